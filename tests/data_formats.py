"""Writers of small files in the public caption and feature formats, for tests.

Each writer produces what the original tools produce (field order, dtypes, key names, 1-indexed
ranges), from plain in-memory values, so tests can check the readers round-trip them exactly.
Ground truth for feature files is a :class:`PixelImage`: boxes in pixels, as detectors emit them.
"""
from __future__ import annotations

import base64
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import h5py
import numpy as np

from geocap.data.items import Caption

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class PixelImage:
    """One image's detector output: boxes float32 ``[N, 4]`` (x1, y1, x2, y2) in pixels,
    features float32 ``[N, D]``."""
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    features: np.ndarray

    @property
    def relative_boxes(self) -> np.ndarray:
        """The boxes divided by the image size, rounded once to float32."""
        size = np.array([self.width, self.height, self.width, self.height], dtype=np.float32)
        return self.boxes / size


def random_images(rng: np.random.Generator, n_images: int, dim: int,
                  n_boxes: Union[int, tuple] = 36, first_id: int = 1) -> list:
    """``n_images`` PixelImages with ids first_id, first_id + 1, ...; boxes inside the image;
    ``n_boxes`` a fixed count or a (low, high) range drawn per image (e.g. (10, 100))."""
    images = []
    for k in range(n_images):
        n = n_boxes if isinstance(n_boxes, int) else int(rng.integers(n_boxes[0], n_boxes[1] + 1))
        w, h = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        size = np.array([w, h], dtype=np.float64)
        xy1 = rng.random((n, 2)) * size
        xy2 = xy1 + rng.random((n, 2)) * (size - xy1)
        boxes = np.concatenate([xy1, xy2], axis=1).astype(np.float32)
        features = (rng.standard_normal((n, dim)) * 3).astype(np.float32)
        images.append(PixelImage(first_id + k, w, h, boxes, features))
    return images


def random_captions(rng: np.random.Generator, image_ids: Sequence[int], per_image: int = 5,
                    first_id: int = 1000, max_words: int = 20) -> list:
    """Captions with tokens (lower-case words) and raw text, ``per_image`` per image."""
    words = ["a", "man", "dog", "riding", "on", "the", "red", "bus", "with", "two", "cats",
             "street", "café", "near", "of", "table", "big", "small", "under", "tree"]
    captions = []
    for image_id in image_ids:
        for _ in range(per_image):
            tokens = [str(w) for w in rng.choice(words, size=int(rng.integers(1, max_words + 1)))]
            text = " ".join(tokens).capitalize() + ". "
            captions.append(Caption(int(image_id), first_id + len(captions), text, tokens))
    return captions


# --- captions -----------------------------------------------------------------------------

def write_json(path, data) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return Path(path)


def write_coco_captions(path, captions: Iterable[Caption],
                        sizes: Optional[Mapping[int, tuple]] = None) -> Path:
    """COCO caption annotations: images (the captions' ids and ``sizes``' ids, with width and
    height when ``sizes`` has them) and one annotation {image_id, id, caption} per caption."""
    captions = list(captions)
    sizes = dict(sizes or {})
    ids = list(dict.fromkeys([c.image_id for c in captions] + list(sizes)))
    images = []
    for i in ids:
        image = {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "license": 1}
        if i in sizes:
            image["width"], image["height"] = sizes[i]
        images.append(image)
    return write_json(path, {
        "info": {"description": "test"}, "licenses": [], "images": images,
        "annotations": [{"image_id": c.image_id, "id": c.caption_id, "caption": c.text}
                        for c in captions],
    })


def write_karpathy(path, captions: Iterable[Caption], splits: Mapping[int, str]) -> Path:
    """Karpathy's ``dataset_coco.json``: one image per key of ``splits`` (train/val/test/
    restval), in that order, with its captions as sentences {tokens, raw, imgid, sentid}."""
    by_image = {i: [] for i in splits}
    for c in captions:
        by_image[c.image_id].append(c)
    images = []
    for imgid, (cocoid, split) in enumerate(splits.items()):
        sents = [{"tokens": list(c.tokens), "raw": c.text, "imgid": imgid, "sentid": c.caption_id}
                 for c in by_image[cocoid]]
        images.append({"filepath": "val2014", "sentids": [s["sentid"] for s in sents],
                       "filename": f"COCO_val2014_{cocoid:012d}.jpg", "imgid": imgid,
                       "split": split, "sentences": sents, "cocoid": cocoid})
    return write_json(path, {"images": images, "dataset": "coco"})


