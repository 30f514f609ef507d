"""What a dump knows about objects and words beyond the model: referents and clusters from the
synthetic ground truth (``DIR/ground_truth.json``), k-means clusters otherwise, and the
hypothetical captions (reference captions whose nouns name other objects of the image).

Conventions (see :mod:`geocap.data.attention_record`): a record's tokens are the words the decoder
produces, ending with ``"<eos>"`` (unless cut at max_len); ``referents[t]`` the object index token
t names, -1 for none. The ground truth's ``refs`` give that per caption word (a plural noun points
at its group's first object); the ``<eos>`` position gets -1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from geocap.data.vocab import UNK
from geocap.errors import DataError, UsageError

GROUND_TRUTH = "ground_truth.json"
KMEANS_SEED = 0
VOWELS = "aeiou"

__all__ = ["GROUND_TRUTH", "GroundTruth", "Hypothetical", "assign_clusters", "encode_words", "fit_clusters",
           "hypothetical_caption", "reference_referents"]


@dataclass
class Hypothetical:
    """A swapped caption: ``words`` (caption words, no <eos>), ``referents`` and
    ``source_referents`` per word (-1 where none / not swapped)."""
    words: list
    referents: list
    source_referents: list


class GroundTruth:
    """The synthetic ground truth of the images ``image_ids``, read from the file one image at a
    time (:class:`~geocap.data.synth.truth_file.TruthFile`: memory does not grow with the file or
    the number of images).

    ``objects(image_id)`` -> list of object dicts (``category_id``, ``cluster_id``);
    ``caption(image_id, caption_id)`` -> the caption dict (``tokens``, ``refs``, ``mentions``);
    ``categories[id]`` -> ``{"name", "plural", ...}``. DataError (a ValueError) naming the file on
    bad input, and on an image of ``image_ids`` the file does not hold.
    """

    def __init__(self, path, image_ids: Sequence[int]):
        from geocap.data.synth.truth_file import TruthFile

        self.path = os.fspath(path)
        self._file = TruthFile(self.path)
        self.categories = {int(c["id"]): c for c in self._file.header["categories"]}
        wanted = np.unique(np.asarray(list(image_ids), np.int64))
        missing = wanted[~np.isin(wanted, self._file.image_ids)]
        if len(missing):
            raise DataError(f"{self.path}: no ground truth for {len(missing)} images (image {int(missing[0])}, ...)")

    def label_names(self):
        """The category names indexed by category id: a list when the ids are 0..K-1, else a dict
        ``{str(id): name}`` (JSON keys); ``metadata["label_names"]`` of a dump."""
        ids = sorted(self.categories)
        if ids == list(range(len(ids))):
            return [str(self.categories[i]["name"]) for i in ids]
        return {str(i): str(self.categories[i]["name"]) for i in ids}

    def objects(self, image_id: int) -> list:
        return self._file.image(image_id)["objects"]

    def check_objects(self, image_id: int, n: int) -> None:
        if len(self.objects(image_id)) != n:
            raise DataError(f"{self.path}: image {image_id} has {len(self.objects(image_id))} objects in the ground "
                            f"truth but {n} boxes in the feature store")

    def clusters(self, image_id: int) -> np.ndarray:
        return np.array([int(o["cluster_id"]) for o in self.objects(image_id)], np.int64)

    def labels(self, image_id: int) -> np.ndarray:
        return np.array([int(o["category_id"]) for o in self.objects(image_id)], np.int64)

    def caption(self, image_id: int, caption_id: int) -> dict:
        for caption in self._file.image(image_id)["captions"]:
            if int(caption["caption_id"]) == int(caption_id):
                return caption
        raise DataError(f"{self.path}: image {image_id} has no caption {caption_id}")


def reference_referents(caption: dict, words: Sequence[str], *, image_id: int, path: str) -> np.ndarray:
    """``referents [len(words) + 1]`` of an encoded reference caption (``words`` its vocabulary
    words, possibly truncated, ``<unk>`` for rare ones; the +1 is the <eos>). ValueError naming the
    image and caption when the words are not the ground truth's."""
    tokens, refs = caption["tokens"], caption["refs"]
    if len(words) > len(tokens):
        raise DataError(f"{path}: caption {caption['caption_id']} of image {image_id} has {len(tokens)} words in "
                         f"the ground truth, {len(words)} in the captions")
    for t, w in enumerate(words):
        if w != tokens[t].lower() and w != "<unk>":
            raise DataError(f"{path}: caption {caption['caption_id']} of image {image_id}: word {t} is {w!r} in the "
                             f"captions, {tokens[t]!r} in the ground truth")
    return np.array(list(refs[:len(words)]) + [-1], np.int64)


