"""Attention dumps: record a model's attention over a dataset split into HDF5 shards (issue 5)."""
