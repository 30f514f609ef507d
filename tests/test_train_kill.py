"""Kill-and-resume of ``geocap train``: a run SIGKILLed at any moment resumes from its last
checkpoint and ends bitwise where an uninterrupted run ends; no half-written checkpoint is ever
visible (a kill during a save leaves the previous checkpoint, plus at most a stale temporary
file that nothing reads).

Every run is a real ``geocap train`` subprocess on tiny synthetic data, one thread each so the
runs are bitwise comparable: ``python -m geocap train ...``, except the one killed during a save,
which runs the same command line through ``geocap.cli.main`` behind a torch.save that dies halfway.
Each (re)start deletes the temporary files the killed processes left, so the finished run folder
holds exactly the run's files."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from geocap.checkpoint import CheckpointError, load_checkpoint
from geocap.train import CONFIG_FILE, LATEST, METRICS
from helpers import synth_data_dir

STEPS, EVERY = 30, 3
RUN_FILES = {LATEST, METRICS, CONFIG_FILE}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TIMEOUT = 120


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 synthetic images (32 train), D = 16, as geocap synth + prepro lay them out."""
    return synth_data_dir(tmp_path_factory.mktemp("killdata"))


def train_args(data_dir, out):
    return ["train", "--data", data_dir, "--out", str(out), "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--batch-size", "4",
            "--dropout", "0.2", "--optimizer", "adamw", "--lr", "3e-3", "--warmup", "5", "--val-every", "0",
            "--log-every", "1", "--device", "cpu", "--no-progress"]


def start(args, prelude: str = ""):
    """``python -m geocap ARGS`` (or, with a ``prelude``, that code then geocap.cli.main(ARGS))."""
    if prelude:
        code = prelude + "\nimport sys\nfrom geocap.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "geocap", *args]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing blocks while the test polls
    proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(proc) -> None:
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, f"geocap train failed ({proc.returncode}):\n{output(proc)}"


def inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def kill_after_next_checkpoint(proc, run, delay: float) -> None:
    """Wait until ``proc`` has renamed a new checkpoint-latest.pt into place, wait ``delay``
    seconds more, then SIGKILL it (it must still be running: the kill lands mid-run)."""
    latest = os.path.join(run, LATEST)
    before = inode(latest)
    deadline = time.monotonic() + TIMEOUT
    while inode(latest) in (before, None):
        assert proc.poll() is None, f"the run ended before its next checkpoint:\n{output(proc)}"
        assert time.monotonic() < deadline, "no new checkpoint appeared"
        time.sleep(0.01)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before it could be killed; lower the delay"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def metrics_lines(run) -> list:
    with open(os.path.join(run, METRICS), encoding="utf-8") as fh:
        return fh.read().splitlines()


def line_step(line: str) -> int:
    return json.loads(line)["step"]


def check_after_kill(run, killed_pids) -> int:
    """The run folder holds the run's files, a complete checkpoint, and at most temporary files
    of the killed processes. Returns the checkpoint's step."""
    stale = {f"{name}.tmp-{pid}" for name in RUN_FILES for pid in killed_pids}
    names = set(os.listdir(run))
    assert RUN_FILES <= names and names <= RUN_FILES | stale, sorted(names)
    checkpoint = load_checkpoint(os.path.join(run, LATEST))  # never half-written
    assert checkpoint.step % EVERY == 0 and 0 < checkpoint.step < STEPS
    return checkpoint.step


def check_same_as_reference(run, ref_run) -> None:
    ref = load_checkpoint(os.path.join(ref_run, LATEST))
    final = load_checkpoint(os.path.join(run, LATEST))
    assert final.step == STEPS
    assert final.model_state.keys() == ref.model_state.keys()
    assert all(torch.equal(final.model_state[k], ref.model_state[k]) for k in ref.model_state)  # bitwise
    assert final.data_position == ref.data_position
    assert json.dumps(final.optimizer_state["param_groups"]) == json.dumps(ref.optimizer_state["param_groups"])
    for i, state in ref.optimizer_state["state"].items():
        assert all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(final.optimizer_state["state"][i][k]))
                   for k in state)
    # every step trained exactly once, with the uninterrupted run's losses
    def losses(lines):
        return [(e["step"], e["loss"]) for e in map(json.loads, lines) if e["kind"] == "train"]
    assert losses(metrics_lines(run)) == losses(metrics_lines(ref_run))
    assert [s for s, _ in losses(metrics_lines(run))] == list(range(1, STEPS + 1))


# Kills the process in the middle of its second checkpoint save: half the bytes of the file are
# written to the temporary name, then SIGKILL (what a kill during torch.save leaves behind).
KILL_DURING_SECOND_SAVE = """
import io, os, signal, torch
_save, _calls = torch.save, []
def _half_save_then_die(obj, f, *args, **kwargs):
    _calls.append(f)
    if len(_calls) == 2:
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = _half_save_then_die
"""


def test_killed_during_a_save_and_at_a_random_moment_resumes_exactly(data_dir, tmp_path):
    """An uninterrupted run (in parallel) against one run killed twice: first in the middle of
    its second checkpoint save, then, resumed, at a random moment after its next checkpoint;
    the second resume trains to the end."""
    args = train_args(data_dir, tmp_path / "run")
    run = tmp_path / "run"
    reference = start(train_args(data_dir, tmp_path / "reference"))

    # 1. killed while writing its second checkpoint (step 2 * EVERY)
    proc = start(args, prelude=KILL_DURING_SECOND_SAVE)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, output(proc)
    killed = [proc.pid]
    temporary = run / f"{LATEST}.tmp-{proc.pid}"
    assert temporary.is_file()  # the half-written file exists, under its temporary name only
    with pytest.raises(CheckpointError, match="tmp"):
        load_checkpoint(temporary)
    snapshots = [(check_after_kill(run, killed), metrics_lines(run))]
    assert snapshots[0][0] == EVERY  # the first checkpoint, intact

    # 2. resumed, then killed at a random moment after its first new checkpoint
    seed = time.time_ns() % 2**32
    delay = random.Random(seed).uniform(0.0, 0.1)
    proc = start(args + ["--resume"])
    killed.append(proc.pid)
    kill_after_next_checkpoint(proc, run, delay)
    snapshots.append((check_after_kill(run, killed), metrics_lines(run)))
    assert snapshots[1][0] > snapshots[0][0], (seed, delay)
    assert not temporary.exists()  # the resumed run deleted the first kill's half-written file at its start

    # 3. resumed to the end: bitwise the uninterrupted run
    finish(start(args + ["--resume"]))
    finish(reference)
    check_same_as_reference(run, tmp_path / "reference")
    # each resume started at its checkpoint's step: the log lines up to that step are still the
    # killed process's own (same timestamps); only later ones were dropped and trained again
    final = metrics_lines(run)
    for step, lines in snapshots:
        kept = [line for line in lines if line_step(line) <= step]
        assert [line for line in final if line_step(line) <= step] == kept, (seed, delay)
    # what the kills left was deleted when the runs restarted: only the run's own files remain
    assert sorted(os.listdir(run)) == sorted(RUN_FILES)
