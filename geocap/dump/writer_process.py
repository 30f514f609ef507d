"""The shard writer in a child process: :class:`WriterProcess` runs :class:`ShardWriter` in a
process of its own, fed through a bounded queue, so the compression (lzf runs inside h5py's
write call, holding the GIL) does not stop the model's process.

Protocol (one child per dump job and rank; shards one after another), pickled messages over two
pipes (``multiprocessing.connection``):

- the parent sends ``("open", seq, path, kwargs, collector)``, then ``("image", seq, records)`` per
  image (a list of :class:`~geocap.data.attention_record.Record`), then ``("close", seq,
  stats_state)`` or ``("abort", seq)``; ``("stop",)`` ends the child;
- ``collector`` (a stats-only dump's) is None or ``(collector_class, shard_images, total_images)``:
  the child then makes ``collector_class()``, tells it its share (``shard_share``, when it has one),
  updates it with each record before writing it (the records' maps dropped, as the parent does
  inline) and stores its ``state()`` at the close, so the statistics cost the writer's core, not
  the model's;
- the child answers ``("closed", seq, bytes, n_records, seconds, sha256)`` after the rename, or
  ``("error", seq, type_name, message)`` on the first error of shard ``seq`` (it then removes
  the temporary file and drops that shard's remaining messages).

The parent queues at most ``queue_images`` messages (a feeder thread pickles them into the pipe,
whose buffer holds at most one more), so memory stays bounded and the model waits when the writer
falls behind. Every wait of the parent polls with a timeout and checks that the child is alive,
so a dead writer raises :class:`~geocap.data.dump_format.DumpError` naming the shards it was
writing (and how it died), never hangs.

The child is a fresh interpreter (``python -m geocap.dump.writer_process``), not a
``multiprocessing`` fork or spawn: fork is unsafe once torch runs threads, and spawn re-runs the
parent's ``__main__`` in the child (a user script without a ``__main__`` guard would dump again;
one with a guard still imports torch there). The child imports only numpy, h5py and
:mod:`geocap.dump.writer` (~0.3 s), and for a stats-only dump its collector's module (the analyses:
~0.2 s more; they import torch only for records without stored entropies or with features). It
dies with its parent: ``PR_SET_PDEATHSIG`` = SIGKILL on Linux (sent when the thread that started it
exits: start it from the thread that runs the job), plus a check of ``os.getppid()`` every poll; so
a SIGKILLed dump's rerun never races an orphan writer. SIGINT is ignored in the child: the parent aborts it.
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Optional, Sequence

from geocap.data.dump_format import DumpError
from geocap.parent_death import die_with_parent as _die_with_parent

QUEUE_IMAGES = 32         # messages (images) queued for the writer at most (coco36 with maps: ~1 MB each)
POLL_S = 0.5              # how often a waiting side checks that the other is alive

__all__ = ["QUEUE_IMAGES", "WriterProcess"]


def new_collector(collector_class, shard_images: int, total_images: int):
    """A fresh ``collector_class()`` for a shard of ``shard_images`` of ``total_images`` images (told
    its share when it has ``shard_share``, so it stores only what merging can need)."""
    collector = collector_class()
    if hasattr(collector, "shard_share"):
        collector.shard_share(shard_images, total_images)
    return collector


def collect_records(collector, records) -> None:
    """Update ``collector`` with one image's records (with its ``update_image`` when it has one, else
    ``update`` per record), then drop their maps (a stats-only shard stores none)."""
    if hasattr(collector, "update_image"):
        collector.update_image(records)
    else:
        for r in records:
            collector.update(r)
    for r in records:
        r.encoder_self = r.decoder_self = r.cross = None


def _serve(commands: Connection, replies: Connection, parent_pid: int) -> None:
    """The child's loop (see the module doc)."""
    from geocap.dump.writer import ShardWriter

    writer, collector, seq, failed = None, None, None, False
    while True:
        if not commands.poll(POLL_S):
            if os.getppid() != parent_pid:
                os._exit(1)            # the temporary file is left: the rerun removes it
            continue
        try:
            msg = commands.recv()
        except EOFError:               # the parent closed the pipe (or died)
            msg = ("stop",)
        op = msg[0]
        if op == "stop":
            if writer is not None:
                writer.abort()
            return
        try:
            if op == "open":
                if writer is not None:
                    writer.abort()
                writer, collector, failed = None, None, False
                seq = msg[1]
                writer = ShardWriter(msg[2], **msg[3])
                collector = None if msg[4] is None else new_collector(*msg[4])
            elif msg[1] != seq or failed:
                continue                                 # a failed or finished shard's leftovers
            elif op == "image":
                if collector is not None:
                    collect_records(collector, msg[2])
                writer.add_image(msg[2])
            elif op == "close":
                size = writer.close(msg[2] if collector is None else collector.state())
                replies.send(("closed", seq, size, writer.n_records, writer.seconds, writer.sha256))
                writer = None
            elif op == "abort":
                writer.abort()
                writer = None
        except Exception as err:                        # reported to the parent, which raises it
            failed = True
            if writer is not None:
                writer.abort()
                writer = None
            replies.send(("error", seq, type(err).__name__, str(err)))


