"""The command line: `geocap demo` checks every backend and exits 0; `python -m geocap` works."""
import subprocess
import sys

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
