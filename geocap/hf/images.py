"""The images a Hugging Face captioner's dump reads: a folder of JPEG/PNG files, optionally with
COCO caption annotations (``captions_*.json``) and COCO instance annotations (``instances_*.json``).

Image ids: with a captions file, its ``images`` list (``id``, ``file_name``) in ascending id, every
file required in the folder; without one, every image file (``IMAGE_EXTENSIONS``) of the folder (not
its subfolders) in name order, the id being the number its name ends with (COCO's names:
``COCO_val2014_000000000042.jpg`` -> 42) when every file has a distinct one, else the file's
position in name order (0, 1, ...). Instances: per image its objects' category id and box, the
COCO ``bbox`` ``[x, y, w, h]`` in pixels normalised by the image's size in the instances file
to ``(x1, y1, x2, y2)`` in [0, 1]; crowd annotations (``iscrowd``) are left out.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from geocap.data.file_digest import file_sha256
from geocap.data.image_files import IMAGE_EXTENSIONS, image_id_from_name
from geocap.data.json_file import read_json
from geocap.data.readers.coco import read_coco_file
from geocap.errors import DataError

__all__ = ["ImageSet", "load_image_set", "read_image"]

@dataclass
class ImageSet:
    """``image_ids [M]`` int64 ascending, ``files`` their names in ``folder``, ``captions`` per
    image its caption texts (None without a captions file), ``instances`` per image id its
    ``[(category id, (x1, y1, x2, y2))]`` and ``categories`` ``{id: name}`` (empty without an
    instances file); ``digests``: SHA-256 of the annotation files read (name -> hex);
    ``captions_file`` the captions file's path; ``unlisted``: the image files of ``folder`` its
    images list does not name (left out of the dump, counted in its summary)."""

    folder: str
    image_ids: np.ndarray
    files: list
    captions: Optional[list] = None
    instances: dict = field(default_factory=dict)
    categories: dict = field(default_factory=dict)
    digests: dict = field(default_factory=dict)
    captions_file: Optional[str] = None
    unlisted: list = field(default_factory=list)

    @property
    def ids_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.image_ids, np.int64).tobytes()).hexdigest()

    def path(self, position: int) -> str:
        return os.path.join(self.folder, self.files[position])


def _folder_files(folder: str, required: bool = True) -> list:
    files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files and required:
        raise DataError(f"--images: {folder} holds no image file ({'/'.join(IMAGE_EXTENSIONS)})")
    return files


def _ids_from_names(files: list) -> np.ndarray:
    numbers = [image_id_from_name(f) for f in files]
    if None not in numbers and len(set(numbers)) == len(files):
        return np.array(numbers, np.int64)
    return np.arange(len(files), dtype=np.int64)


def _read_captions(path: str, folder: str) -> tuple:
    """``(image ids ascending, their file names, per image its caption texts ordered by annotation
    id)`` from the COCO captions file ``path`` (:func:`geocap.data.readers.coco.read_coco_file`'s
    checks, then a file name per image, caption text that is not blank and every file in ``folder``)."""
    try:
        coco = read_coco_file(path)
        files = {image_id: coco.file_name(image_id) for image_id in coco.images}
    except DataError as err:
        raise DataError(f"--captions: {err}") from None
    captions: dict = {i: [] for i in files}
    for ann in sorted(coco.annotations, key=lambda a: (a["image_id"], a["id"])):
        image_id = ann["image_id"]
        if not ann["caption"].strip():
            raise DataError(f"--captions: {path}: annotation {ann['id']!r} of image {image_id} "
                            f"({files[image_id]}) has no caption text")
        captions[image_id].append(ann["caption"])
    ids = sorted(files)
    for image_id in ids:
        if not os.path.isfile(os.path.join(folder, files[image_id])):
            raise DataError(f"image {image_id}: file {os.path.join(folder, files[image_id])} (from --captions "
                             f"{path}) is missing")
    return np.array(ids, np.int64), [files[i] for i in ids], [captions[i] for i in ids]


def _read_instances(path: str) -> tuple:
    data = read_json(path, "COCO instances file")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise DataError(f"--instances: {path}: not COCO instance annotations (needs 'images', 'annotations' and "
                         f"'categories' lists)")
    categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    sizes = {int(e["id"]): (float(e["width"]), float(e["height"])) for e in data["images"]}
    instances: dict = {}
    for ann in data["annotations"]:
        image_id, cid = ann.get("image_id"), ann.get("category_id")
        if image_id not in sizes or cid not in categories:
            raise DataError(f"--instances: {path}: annotation {ann.get('id')!r} names an unknown image {image_id!r} "
                             f"or category {cid!r}")
        if ann.get("iscrowd"):
            continue
        width, height = sizes[image_id]
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not (width > 0 and height > 0 and w >= 0 and h >= 0):
            raise DataError(f"--instances: {path}: annotation {ann.get('id')!r} of image {image_id}: bad bbox "
                             f"{ann['bbox']} or image size {width}x{height}")
        box = (max(0.0, x / width), max(0.0, y / height), min(1.0, (x + w) / width), min(1.0, (y + h) / height))
        instances.setdefault(int(image_id), []).append((int(cid), box))
    return instances, categories


def load_image_set(folder, *, captions=None, instances=None, limit: int = 0) -> ImageSet:
    """The images of ``folder`` (see the module doc), the first ``limit`` only when > 0;
    ValueError naming the argument, the file or the image id."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise DataError(f"--images: {folder}: no such directory")
    digests, texts, unlisted = {}, None, []
    if captions is not None:
        captions = os.path.abspath(os.fspath(captions))
        if not os.path.isfile(captions):
            raise DataError(f"--captions: {captions}: no such file")
        image_ids, files, texts = _read_captions(captions, folder)
        digests["captions"] = file_sha256(captions)
        named = set(files)
        unlisted = [f for f in _folder_files(folder, required=False) if f not in named]
    else:
        files = _folder_files(folder)
        image_ids = _ids_from_names(files)
        order = np.argsort(image_ids, kind="stable")
        image_ids, files = image_ids[order], [files[i] for i in order]
    if limit:
        image_ids, files = image_ids[:limit], files[:limit]
        texts = texts[:limit] if texts is not None else None
    boxes, names = {}, {}
    if instances is not None:
        instances = os.path.abspath(os.fspath(instances))
        if not os.path.isfile(instances):
            raise DataError(f"--instances: {instances}: no such file")
        boxes, names = _read_instances(instances)
        digests["instances"] = file_sha256(instances)
    return ImageSet(folder=folder, image_ids=image_ids, files=files, captions=texts, instances=boxes,
                    categories=names, digests=digests, captions_file=captions, unlisted=unlisted)


def read_image(path: str, image_id: int):
    """The image file as an RGB ``PIL.Image``, as a browser shows it: turned upright by its EXIF
    orientation (``ImageOps.exif_transpose``), and 16-bit grey levels scaled to 8 bits (``/ 257``,
    rounded; PIL's own RGB conversion clips them to white). ValueError naming the image id and the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                grey = np.asarray(image, dtype=np.float64)
                if grey.size and (grey.min() < 0 or grey.max() > 65535):
                    raise DataError(f"image {image_id}: {path}: grey levels outside 16 bits ({image.mode})")
                image = Image.fromarray(np.round(grey / 257.0).astype(np.uint8), mode="L")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"image {image_id}: cannot read {path} ({err})") from None
