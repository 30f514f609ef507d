"""``geocap study``: the command line of :func:`geocap.study.run.run_study`.

Usage::

    geocap study --out DIR [--quick] [--seeds K] [--variants ort,none,directional,absolute] [--settings FILE]
                 [--jobs J]

Settings: the full study's (``StudySettings.full()``) or, with ``--quick``, the quick one's
(``StudySettings.for_quick()``), then the fields of ``--settings FILE`` (a JSON object with a
subset of them), then ``--seeds`` and ``--variants``. Rerun the same command after an
interruption to go on; a DIR holding a study with other settings is refused, naming them.
``--jobs J`` makes J models at once, each in its own process with one torch thread (default: 2
where there are at least 2 CPUs, else 1); it is not a setting: the results do not depend on it.
"""
from __future__ import annotations

import argparse
import os

from geocap.cli import add_progress_option
from geocap.errors import UsageError

__all__ = ["add_parser", "run", "settings_from_args"]


def settings_from_args(args: argparse.Namespace):
    """The StudySettings of parsed ``geocap study`` options (UsageError naming a bad one)."""
    from geocap.data.json_file import read_json
    from geocap.study.settings import StudySettings

    settings = StudySettings.for_quick() if args.quick else StudySettings.full()
    if args.settings is not None:
        try:
            settings = StudySettings.from_dict(read_json(args.settings, "study settings file"), settings)
        except ValueError as err:
            message = str(err)
            raise UsageError(message if message.startswith(args.settings) else f"--settings {args.settings}: "
                             f"{message}") from None
    changes = {}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.variants is not None:
        changes["variants"] = args.variants
    if changes:
        try:
            settings = StudySettings.from_dict(changes, settings)
        except ValueError as err:
            raise UsageError(f"--{next(iter(changes))}: {err}" if len(changes) == 1 else str(err)) from None
    return settings


def run(args: argparse.Namespace) -> int:
    """Handler of ``geocap study``: runs the study, prints where study.json is, returns 0
    (geocap's errors for bad options, a refused --out or bad data)."""
    from geocap.metrics.evaluate import require_pycocoevalcap
    from geocap.study.run import run_study

    require_pycocoevalcap("geocap study's evaluations")    # before the first model trains
    settings = settings_from_args(args)
    path = run_study(args.out, settings, progress=args.progress, jobs=args.jobs)
    print(f"study: {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap study`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "study", help="train, evaluate, dump and analyse every (variant, seed); study.json and study.md (resumable)",
        description="Train every geometry variant (ort, none, directional, absolute) with several seeds on one "
                    "synthetic dataset, evaluate, dump and analyse each model and its untrained control, and write "
                    "DIR/study.json, DIR/study.md and its figures. Rerun the same command after an interruption to "
                    "go on.")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the study folder (created; must be absent, empty or a study of the same settings)")
    parser.add_argument("--quick", action="store_true",
                        help="the quick study: 2 seeds, a 2-layer model, fewer images and steps (same code path)")
    parser.add_argument("--seeds", type=int, default=None, metavar="K", help="models per variant (seeds 0..K-1)")
    parser.add_argument("--variants", default=None, metavar="LIST",
                        help="comma-separated subset of ort,none,directional,absolute (default all four)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="J",
                        help="models made at once, each in its own process with one torch thread (default: "
                             "%(default)s; the results do not depend on it)")
    parser.add_argument("--settings", default=None, metavar="FILE",
                        help="JSON object of study settings (a subset of the fields of "
                             "geocap.study.settings.StudySettings) over the full or quick defaults")
    add_progress_option(parser, help="no progress bars (log lines stay)")
    parser.set_defaults(func=run)
    return parser
