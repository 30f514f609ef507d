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
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress (a bar on a terminal; in a log a line every GEOCAP_PROGRESS_INTERVAL s)")
    parser.set_defaults(func=run_analyze)
    return parser


ANALYSIS_SECTIONS = ("entropy", "thematic", "proximity", "grounding")   # the analyses of analysis.json


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_analysis(data, file: str) -> None:
    """DataError naming ``file`` unless ``data`` has the shape of ``geocap analyze``'s
    analysis.json where ``geocap compare`` reads it: an object holding at least one analysis
    section (entropy, thematic, proximity, grounding), each an object; every per-layer value
    the table reads a list of numbers (or null), every uncertainty an object of numbers."""
    from geocap.analysis.compare import MEASURES
    from geocap.errors import DataError

    def bad(where: str, why: str):
        return DataError(f"{file}: not a geocap analysis (analysis.json of geocap analyze): {where} {why}")
    if not isinstance(data, dict):
        raise bad("the file", f"holds a JSON {type(data).__name__}, not an object")
    present = [name for name in ANALYSIS_SECTIONS if name in data]
    if not present:
        raise bad("the file", f"has none of the sections {', '.join(ANALYSIS_SECTIONS)} "
                              f"(its keys: {', '.join(sorted(map(str, data))) or 'none'})")
    for name in present:
        if not isinstance(data[name], dict):
            raise bad(f"'{name}'", "is not an object")
    if "records" in data and (isinstance(data["records"], bool) or not isinstance(data["records"], int)):
        raise bad("'records'", "is not an integer")
    for _, path, se_path, _ in MEASURES:
        where = ".".join(path)
        tree = data
        for key in path:
            tree = tree.get(key) if isinstance(tree, dict) else None
        if tree is not None and not (isinstance(tree, list) and all(map(_is_number, tree))):
            raise bad(f"'{where}'", "is not a list of numbers")
        summary = data
        for key in se_path or ():
            summary = summary.get(key) if isinstance(summary, dict) else None
        if se_path and summary is not None:
            where = ".".join(se_path)
            if not isinstance(summary, dict):
                raise bad(f"'{where}'", "is not an object")
            se = summary.get("se")
            if se is not None and not (isinstance(se, list) and all(map(_is_number, se))):
                raise bad(f"'{where}.se'", "is not a list of numbers")
            for key in ("change", "change_se"):
                if not _is_number(summary.get(key)):
                    raise bad(f"'{where}.{key}'", "is not a number")
            if not isinstance(summary.get("trend", ""), (str, type(None))):
                raise bad(f"'{where}.trend'", "is not a string")
        reasons = data.get(path[0], {}).get("unavailable") if isinstance(data.get(path[0]), dict) else None
        if reasons is not None and not (isinstance(reasons, dict)
                                        and all(isinstance(v, str) for v in reasons.values())):
            raise bad(f"'{path[0]}.unavailable'", "is not an object of reasons")
    grounding = data.get("grounding") or {}
    if not _is_number(grounding.get("chance")) or not _is_number(grounding.get("tokens")):
        raise bad("'grounding.chance' or 'grounding.tokens'", "is not a number")


def compare_outputs(out: str, inputs) -> tuple:
    """(table file, figure file) of ``geocap compare --out out``: the figure is ``out`` with the
    suffix ``.png``. UsageError naming ``--out`` when ``out`` is an existing folder, when its
    folder is missing, when table and figure would be one file (``--out X.png``), or when either
    would land in one of the ``inputs`` (analysis files, each in its report folder): a report is
    never overwritten."""
    from geocap.errors import UsageError

    figure = os.path.splitext(out)[0] + ".png"
    if os.path.isdir(out):
        raise UsageError(f"--out: {out} is a folder; give the table's file name (FILE.md; the figure goes "
                         f"beside it as FILE.png)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out: the folder {os.path.dirname(out) or parent} does not exist")
    if os.path.abspath(figure) == os.path.abspath(out):
        raise UsageError(f"--out: {out} would be both the table and its figure; give FILE.md (the figure is "
                         f"written beside it as FILE.png)")
    for file in inputs:
        report = os.path.realpath(os.path.dirname(os.path.abspath(file)))
        for target in (out, figure):
            real = os.path.realpath(target)
            if real == os.path.realpath(file) or os.path.dirname(real) == report:
                raise UsageError(f"--out: {target} would overwrite {file} or its report folder {report}; "
                                 f"write the comparison elsewhere")
    return out, figure


def run_compare(args) -> int:
    """Handler of ``geocap compare``: the models' analyses side by side in one markdown table."""
    from geocap.analysis.compare import comparison_figure, comparison_table
    from geocap.data.atomic import write_text_atomic
    from geocap.data.json_file import read_json
    from geocap.errors import DataError, UsageError

    analyses, files = {}, []
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"compare: expected NAME=REPORT_DIR, got {item!r}")
        if name in analyses:
            raise UsageError(f"compare: model name {name!r} given twice")
        file = os.path.join(path, "analysis.json") if os.path.isdir(path) else path
        analyses[name] = read_json(file, "analysis file (geocap analyze's analysis.json)", DataError)
        check_analysis(analyses[name], file)
        files.append(file)
    if args.out:
        out, figure = compare_outputs(args.out, files)
    table = comparison_table(analyses)
    if args.out:
        comparison_figure(analyses, figure)
        write_text_atomic(out, table)
        print(f"compared {', '.join(analyses)} -> {out}, {figure}")
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
