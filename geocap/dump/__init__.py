"""Attention dumps: record a model's attention over a dataset split into HDF5 shards.

``open_dump(DUMP)`` reads a dump (numpy/h5py only: :mod:`geocap.data.dump_format`, which also
documents the layout); ``dump(...)`` (:mod:`geocap.dump.job`) writes one (its command line,
``geocap dump``, is :mod:`geocap.cli.dump`). Importing this package does not import the model:
``dump`` loads it on first use.
"""
from geocap.data.dump_format import Dump, DumpError, open_dump

__all__ = ["Dump", "DumpError", "dump", "open_dump"]


def __getattr__(name):
    if name == "dump":
        from geocap.dump.job import dump
        return dump
    raise AttributeError(f"module 'geocap.dump' has no attribute {name!r}")
