"""``geocap compare NAME=REPORT ... [--out FILE.md]``: several models' analyses (``geocap analyze``)
side by side in one markdown table (:mod:`geocap.analysis.compare`), with its figure beside ``--out``.

The inputs are checked to be analysis.json files of ``geocap analyze`` (``check_analysis``) and
``--out`` never lands on an input or its report folder (``compare_outputs``).
"""
from __future__ import annotations

import argparse
import os

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


def run(args) -> int:
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap compare`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "compare", help="several models' analyses (geocap analyze) side by side in one markdown table",
        description="Entropy, proximity and grounding by layer for each model, with standard errors and the "
                    "first-to-last-layer change, one table (geocap.analysis.compare).")
    parser.add_argument("reports", nargs="+", metavar="NAME=REPORT_DIR",
                        help="a model's name and its geocap analyze folder (or its analysis.json)")
    parser.add_argument("--out", default=None, metavar="FILE.md",
                        help="write the table here and its figure beside it (FILE.png); default: print the table")
    parser.set_defaults(func=run)
    return parser
