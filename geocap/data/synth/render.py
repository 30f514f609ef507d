"""The synthetic scenes drawn as images, for image captioners (patch encoders such as ViT) that
read pixels instead of detector features; the ``geocap synth-images`` command.

``render_images(data_dir, out_dir)`` reads ``ground_truth.json`` and ``captions_coco.json`` of a
``geocap synth`` folder and writes into ``out_dir``:

``images/<stem>.png``
    One PNG per image, ``<stem>`` the stem of the image's COCO ``file_name`` (``synth_<id>.png``),
    at the image's width x height, or scaled so that its longer side is ``size`` (each side
    rounded half up, at least 1 pixel). A plain background (:data:`BACKGROUND`), then every
    object's box filled with its category's colour and pattern (:func:`category_style`), with a
    one-pixel outline (:data:`OUTLINE`) when the box is at least 5 pixels each way.
``captions_<split>.json``
    COCO captions of the split's images (``split=None``: every image, ``captions_all.json``):
    ``images [{id, file_name, width, height}]`` with the PNG's name and size, ``annotations
    [{id, image_id, caption}]`` as in ``captions_coco.json``.
``instances_<split>.json``
    COCO instances (loads with ``pycocotools.coco.COCO``): the same images, ``categories [{id,
    name, supercategory}]`` = every category of the ground truth with its id (0-based, the
    feature store's label ids) and its cluster's name, ``annotations [{id, image_id, category_id,
    bbox, area, iscrowd}]``: one per ground-truth object, in the store's object order, ``bbox``
    ``[x, y, w, h]`` = the normalised box times the written image's width and height (not
    rounded), ``area = w * h``. Annotation ids count the objects of the whole dataset in
    ground-truth order from 1, so an object has the same id whichever split is rendered.
``render.json``
    What was rendered (``size``, the splits and their image counts); written last. A folder
    holding one with another ``size`` is refused, so splits rendered into one folder match.

Drawing conventions (pixel ``(col, row)`` of the written image, origin top left):

- a box ``(x1, y1, x2, y2)`` covers columns ``round(x1 * W) .. round(x2 * W) - 1`` and rows
  likewise (round half up), at least one of each: the pixels whose centres lie in the box;
- its outermost covered pixels are the outline when it covers at least :data:`MIN_OUTLINED`
  (5) columns and rows (a smaller box is all fill, so that its colour survives at small sizes);
  the rest is filled: pixel ``(c, r)`` gets the category's ``accent`` where its ``pattern`` is
  on at ``(c, r)`` (:func:`pattern_on`, anchored at the image's origin with period
  :func:`pattern_period`), its ``colour`` elsewhere;
- order: larger boxes first (so small objects resting on large ones stay visible), each whole
  directly followed by its parts (``part_of``), so a part is always drawn over its whole; ties
  by object index.

Every file is written under a temporary name and renamed (``geocap.data.atomic``); the JSON files
come after every image, so a split whose JSON files exist is complete. The same inputs give
byte-identical files. Bad input (a missing or unreadable file, images of the two files that
disagree, an unknown split, a bad size) is a ValueError naming the file, image or argument.
"""
from __future__ import annotations

import colorsys
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..atomic import atomic_output, write_text_atomic
from ..json_file import read_json
from ..readers.coco import read_coco_file
from .generate import FILES
from geocap.errors import DataError, UsageError

SPLITS = ("train", "val", "test")
BACKGROUND = (236, 236, 230)
OUTLINE = (24, 24, 24)
PATTERNS = ("solid", "horizontal", "vertical", "diagonal", "checker")
MIN_LONGER_SIDE = 16
MIN_OUTLINED = 5               # a box narrower or lower than this (pixels) gets no outline
MARKER = "render.json"
_HUES = 25                     # evenly spaced hues; category k takes hue number (7 k) mod 25


@dataclass(frozen=True)
class CategoryStyle:
    """How a category is drawn: RGB ``colour`` and ``accent`` (the pattern's marks), ``pattern``
    one of :data:`PATTERNS`."""
    colour: tuple
    accent: tuple
    pattern: str