class WriterProcess:
    """A writer child process (see the module doc). Use :meth:`open` per shard, then
    :meth:`add_image` per image and :meth:`close` (waits; returns the shard's size in bytes), or
    :meth:`send_close` (does not wait: the next shard can start while the child finishes this one)
    and later :meth:`collect`; or :meth:`abort`; :meth:`stop` at the end (also a context manager).

    After :meth:`close`: ``n_records``, ``child_seconds`` (time in the child's ShardWriter) and
    ``sha256`` of that shard. ``seconds``: the parent's time in this object since :meth:`open`
    (queueing the records, waiting for queue room and for the close), i.e. what writing costs the
    model's process apart from pickling, which the feeder thread does. Errors of the child's
    writer are raised here: ValueError for its ValueErrors (same message), RuntimeError
    otherwise; a dead child raises DumpError naming the shard files it was writing.
    """

    def __init__(self, queue_images: int = QUEUE_IMAGES):
        if isinstance(queue_images, bool) or not isinstance(queue_images, int) or queue_images < 1:
            raise ValueError(f"queue_images must be an int >= 1, got {queue_images!r}")
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "geocap.dump.writer_process", str(cmd_r), str(rep_w), str(os.getpid())],
                pass_fds=(cmd_r, rep_w), env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (cmd_r, cmd_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(cmd_r)
        os.close(rep_w)
        self.pid = self._proc.pid
        self._commands = Connection(cmd_w, readable=False)
        self._replies = Connection(rep_r, writable=False)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_images)
        self._feeder_error: Optional[BaseException] = None
        self._feeder = threading.Thread(target=self._feed, name="geocap-writer-feeder", daemon=True)
        self._feeder.start()
        self._seq = 0
        self._open = False
        self._pending: set = set()        # closing shards (their close queued, its reply not yet in)
        self._paths: dict = {}            # seq -> shard path, of the open and the closing shards
        self._folder: Optional[str] = None    # the folder of the last shard opened
        self._done: list = []
        self.seconds = self.child_seconds = 0.0
        self.n_records = 0
        self.sha256: Optional[str] = None

    # -- plumbing
    def _feed(self) -> None:
        """Feeder thread: pickles the queued messages into the pipe (blocks while it is full)."""
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            try:
                self._commands.send(msg)     # pickles it whole first: a pickling error sends nothing
            except Exception as err:         # the child died (broken pipe), the pipe closed, or pickling failed
                self._feeder_error = err
                return

    def _died(self) -> DumpError:
        """The error for a child that ended on its own: it names the shards it was writing."""
        code = self._proc.returncode
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        shards = [self._paths[seq] for seq in sorted(self._paths)]
        where = ", ".join(shards) if shards else (self._folder or "no dump") + " (no shard open)"
        folder = self._folder
        what = "this shard" if len(shards) == 1 else "these shards" if shards else "the dump"
        return DumpError(f"{where}: the shard writer process {self.pid} died ({how}) while writing {what}"
                         + (f"; rerun the same command to resume the dump {folder}" if folder else ""))

    def _check(self) -> None:
        if self._proc.poll() is not None:
            raise self._died()
        if self._feeder_error is not None or not self._feeder.is_alive():
            err = self._feeder_error
            if err is None or isinstance(err, OSError):
                # a broken pipe usually means the child is dying: give it a moment to be reaped, so
                # the error says what happened rather than how it was noticed
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=2.0)
                if self._proc.poll() is not None:
                    raise self._died()
            raise RuntimeError(f"could not send to the shard writer process {self.pid}: "
                               f"{type(err).__name__}: {err}")

    def _raise(self, reply) -> None:
        _, seq, kind, message = reply
        self._pending.discard(seq)
        self._paths.pop(seq, None)
        if seq == self._seq:
            self._open = False
        from geocap import errors
        own = getattr(errors, kind, None)                # geocap's own error types keep their type
        if isinstance(own, type) and issubclass(own, errors.GeocapError):
            raise own(message)
        if kind == "ValueError":
            raise ValueError(message)
        raise RuntimeError(f"shard writer process: {kind}: {message}")

    def _put(self, msg) -> None:
        while True:
            self._check()
            try:
                self._queue.put(msg, timeout=POLL_S)
                return
            except queue.Full:
                self._poll()

    def _reply(self, timeout: float):
        """The next reply, or None when none came within ``timeout`` s."""
        try:
            if self._replies.poll(timeout):
                return self._replies.recv()
        except EOFError:
            pass
        return None

    def _take(self, reply) -> None:
        """Keep a "closed" reply of a pending shard; raise an "error" reply of the open or a pending one."""
        seq = reply[1]
        if reply[0] == "error" and (seq in self._pending or (self._open and seq == self._seq)):
            self._raise(reply)
        if reply[0] == "closed" and seq in self._pending:
            self._pending.discard(seq)
            self._paths.pop(seq, None)
            self._done.append(reply[1:])

    def _poll(self) -> None:
        """Take the replies that came (raising an error of the open or a pending shard)."""
        while True:
            reply = self._reply(0)
            if reply is None:
                return
            self._take(reply)

    # -- the ShardWriter's calls
    def open(self, path, *, collector=None, **kwargs) -> int:
        """Start shard ``path`` (``kwargs``: :class:`~geocap.dump.writer.ShardWriter`'s); its
        sequence number (what :meth:`collect` reports it by). ``seconds`` restarts at 0.
        ``collector``: None, or ``(collector_class, shard_images, total_images)`` to have the child
        update a stats-only collector with every record and store its state at the close (the
        ``stats_state`` given to :meth:`close` is then ignored; the class must be importable by
        name)."""
        t0 = time.perf_counter()
        if self._open:
            raise ValueError("open: the previous shard is still open (close or abort it first)")
        self._seq += 1
        self.seconds = 0.0
        self._paths[self._seq] = os.fspath(path)
        self._folder = os.path.dirname(os.fspath(path))
        self._put(("open", self._seq, os.fspath(path), kwargs, collector))
        self._open = True
        self.seconds += time.perf_counter() - t0
        return self._seq

    def add_image(self, records: Sequence) -> None:
        """Queue one image's records (waits while the queue is full)."""
        t0 = time.perf_counter()
        if not self._open:
            raise ValueError("add_image: no shard open")
        self._poll()
        self._put(("image", self._seq, list(records)))
        self.seconds += time.perf_counter() - t0

    def send_close(self, stats_state: Optional[dict] = None) -> int:
        """Queue the close of the open shard (flush, ``stats/``, rename) without waiting for it;
        its sequence number. The next shard may be opened at once; :meth:`collect` reports it."""
        t0 = time.perf_counter()
        if not self._open:
            raise ValueError("close: no shard open")
        self._put(("close", self._seq, stats_state))
        self._open = False
        self._pending.add(self._seq)
        self.seconds += time.perf_counter() - t0
        return self._seq

    def collect(self, block: bool = False) -> list:
        """The shards closed since the last call: ``(seq, bytes, n_records, child_seconds, sha256)`` each;
        with ``block``, after waiting for at least one while any is closing (so the caller can
        list each shard as soon as it is complete). Raises a closing shard's error."""
        self._poll()
        while block and self._pending and not self._done:
            reply = self._reply(POLL_S)
            if reply is None:
                self._check()
            else:
                self._take(reply)
        done, self._done = self._done, []
        return done

    def close(self, stats_state: Optional[dict] = None) -> int:
        """Close the open shard and wait for it; its size in bytes (``n_records``,
        ``child_seconds`` and ``sha256``: that shard's)."""
        t0 = time.perf_counter()
        seq = self.send_close(stats_state)
        while seq in self._pending:
            reply = self._reply(POLL_S)
            if reply is None:
                self._check()
            else:
                self._take(reply)
        for i, (done_seq, size, self.n_records, self.child_seconds, self.sha256) in enumerate(self._done):
            if done_seq == seq:
                del self._done[i]
                break
        self.seconds += time.perf_counter() - t0
        return size

    def abort(self) -> None:
        """Drop the current shard: the child removes its temporary file."""
        if self._open:
            self._open = False
            self._paths.pop(self._seq, None)
            try:
                self._put(("abort", self._seq))
            except (RuntimeError, DumpError):       # the child is gone: nothing left to abort
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """End the child (aborting an open shard); killed when it has not ended within ``timeout`` s."""
        if self._proc.poll() is None:
            self.abort()
            with_room = time.monotonic() + timeout
            while self._feeder.is_alive() and time.monotonic() < with_room:
                try:
                    self._queue.put(("stop",), timeout=POLL_S)
                    break
                except queue.Full:
                    if self._proc.poll() is not None:
                        break
            if not self._feeder.is_alive():
                self._commands.close()            # the child reads EOF and ends
            try:
                self._proc.wait(max(0.0, with_room - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with_room = True
        try:
            self._queue.put_nowait(None)          # ends the feeder
        except queue.Full:
            with_room = False
        self._commands.close()                    # a feeder blocked on the pipe gets an error and ends
        if with_room:
            self._feeder.join(5)
        self._replies.close()

    def __enter__(self) -> "WriterProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str]) -> int:
    """The child: ``python -m geocap.dump.writer_process CMD_FD REPLY_FD PARENT_PID``."""
    cmd_fd, reply_fd, parent_pid = (int(a) for a in argv)
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(Connection(cmd_fd, writable=False), Connection(reply_fd, readable=False), parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
