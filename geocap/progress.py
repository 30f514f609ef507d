"""Progress of long work, for a terminal and for a log file alike.

On a terminal: a tqdm bar on stderr. Anywhere else (a log file, a pipe, a batch job, CI): the
same tqdm status as one plain line every ``GEOCAP_PROGRESS_INTERVAL`` seconds (default 30;
0 = every update), so a job that writes to a log still says how far it is. Depends on tqdm only:
every layer (data, jobs, analyses) may use it.
"""
from __future__ import annotations

import os
import re
import sys
from geocap.errors import UsageError

DEFAULT_INTERVAL_S = 30.0


def log_interval() -> float:
    """Seconds between two progress lines when stderr is not a terminal
    (``GEOCAP_PROGRESS_INTERVAL``; ValueError naming it when it is not a number >= 0)."""
    raw = os.environ.get("GEOCAP_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"GEOCAP_PROGRESS_INTERVAL must be a number of seconds >= 0, got {raw!r}")
    return value


# ANSI control sequences: tqdm moves the cursor (ESC [ A) to stack bars open at the same time
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines, without the
    cursor movements of stacked bars (a log cannot show them)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in _CONTROL.sub("", text).replace("\r", "\n").split("\n"):
            line = line.strip()
            if line:
                self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, enabled: bool = True, stream=None, **kwargs):
    """A tqdm progress bar over ``iterable`` (or a manual one: ``total=``, ``.update(n)``) on
    ``stream`` (default stderr): redrawn in place on a terminal, a line every
    :func:`log_interval` seconds elsewhere; ``enabled=False``: the bare iterable / a do-nothing
    bar with the same methods. ``kwargs`` go to tqdm (``total``, ``initial``, ``unit``, ``desc``)."""
    if not enabled:
        return _NoBar(iterable)
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    interval = log_interval()
    return tqdm(iterable, file=_Lines(stream), mininterval=interval, maxinterval=max(interval, 1e-3), ascii=True,
                ncols=100, **kwargs)


class _NoBar:
    def __init__(self, iterable):
        self._it = iterable

    def __iter__(self):
        return iter(self._it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


__all__ = ["DEFAULT_INTERVAL_S", "log_interval", "progress_bar"]
