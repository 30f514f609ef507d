"""The command line: `geocap kernel-check` checks every backend and exits 0 (`geocap demo`, its old
name, too, with a note); `python -m geocap` works; SIGINT and SIGTERM stop a command cleanly; user
errors are one line, bugs keep their traceback; the parsers live in geocap.cli only."""
import subprocess
import sys

import pytest

from geocap.cli import main


def test_kernel_check_checks_every_backend(capsys):
    assert main(["kernel-check", "--batch", "1", "--heads", "2", "--n", "9", "--head-dim", "32",
                 "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "all backends agree with the reference" in out
    for dtype in ("float32", "float16", "bfloat16"):
        assert dtype in out
    assert "triton" in out and "SDPA + precomputed bias" in out
    assert "deprecated" not in captured.err


def test_demo_is_a_deprecated_name_of_kernel_check(capsys, monkeypatch):
    import geocap.demo

    calls = []
    monkeypatch.setattr(geocap.demo, "run_demo", lambda **options: calls.append(options) or 0)
    assert main(["demo", "--n", "9"]) == 0
    assert capsys.readouterr().err == "geocap: 'demo' is deprecated; use 'geocap kernel-check'\n"
    assert main(["kernel-check", "--n", "9"]) == 0
    assert capsys.readouterr().err == ""
    assert calls[0] == calls[1] and calls[0]["n"] == 9


def test_bad_arguments_are_reported(capsys):
    assert main(["kernel-check", "--n", "0"]) == 2
    assert "n must be at least 1" in capsys.readouterr().err
    assert subprocess.run([sys.executable, "-m", "geocap", "--version"], capture_output=True, text=True,
                          check=True).stdout.startswith("geocap ")


# -- SIGINT / SIGTERM stop a long command: old output untouched, no temporary file, 130 / 143 ------
# The command is `geocap prepro features` through geocap.cli.main, with the store writer slowed
# down (a run of ~10 s) and a marker file written once the temporary store is being filled. In
# the "finaliser" mode the wait happens inside an object's __del__, as it does inside h5py's
# weakref callbacks: an exception raised there by the signal handler is printed as "Exception
# ignored" and lost, so only the stop flag (geocap.stop) can end the run.
SLOW_WRITER = """
import os, sys, time
import geocap.data.store as store
_append, _marker, _mode = store._Writer.append, sys.argv.pop(1), sys.argv.pop(1)
class _Finalised:
    def __del__(self):
        time.sleep(0.05)
def _slow_append(self, *args):
    _append(self, *args)
    if not os.path.exists(_marker):
        open(_marker, "w").close()
    if _mode == "finaliser":
        _Finalised()            # freed at once: the wait runs in its finaliser
    else:
        time.sleep(0.05)
store._Writer.append = _slow_append
from geocap.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupt_prepro(tmp_path, sig, *, inherit_ignored_sigint=False, mode="plain"):
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
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(marker), mode, "prepro", "features", "--from",
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


def test_a_signal_lost_inside_a_finaliser_still_stops_the_command(tmp_path):
    """The signal lands while Python runs a finaliser: the Interrupted raised there is lost
    ("Exception ignored in ..."), yet the stop flag ends the run at the next image: exit 130,
    the old store byte-identical, no temporary file (before the flag: exit 0, store replaced)."""
    import signal
    rc, seconds, stdout, stderr, unchanged, temporaries = _interrupt_prepro(tmp_path, signal.SIGINT,
                                                                            mode="finaliser")
    assert rc == 130, stderr
    assert stderr.strip().splitlines()[-1] == "geocap: interrupted by SIGINT"
    assert "wrote" not in stdout
    assert unchanged and temporaries == []


def test_a_stop_request_blocks_the_final_rename_and_the_exit_status(tmp_path, capsys, monkeypatch):
    """A stop requested (the flag) without the exception reaching the command: the atomic write
    replaces nothing, and the command line exits 130 even when the command returns 0."""
    from geocap import stop
    from geocap.data.atomic import write_text_atomic

    target = tmp_path / "out.txt"
    target.write_text("old")
    with stop.stop_signals():
        stop.request_stop()
        with pytest.raises(stop.Interrupted):
            write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert stop.requested() is None                          # cleared when the block ends

    import geocap.demo

    def returns_after_a_lost_interrupt(**options):
        stop.request_stop()
        return 0
    monkeypatch.setattr(geocap.demo, "run_demo", returns_after_a_lost_interrupt)
    assert main(["kernel-check"]) == 130
    assert capsys.readouterr().err == "geocap: interrupted by SIGINT\n"


def test_a_stop_whose_exception_became_another_still_exits_as_interrupted(capsys, monkeypatch):
    """SIGINT inside an h5py callback (Cython) surfaces as ``SystemError: ... returned a result with
    an exception set``, not as the Interrupted the handler raised (seen in a study killed by SIGINT):
    with the stop requested, the command line reports the interruption (exit 130), not a bug."""
    from geocap import stop
    import geocap.demo

    def mangled(**options):
        stop.request_stop()
        raise SystemError("<cyfunction FastRLock.__exit__> returned a result with an exception set")
    monkeypatch.setattr(geocap.demo, "run_demo", mangled)
    assert main(["kernel-check"]) == 130
    assert capsys.readouterr().err == "geocap: interrupted by SIGINT\n"

    def a_bug(**options):                       # without a stop request it stays a bug, traceback and all
        raise SystemError("a bug")
    monkeypatch.setattr(geocap.demo, "run_demo", a_bug)
    with pytest.raises(SystemError, match="a bug"):
        main(["kernel-check"])


def test_a_sigint_while_a_tsv_input_is_written_keeps_the_old_store(tmp_path):
    """The outside check that once found a Ctrl-C lost inside h5py's callbacks: `geocap prepro features
    --from tsv --dtype float32` on a TSV input that takes a while, SIGINT once the temporary store holds
    data: exit 130, the old store unchanged, no temporary file."""
    import os
    import signal
    import time

    import numpy as np

    from data_formats import random_images, write_tsv

    rng = np.random.default_rng(0)
    source, out = tmp_path / "in.tsv", tmp_path / "out.h5"
    write_tsv(source, random_images(rng, 400, 512))
    out.write_bytes(b"the old store")
    proc = subprocess.Popen([sys.executable, "-m", "geocap", "prepro", "features", "--from", "tsv", str(source),
                             "--out", str(out), "--dtype", "float32", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / f"out.h5.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0):
        assert proc.poll() is None, ("finished before it could be interrupted", proc.communicate())
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "wrote" not in stdout
    assert out.read_bytes() == b"the old store"
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


# -- `geocap --help` imports no subcommand module; the help table matches the parsers -----------


def test_top_level_help_imports_no_subcommand_module():
    code = ("import sys\nfrom geocap.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'h5py', 'geocap.train', 'geocap.cli.analyze') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    for name in ("train", "dump", "analyze", "compare", "view", "study", "hf-train-tiny", "kernel-check",
                 "demo-table"):
        assert name in done.stdout


def test_the_help_table_says_what_each_subcommand_parser_says():
    import argparse

    from geocap.cli import COMMANDS, build_parser

    def helps(parser):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {choice.dest: choice.help for choice in action._choices_actions}
    full, bare = helps(build_parser()), helps(build_parser(set()))
    assert full == bare and set(COMMANDS) | {"demo"} == set(full)


# -- errors: geocap's own types are one line; anything else keeps its traceback -----------------


def test_geocap_errors_are_one_line_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    import json

    import geocap.demo
    from geocap.errors import CheckpointError, DataError, DumpError, GeocapError, UsageError

    for kind in (UsageError, DataError, DumpError, CheckpointError):
        assert issubclass(kind, GeocapError) and issubclass(kind, ValueError)

        def raise_it(kind=kind, **options):
            raise kind("features.h5: image 40: something wrong")
        monkeypatch.setattr(geocap.demo, "run_demo", raise_it)
        assert main(["kernel-check"]) == 2
        assert capsys.readouterr().err == "geocap: error: features.h5: image 40: something wrong\n"

    def library_value_error(**options):          # a bug: a ValueError from inside a library
        json.loads("{not json")
    monkeypatch.setattr(geocap.demo, "run_demo", library_value_error)
    with pytest.raises(json.JSONDecodeError):
        main(["kernel-check"])

    def key_error(**options):
        return {}["missing"]
    monkeypatch.setattr(geocap.demo, "run_demo", key_error)
    with pytest.raises(KeyError):
        main(["kernel-check"])


def test_hdf5_errors_renamed_only_when_h5py_raised_them(tmp_path):
    import h5py
    import numpy as np

    from geocap.data.hdf5_errors import named_hdf5_errors
    from geocap.errors import DataError

    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with h5py.File(path, "r") as f:
        with pytest.raises(DataError, match=r"a\.h5: unreadable HDF5 file \(corrupt or truncated\?\)") as caught:
            with named_hdf5_errors(str(path)):
                f["missing"]
        assert isinstance(caught.value.__cause__, KeyError)       # the origin stays in the traceback
        for bug in (KeyError("a key of geocap's own dict"), ValueError("geocap's own bug")):
            with pytest.raises(type(bug), match="geocap's own"):
                with named_hdf5_errors(str(path)):
                    raise bug


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """write_text_atomic (and so write_results of the metrics, which now uses it) fsyncs the
    temporary file, then renames it: a power cut leaves the old file or the new one."""
    import os

    from geocap.data.atomic import write_text_atomic
    from geocap.metrics import write_results

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    target = tmp_path / "a.txt"
    write_text_atomic(target, "text")
    tmp = f"{target}.tmp-{os.getpid()}"
    assert events == [("fsync", tmp), ("replace", tmp, str(target))] and target.read_text() == "text"
    events.clear()
    write_results(tmp_path / "r.json", {1: "a cat"})
    assert [e[0] for e in events] == ["fsync", "replace"]


def test_packaging_version_licence_and_types_are_declared_once():
    import tomllib
    from pathlib import Path

    import geocap

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "geocap.__version__"}
    assert project["project"]["license"] == "Apache-2.0" and "Apache License" in (root / "LICENSE").read_text()
    assert (root / "geocap" / "py.typed").exists() and "py.typed" in project["tool"]["setuptools"]["package-data"][
        "geocap"]
    assert geocap.__version__.count(".") == 2


def test_the_command_line_is_one_package_on_top_of_the_library():
    """Every subcommand is a module of geocap.cli with add_parser and run; no module below the
    command line builds a parser or imports geocap.cli (the layering: the CLI on top)."""
    import ast
    import importlib
    from pathlib import Path

    from geocap.cli import COMMANDS, DEPRECATED

    for name in COMMANDS:
        module = importlib.import_module(f"geocap.cli.{name.replace('-', '_')}")
        assert callable(module.add_parser) and callable(module.run), name
    assert set(DEPRECATED.values()) <= set(COMMANDS)
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("geocap", "analysis", "kernels"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.is_relative_to(root / "geocap" / "cli") or path == root / "geocap" / "__main__.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in ("ArgumentParser", "add_subparsers"):
                    offenders.append(f"{path.relative_to(root)}: builds a parser ({node.attr})")
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "geocap.cli" or n.startswith("geocap.cli.") for n in names):
                    offenders.append(f"{path.relative_to(root)}: imports geocap.cli")
    assert offenders == []


# -- user errors are one line (exit 2); a bug in geocap -- even a plain ValueError raised by geocap's own
# code -- keeps its traceback (the command line once printed every ValueError raised in geocap as one line)


def test_user_errors_of_study_and_analyze_are_one_line(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    for content, says in (('{"heads": "four"}', "study setting heads must be an int"),
                          ('{"no_such_field": 1}', "unknown study settings: no_such_field"),
                          ('{"variants": ["ort", "ort"]}', "names a variant twice")):
        settings.write_text(content)
        assert main(["study", "--out", str(tmp_path / "study"), "--settings", str(settings), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"geocap: error: --settings {settings}: ") and says in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "study").exists()
    assert main(["study", "--out", str(tmp_path / "study"), "--seeds", "0"]) == 2
    assert capsys.readouterr().err == "geocap: error: --seeds: study setting seeds must be at least 1, got 0\n"
    missing = tmp_path / "no-dump"
    assert main(["analyze", str(missing), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == f"geocap: error: dump {str(missing)!r} does not exist\n"


def test_a_plain_value_error_raised_by_geocap_code_is_a_bug_with_its_traceback(tmp_path, monkeypatch, capsys):
    """A bug injected under `geocap analyze`: geocap calls its own CIDEr-D scorer wrongly, and the
    scorer's ``raise ValueError`` (a plain one, from geocap's own source) escapes with its traceback
    instead of being printed as a user error (exit 2)."""
    import geocap.analysis
    from geocap.metrics.cider import CiderD

    dump = tmp_path / "dump"
    dump.mkdir()

    def buggy_run_analyses(*args, **kwargs):
        CiderD({1: ["a cat"]}, n=0)                        # a bug: n must be >= 1
    monkeypatch.setattr(geocap.analysis, "run_analyses", buggy_run_analyses)
    monkeypatch.setattr("geocap.cli.analyze._open_dump", lambda path, progress: None)
    with pytest.raises(ValueError, match="n must be >= 1") as caught:
        main(["analyze", str(dump), "--out", str(tmp_path / "report"), "--no-progress"])
    assert type(caught.value) is ValueError
    assert caught.traceback[-1].path.name == "cider.py"         # raised inside geocap's own code
    assert "geocap: error" not in capsys.readouterr().err
    # through the real entry point: a traceback and exit status 1, not one line and 2
    code = ("import sys, geocap.analysis, geocap.cli.analyze\nfrom geocap.metrics.cider import CiderD\n"
            "geocap.analysis.run_analyses = lambda *a, **k: CiderD({1: ['a cat']}, n=0)\n"
            "geocap.cli.analyze._open_dump = lambda path, progress: None\n"
            "from geocap.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "analyze", str(dump), "--out", str(tmp_path / "r2")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "cider.py" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "ValueError: n must be >= 1, got 0"


def test_train_variant_names_the_study_variants_options():
    """``geocap train --variant NAME`` sets the options of the study's variant of that name, and
    refuses a contradicting option beside it."""
    from geocap.cli import build_parser
    from geocap.cli.train import config_from_args
    from geocap.errors import UsageError
    from geocap.train.variants import VARIANTS

    parser = build_parser()
    for name, options in VARIANTS.items():
        config = config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", "--variant", name]))
        assert {key: getattr(config, key) for key in options} == options, name
    plain = config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o"]))
    directional = config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", "--variant",
                                                      "directional"]))
    assert (plain.embedding, directional.embedding) == ("ort", "signed")
    with pytest.raises(UsageError, match="--variant none sets geometry = False"):
        config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", "--variant", "none",
                                            "--geometry", "true"]))
    with pytest.raises(UsageError, match="variant must be one of ort, none, directional, absolute"):
        config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", "--variant", "no-geometry"]))