def hypothetical_caption(caption: dict, objects: list, categories: dict,
                         known: Optional[set] = None) -> Optional[Hypothetical]:
    """Swap each noun mention of ``caption`` to name another category present in the image.

    The replacement for mention m (in caption order) is drawn deterministically from the
    image's categories (ascending id) whose name (singular or plural, as needed) has only words
    of ``known`` (the vocabulary; None: any) and that the caption does not mention (else any
    other than m's own; each used at most once while others remain): the one at position
    ``(caption_id + m) % count``. The noun takes the new category's singular or plural name as
    the mention's count says; "a"/"an" follows the new noun; numbers are kept. The new noun's
    words refer to the first object of the new category, their ``source_referents`` to the
    objects the old words named. Returns None when no mention could be swapped (one category).
    """
    tokens, refs = list(caption["tokens"]), list(caption["refs"])
    present = sorted({int(o["category_id"]) for o in objects})
    mentions = sorted(caption["mentions"], key=lambda m: m["start"])
    mentioned = {int(m["category_id"]) for m in mentions}
    first_object = {}
    for i, o in enumerate(objects):
        first_object.setdefault(int(o["category_id"]), i)
    used: set = set()
    words, ref_out, src_out = [], [], []
    pos, swapped = 0, False
    for k, m in enumerate(mentions):
        start, end, cat = int(m["start"]), int(m["end"]), int(m["category_id"])
        for t in range(pos, start + 1):          # text before the mention and its determiner / number
            words.append(tokens[t]), ref_out.append(refs[t]), src_out.append(-1)
        count = int(m.get("count", len(m.get("objects", [])) or 1))
        form = "name" if count == 1 else "plural"
        nameable = [c for c in present if c != cat
                    and (known is None or all(w in known for w in categories[c][form].split()))]
        candidates = [c for c in nameable if c not in mentioned and c not in used] \
            or [c for c in nameable if c not in used] or nameable
        if not candidates:                        # nothing else in the image: keep the mention
            for t in range(start + 1, end):
                words.append(tokens[t]), ref_out.append(refs[t]), src_out.append(-1)
            pos = end
            continue
        new = candidates[(int(caption["caption_id"]) + k) % len(candidates)]
        used.add(new)
        name = categories[new][form]
        if count == 1 and words and words[-1] in ("a", "an"):
            words[-1] = "an" if name[0] in VOWELS else "a"
        source = max(refs[start + 1:end], default=-1)
        for w in name.split():
            words.append(w), ref_out.append(first_object[new]), src_out.append(source)
        pos, swapped = end, True
    for t in range(pos, len(tokens)):
        words.append(tokens[t]), ref_out.append(refs[t]), src_out.append(-1)
    return Hypothetical(words, ref_out, src_out) if swapped else None


def fit_clusters(features: np.ndarray, k: int) -> np.ndarray:
    """k-means centroids ``[k, D]`` float32 of the L2-normalised rows of ``features [M, D]``
    (scipy's kmeans2, k-means++ init, fixed seed: the same data gives the same centroids)."""
    from scipy.cluster.vq import kmeans2
    x = _normalised(features)
    if len(x) < k:
        raise UsageError(f"clusters: {k} clusters need at least {k} objects, the sample has {len(x)}")
    centroids, _ = kmeans2(x.astype(np.float64), k, minit="++", rng=np.random.default_rng(KMEANS_SEED))
    return centroids.astype(np.float32)


def assign_clusters(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid of each L2-normalised row of ``features [N, D]``, int64 ``[N]``."""
    x = _normalised(features)
    d = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return d.argmin(1).astype(np.int64)


def _normalised(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def encode_words(words: Sequence[str], word_id: dict) -> list:
    """Vocabulary ids of ``words`` (``<unk>`` for unknown ones)."""
    return [word_id.get(w, UNK) for w in words]
