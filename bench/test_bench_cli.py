"""Start-up of the command line: wall time of ``geocap --help`` and of one subcommand's help.

``geocap --help`` builds only the top-level parser (subcommand modules are imported when their
subcommand runs), so it must not import torch or matplotlib: the goal is well under 1 s on a
fresh clone. ``geocap train --help`` imports the training stack (torch) and shows what a
subcommand costs before it starts its work. Each timed call is a fresh ``python -m geocap``
process; ``extra_info["imports_torch"]`` records whether the process imported torch.
Run: ``python -m pytest bench/test_bench_cli.py --benchmark-only -q``.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = ("import runpy, sys; sys.argv = ['geocap'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('geocap', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('imports_torch', 'torch' in sys.modules, file=sys.stderr)")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=["help", "train-help"])
def test_bench_cli_startup(benchmark, argv):
    def run():
        return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)

    done = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.group = "cli start-up"
    benchmark.extra_info["variant"] = "geocap " + " ".join(argv)
    benchmark.extra_info["imports_torch"] = "imports_torch True" in done.stderr
    assert "usage: geocap" in done.stdout