def category_style(category_id: int) -> CategoryStyle:
    """The style of category ``category_id`` (>= 0), a pure function of the id. Hues are 25 evenly
    spaced steps, taken 7 apart for consecutive ids (a cluster's categories have consecutive ids,
    so they get far-apart hues), bright on even steps and darker on odd ones; the pattern cycles
    through :data:`PATTERNS`; the accent is the colour at 55 % brightness. The 25 categories of
    the synthetic world get 25 colours at least 40 apart in RGB (Euclidean), all far from the
    background."""
    if isinstance(category_id, bool) or not isinstance(category_id, (int, np.integer)) or category_id < 0:
        raise ValueError(f"category_id must be an int >= 0, got {category_id!r}")
    step = (7 * int(category_id)) % _HUES
    lap = int(category_id) // _HUES                  # ids beyond 24 (not in the synthetic world) get paler
    value = 0.95 if step % 2 == 0 else 0.7
    saturation = 0.75 / (1 + lap)
    rgb = colorsys.hsv_to_rgb(step / _HUES, saturation, value)
    colour = tuple(int(255 * c + 0.5) for c in rgb)
    accent = tuple(int(0.55 * c + 0.5) for c in colour)
    return CategoryStyle(colour=colour, accent=accent, pattern=PATTERNS[int(category_id) % len(PATTERNS)])


def pattern_period(width: int, height: int) -> int:
    """The patterns' period in pixels on a ``width`` x ``height`` image: 1/16 of the longer side,
    at least 4 (so a pattern survives downscaling to a few patches per side)."""
    return max(4, int(max(width, height) / 16 + 0.5))


