"""Stop requests (SIGINT, SIGTERM) for long work: a flag first, an exception second.

Within :func:`stop_signals` (the ``geocap`` command line wraps every command in it) a SIGINT or
SIGTERM (1) records a stop request in a process-wide flag and (2) raises :class:`Interrupted`
in the main thread at once, so a command blocked in a long call stops promptly.

The exception alone is not enough: raised while Python runs a finaliser or a weakref callback
(h5py's objects have them) it is printed as "Exception ignored in ..." and lost, and the work
would go on to replace its output and exit 0. So long loops call :func:`check` once per item
(image, step, shard) and every final rename of an output (:mod:`geocap.data.atomic`, the dump's
shards, the study's data folder) calls it just before renaming: a stop request lost as an
exception is raised again there, and no output is replaced after one. A command that returns
normally after a stop request still exits with the signal's status (see :mod:`geocap.cli`).

Depends on the standard library only: every layer may use it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: Optional[int] = None  # the signal number of the first stop request, None without one


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def request_stop(signum: int = signal.SIGINT) -> None:
    """Record a stop request (what the signal handler does, without raising)."""
    global _requested
    if _requested is None:
        _requested = int(signum)


def requested() -> Optional[int]:
    """The signal number of the pending stop request, None without one."""
    return _requested


def clear() -> None:
    """Forget a stop request (at the start and the end of :func:`stop_signals`)."""
    global _requested
    _requested = None


def check() -> None:
    """Raise :class:`Interrupted` when a stop was requested; otherwise do nothing (cheap: call
    it once per item of a long loop and just before renaming an output into place)."""
    if _requested is not None:
        raise Interrupted(_requested)


def _on_signal(signum, frame):
    request_stop(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals():
    """Within the block, SIGINT and SIGTERM record a stop request and raise :class:`Interrupted`
    in the main thread (also when the process inherited SIGINT ignored, as a job started with
    ``&`` from a script does); the previous handlers come back after it. Elsewhere than the main
    thread, nothing changes. The flag is cleared on entry and on exit (read :func:`requested`
    inside the block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear()
