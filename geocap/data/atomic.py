"""Files appear complete or not at all: write to a temporary name beside the target, rename
when done, remove the temporary file on any failure (an interrupted run leaves the old output
or none, never a half-written file)."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_output(path):
    """Yield ``<path>.tmp-<pid>`` to write; on success it replaces ``path``, on failure it is removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
