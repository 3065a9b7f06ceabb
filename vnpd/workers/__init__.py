"""Worker pools: where batches run, behind one WorkerPool interface (``pool.py``).

``local.py`` runs processes on this host, over pipes; ``ray_pool.py`` runs actors on a Ray
cluster, and is imported only when ``[workers] backend = "ray"`` chooses it, so the local
backend never imports Ray. The daemon picks one (``vnpd.daemon.app.make_pool``).
"""
