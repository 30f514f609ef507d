"""The ``geocap`` command line (also ``python -m geocap``): demo, synth, synth-images, prepro,
train, hf-train-tiny, evaluate, import-ort, dump, analyze, compare, view, study. Each subcommand's parser
lives with the code it runs.

Exit status: 0 done; 2 bad input or options (one line ``geocap: error: ...``); 130 stopped by
SIGINT, 143 by SIGTERM. Both signals raise :class:`Interrupted` (a KeyboardInterrupt) in the
main thread, also when the process inherited SIGINT ignored (a job started with ``&`` from a
script), so every command stops at once through its normal clean-up: files being written are
removed and earlier outputs stay as they were."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def _stop_signals_raise():
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (the
    previous handlers come back after it; elsewhere than the main thread, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _demo(args) -> int:
    if args.interpret and "triton" not in sys.modules:
        # must happen before triton is imported anywhere
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from geocap.demo import run_demo

    return run_demo(batch=args.batch, heads=args.heads, n=args.n, head_dim=args.head_dim, repeats=args.repeats)


def build_parser() -> argparse.ArgumentParser:
    from geocap import __version__

    parser = argparse.ArgumentParser(prog="geocap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"geocap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check every kernel backend against the float64 reference and time them")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--heads", type=int, default=8)
    demo.add_argument("--n", type=int, default=36, help="objects per image")
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--repeats", type=int, default=5, help="timed calls per backend")
    demo.add_argument("--no-interpret", dest="interpret", action="store_false",
                      help="without a GPU, skip the Triton kernels instead of running them under the interpreter")
    demo.set_defaults(func=_demo)

    from geocap.analyze import add_analyze_parser, add_compare_parser
    from geocap.data.prepro import add_prepro_parser
    from geocap.data.synth import add_synth_images_parser, add_synth_parser
    from geocap.dump.cli import add_dump_parser
    from geocap.evaluate import add_evaluate_parser
    from geocap.hf.tiny import add_hf_train_tiny_parser
    from geocap.ort_import import add_import_ort_parser
    from geocap.study.cli import add_study_parser
    from geocap.train import add_train_parser
    from geocap.view.cli import add_view_parser

    add_synth_parser(sub)
    add_synth_images_parser(sub)
    add_prepro_parser(sub)
    add_train_parser(sub)
    add_hf_train_tiny_parser(sub)
    add_evaluate_parser(sub)
    add_import_ort_parser(sub)
    add_dump_parser(sub)
    add_analyze_parser(sub)
    add_compare_parser(sub)
    add_view_parser(sub)
    add_study_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _stop_signals_raise():
            return args.func(args)
    except ValueError as err:
        print(f"geocap: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"geocap: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
