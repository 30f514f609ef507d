"""``geocap prepro features`` and ``geocap prepro captions``: the command line of
:mod:`geocap.data.prepro` (its docstring is the usage)."""
from __future__ import annotations

import argparse
import sys

from geocap.cli import add_progress_option


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``prepro features`` and ``prepro captions`` to ``subparsers``; returns the ``prepro`` parser."""
    from geocap.data import prepro
    from geocap.data.prepro import SOURCES

    parser = subparsers.add_parser("prepro", help="build the feature store and the captions directory",
                                   description=prepro.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="prepro_command", required=True)

    feat = sub.add_parser("features", help="detector features -> one feature store (HDF5)")
    feat.add_argument("--from", dest="source", choices=SOURCES, required=True,
                      help="input format: bottom-up TSV file(s); ORT npz folder + box folder; "
                           "meshed-memory HDF5; geocap feature store(s)")
    feat.add_argument("inputs", nargs="+", metavar="INPUT")
    feat.add_argument("--out", required=True, help="the feature store to write (replaced atomically)")
    feat.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    feat.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                      help="bad image: stop with an error naming it, or leave it out and count it")
    feat.add_argument("--label-names", metavar="TXT", help="detector class names, one per line (label id = line)")
    feat.add_argument("--sizes", nargs="+", metavar="JSON", default=None,
                      help="JSON files whose 'images' carry width/height (COCO annotations): needed for "
                           "pixel boxes (m2-h5, npz-dir --box-units pixel)")
    feat.add_argument("--box-units", choices=("pixel", "relative"), help="npz-dir: units of the box folder")
    add_progress_option(feat)
    feat.set_defaults(func=run)

    caps = sub.add_parser("captions", help="caption annotations -> vocab.json + captions.h5")
    src = caps.add_mutually_exclusive_group(required=True)
    src.add_argument("--karpathy", metavar="FILE", help="Karpathy's dataset_coco.json (tokens and splits)")
    src.add_argument("--coco", nargs="+", metavar="FILE",
                     help="COCO caption annotations (no splits: 'none'); each file once, each annotation in "
                          "one file only")
    src.add_argument("--cocotalk", nargs=2, metavar=("JSON", "LABEL_H5"),
                     help="ORT / self-critical cocotalk.json and cocotalk_label.h5 (their words and splits; "
                          "the vocabulary is rebuilt with --min-count)")
    caps.add_argument("--out", required=True, metavar="DIR")
    caps.add_argument("--min-count", type=int, default=5, help="words seen fewer times become <unk>")
    caps.add_argument("--max-len", type=int, default=16, help="words kept per caption")
    caps.add_argument("--vocab-split", choices=("train", "all"), default="train",
                      help="count words over the train split only (default, when the source has splits) "
                           "or over every caption")
    add_progress_option(caps)
    caps.set_defaults(func=run)
    return parser


def run(args) -> int:
    """Handler of ``geocap prepro features`` and ``geocap prepro captions``."""
    return {"features": run_features, "captions": run_captions}[args.prepro_command](args)


def run_features(args) -> int:
    """``geocap prepro features``: stream the inputs into one feature store, print what was written."""
    from geocap.data.prepro import prepro_features

    summary = prepro_features(args.source, args.inputs, args.out, dtype=args.dtype, on_error=args.on_error,
                              label_names=args.label_names, sizes=args.sizes, box_units=args.box_units,
                              progress=args.progress)
    print("\n".join(summary.lines()))
    for line in summary.warnings():
        print(line, file=sys.stderr)
    return 0


def run_captions(args) -> int:
    """``geocap prepro captions``: tokenise, build the vocabulary, encode, write DIR; print a summary."""
    from geocap.data.prepro import prepro_captions

    summary = prepro_captions(args.out, karpathy=args.karpathy, coco=args.coco, cocotalk=args.cocotalk,
                              min_count=args.min_count, max_len=args.max_len, vocab_split=args.vocab_split,
                              progress=args.progress)
    print("\n".join(summary.lines()))
    return 0