def pattern_on(pattern: str, cols, rows, period: int) -> np.ndarray:
    """Where ``pattern`` puts its accent, at pixel columns ``cols`` and rows ``rows`` (integer
    arrays that broadcast together; anchored at the image's origin): bool array.

    solid: nowhere; horizontal / vertical: stripes ``max(1, period // 3)`` pixels wide every
    ``period`` rows / columns; diagonal: the same along ``col + row``; checker: squares of side
    ``max(1, period // 2)``."""
    cols, rows = np.asarray(cols), np.asarray(rows)
    stripe, half = max(1, period // 3), max(1, period // 2)
    if pattern == "solid":
        return np.zeros(np.broadcast_shapes(cols.shape, rows.shape), dtype=bool)
    if pattern == "horizontal":
        return np.broadcast_to(rows % period < stripe, np.broadcast_shapes(cols.shape, rows.shape))
    if pattern == "vertical":
        return np.broadcast_to(cols % period < stripe, np.broadcast_shapes(cols.shape, rows.shape))
    if pattern == "diagonal":
        return (cols + rows) % period < stripe
    if pattern == "checker":
        return (cols // half + rows // half) % 2 == 0
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def image_size(width: int, height: int, size: Optional[int]) -> tuple:
    """The written image's (width, height): as given, or scaled so the longer side is ``size``."""
    if size is None:
        return int(width), int(height)
    scale = size / max(width, height)
    return max(1, _round(width * scale)), max(1, _round(height * scale))


def pixel_span(box, width: int, height: int) -> tuple:
    """The pixels a normalised box covers: ``(col0, row0, col1, row1)``, half-open, at least one
    pixel each way (see the module docstring)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    c0, r0 = _round(x1 * width), _round(y1 * height)
    c1, r1 = max(_round(x2 * width), c0 + 1), max(_round(y2 * height), r0 + 1)
    return c0, r0, min(c1, width), min(r1, height)


def drawing_order(boxes, part_of) -> list:
    """Object indices in drawing order: by decreasing box area, each whole directly followed by
    its parts (recursively, by decreasing area), ties by index. ``boxes`` ``[N, 4]`` normalised;
    ``part_of[i]`` the index of i's whole or -1. ValueError for a ``part_of`` outside the
    objects or a cycle."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    n = len(boxes)
    keys = {}

    def key(i, seen=()):
        if i in keys:
            return keys[i]
        whole = int(part_of[i])
        if whole != -1 and not 0 <= whole < n:
            raise ValueError(f"object {i}: part_of {whole} is not an object index (0..{n - 1}) or -1")
        if i in seen:
            raise ValueError(f"object {i}: part_of forms a cycle")
        own = (-float(area[i]), i)
        keys[i] = own if whole == -1 else key(whole, seen + (i,)) + own
        return keys[i]

    return sorted(range(n), key=key)


def render_scene(width: int, height: int, objects) -> np.ndarray:
    """One image, ``uint8 [height, width, 3]``: ``objects`` a list of dicts with ``category_id``,
    ``box`` (normalised x1, y1, x2, y2) and ``part_of``, drawn as the module docstring says."""
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    if not objects:
        return canvas
    period = pattern_period(width, height)
    for i in drawing_order([o["box"] for o in objects], [o["part_of"] for o in objects]):
        style = category_style(objects[i]["category_id"])
        c0, r0, c1, r1 = pixel_span(objects[i]["box"], width, height)
        inset = 1 if min(c1 - c0, r1 - r0) >= MIN_OUTLINED else 0
        canvas[r0:r1, c0:c1] = OUTLINE
        cols, rows = np.arange(c0 + inset, c1 - inset)[None, :], np.arange(r0 + inset, r1 - inset)[:, None]
        on = pattern_on(style.pattern, cols, rows, period)
        canvas[r0 + inset:r1 - inset, c0 + inset:c1 - inset] = np.where(on[..., None], np.uint8(style.accent),
                                                                         np.uint8(style.colour))
    return canvas


# ----------------------------------------------------------------------------- the files


def _png_name(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0] + ".png"


def _read_inputs(data_dir: str):
    """Ground truth and COCO captions, checked against each other: ``(truth, coco_images by id,
    captions by image id)``."""
    truth_path = os.path.join(data_dir, FILES["ground_truth"])
    coco_path = os.path.join(data_dir, FILES["captions"])
    truth = read_json(truth_path, "synthetic ground truth (geocap synth)")
    if not isinstance(truth, dict) or truth.get("format") != "geocap-synth-ground-truth":
        raise DataError(f"{truth_path}: not a geocap synthetic ground truth (no format 'geocap-synth-ground-truth')")
    coco = read_coco_file(coco_path, "COCO captions file (geocap synth)")
    coco_images = coco.images
    captions = {image_id: [{"id": ann["id"], "image_id": image_id, "caption": ann["caption"]} for ann in anns]
                for image_id, anns in coco.captions_by_image().items()}
    try:
        truth_ids = set()
        for image in truth["images"]:
            image_id = image["image_id"]
            truth_ids.add(image_id)
            coco_image = coco_images.get(image_id)
            if coco_image is None:
                raise DataError(f"{coco_path}: image {image_id} of {truth_path} is missing")
            if (coco_image.get("width"), coco_image.get("height")) != (image["width"], image["height"]):
                raise DataError(f"{coco_path}: image {image_id} is {coco_image.get('width')}x"
                                 f"{coco_image.get('height')}, {truth_path} says {image['width']}x{image['height']}")
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{truth_path}: malformed ground truth ({err!r})") from None
    unknown = sorted(set(captions) - truth_ids)
    if unknown:
        raise DataError(f"{coco_path}: captions of image {unknown[0]}, which {truth_path} does not hold")
    return truth, coco_images, captions


def _check_size(size) -> None:
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_LONGER_SIDE:
        raise UsageError(f"size must be None or an int >= {MIN_LONGER_SIDE} (the longer side in pixels), got {size!r}")


def _check_split(split) -> str:
    """The split's name in the file names ("all" for None); ValueError for an unknown split."""
    if split is None:
        return "all"
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)} or None (every image), got {split!r}")
    return split


