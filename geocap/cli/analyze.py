"""``geocap analyze DUMP --out DIR``: the four attention analyses of a dump, as analysis.json,
one figure per analysis, report.md and report.html (see :mod:`geocap.analysis.report`).

A stats-only dump (``geocap dump --stats-only``) holds no maps but the analyses' merged statistics,
which are used as they are; a full dump is read record by record, in chunks, never whole.
"""
from __future__ import annotations

import argparse
import os

from geocap.cli import add_progress_option
from geocap.errors import DataError, UsageError
from geocap.out_dir import check_out_dir

REPORT_MARKER = "analysis.json"       # what every report folder holds (geocap.analysis.run_analyses)


def _open_dump(path: str, progress: bool):
    from geocap.data.dump_format import open_dump  # lazy: h5py and the reader only when analysing

    return open_dump(path, progress=progress)


def run(args) -> int:
    """Handler of ``geocap analyze``; returns 0, raises UsageError / DataError for bad options or data."""
    from geocap.analysis import run_analyses

    if not os.path.exists(args.dump):
        raise DataError(f"dump {args.dump!r} does not exist")
    if os.path.exists(args.out) and os.path.samefile(args.out, args.dump):
        raise UsageError(f"--out: {args.out} is the dump itself; the report needs a folder of its own")
    check_out_dir(args.out, marker=REPORT_MARKER, kind="geocap analysis report")
    for name in ("clusters", "kmeans_buffer", "bins"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.reservoir < 3:
        raise UsageError(f"--reservoir must be >= 3, got {args.reservoir}")
    dump = _open_dump(args.dump, args.progress)
    data = run_analyses(dump, args.out, viewer_href=args.viewer_href, progress=args.progress,
                        k=args.clusters, kmeans_buffer=args.kmeans_buffer, bins=args.bins,
                        reservoir=args.reservoir, seed=args.seed)
    print(f"analysed {data['records']} records -> {os.path.join(args.out, 'analysis.json')}, "
          f"{os.path.join(args.out, 'report.md')}, {os.path.join(args.out, 'report.html')}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap analyze`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "analyze", help="run the four attention analyses over a dump (analysis.json, figures, report.md and .html)",
        description="Run the four attention analyses of 'On the Interplay between Language and Vision in "
                    "Transformers' (Ilinykh 2022) (entropy, thematic relatedness, proximity, "
                    "grounding) over an attention dump and write DIR/analysis.json, one PNG per analysis and "
                    "DIR/report.md, rendered as DIR/report.html. A stats-only dump is analysed from its stored "
                    "statistics (the options below were fixed when it was written and are ignored).")
    parser.add_argument("dump", metavar="DUMP", help="an attention dump (geocap dump)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created if missing; must be empty, absent or an earlier report)")
    parser.add_argument("--viewer-href", default=None, metavar="URL",
                        help="link report.md to the attention viewer (geocap view) at this address")
    parser.add_argument("--clusters", type=int, default=6, metavar="K",
                        help="k-means clusters when records carry neither clusters nor labels (default 6)")
    parser.add_argument("--kmeans-buffer", type=int, default=256, metavar="N",
                        help="records whose features fit the k-means fallback (default 256)")
    parser.add_argument("--bins", type=int, default=10, help="bins of the proximity curves (default 10)")
    parser.add_argument("--reservoir", type=int, default=20000, metavar="PAIRS",
                        help="object pairs sampled for each Spearman correlation (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means fallback and the pair sample")
    add_progress_option(parser)
    parser.set_defaults(func=run)
    return parser
