"""The output file: HDF5 schema, writing, verifying and atomic publishing."""
