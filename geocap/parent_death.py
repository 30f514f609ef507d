"""Make this process die with its parent, so that nothing runs on when the process that
started it is gone (a ``torchrun`` launcher SIGKILLed while its ranks, each in a session of its
own, train on; a dump's writer child whose job died). Depends on the standard library only, so
that light child processes can use it.

Two mechanisms, as neither alone is enough:

- Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills this process when the *thread*
  that started it exits (start it from a thread that lives as long as the parent's work);
- a daemon thread that checks ``os.getppid()`` every ``poll_s`` seconds and SIGKILLs this
  process once it differs from ``parent_pid`` (the process was re-parented: the parent died),
  which also covers other systems and a parent that died before the prctl.

SIGKILL, not a catchable signal: a rank blocked in a collective whose peers are gone would not
run a Python handler for minutes. What it was writing stays under a temporary name, which the
next run removes (:mod:`geocap.data.atomic`).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_S = 1.0

_watched: set = set()


def die_with_parent(parent_pid: int | None = None, *, poll_s: float = POLL_S) -> None:
    """From now on, this process dies (SIGKILL) soon after ``parent_pid`` (default: the current
    parent) does; at once if it is already gone. Calling it again for the same parent does nothing."""
    parent = os.getppid() if parent_pid is None else int(parent_pid)
    if parent in _watched:
        return
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:           # the parent died before the prctl
        os._exit(1)
    _watched.add(parent)
    threading.Thread(target=_watch, args=(parent, poll_s), name="geocap-parent-watch", daemon=True).start()


def _watch(parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["die_with_parent"]
