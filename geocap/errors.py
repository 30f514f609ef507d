"""geocap's own error types: what the ``geocap`` command line reports as one line.

Every kind subclasses :class:`GeocapError` and, for the callers that catch ``ValueError``,
``ValueError``. Any other exception escaping a command is a bug (or an input geocap does not
check yet) and keeps its traceback (see :mod:`geocap.cli`).

- :class:`UsageError`: bad options or arguments (the message names the option).
- :class:`DataError`: bad input data (the message names the file and, where there is one, the image id).
- :class:`DumpError`: a dump or one of its files that cannot be read as it claims.
- :class:`CheckpointError`: a file that is not a readable geocap checkpoint, or one that does not fit.

Depends on the standard library only: every layer may raise them.
"""
from __future__ import annotations


class GeocapError(ValueError):
    """Base of geocap's own errors (a ValueError, as the library has always raised)."""


class UsageError(GeocapError):
    """Bad options or arguments; the message names the option."""


class DataError(GeocapError):
    """Bad input data: the message names the file and, where there is one, the image id."""


class DumpError(GeocapError):
    """A dump (or one of its files) that cannot be read as it claims; the message names the file."""


class CheckpointError(GeocapError):
    """A file that is not a readable geocap checkpoint (or not one that fits); the message names the file."""
