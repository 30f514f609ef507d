"""COCO caption annotations (``captions_train2014.json`` and the like), read through
pycocotools: ``{"images": [{"id", "width", "height", "file_name", ...}], "annotations":
[{"image_id", "id", "caption"}], ...}``. Also image sizes from any JSON whose ``images``
entries carry them.
"""
from __future__ import annotations

import contextlib
import io

from pycocotools.coco import COCO

from ..items import Caption, CaptionSet, DataError
from ._common import int_field, load_json


def read_coco_captions(path) -> CaptionSet:
    """Read COCO caption annotations into a :class:`CaptionSet` (``splits`` empty).

    Captions in the file's annotation order: image_id, caption_id = the annotation ``id``,
    text = ``caption`` unchanged (COCO's captions keep their stray spaces and capitals),
    tokens None. The file is decoded as UTF-8 and indexed by pycocotools' ``COCO`` (its
    progress prints are suppressed). Duplicate image or annotation ids, and captions of an
    image the file does not list, raise :class:`DataError` naming the file and image.
    """
    data = load_json(path)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no {key!r} list")
    for i, image in enumerate(data["images"]):
        int_field(image, "id", f"{path}: images[{i}]")
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "id"):
            int_field(ann, key, f"{path}: annotations[{i}]")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    if len(coco.imgs) != len(data["images"]):
        raise DataError(f"{path}: image {_first_duplicate(i['id'] for i in data['images'])}: "
                        f"duplicate image id")
    if len(coco.anns) != len(data["annotations"]):
        dup = _first_duplicate(a["id"] for a in data["annotations"])
        raise DataError(f"{path}: image {coco.anns[dup]['image_id']}: duplicate annotation "
                        f"id {dup}")
    out = CaptionSet()
    for ann in data["annotations"]:
        image_id = ann["image_id"]
        if image_id not in coco.imgs:
            raise DataError(f"{path}: image {image_id}: annotation {ann['id']} is for an image "
                            f"missing from 'images'")
        if not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: image {image_id}: annotation {ann['id']} has no caption")
        out.captions.append(Caption(image_id=image_id, caption_id=ann["id"], text=ann["caption"]))
    return out


def read_image_sizes(path) -> dict:
    """{image_id: (width, height)} from a JSON file's ``images`` entries that carry ``width``
    and ``height`` (COCO annotations do; Karpathy's file and cocotalk.json only when someone
    added them). The id is ``id``, else ``cocoid``. DataError when no entry has a size, a size
    is not positive, or one id has two different sizes.
    """
    data = load_json(path)
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{path}: no 'images' list")
    sizes = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "width" not in image or "height" not in image:
            continue
        where = f"{path}: images[{i}]"
        image_id = int_field(image, "id" if "id" in image else "cocoid", where)
        size = (int_field(image, "width", where), int_field(image, "height", where))
        if size[0] <= 0 or size[1] <= 0:
            raise DataError(f"{path}: image {image_id}: size {size[0]}x{size[1]} is not positive")
        if sizes.setdefault(image_id, size) != size:
            raise DataError(f"{path}: image {image_id}: two different sizes, {sizes[image_id]} "
                            f"and {size}")
    if not sizes:
        raise DataError(f"{path}: no image carries 'width' and 'height'")
    return sizes


def _first_duplicate(values):
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None
