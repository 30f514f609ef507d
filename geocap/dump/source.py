"""What a dump reads for each batch of images besides the model: the per-image object fields
(labels, clusters, features) and the teacher-forced caption rows (references with their
referents, and the hypothetical captions).

Labels come from the feature store (else the ground truth's categories; -1 where neither knows);
clusters from the ground truth's categories (``cluster_id`` of each object), else the nearest of
the k-means ``centroids``; referents and hypothetical captions from the ground truth only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from geocap.dump import ground_truth
from geocap.dump.record_builder import CaptionRow

__all__ = ["SplitSource", "kmeans_centroids"]


def kmeans_centroids(dataset, n_images: int, k: int, sample: int) -> np.ndarray:
    """Centroids ``[k, D]`` fitted on the objects of a fixed random sample of the first
    ``n_images`` images of ``dataset`` (up to ``sample`` objects; seed ``ground_truth.KMEANS_SEED``):
    every rank computes the same ones."""
    order = np.random.default_rng(ground_truth.KMEANS_SEED).permutation(n_images)
    feats, total = [], 0
    for i in order.tolist():
        f, _ = dataset.store.read(int(dataset.position[i]))
        feats.append(f)
        total += len(f)
        if total >= sample:
            break
    return ground_truth.fit_clusters(np.concatenate(feats)[:sample], k)


class SplitSource:
    """Per-batch inputs of a dump of ``dataset`` (a per-image ``CaptionDataset`` with every
    caption): ``truth`` a :class:`~geocap.dump.ground_truth.GroundTruth` or None, ``centroids``
    the k-means centroids or None, ``words`` the vocabulary, ``eos_id``/``max_len`` the model's
    <eos> id and positions, ``hypothetical`` whether to add hypothetical captions,
    ``has_labels`` whether every record carries labels, ``features`` whether it carries features."""

    def __init__(self, dataset, *, truth: Optional[ground_truth.GroundTruth], centroids: Optional[np.ndarray],
                 words: Sequence[str], eos_id: int, max_len: int, hypothetical: bool, has_labels: bool,
                 features: bool):
        self.dataset, self.truth, self.centroids = dataset, truth, centroids
        self.words = list(words)
        self.word_id = {w: i for i, w in enumerate(self.words)}
        self.known = set(self.words)
        self.eos_id, self.max_len = eos_id, max_len
        self.hypothetical, self.has_labels, self.features = hypothetical, has_labels, features

    def image_id(self, position: int) -> int:
        return int(self.dataset.image_ids[position])

    def objects(self, positions: Sequence[int], batch) -> list:
        """Per image of the batch: ``{"labels", "clusters", "features"}`` (arrays or None) and
        ``"width"``, ``"height"`` (pixels, from the store's ``image_sizes``; None when unknown)."""
        store, out = self.dataset.store, []
        sizes = store.image_sizes
        for b, i in enumerate(positions):
            image_id, n = self.image_id(i), int(batch.attention_mask[b].sum())
            width, height = (int(v) for v in sizes[int(self.dataset.position[i])])
            obj = {"labels": None, "clusters": None, "features": None,
                   "width": width if width > 0 else None, "height": height if height > 0 else None}
            feats = batch.features[b, :n].numpy()
            if self.truth is not None:
                self.truth.check_objects(image_id, n)
                obj["clusters"] = self.truth.clusters(image_id)
            elif self.centroids is not None:
                obj["clusters"] = ground_truth.assign_clusters(feats, self.centroids)
            if store.has_labels:
                obj["labels"] = store[int(self.dataset.position[i])].labels
            if obj["labels"] is None and self.truth is not None:
                obj["labels"] = self.truth.labels(image_id)
            if obj["labels"] is None and self.has_labels:
                obj["labels"] = np.full(n, -1, np.int64)
            if self.features:
                obj["features"] = feats.astype(np.float16)
            out.append(obj)
        return out

    def reference_rows(self, positions: Sequence[int], batch) -> list:
        """The batch's reference captions (each image's in caption order), then its hypothetical
        captions, as :class:`CaptionRow` s (``image`` = index in the batch)."""
        caps, truth = self.dataset.captions, self.truth
        rows, hyps = [], []
        for b, i in enumerate(positions):
            image_id = self.image_id(i)
            first, count = int(self.dataset.first_row[i]), int(self.dataset.n_captions[i])
            for j in range(count):
                length = int(batch.caption_lengths[b, j])           # <bos> words <eos>
                ids = batch.captions[b, j, 1:length].tolist()[:self.max_len]
                cid = int(caps.caption_id[first + j])
                refs = None
                if truth is not None:
                    caption = truth.caption(image_id, cid)
                    refs = ground_truth.reference_referents(caption, [self.words[k] for k in ids[:-1]],
                                                         image_id=image_id, path=truth.path)[:len(ids)]
                    if self.hypothetical:
                        hyp = ground_truth.hypothetical_caption(caption, truth.objects(image_id), truth.categories,
                                                             self.known)
                        if hyp is not None:
                            n = min(len(hyp.words), caps.max_len, self.max_len - 1)
                            hid = ground_truth.encode_words(hyp.words[:n], self.word_id) + [self.eos_id]
                            hyps.append(CaptionRow(b, hid, "hypothetical", cid,
                                                   np.array(hyp.referents[:n] + [-1], np.int64),
                                                   np.array(hyp.source_referents[:n] + [-1], np.int64)))
                rows.append(CaptionRow(b, ids, "reference", cid, refs))
        return rows + hyps
