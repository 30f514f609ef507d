"""``geocap hf-train-tiny``: a tiny Hugging Face VisionEncoderDecoderModel trained from scratch on
rendered images (:mod:`geocap.hf.tiny`). Needs geocap[hf]."""
from __future__ import annotations

import argparse

from geocap.cli import add_progress_option


def run(args) -> int:
    """Handler of ``geocap hf-train-tiny``: trains, saves, prints a summary."""
    from geocap.hf.tiny import train_tiny_captioner

    sizes = {k: getattr(args, k) for k in ("image_size", "patch_size", "d_model", "layers", "heads")}
    summary = train_tiny_captioner(args.images, args.captions, args.out, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, progress=args.progress, **sizes)
    print(f"trained a tiny VisionEncoderDecoderModel ({summary['parameters']} parameters, vocabulary "
          f"{summary['vocab_size']}) on {summary['images']} images / {summary['captions']} captions: "
          f"{summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
          f"{summary['seconds_per_step']:.3f} s/step; saved to {summary['out_dir']}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap hf-train-tiny --images DIR --captions JSON --out MODEL_DIR [--steps N]
    [--batch-size B] [--lr LR] [--seed S] [--image-size S] [--patch-size P] [--d-model D]
    [--layers L] [--heads H] [--no-progress]``. The handler returns 0, or raises geocap's errors for
    bad input (exit status 2)."""
    from geocap.hf.tiny import DEFAULT_SIZES

    d = DEFAULT_SIZES
    p = subparsers.add_parser(
        "hf-train-tiny", help="train a tiny Hugging Face VisionEncoderDecoderModel from scratch on rendered images",
        description="Train a tiny ViT + GPT-2 VisionEncoderDecoderModel from random init on a COCO captions file and "
                    "its images (e.g. `geocap synth-images` output), on the CPU, and save it with its tokenizer and "
                    "image processor (save_pretrained) for geocap.hf.record_captions. Needs geocap[hf].")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of the images (file_name in the JSON)")
    p.add_argument("--captions", required=True, metavar="JSON", help="COCO captions file")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output folder (replaced if it holds a model)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, each with all its captions (16)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=d["image_size"], help=f"input side (default {d['image_size']})")
    p.add_argument("--patch-size", type=int, default=d["patch_size"], help=f"patch side (default {d['patch_size']})")
    p.add_argument("--d-model", type=int, default=d["d_model"], help=f"width (default {d['d_model']})")
    p.add_argument("--layers", type=int, default=d["layers"], help=f"layers per side (default {d['layers']})")
    p.add_argument("--heads", type=int, default=d["heads"], help=f"attention heads (default {d['heads']})")
    add_progress_option(p)
    p.set_defaults(func=run)
    return p
