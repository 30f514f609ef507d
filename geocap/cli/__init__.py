"""The ``geocap`` command line (also ``python -m geocap``): kernel-check, synth, synth-images,
prepro, train, hf-train-tiny, evaluate, import-ort, dump, analyze, compare, view, export, study,
demo-table. Each subcommand is a module of this package (``add_parser(subparsers)`` and ``run(args)``),
imported only when that subcommand runs (``geocap --help`` imports neither torch nor matplotlib);
the library below imports nothing from here. ``geocap demo`` is the deprecated name of
``geocap kernel-check``.

Exit status: 0 done; 2 bad input or options (one line ``geocap: error: ...``); 130 stopped by
SIGINT, 143 by SIGTERM; 1 a bug (with its traceback).

SIGINT and SIGTERM request a stop (:mod:`geocap.stop`): a flag that every
long loop and every final rename checks, and an :class:`Interrupted` (a KeyboardInterrupt)
raised at once in the main thread, also when the process inherited SIGINT ignored (a job
started with ``&`` from a script), so every command stops through its normal clean-up: files
being written are removed and earlier outputs stay as they were.

Errors: geocap's own error types (:mod:`geocap.errors`) are printed as one line. Any other
exception (a plain ``ValueError`` or ``KeyError`` included) is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import sys

from geocap.errors import GeocapError
from geocap.stop import Interrupted, requested, stop_signals  # noqa: F401 -- Interrupted: re-exported

# subcommand -> one-line help; its module is geocap.cli.<name with "_" for "-">. The help is repeated
# here so that `geocap --help` imports no subcommand module; tests/test_cli.py checks it against the parsers.
COMMANDS = {
    "kernel-check": "check every kernel backend against the float64 reference and time them",
    "synth": "write the embedded synthetic dataset (captions, splits, features, ground truth)",
    "synth-images": "draw the synthetic scenes as PNG images with COCO captions and instances files",
    "prepro": "build the feature store and the captions directory",
    "train": "cross-entropy and self-critical training of the captioner (torchrun for several processes)",
    "hf-train-tiny": "train a tiny Hugging Face VisionEncoderDecoderModel from scratch on rendered images",
    "evaluate": "caption a split with a checkpoint and score it (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE)",
    "import-ort": "convert an original ORT checkpoint (model.pth + infos.pkl) into a geocap checkpoint",
    "dump": "record a checkpoint's attention over a split into HDF5 shards (resumable)",
    "analyze": "run the four attention analyses over a dump (analysis.json, figures, report.md and .html)",
    "compare": "several models' analyses (geocap analyze) side by side in one markdown table",
    "view": "write a static attention viewer (HTML, no network) for a dump",
    "export": "write a dump's records (and an analysis) as CSV tables for notebooks",
    "study": "train, evaluate, dump and analyse every (variant, seed); study.json and study.md (resumable)",
    "demo-table": "evaluated models side by side with sample captions (the closing table of ./run.sh)",
}
DEPRECATED = {"demo": "kernel-check"}      # old name -> new name (the old one still runs, with a note)
PROGRESS_HELP = "no progress (a bar on a terminal; in a log a line every GEOCAP_PROGRESS_INTERVAL s)"


def add_progress_option(parser: argparse.ArgumentParser, help: str = PROGRESS_HELP, **kwargs) -> None:
    """``--no-progress``, read as ``args.progress`` (True unless given), for every command that
    shows progress; ``kwargs`` go to ``add_argument`` (``default=argparse.SUPPRESS`` for train)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", help=help, **kwargs)


def _module(name: str):
    import importlib
    return importlib.import_module(f"geocap.cli.{name.replace('-', '_')}")


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``geocap`` parser. ``commands``: the subcommands whose full parsers are built (their
    modules imported); the others get a bare parser with their help only. Default: all."""
    from geocap import __version__

    parser = argparse.ArgumentParser(prog="geocap", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"geocap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        if commands is None or name in commands:
            _module(name).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    for old, new in DEPRECATED.items():
        if commands is None or old in commands:
            _module(new).add_deprecated_parser(sub)
        else:
            sub.add_parser(old, help=f"deprecated name of {new}")
    return parser


def _command(argv) -> set:
    """The subcommand named in ``argv`` (the first argument that is not an option), as a set."""
    return {next((a for a in argv if not a.startswith("-")), None)}


def _interrupted(signum: int) -> int:
    import signal
    print(f"geocap: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    stopped = None
    try:
        with stop_signals():
            try:
                status = args.func(args)
            finally:
                stopped = requested()
        if stopped is not None:          # the command returned although a stop was requested
            return _interrupted(stopped)
        return status
    except KeyboardInterrupt as err:
        import signal
        return _interrupted(getattr(err, "signum", signal.SIGINT))
    except Exception as err:
        if stopped is not None:
            # the stop's exception was turned into another on its way out (raised inside h5py's
            # Cython callbacks it becomes "SystemError: ... returned a result with an exception set")
            return _interrupted(stopped)
        if isinstance(err, GeocapError):
            print(f"geocap: error: {err}", file=sys.stderr)
            return 2
        raise
