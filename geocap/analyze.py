"""``geocap analyze DUMP --out DIR``: the four attention analyses of a dump, as analysis.json,
one figure per analysis, report.md and report.html (see :mod:`geocap.analysis.report`).

A stats-only dump (``geocap dump --stats-only``) holds no maps but the analyses' merged statistics,
which are used as they are; a full dump is read record by record, in chunks, never whole.
"""
from __future__ import annotations

import argparse
import os

from geocap.out_dir import check_out_dir

REPORT_MARKER = "analysis.json"       # what every report folder holds (geocap.analysis.run_analyses)


def _open_dump(path: str, progress: bool):
    from geocap.data.dump_format import open_dump  # lazy: h5py and the reader only when analysing

    return open_dump(path, progress=progress)


def run_analyze(args) -> int:
    """Handler of ``geocap analyze``; returns 0, raises ValueError for bad options or data."""
    from geocap.analysis import run_analyses

    if not os.path.exists(args.dump):
        raise ValueError(f"dump {args.dump!r} does not exist")
    if os.path.exists(args.out) and os.path.samefile(args.out, args.dump):
        raise ValueError(f"--out: {args.out} is the dump itself; the report needs a folder of its own")
    check_out_dir(args.out, marker=REPORT_MARKER, kind="geocap analysis report")
    for name in ("clusters", "kmeans_buffer", "bins"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.reservoir < 3:
        raise ValueError(f"--reservoir must be >= 3, got {args.reservoir}")
    dump = _open_dump(args.dump, args.progress)
    data = run_analyses(dump, args.out, viewer_href=args.viewer_href, progress=args.progress,
                        k=args.clusters, kmeans_buffer=args.kmeans_buffer, bins=args.bins,
                        reservoir=args.reservoir, seed=args.seed)
    print(f"analysed {data['records']} records -> {os.path.join(args.out, 'analysis.json')}, "
          f"{os.path.join(args.out, 'report.md')}, {os.path.join(args.out, 'report.html')}")
    return 0


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap analyze`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "analyze", help="run the four attention analyses over a dump (analysis.json, figures, report.md and .html)",
        description="Run the seed study's four attention analyses (entropy, thematic relatedness, proximity, "
                    "grounding) over an attention dump and write DIR/analysis.json, one PNG per analysis and "
                    "DIR/report.md, rendered as DIR/report.html. A stats-only dump is analysed from its stored statistics (the options below "
                    "were fixed when it was written and are ignored).")
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
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress (a bar on a terminal; in a log a line every GEOCAP_PROGRESS_INTERVAL s)")
    parser.set_defaults(func=run_analyze)
    return parser


def run_compare(args) -> int:
    """Handler of ``geocap compare``: the models' analyses side by side in one markdown table."""
    from geocap.analysis.compare import comparison_figure, comparison_table
    from geocap.data.atomic import write_text_atomic
    from geocap.data.json_file import read_json

    analyses = {}
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"compare: expected NAME=REPORT_DIR, got {item!r}")
        if name in analyses:
            raise ValueError(f"compare: model name {name!r} given twice")
        file = os.path.join(path, "analysis.json") if os.path.isdir(path) else path
        analyses[name] = read_json(file, "analysis file (geocap analyze's analysis.json)")
    table = comparison_table(analyses)
    if args.out:
        figure = os.path.splitext(args.out)[0] + ".png"
        comparison_figure(analyses, figure)
        write_text_atomic(args.out, table)
        print(f"compared {', '.join(analyses)} -> {args.out}, {figure}")
    else:
        print(table, end="")
    return 0


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap compare`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "compare", help="several models' analyses (geocap analyze) side by side in one markdown table",
        description="Entropy, proximity and grounding by layer for each model, with standard errors and the "
                    "first-to-last-layer change, one table (geocap.analysis.compare).")
    parser.add_argument("reports", nargs="+", metavar="NAME=REPORT_DIR",
                        help="a model's name and its geocap analyze folder (or its analysis.json)")
    parser.add_argument("--out", default=None, metavar="FILE.md",
                        help="write the table here and its figure beside it (FILE.png); default: print the table")
    parser.set_defaults(func=run_compare)
    return parser
