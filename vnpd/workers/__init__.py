"""Worker pools: where batches run, behind one WorkerPool interface."""
