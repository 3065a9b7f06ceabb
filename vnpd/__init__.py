"""vnpd: ESM-2 protein embeddings as a service (inbox FASTA -> outbox HDF5)."""

__version__ = "0.1.0"
