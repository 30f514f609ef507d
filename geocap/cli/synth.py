"""``geocap synth OUT``: the embedded synthetic dataset (:func:`geocap.data.synth.generate_synthetic`)."""
from __future__ import annotations

import argparse


def run(args) -> int:
    """Handler of ``geocap synth``: writes the dataset, prints its summary."""
    from geocap.data.synth import generate_synthetic

    summary = generate_synthetic(args.out, images=args.images, seed=args.seed, feature_dim=args.feature_dim)
    print("\n".join(summary.lines()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap synth OUT [--images N] [--seed S] [--feature-dim D]`` on an argparse
    subparsers object; returns its parser. The handler returns 0, or raises geocap's errors for
    bad arguments (exit status 2)."""
    from geocap.data.synth import DEFAULT_FEATURE_DIM, DEFAULT_IMAGES

    p = subparsers.add_parser(
        "synth", help="write the embedded synthetic dataset (captions, splits, features, ground truth)",
        description="Write synthetic scenes into OUT: captions_coco.json (COCO captions), dataset_coco.json "
                    "(Karpathy splits), features.h5 (the feature store) and ground_truth.json.")
    p.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES, help=f"images to generate (default {DEFAULT_IMAGES})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--feature-dim", type=int, default=DEFAULT_FEATURE_DIM,
                   help=f"feature dimension D (default {DEFAULT_FEATURE_DIM})")
    p.set_defaults(func=run)
    return p
