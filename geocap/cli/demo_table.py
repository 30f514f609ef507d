"""The README demo's closing summary (``./run.sh``): evaluated models side by side, a few sample
captions, and where every result is.

Usage::

    geocap demo-table [--captions DIR/caps] [--samples 3] NAME=RESULTS_DIR/metrics_test.json ...

Each ``NAME=FILE`` is one model (a table row, in the order given): ``FILE`` is the
``metrics_<split>.json`` that ``geocap evaluate`` wrote, and the captions it names
(``results_file``) sit beside it. The table holds CIDEr-D, BLEU-4 (pycocoevalcap's raw values,
CIDEr-D on its x10 scale) and the relation-word accuracy (``relation_accuracy``: correct relation
uses / uses, with the counts; "n/a" and the file's reason when it is undefined). With
``--captions``, the first ``--samples`` images of the split are listed with each model's caption
and the image's first reference caption. Every model must have been evaluated on the same split
and images (else DataError naming the file).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from geocap.data.json_file import read_json
from geocap.errors import DataError, UsageError


@dataclass
class EvaluatedModel:
    """One row: ``name``, the metrics file's ``path`` and JSON ``record``, and its captions
    (image id -> caption, ascending image id)."""
    name: str
    path: str
    record: dict
    captions: dict


def load_model(name: str, path: str) -> EvaluatedModel:
    """Read an evaluation's metrics file and the captions file beside it; DataError naming the
    file when either is missing or not geocap's evaluation output."""
    from geocap.evaluate import EVALUATION_FORMAT  # lazy: geocap.evaluate imports torch
    path = os.path.abspath(os.fspath(path))
    try:
        record = read_json(path, "metrics file")
    except ValueError as err:
        raise DataError(f"{name}: {err}") from None
    if not isinstance(record, dict) or record.get("format") != EVALUATION_FORMAT:
        raise DataError(f"{name}: {path}: not a {EVALUATION_FORMAT} metrics file")
    for key in ("metrics", "results_file", "split", "n_images"):
        if key not in record:
            raise DataError(f"{name}: {path}: field {key!r} missing")
    results = os.path.join(os.path.dirname(path), record["results_file"])
    try:
        with open(results, encoding="utf-8") as fh:
            rows = json.load(fh)
        captions = {int(r["image_id"]): str(r["caption"]) for r in rows}
    except FileNotFoundError:
        raise DataError(f"{name}: {results}: captions file missing") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"{name}: {results}: not a COCO results file ({err!r})") from None
    return EvaluatedModel(name=name, path=path, record=record, captions=dict(sorted(captions.items())))


def _metric(record: dict, key: str) -> str:
    value = record["metrics"].get(key)
    return "n/a" if value is None else f"{value:.3f}"


def _relation_cell(record: dict) -> str:
    acc, counts = record.get("relation_accuracy"), record.get("relation_counts")
    if acc is None:
        return f"n/a ({record.get('relation_note') or 'not computed'})"
    return (f"{acc:.3f} ({counts['correct']}/{counts['uses']} uses; relation in "
            f"{100 * counts['fraction_with_relation']:.0f}% of captions)")


def format_table(models: Sequence[EvaluatedModel]) -> str:
    """A plain-text table, one row per model: model | CIDEr-D | BLEU-4 | relation acc."""
    header = ("model", "CIDEr-D", "BLEU-4", "relation acc")
    rows = [(m.name, _metric(m.record, "CIDEr"), _metric(m.record, "Bleu_4"), _relation_cell(m.record))
            for m in models]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = lambda r: "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[3]  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths) + ("-" * len(header[3]),)),
                      *map(line, rows)])


def format_samples(models: Sequence[EvaluatedModel], references: Optional[dict], samples: int) -> str:
    """The first ``samples`` images: each model's caption, then a reference when given
    (``references``: image id -> its reference strings)."""
    ids = list(models[0].captions)[:samples]
    width = max(len(m.name) for m in models + [EvaluatedModel("reference", "", {}, {})])
    lines = []
    for image_id in ids:
        lines.append(f"  image {image_id}")
        lines += [f"    {m.name:<{width}}  {m.captions[image_id]}" for m in models]
        if references is not None:
            lines.append(f"    {'reference':<{width}}  {references[image_id][0]}")
    return "\n".join(lines)


def summary(models: Sequence[EvaluatedModel], references: Optional[dict] = None, samples: int = 3) -> str:
    """Table, sample captions and the files, as ``./run.sh`` prints them."""
    if not models:
        raise UsageError("give at least one NAME=metrics file")
    first = models[0]
    for m in models[1:]:
        if (m.record["split"], list(m.captions)) != (first.record["split"], list(first.captions)):
            raise DataError(f"{m.name}: {m.path}: evaluated on other images than {first.name} ({first.path})")
    split, n = first.record["split"], first.record["n_images"]
    parts = [f"{split} split, {n} images, beam size {first.record.get('beam_size', '?')}:", format_table(models)]
    if samples > 0:
        parts += ["", f"{min(samples, n)} {split} images: each model's caption and a reference",
                  format_samples(models, references, samples)]
    parts += ["", "results:"]
    for m in models:
        parts.append(f"  {m.name}: {m.path} and {os.path.join(os.path.dirname(m.path), m.record['results_file'])}")
        checkpoint = m.record.get("checkpoint")
        if checkpoint:
            parts.append(f"  {' ' * len(m.name)}  checkpoint {checkpoint}")
    return "\n".join(parts)


def _named(text: str) -> tuple:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=METRICS_FILE, got {text!r}")
    return name, path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap demo-table`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "demo-table", help="evaluated models side by side with sample captions (the closing table of ./run.sh)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=_named, metavar="NAME=METRICS_FILE")
    parser.add_argument("--captions", metavar="DIR", help="captions directory, for a reference per sample image")
    parser.add_argument("--samples", type=int, default=3, help="sample images to list (default 3; 0: none)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    """Handler of ``geocap demo-table``: prints the table; UsageError / DataError for bad input."""
    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {args.samples}")
    models = [load_model(name, path) for name, path in args.models]
    references = None
    if args.captions:
        from geocap.data.vocab import load_captions
        caps = load_captions(args.captions)
        references = {i: caps.references(i) for i in list(models[0].captions)[:args.samples]}
    print(summary(models, references, args.samples))
    return 0
