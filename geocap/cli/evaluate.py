"""``geocap evaluate``: the command line of :func:`geocap.evaluate.evaluate` (caption a split with a
checkpoint, score it, write the results and metrics files)."""
from __future__ import annotations

import argparse

from geocap.cli import add_progress_option


def run(args: argparse.Namespace) -> int:
    """Handler of ``geocap evaluate``: prints the report, returns 0 (geocap's errors for bad options or data)."""
    from geocap.evaluate import evaluate, format_report

    result = evaluate(args.checkpoint, args.data, args.split, beam_size=args.beam_size, max_len=args.max_len,
                      batch_size=args.batch_size, out_dir=args.out, limit=args.limit, meteor=args.meteor,
                      spice=args.spice, tokenizer=args.tokenizer, features=args.features, captions=args.captions,
                      ground_truth=args.ground_truth, device=args.device, workers=args.workers, progress=args.progress)
    print(format_report(result))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap evaluate`` on an argparse subparsers object; returns its parser."""
    from geocap.evaluate import TOKENIZERS

    parser = subparsers.add_parser(
        "evaluate", help="caption a split with a checkpoint and score it (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE)",
        description="Caption every image of a split with a trained checkpoint, score the captions against the "
                    "split's reference captions, and write captions_<split>.json (COCO results) and "
                    "metrics_<split>.json.")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a geocap checkpoint (loaded safely)")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="folder holding the feature store and the captions directory")
    parser.add_argument("--split", default="test", help="split of the captions directory (default test)")
    parser.add_argument("--beam-size", type=int, default=3, help="beams (1: greedy decoding; default 3)")
    parser.add_argument("--max-len", type=int, default=20, help="at most this many words per caption (default 20)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per batch (default 50)")
    parser.add_argument("--out", default=None, metavar="RESULTS_DIR",
                        help="folder for the results and metrics files (default: the checkpoint's folder)")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="evaluate the first N images of the split only (default 0: all)")
    parser.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (a Java subprocess)")
    parser.add_argument("--no-spice", dest="spice", action="store_false", help="skip SPICE")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="auto",
                        help="PTB tokenizer: java (Stanford), python (fallback), auto (java when present)")
    parser.add_argument("--features", default="features.h5", help="feature store file inside --data")
    parser.add_argument("--captions", default="caps", help="captions directory inside --data")
    parser.add_argument("--ground-truth", default="ground_truth.json", metavar="FILE",
                        help="synthetic ground truth inside --data, for the relation-word accuracy "
                             "(default ground_truth.json; skipped when absent)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    add_progress_option(parser)
    parser.set_defaults(func=run)
    return parser


