"""COCO caption annotations (``captions_train2014.json`` and the like): ``{"images": [{"id",
"width", "height", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}], ...}``.
Also image sizes from any JSON whose ``images`` entries carry them.

:func:`read_coco_file` is the one parser of a COCO captions file: every reader of one (prepro's
:func:`read_coco_captions`, the Hugging Face image set and tiny trainer, the synthetic renderer)
goes through it, so they share one set of checks, in one order, with one error type
(:class:`DataError` naming the file and, where there is one, the image id).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..items import Caption, CaptionSet, DataError
from ._common import first_duplicate, int_field, load_json


@dataclass
class CocoCaptionsFile:
    """A checked COCO captions file.

    ``images``: ``{image_id: its "images" entry (dict)}`` in the file's order; ``annotations``: the
    ``"annotations"`` entries (dicts) in the file's order, each with an integer ``image_id`` listed
    in ``images``, an integer ``id`` unique in the file, and a string ``caption`` (unchanged: COCO's
    captions keep their stray spaces and capitals).
    """

    path: str
    images: dict
    annotations: list

    def file_name(self, image_id: int) -> str:
        """The ``file_name`` of image ``image_id``; DataError naming the file and image when absent."""
        name = self.images[image_id].get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{self.path}: image {image_id} has no 'file_name' (found {name!r})")
        return name

    def captions_by_image(self) -> dict:
        """``{image_id: [annotation, ...]}`` in file order, for the images that have captions."""
        out: dict = {}
        for ann in self.annotations:
            out.setdefault(ann["image_id"], []).append(ann)
        return out


def read_coco_file(path, what: str = "COCO captions file") -> CocoCaptionsFile:
    """Parse and check the COCO captions file ``path`` (UTF-8). ``what`` names the file in the
    "missing" / "not readable" messages.

    Checks, in this order, each a :class:`DataError` naming ``path`` (and the image id where there
    is one): readable JSON holding an object with ``images`` and ``annotations`` lists; an integer
    ``id`` in every image and an integer ``image_id`` and ``id`` in every annotation; no image id
    twice; no annotation id twice; each annotation's image listed in ``images``; each annotation a
    string ``caption``.
    """
    path = os.fspath(path)
    data = load_json(path, what)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: not a {what} (no {key!r} list; needs 'images' and 'annotations' lists)")
    for i, image in enumerate(data["images"]):
        int_field(image, "id", f"{path}: images[{i}]")
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "id"):
            int_field(ann, key, f"{path}: annotations[{i}]")
    images = {image["id"]: image for image in data["images"]}
    if len(images) != len(data["images"]):
        raise DataError(f"{path}: image {first_duplicate(i['id'] for i in data['images'])}: "
                        f"duplicate image id")
    by_id = {ann["id"]: ann for ann in data["annotations"]}
    if len(by_id) != len(data["annotations"]):
        dup = first_duplicate(a["id"] for a in data["annotations"])
        raise DataError(f"{path}: image {by_id[dup]['image_id']}: duplicate annotation id {dup}")
    for ann in data["annotations"]:
        image_id = ann["image_id"]
        if image_id not in images:
            raise DataError(f"{path}: image {image_id}: annotation {ann['id']} is for an image "
                            f"missing from 'images'")
        if not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: image {image_id}: annotation {ann['id']} has no caption")
    return CocoCaptionsFile(path=path, images=images, annotations=data["annotations"])


def read_coco_captions(path) -> CaptionSet:
    """Read COCO caption annotations into a :class:`CaptionSet` (``splits`` empty).

    Captions in the file's annotation order: image_id, caption_id = the annotation ``id``,
    text = ``caption`` unchanged, tokens None. Checked by :func:`read_coco_file`.
    """
    coco = read_coco_file(path)
    out = CaptionSet()
    for ann in coco.annotations:
        out.captions.append(Caption(image_id=ann["image_id"], caption_id=ann["id"], text=ann["caption"]))
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
