"""The command line: `geocap demo` checks every backend and exits 0; `python -m geocap` works;
SIGINT and SIGTERM stop a command cleanly."""
import subprocess
import sys

import pytest

from geocap.cli import main


def test_demo_checks_every_backend(capsys):
    assert main(["demo", "--batch", "1", "--heads", "2", "--n", "9", "--head-dim", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "all backends agree with the reference" in out
    for dtype in ("float32", "float16", "bfloat16"):
        assert dtype in out
    assert "triton" in out and "SDPA + precomputed bias" in out


def test_bad_arguments_are_reported(capsys):
    assert main(["demo", "--n", "0"]) == 2
    assert "n must be at least 1" in capsys.readouterr().err
    assert subprocess.run([sys.executable, "-m", "geocap", "--version"], capture_output=True, text=True,
                          check=True).stdout.startswith("geocap ")


# -- SIGINT / SIGTERM stop a long command: old output untouched, no temporary file, 130 / 143 ------
# The command is `geocap prepro features` through geocap.cli.main, with the store writer slowed
# down (a run of ~10 s) and a marker file written once the temporary store is being filled.
SLOW_WRITER = """
import os, sys, time
import geocap.data.store as store
_append, _marker = store._Writer.append, sys.argv.pop(1)
def _slow_append(self, *args):
    _append(self, *args)
    if not os.path.exists(_marker):
        open(_marker, "w").close()
    time.sleep(0.05)
store._Writer.append = _slow_append
from geocap.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupt_prepro(tmp_path, sig, *, inherit_ignored_sigint=False):
    import os
    import signal
    import time

    import numpy as np

    from geocap.data.items import ImageFeatures
    from geocap.data.store import write_store

    rng = np.random.default_rng(0)
    images = [ImageFeatures(image_id=i, features=rng.standard_normal((3, 8)).astype(np.float32),
                            boxes=np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (3, 1)))
              for i in range(200)]
    source, out, marker = tmp_path / "source.h5", tmp_path / "out.h5", tmp_path / "started"
    write_store(source, images, progress=False)
    write_store(out, images[:5], progress=False)
    before = out.read_bytes()
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherit_ignored_sigint else None
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(marker), "prepro", "features", "--from",
                             "store", str(source), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.02)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == [f"out.h5.tmp-{proc.pid}"]
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    return proc.returncode, time.monotonic() - sent, stdout, stderr, out.read_bytes() == before, [
        n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("sig,ignored,code", [("SIGINT", False, 130), ("SIGINT", True, 130), ("SIGTERM", False, 143)],
                         ids=["sigint", "sigint-inherited-ignored", "sigterm"])
def test_a_signal_stops_a_long_command_and_keeps_the_old_output(tmp_path, sig, ignored, code):
    """A SIGINT (also when the process inherited it ignored, as a job started with `&` from a
    script does) or a SIGTERM in the middle of `geocap prepro features`: it stops within a
    second or two, exits 130 / 143 with one line, the old store is byte-identical and the
    temporary file is gone."""
    import signal
    rc, seconds, stdout, stderr, unchanged, temporaries = _interrupt_prepro(
        tmp_path, getattr(signal, sig), inherit_ignored_sigint=ignored)
    assert rc == code, stderr
    assert seconds < 5
    assert stderr.strip().splitlines() == [f"geocap: interrupted by {sig}"]
    assert "wrote" not in stdout
    assert unchanged and temporaries == []
