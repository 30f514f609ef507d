"""Karpathy's split file ``dataset_coco.json`` (from neuraltalk2 / "Deep Visual-Semantic
Alignments"): ``{"images": [{"cocoid", "split", "sentences": [{"tokens", "raw", "sentid",
...}], "filepath", "filename", ...}], "dataset": "coco"}`` with split one of train, val, test,
restval (restval is the rest of COCO val2014, used for training).
"""
from __future__ import annotations

from ..items import Caption, CaptionSet, DataError
from ._common import int_field, load_json

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def split_name(split, path, image_id) -> str:
    """The record's split for a file's split name (restval -> train); DataError if unknown."""
    if split not in SPLITS:
        raise DataError(f"{path}: image {image_id}: unknown split {split!r} "
                        f"(expected one of {', '.join(SPLITS)})")
    return SPLITS[split]


def read_karpathy(path) -> CaptionSet:
    """Read a Karpathy split file into a :class:`CaptionSet`.

    Captions in file order: image_id = ``cocoid``, caption_id = ``sentid``, text = ``raw``
    (unchanged), tokens = ``tokens`` (as stored: lower-cased, punctuation dropped). splits maps
    every cocoid to "train" (train and restval), "val" or "test". Duplicate cocoids or sentids,
    unknown splits and malformed entries raise :class:`DataError` naming the file and image.
    """
    data = load_json(path)
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{path}: no 'images' list")
    out = CaptionSet()
    sentids = {}
    for i, image in enumerate(images):
        image_id = int_field(image, "cocoid", f"{path}: images[{i}]")
        at = f"{path}: image {image_id}"
        if image_id in out.splits:
            raise DataError(f"{at}: duplicate image id")
        out.splits[image_id] = split_name(image.get("split"), path, image_id)
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{at}: no 'sentences' list")
        for j, sentence in enumerate(sentences):
            sentid = int_field(sentence, "sentid", f"{at}: sentences[{j}]")
            if sentid in sentids:
                raise DataError(f"{at}: duplicate sentid {sentid} (also in image {sentids[sentid]})")
            sentids[sentid] = image_id
            raw, tokens = sentence.get("raw"), sentence.get("tokens")
            if not isinstance(raw, str):
                raise DataError(f"{at}: sentence {sentid} has no 'raw' text")
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise DataError(f"{at}: sentence {sentid} has no 'tokens' list of strings")
            out.captions.append(Caption(image_id=image_id, caption_id=sentid, text=raw,
                                        tokens=list(tokens)))
    return out
