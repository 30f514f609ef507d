"""``geocap kernel-check``: every attention backend against the float64 eager reference, then their
timings (:func:`geocap.demo.run_demo`). ``geocap demo`` is its old name, kept as a deprecated alias."""
from __future__ import annotations

import argparse
import os
import sys

HELP = "check every kernel backend against the float64 reference and time them"


def add_parser(subparsers, name: str = "kernel-check", help: str = HELP) -> argparse.ArgumentParser:
    """Register ``geocap NAME`` (``kernel-check``, or the deprecated ``demo``) on an argparse
    subparsers object; returns its parser."""
    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--n", type=int, default=36, help="objects per image")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend")
    parser.add_argument("--no-interpret", dest="interpret", action="store_false",
                        help="without a GPU, skip the Triton kernels instead of running them under the interpreter")
    parser.set_defaults(func=run, deprecated_name=None if name == "kernel-check" else name)
    return parser


def add_deprecated_parser(subparsers) -> argparse.ArgumentParser:
    """``geocap demo``: the same command under its old name; running it prints a one-line note."""
    return add_parser(subparsers, "demo", "deprecated name of kernel-check")


def run(args) -> int:
    """Handler of ``geocap kernel-check``: 0 when every backend agrees with the reference."""
    if args.deprecated_name:
        print(f"geocap: '{args.deprecated_name}' is deprecated; use 'geocap kernel-check'", file=sys.stderr)
    if args.interpret and "triton" not in sys.modules:
        # must happen before triton is imported anywhere
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from geocap.demo import run_demo

    return run_demo(batch=args.batch, heads=args.heads, n=args.n, head_dim=args.head_dim, repeats=args.repeats)
