"""h5py's errors on a damaged file, as one :class:`~geocap.data.items.DataError` naming it.

Corrupt metadata (superblock, object headers, local heaps, B-trees) does not always surface as
``OSError``: depending on which HDF5 call meets it, h5py raises ``RuntimeError`` (e.g. "Unable
to synchronously check link existence"), ``KeyError`` (opening an object whose header is
damaged) or ``ValueError``. Readers open their files with :func:`open_hdf5` and wrap their
HDF5 access in :func:`named_hdf5_errors`.

Only errors raised from inside h5py are renamed (and chained, so their origin stays visible
with a traceback): a ``KeyError`` or ``ValueError`` raised by geocap's own code in the block is a
bug and passes unchanged.
"""
from __future__ import annotations

import contextlib
import os

from geocap.data.items import DataError

HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


@contextlib.contextmanager
def named_hdf5_errors(where: str, what: str = "HDF5 file"):
    """Inside the block, an h5py error becomes ``DataError("<where>: unreadable <what> (corrupt
    or truncated?): <h5py's message>")``; a DataError raised in the block passes unchanged.
    ``where`` names the file (and the image id, where there is one). Errors not raised from
    inside h5py (or the OS) pass unchanged."""
    try:
        yield
    except DataError:
        raise
    except HDF5_ERRORS as err:
        if not isinstance(err, OSError) and not raised_in_h5py(err):
            raise
        message = str(err).strip("'\"") or type(err).__name__
        raise DataError(f"{where}: unreadable {what} (corrupt or truncated?): {message}") from err


def raised_in_h5py(err: BaseException) -> bool:
    """Whether ``err`` was raised from inside the h5py package (some frame of its traceback,
    after the block's own, runs h5py's code)."""
    tb = err.__traceback__
    while tb is not None:
        parts = os.path.normpath(tb.tb_frame.f_code.co_filename).split(os.sep)
        if "h5py" in parts:
            return True
        tb = tb.tb_next
    return False


def open_hdf5(path, what: str = "HDF5 file", error: type = DataError, **options):
    """``h5py.File(path, "r", **options)``; ``error`` (DataError unless given) naming the file
    when h5py cannot open it: ``"<path>: not a readable <what>: <h5py's message>"``."""
    import h5py

    try:
        return h5py.File(os.fspath(path), "r", **options)
    except OSError as err:
        raise error(f"{path}: not a readable {what}: {err}") from None
