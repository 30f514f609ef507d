"""Files appear complete or not at all: write to a temporary name beside the target, rename
when done, remove the temporary file on any failure (an interrupted run leaves the old output
or none, never a half-written file). Folders likewise: :func:`replace_folder` swaps a folder
written under a temporary name into place.

The temporary name of ``path`` is ``<path>.tmp-<pid>``. A process killed outright (SIGKILL, a
power cut) cannot remove its own, so each write first removes the *stale* temporaries of its
target: those whose pid is no longer alive on this machine (a live writer's file is kept)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil

from geocap import stop


def temporary_name(path, pid: int | None = None) -> str:
    """``<path>.tmp-<pid>`` (default: this process's pid)."""
    return f"{os.fspath(path)}.tmp-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a zombie or another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_folder(out, pid: int | None = None) -> str:
    """``<parent>/.<name>.tmp-<pid>``: where a folder ``out`` is written before
    :func:`replace_folder` puts it in place (hidden, beside ``out``: on the same filesystem)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(out)))
    return os.path.join(folder, f".{name}.tmp-{os.getpid() if pid is None else pid}")


def remove_stale_temporary_folders(out) -> list:
    """Delete the folders ``.<name>.tmp-<pid>`` beside ``out`` (:func:`temporary_folder`) whose
    pid is no longer alive (what a killed writer of ``out`` left); returns the names removed."""
    folder, name = os.path.split(os.path.abspath(os.fspath(out)))
    return _remove_stale(folder, re.compile(r"\." + re.escape(name) + r"\.tmp-(\d+)"))


def remove_stale_temporaries(path) -> list:
    """Delete the temporaries ``<path>.tmp-<pid>`` of ``path`` whose pid is no longer alive
    (what a killed writer of ``path`` left); returns the names removed, sorted. Other files of
    the folder, this process's own temporary and those of live processes are left alone."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return _remove_stale(folder, re.compile(re.escape(name) + r"\.tmp-(\d+)"))


def _remove_stale(folder: str, pattern) -> list:
    """Remove the entries of ``folder`` matching ``pattern`` (group 1: a pid) whose pid is dead."""
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return []
    removed = []
    for entry in sorted(entries):
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        entry_path = os.path.join(folder, entry)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(entry_path) and not os.path.islink(entry_path):
                shutil.rmtree(entry_path)
            else:
                os.remove(entry_path)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output(path):
    """Yield ``<path>.tmp-<pid>`` to write; on success it replaces ``path``, on failure (any
    exception, KeyboardInterrupt included) it is removed, and so it is when a stop was requested
    (:func:`geocap.stop.check`, just before the rename). The file is flushed to disk (fsync)
    before the rename, so a power cut leaves the old file or the new one, never an empty one.
    Stale temporaries of ``path`` left by dead processes are removed first."""
    path = os.fspath(path)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        stop.check()                # a stop request lost as an exception replaces nothing
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fsync_file(path) -> None:
    """Flush the file ``path`` to disk (``os.fsync``); nothing when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def replace_folder(tmp, out) -> None:
    """Put the complete folder ``tmp`` at ``out``, replacing any folder there: the old one is
    renamed to ``.<name>.old-<pid>`` beside it, ``tmp`` renamed to ``out``, then the old one
    removed; if the second rename fails the old folder is put back. ``tmp`` and ``out`` must be
    on one filesystem (write ``tmp`` beside ``out``)."""
    tmp, out = os.fspath(tmp), os.fspath(out)
    folder, name = os.path.split(os.path.abspath(out))
    old = os.path.join(folder, f".{name}.old-{os.getpid()}")
    stop.check()                    # a stop request lost as an exception replaces nothing
    if os.path.exists(out):
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if os.path.exists(old):
            os.rename(old, out)
        raise
    if os.path.exists(old):
        shutil.rmtree(old)
