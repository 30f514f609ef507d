"""``geocap train``: the command line of :func:`geocap.train.train` (usage and conventions in
:mod:`geocap.train`). Every field of :class:`geocap.train.config.TrainConfig` is an option."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import TYPE_CHECKING

from geocap.cli import add_progress_option
from geocap.errors import UsageError

if TYPE_CHECKING:
    from geocap.train.config import TrainConfig

_HELP = {
    "data": "folder holding the feature store and the captions directory",
    "out": "run folder (checkpoints, metrics.jsonl, train_config.json)",
    "features": "feature store file inside --data (default features.h5)",
    "captions": "captions directory inside --data (default caps)",
    "embedding": "the box embedding of the encoder's geometry: ort (ORT's, |offset| between centres) or signed "
                 "(signed offsets: tells a layout from its mirror image)",
    "box_features": "append each object's normalised box and area (x1, y1, x2, y2, area) to its features",
    "steps": "total optimiser steps",
    "batch_size": "images per batch and process, each with its captions (--captions-per-image); "
                  "it counted captions before batches were per image",
    "optimizer": "noam (Adam 0.9/0.98/1e-9, ORT's schedule) or adamw (linear warmup to --lr)",
    "lr_factor": "noam: the schedule's factor",
    "lr": "adamw: the peak learning rate",
    "warmup": "warm-up steps",
    "decay": "adamw: after the warm-up, none (constant --lr), cosine or linear (to 0 at --steps)",
    "grad_clip": "max gradient L2 norm (0: no clipping)",
    "precision": "auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16 (autocast; fp16 with a GradScaler)",
    "val_every": "validate (greedy decoding, CIDEr-D) every N steps (0: never)",
    "val_images": "validate on the first N val images (0: all)",
    "val_cider": "validate by greedy decoding and CIDEr-D (false: no decoding and no best checkpoint)",
    "val_loss_images": "at each validation, the teacher-forced loss of the first N val images (0: none)",
    "checkpoint_every": "write checkpoint-latest.pt every N steps (0: only at the end)",
    "captions_per_image": "the captions of each image in a cross-entropy batch: all, one-random, or an int k "
                          "(the first k)",
    "scst_from_step": "self-critical training (CIDEr-D reward) for the steps after this many (-1: never; "
                      "0: from the start; may be set when resuming a cross-entropy run)",
    "scst_baseline": "greedy (the greedy caption's reward) or mean (the mean reward of the image's other samples)",
    "scst_samples": "sampled captions per image in SCST (>= 2 with the mean baseline)",
    "scst_batch_size": "images per SCST batch and process (0: --batch-size)",
    "scst_lr": "constant learning rate of the SCST steps",
}


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_options(parser: argparse.ArgumentParser) -> None:
    from geocap.train.config import TrainConfig

    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="JSON file of options (command-line options override it)")
    parser.add_argument("--variant", default=argparse.SUPPRESS, metavar="NAME",
                        help="a geometry variant by its name (as in geocap study): ort, none (no geometry), "
                             "directional (--embedding signed) or absolute (none + --box-features true); sets "
                             "those options")
    parser.add_argument("--resume", action="store_true", default=False,
                        help="continue RUN/checkpoint-latest.pt with RUN/train_config.json's options")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "bool": _bool}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                            metavar="BOOL" if kind is _bool else f.name.upper(),
                            help=f"{_HELP.get(f.name, '')} (default {f.default!r})".strip())
    add_progress_option(parser, default=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> "TrainConfig":
    """The TrainConfig of parsed ``geocap train`` options: defaults (or, with --resume, the run's
    train_config.json), then --config, then the options given (``--variant`` standing for the
    options of :data:`geocap.train.variants.VARIANTS` it names)."""
    from geocap.train.config import CONFIG_FILE, TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if hasattr(args, "variant"):
        from geocap.train.variants import variant_options

        given.update(variant_options(args.variant, given))
    base = None
    if getattr(args, "resume", False):
        out = given.get("out")
        if not out and hasattr(args, "config"):
            out = TrainConfig.load(args.config).out
        if not out:
            raise UsageError("--resume needs --out RUN")
        saved = os.path.join(out, CONFIG_FILE)
        if not os.path.isfile(saved):
            raise UsageError(f"--resume: {saved} missing (RUN holds no training run)")
        base = TrainConfig.load(saved)
    if hasattr(args, "config"):
        base = TrainConfig.load(args.config, base)
    return TrainConfig.from_dict(given, base)


def run(args: argparse.Namespace) -> int:
    """Handler of ``geocap train``: trains (or resumes), prints where the run is; geocap's errors
    (:mod:`geocap.errors`) for bad options or data."""
    from geocap.train import train

    config = config_from_args(args)
    result = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        best = ("" if result.best_cider is None
                else f"; best val CIDEr-D {result.best_cider:.4f} at step {result.best_step}")
        print(f"trained to step {result.step}{best}; run in {result.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap train`` on an argparse subparsers object; returns its parser."""
    import geocap.train

    parser = subparsers.add_parser(
        "train", help="cross-entropy and self-critical training of the captioner (torchrun for several processes)",
        description=geocap.train.__doc__.split("\n\n")[0] + " Data: DIR/features.h5 and DIR/caps/ (vocab.json, "
                    "captions.h5), as `geocap synth DIR` and `geocap prepro captions --karpathy DIR/dataset_coco.json "
                    "--out DIR/caps` write them.")
    _add_options(parser)
    parser.set_defaults(func=run)
    return parser