def write_cocotalk(json_path, label_path, captions: Iterable[Caption], splits: Mapping[int, str],
                   *, max_length: int = 16, sizes: Optional[Mapping[int, tuple]] = None) -> list:
    """``cocotalk.json`` and ``cocotalk_label.h5`` as self-critical's prepro_labels.py writes
    them: vocabulary = the sorted distinct tokens (ix_to_word 1-indexed), one ``images`` entry
    per key of ``splits`` in that order, ``labels`` uint32 ``[M, max_length]`` (captions cut
    to max_length, 0-padded) grouped by image, label_start_ix/label_end_ix 1-indexed inclusive.
    Returns the vocabulary (``vocab[k]`` has index k + 1)."""
    captions = list(captions)
    vocab = sorted({t for c in captions for t in c.tokens})
    index = {w: k + 1 for k, w in enumerate(vocab)}
    rows, starts, ends = [], [], []
    images = []
    for image_id, split in splits.items():
        image = {"split": split, "file_path": f"val2014/COCO_val2014_{image_id:012d}.jpg",
                 "id": image_id}
        if sizes and image_id in sizes:
            image["width"], image["height"] = sizes[image_id]
        images.append(image)
        mine = [c for c in captions if c.image_id == image_id]
        starts.append(len(rows) + 1)
        for c in mine:
            row = np.zeros(max_length, dtype=np.uint32)
            seq = [index[t] for t in c.tokens[:max_length]]
            row[:len(seq)] = seq
            rows.append(row)
        ends.append(len(rows))
    write_json(json_path, {"ix_to_word": {str(k): w for w, k in index.items()}, "images": images})
    with h5py.File(label_path, "w") as f:
        f.create_dataset("labels", data=np.stack(rows) if rows else
                         np.zeros((0, max_length), dtype=np.uint32))
        f.create_dataset("label_start_ix", data=np.array(starts, dtype=np.int64))
        f.create_dataset("label_end_ix", data=np.array(ends, dtype=np.int64))
        f.create_dataset("label_length", data=np.array(
            [min(len(c.tokens), max_length) for i in splits for c in captions if c.image_id == i],
            dtype=np.int64))
    return vocab


# --- features -----------------------------------------------------------------------------

def b64(array: np.ndarray) -> str:
    """base64 text of an array's raw bytes."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def tsv_fields(image: PixelImage, *, num_boxes: Optional[int] = None) -> list:
    """The six TSV fields of one image (``num_boxes`` overrides the true count)."""
    # a fixture whose arrays disagree would test the writer, not the reader: malformed rows are
    # built from explicit field strings instead
    assert image.boxes.shape == (len(image.features), 4), "PixelImage boxes must be [N, 4] beside features [N, D]"
    n = len(image.boxes) if num_boxes is None else num_boxes
    return [str(image.image_id), str(image.width), str(image.height), str(n),
            b64(image.boxes.astype("<f4")), b64(image.features.astype("<f4"))]


def write_tsv(path, rows: Iterable[Union[PixelImage, Sequence[str]]]) -> Path:
    """A bottom-up-attention TSV file as generate_tsv.py writes it (csv module, tab delimiter,
    CRLF line ends, no header). A row is a PixelImage, or a list of field strings written as
    given (for malformed lines)."""
    with open(path, "w", newline="", encoding="ascii") as f:
        writer = csv.writer(f, delimiter="\t")
        for row in rows:
            writer.writerow(tsv_fields(row) if isinstance(row, PixelImage) else list(row))
    return Path(path)


def write_npz_dir(feature_dir, box_dir, images: Iterable[PixelImage], *, relative: bool = False,
                  key: str = "feat") -> tuple:
    """ORT / self-critical folders: ``feature_dir/<id>.npz`` holding ``key`` (``feat``, or
    ``z`` as some copies have) and ``box_dir/<id>.npy`` boxes in pixels (cocobu_box) or
    ``relative`` (cocobu_box_relative, float32). Returns (feature_dir, box_dir) as Paths."""
    feature_dir, box_dir = Path(feature_dir), Path(box_dir)
    feature_dir.mkdir(parents=True, exist_ok=True)
    box_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        np.savez_compressed(feature_dir / f"{image.image_id}.npz", **{key: image.features})
        np.save(box_dir / f"{image.image_id}.npy",
                image.relative_boxes if relative else image.boxes)
    return feature_dir, box_dir


def write_m2_h5(path, images: Iterable[PixelImage], *, boxes: bool = True) -> Path:
    """A meshed-memory ``coco_detections.hdf5``: ``<id>_features``, ``<id>_boxes`` (pixels;
    left out when ``boxes`` is False) and ``<id>_cls_prob`` per image."""
    with h5py.File(path, "w") as f:
        for image in images:
            f.create_dataset(f"{image.image_id}_features", data=image.features)
            if boxes:
                f.create_dataset(f"{image.image_id}_boxes", data=image.boxes)
            f.create_dataset(f"{image.image_id}_cls_prob",
                             data=np.full((len(image.boxes), 4), 0.25, dtype=np.float32))
    return Path(path)


def sizes_of(images: Iterable[PixelImage]) -> dict:
    """{image_id: (width, height)} of PixelImages."""
    return {image.image_id: (image.width, image.height) for image in images}


def corrupt_signature(path, signature: bytes, at: int = 0):
    """Overwrite the ``at``-th occurrence of an HDF5 structure's signature (b"HEAP" a local heap,
    b"SNOD" a group's symbol table node, b"TREE" a B-tree node) with junk."""
    data = bytearray(path.read_bytes())
    pos = -1
    for _ in range(at + 1):
        pos = data.index(signature, pos + 1)
    data[pos:pos + len(signature)] = b"\xa5" * len(signature)
    path.write_bytes(bytes(data))


def corrupt_header_bytes(path, seed: int):
    """Four random bytes of the first 4 KiB (superblock, root group, object headers) overwritten."""
    import random
    data = bytearray(path.read_bytes())
    rnd = random.Random(seed)
    for _ in range(4):
        data[rnd.randrange(min(4096, len(data)))] = rnd.randrange(256)
    path.write_bytes(bytes(data))
