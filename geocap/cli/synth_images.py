"""``geocap synth-images``: the synthetic scenes of a ``geocap synth`` folder drawn as PNG images,
with COCO captions and instances files (:func:`geocap.data.synth.render_images`)."""
from __future__ import annotations

import argparse

from geocap.cli import add_progress_option


def run(args) -> int:
    """Handler of ``geocap synth-images``: draws the images, writes the COCO files, prints a summary."""
    from geocap.data.synth import render_images

    summary = render_images(args.data, args.out, split=args.split, size=args.size, progress=args.progress)
    print(f"rendered {summary['images']} images ({summary['split']}, {summary['objects']} objects, "
          f"{summary['captions']} captions) into {summary['images_dir']} in {summary['seconds']:.1f} s; "
          f"wrote {summary['captions_json']} and {summary['instances_json']}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap synth-images --data DIR --out DIR [--split S] [--size N] [--no-progress]``.
    The handler returns 0, or raises geocap's errors for bad input (exit status 2)."""
    from geocap.data.synth.render import SPLITS

    p = subparsers.add_parser(
        "synth-images", help="draw the synthetic scenes as PNG images with COCO captions and instances files",
        description="Draw each image of a `geocap synth` folder (boxes filled with a colour and a pattern per "
                    "category) into OUT/images/, and write OUT/captions_<split>.json and OUT/instances_<split>.json "
                    "(COCO formats; split 'all' without --split).")
    p.add_argument("--data", required=True, metavar="DIR", help="a `geocap synth` output folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--split", choices=SPLITS, default=None, help="only this split's images (default: every image)")
    p.add_argument("--size", type=int, default=None,
                   help="longer side of the written images in pixels (default: the ground truth's sizes)")
    add_progress_option(p)
    p.set_defaults(func=run)
    return p
