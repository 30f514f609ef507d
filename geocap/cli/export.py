"""``geocap export DUMP --csv DIR [--limit N] [--analysis REPORT]``: a dump's records as CSV tables
(records, tokens, objects; :func:`geocap.dump.export.write_csv`), and ``geocap analyze``'s results
as analysis.csv."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap export`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "export", help="write a dump's records (and an analysis) as CSV tables for notebooks",
        description="Write a dump's records as CSV tables (records, tokens, objects).")
    parser.add_argument("dump", metavar="DUMP")
    parser.add_argument("--csv", required=True, metavar="DIR", help="folder of the CSV files")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="the first N records only (0: all)")
    parser.add_argument("--analysis", metavar="REPORT", help="also analysis.csv from REPORT/analysis.json "
                                                             "(geocap analyze's folder, or the file)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    """Handler of ``geocap export``: writes the CSV files, prints their paths."""
    from geocap.data.dump_format import open_dump
    from geocap.dump.export import write_csv

    dump = open_dump(args.dump, progress=False)
    records = iter(dump) if args.limit <= 0 else (r for _, r in zip(range(args.limit), dump))
    for name, path in write_csv(records, args.csv, analysis=args.analysis).items():
        print(f"{name}: {path}")
    return 0
