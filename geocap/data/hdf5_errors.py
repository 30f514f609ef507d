"""h5py's errors on a damaged file, as one :class:`~geocap.data.items.DataError` naming it.

Corrupt metadata (superblock, object headers, local heaps, B-trees) does not always surface as
``OSError``: depending on which HDF5 call meets it, h5py raises ``RuntimeError`` (e.g. "Unable
to synchronously check link existence"), ``KeyError`` (opening an object whose header is
damaged) or ``ValueError``. Readers wrap their HDF5 access in :func:`named_hdf5_errors`.
"""
from __future__ import annotations

import contextlib

from geocap.data.items import DataError

HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


@contextlib.contextmanager
def named_hdf5_errors(where: str, what: str = "HDF5 file"):
    """Inside the block, an h5py error becomes ``DataError("<where>: unreadable <what> (corrupt
    or truncated?): <h5py's message>")``; a DataError raised in the block passes unchanged.
    ``where`` names the file (and the image id, where there is one)."""
    try:
        yield
    except DataError:
        raise
    except HDF5_ERRORS as err:
        message = str(err).strip("'\"") or type(err).__name__
        raise DataError(f"{where}: unreadable {what} (corrupt or truncated?): {message}") from None
