"""``geocap view DUMP --out DIR``: the static attention viewer of a dump (see geocap.view.site)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from geocap.cli import add_progress_option
from geocap.errors import UsageError


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def report_href(report, out_dir) -> str | None:
    """The link from the site's pages to the rendered analysis report: ``report.html`` beside the
    given report (``report`` is its ``.md`` or ``.html`` path, or its folder), relative to
    ``out_dir``; None for None. Raises UsageError when no HTML report is there (``geocap analyze``
    writes it beside ``report.md``): a link to markdown would show the raw text without figures."""
    if report is None:
        return None
    path = Path(report)
    if path.is_dir():
        html = path / "report.html"
    elif path.suffix.lower() in (".md", ".html"):
        html = path.with_suffix(".html") if path.suffix.lower() == ".md" else path
    else:
        raise UsageError(f"--report: expected the analysis report (report.md or report.html) or its folder, "
                         f"got {report}")
    if not html.is_file():
        raise UsageError(f"--report: no HTML report at {html} (geocap analyze writes report.html beside "
                         f"report.md; rerun it)")
    href = os.path.relpath(os.path.abspath(html), os.path.abspath(out_dir))
    return Path(href).as_posix()


def run(args) -> int:
    """Handler of ``geocap view``: open the dump, build the site, print where it is."""
    from geocap.data.dump_format import open_dump
    from geocap.view.site import build_site

    href = report_href(args.report, args.out)          # checked before the dump is read
    dump = open_dump(args.dump, progress=args.progress)
    summary = build_site(dump, args.out, images_dir=args.images, limit=args.limit or None,
                         report_href=href, progress=args.progress,
                         page_size=args.page_size, title=os.path.basename(os.path.normpath(args.dump)),
                         grouped=True,          # a dump stores its records image by image
                         encoder_top_k=args.encoder_top_k)
    missing = ", ".join(f"{name} in {count}" for name, count in summary.missing.items() if count)
    print(f"viewer: {summary.images} images, {summary.records} records "
          f"({summary.images_with_file} with image files), {summary.files} files, "
          f"{summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f} s")
    if missing:
        print(f"records without maps: {missing}")
    print(f"open {Path(args.out) / 'index.html'}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap view`` on an argparse subparsers object; returns its parser. The handler
    (``args.func(args)``) returns 0 or raises geocap's errors for bad options or data."""
    parser = subparsers.add_parser(
        "view", help="write a static attention viewer (HTML, no network) for a dump",
        description="Write a static site for browsing a dump's attention: an index of its images "
                    "(searchable by id and caption words, paged) and a page per image with its boxes "
                    "shaded by encoder, cross and decoder attention per layer and head. Open "
                    "DIR/index.html from disk or any static server.")
    parser.add_argument("dump", metavar="DUMP", help="an attention dump (geocap dump)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of the site (replaced atomically; must be empty, absent or an earlier site)")
    parser.add_argument("--images", default=None, metavar="IMAGE_DIR",
                        help="folder of the image files, named by id as COCO names them; they are hard-linked "
                             "into DIR/images (copied across file systems). Default: boxes on blank canvases")
    parser.add_argument("--limit", type=_non_negative, default=0, metavar="N",
                        help="only the first N images of the dump (default 0: all)")
    parser.add_argument("--report", default=None, metavar="PATH",
                        help="the analysis report to link to: report.md or report.html of geocap analyze, or their "
                             "folder; the pages link to report.html there (relative to DIR)")
    parser.add_argument("--page-size", type=_positive, default=100, metavar="K",
                        help="images per index page and per data file of the index (default 100)")
    parser.add_argument("--encoder-top-k", type=_positive, default=None, metavar="K",
                        help="keep only the K largest weights of each encoder self-attention row (the pages say how "
                             "much weight a row lost); a patch encoder's N x N maps are most of a site's size. "
                             "Default: whole maps")
    add_progress_option(parser)
    parser.set_defaults(func=run)
    return parser
