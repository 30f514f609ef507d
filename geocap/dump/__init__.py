"""Attention dumps: record a model's attention over a dataset split into HDF5 shards.

``open_dump(DUMP)`` reads a dump (numpy/h5py only: :mod:`geocap.data.dump_format`, which also
documents the layout); ``dump(...)`` (:mod:`geocap.dump.job`) writes one and
``add_dump_parser`` (:mod:`geocap.dump.cli`) is the ``geocap dump`` command. Importing this
package does not import the model: ``dump`` and ``add_dump_parser`` load it on first use.
"""
from geocap.data.dump_format import Dump, DumpError, open_dump

__all__ = ["Dump", "DumpError", "add_dump_parser", "dump", "open_dump", "run_dump"]


def __getattr__(name):
    if name == "dump":
        from geocap.dump.job import dump
        return dump
    if name in ("add_dump_parser", "run_dump"):
        from geocap.dump import cli
        return getattr(cli, name)
    raise AttributeError(f"module 'geocap.dump' has no attribute {name!r}")