def _read_marker(out_dir: str, size) -> dict:
    """The folder's ``render.json`` (a fresh one when absent); ValueError when it was rendered
    at another size, or when the folder holds other things and no ``render.json``."""
    path = os.path.join(out_dir, MARKER)
    if not os.path.exists(path):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise UsageError(f"out_dir: {out_dir} is not empty and holds no {MARKER} (not a geocap synth-images "
                             f"folder); refusing to write into it")
        return {"format": "geocap-synth-images", "format_version": 1, "size": size, "splits": {}}
    marker = read_json(path, "geocap synth-images record")
    if marker.get("size") != size:
        raise UsageError(f"size: {out_dir} was rendered with size {marker.get('size')}, not {size}; "
                         f"render into another folder")
    return marker


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _select(truth: dict, truth_path: str, coco_images: dict, captions: dict, split, size):
    """The split's images and the JSON entries of both files: ``(selected [(image, width, height,
    file_name)], images, caption annotations, instance annotations, categories)``; ValueError
    naming the ground truth file (and the image) for anything malformed."""
    try:
        categories = [{"id": int(c["id"]), "name": c["name"], "supercategory": c["cluster"]}
                      for c in truth["categories"]]
        known = {c["id"] for c in categories}

        json_images, caption_anns, instance_anns = [], [], []
        selected, next_id = [], 1
        for image in truth["images"]:
            first_id, next_id = next_id, next_id + len(image["objects"])
            if split is not None and image["split"] != split:
                continue
            image_id = image["image_id"]
            for j, o in enumerate(image["objects"]):
                if o["category_id"] not in known:
                    raise DataError(f"{truth_path}: image {image_id}, object {j}: category {o['category_id']} is not "
                                     f"in its categories table")
            width, height = image_size(image["width"], image["height"], size)
            file_name = _png_name(coco_images[image_id]["file_name"])
            json_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            caption_anns.extend(captions.get(image_id, []))
            for j, o in enumerate(image["objects"]):
                x1, y1, x2, y2 = (float(v) for v in o["box"])
                w, h = (x2 - x1) * width, (y2 - y1) * height
                instance_anns.append({"id": first_id + j, "image_id": image_id, "category_id": int(o["category_id"]),
                                      "bbox": [x1 * width, y1 * height, w, h], "area": w * h, "iscrowd": 0})
            selected.append((image, width, height, file_name))
        for image, _, _, _ in selected:           # validate every part_of before writing anything
            try:
                drawing_order([o["box"] for o in image["objects"]], [o["part_of"] for o in image["objects"]])
            except ValueError as err:
                raise DataError(f"{truth_path}: image {image['image_id']}: {err}") from None
    except (KeyError, TypeError, IndexError) as err:
        raise DataError(f"{truth_path}: malformed ground truth ({err!r})") from None
    return selected, json_images, caption_anns, instance_anns, categories


def render_images(data_dir, out_dir, *, split: Optional[str] = None, size: Optional[int] = None,
                  progress: bool = True) -> dict:
    """Draw the images of a ``geocap synth`` folder and write their COCO files (see the module
    docstring). ``split``: "train", "val", "test", or None for every image; ``size``: the longer
    side in pixels (>= 16), or None for the ground truth's sizes.

    Returns ``{"out_dir", "split", "images", "objects", "captions", "images_dir", "captions_json",
    "instances_json", "seconds"}`` (counts, and the paths written). ValueError naming the file,
    image or argument for bad input, before anything is written."""
    from PIL import Image

    from geocap.progress import progress_bar

    started = time.perf_counter()
    data_dir, out_dir = os.fspath(data_dir), os.fspath(out_dir)
    _check_size(size)
    name = _check_split(split)
    truth_path = os.path.join(data_dir, FILES["ground_truth"])
    truth, coco_images, captions = _read_inputs(data_dir)
    selected, json_images, caption_anns, instance_anns, categories = _select(truth, truth_path, coco_images,
                                                                             captions, split, size)
    if not selected:
        raise UsageError(f"split {split!r}: {truth_path} holds no image of that split")
    marker = _read_marker(out_dir, size)
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    bar = progress_bar(total=len(selected), unit="img", desc=f"render {name}", enabled=progress)
    try:
        for image, width, height, file_name in selected:
            pixels = render_scene(width, height, image["objects"])
            with atomic_output(os.path.join(images_dir, file_name)) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
            bar.update(1)
    finally:
        bar.close()
    info = {"description": f"geocap synthetic scenes rendered as images ({name})", "version": "1"}
    captions_json = os.path.join(out_dir, f"captions_{name}.json")
    instances_json = os.path.join(out_dir, f"instances_{name}.json")
    write_text_atomic(captions_json, _dumps({"info": info, "licenses": [], "images": json_images,
                                             "annotations": caption_anns}))
    write_text_atomic(instances_json, _dumps({"info": info, "licenses": [], "images": json_images,
                                              "categories": categories, "annotations": instance_anns}))
    marker["splits"][name] = len(selected)
    marker["splits"] = dict(sorted(marker["splits"].items()))
    write_text_atomic(os.path.join(out_dir, MARKER), _dumps(marker))
    return {"out_dir": out_dir, "split": name, "images": len(selected), "objects": len(instance_anns),
            "captions": len(caption_anns), "images_dir": images_dir, "captions_json": captions_json,
            "instances_json": instances_json, "seconds": time.perf_counter() - started}
