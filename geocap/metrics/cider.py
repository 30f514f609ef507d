"""Vectorised CIDEr-D (Vedantam et al., 2015, "CIDEr: Consensus-based Image Description
Evaluation"), numerically equal to ``pycocoevalcap.cider.Cider`` on the same inputs.

Conventions (those of the coco-caption implementation, which this module reproduces):

* Captions are already tokenised strings; words are ``caption.split()`` (tokenise with
  :mod:`geocap.metrics.tokenize` first).
* n-grams of orders 1..``n`` (default 4) are counted per caption ("term frequency").
* Document frequency ``df(g)`` of an n-gram ``g`` is the number of *images* for which ``g``
  occurs in at least one reference caption.  With ``N`` images in the reference corpus the
  weight of ``g`` is ``idf(g) = log(N) - log(max(1, df(g)))``; an n-gram never seen in the
  references thus gets ``idf = log(N)``.  With ``N == 1`` every weight is 0 and so is every
  score.
* For a candidate ``c`` and one reference ``r`` of the same image, per order ``k``::

      s_k(c, r) = sum_g min(tf_c(g), tf_r(g)) * tf_r(g) * idf(g)**2 / (|v_c,k| * |v_r,k|)

  where ``v_x,k`` is the tf-idf vector of the order-``k`` n-grams of ``x`` (the division is
  skipped when either norm is 0, in which case the numerator is 0 as well).  This is the
  "clipped" cosine of CIDEr-D: candidate counts are clipped by the reference counts.
* Gaussian length penalty ``exp(-(l_c - l_r)**2 / (2 * sigma**2))`` with ``sigma = 6``, where
  -- exactly as in coco-caption -- the "length" ``l`` of a caption is its number of *bigrams*,
  ``max(len(words) - 1, 0)`` (so an empty and a one-word caption both have length 0).
* ``score(c) = 10 * mean_k( sum_r s_k(c, r) * penalty(c, r) ) / n_refs``.

Two document-frequency modes:

* **fixed corpus** (:class:`CiderD`, for self-critical training rewards): document
  frequencies and ``N`` come from the whole reference corpus given to the constructor (e.g.
  all training images), computed once; :meth:`CiderD.scores` then scores any batch of
  candidates against the references of their images.
* **per call** (:func:`cider_d`): document frequencies and ``N`` come from the references of
  exactly the images scored in that call.  This is what ``pycocoevalcap``'s
  ``Cider().compute_score(gts, res)`` does, and :func:`cider_d` returns the same numbers.
  :meth:`CiderD.corpus_score` scoring every corpus image equals :func:`cider_d` on the corpus.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["CiderD", "cider_d", "ngram_counts"]


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of all n-grams (as tuples) of orders 1..n of a list of words."""
    counts: Counter = Counter()
    length = len(words)
    for k in range(1, n + 1):
        for i in range(length - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _bigram_length(words: Sequence[str]) -> int:
    # coco-caption's length is the number of bigrams (see module docstring).
    return max(len(words) - 1, 0)


class CiderD:
    """CIDEr-D against a fixed reference corpus, vectorised over many candidates.

    Args:
        references: ``image_id -> list of tokenised reference captions``.  All of these
            images define the document frequencies (``N = len(references)``).  Every image
            needs at least one reference.
        n: highest n-gram order (default 4).
        sigma: standard deviation of the Gaussian length penalty (default 6.0).

    The reference n-grams are stored once as sorted integer keys
    ``ref_row * vocab_size + ngram_id`` with their counts, together with each reference's
    per-order tf-idf norms and bigram lengths; :meth:`scores` looks the candidates' n-grams up
    with one ``np.searchsorted`` per batch.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], n: int = 4,
                 sigma: float = 6.0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not references:
            raise ValueError("references must hold at least one image")
        self.n = int(n)
        self.sigma = float(sigma)
        vocab: dict[tuple, int] = {}
        orders: list[int] = []
        df: list[int] = []
        self._image_index: dict[Hashable, int] = {}
        ref_start, ref_count, ref_lengths = [], [], []
        rows, ids, cnts = [], [], []
        n_refs = 0
        for img, refs in references.items():
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"image {img!r}: references must be a non-empty list of strings")
            self._image_index[img] = len(self._image_index)
            ref_start.append(n_refs)
            ref_count.append(len(refs))
            seen: set[int] = set()
            for ref in refs:
                words = ref.split()
                ref_lengths.append(_bigram_length(words))
                for gram, c in ngram_counts(words, self.n).items():
                    gid = vocab.get(gram)
                    if gid is None:
                        gid = vocab[gram] = len(vocab)
                        orders.append(len(gram) - 1)
                        df.append(0)
                    if gid not in seen:
                        seen.add(gid)
                        df[gid] += 1
                    rows.append(n_refs)
                    ids.append(gid)
                    cnts.append(c)
                n_refs += 1
        self._vocab = vocab
        self._order = np.asarray(orders, dtype=np.int64)
        self.num_images = len(self._image_index)
        self._log_n = math.log(float(self.num_images))
        df_arr = np.asarray(df, dtype=np.float64)
        self._idf = self._log_n - np.log(np.maximum(1.0, df_arr))
        self._idf2 = self._idf ** 2
        self._vsize = max(len(vocab), 1)
        self._ref_start = np.asarray(ref_start, dtype=np.int64)
        self._ref_count = np.asarray(ref_count, dtype=np.int64)
        self._ref_len = np.asarray(ref_lengths, dtype=np.float64)
        rows_a = np.asarray(rows, dtype=np.int64)
        ids_a = np.asarray(ids, dtype=np.int64)
        cnts_a = np.asarray(cnts, dtype=np.float64)
        keys = rows_a * self._vsize + ids_a
        order = np.argsort(keys, kind="stable")
        self._ref_keys = keys[order]
        self._ref_cnts = cnts_a[order]
        sq = (cnts_a * self._idf[ids_a]) ** 2 if len(ids_a) else cnts_a
        norm2 = np.bincount(rows_a * self.n + self._order[ids_a] if len(ids_a) else rows_a,
                            weights=sq, minlength=n_refs * self.n)
        self._ref_norm = np.sqrt(norm2.astype(np.float64)).reshape(n_refs, self.n)

    def __contains__(self, image_id: Hashable) -> bool:
        return image_id in self._image_index

    @property
    def image_ids(self) -> list:
        """The corpus image ids, in the order given to the constructor."""
        return list(self._image_index)

    def scores(self, candidates: Sequence[str], image_ids: Sequence[Hashable]) -> np.ndarray:
        """CIDEr-D of each tokenised candidate against the references of its image.

        ``candidates[i]`` is scored against ``references[image_ids[i]]``; the same image may
        appear many times (e.g. several samples per image in self-critical training).
        Returns a float64 array of shape ``(len(candidates),)``.
        """
        if len(candidates) != len(image_ids):
            raise ValueError(f"{len(candidates)} candidates but {len(image_ids)} image ids")
        n_cand = len(candidates)
        if n_cand == 0:
            return np.zeros(0, dtype=np.float64)
        n = self.n
        try:
            img_idx = np.fromiter((self._image_index[i] for i in image_ids), dtype=np.int64,
                                  count=n_cand)
        except KeyError as exc:
            raise KeyError(f"image id {exc.args[0]!r} is not in the reference corpus") from None
        vocab = self._vocab
        e_row, e_id, e_cnt = [], [], []
        unknown2 = np.zeros((n_cand, n), dtype=np.float64)  # sum of tf**2 of unseen n-grams
        cand_len = np.empty(n_cand, dtype=np.float64)
        for i, cand in enumerate(candidates):
            words = cand.split()
            cand_len[i] = _bigram_length(words)
            for gram, c in ngram_counts(words, n).items():
                gid = vocab.get(gram)
                if gid is None:
                    unknown2[i, len(gram) - 1] += c * c
                else:
                    e_row.append(i)
                    e_id.append(gid)
                    e_cnt.append(c)
        e_row_a = np.asarray(e_row, dtype=np.int64)
        e_id_a = np.asarray(e_id, dtype=np.int64)
        e_cnt_a = np.asarray(e_cnt, dtype=np.float64)
        e_ord = self._order[e_id_a]
        # candidate tf-idf norms per order (unseen n-grams have idf = log N)
        cand_norm2 = np.bincount(e_row_a * n + e_ord, weights=(e_cnt_a ** 2) * self._idf2[e_id_a],
                                 minlength=n_cand * n).astype(np.float64).reshape(n_cand, n)
        cand_norm = np.sqrt(cand_norm2 + unknown2 * (self._log_n ** 2))

        # (candidate, reference) pairs: candidate i against each reference of its image
        n_pairs_per_cand = self._ref_count[img_idx]
        pair_offset = np.concatenate(([0], np.cumsum(n_pairs_per_cand)))
        n_pairs = int(pair_offset[-1])
        pair_cand = np.repeat(np.arange(n_cand), n_pairs_per_cand)
        pair_k = np.arange(n_pairs) - pair_offset[pair_cand]
        pair_ref = self._ref_start[img_idx[pair_cand]] + pair_k

        # every candidate n-gram entry against every reference of its image
        reps = n_pairs_per_cand[e_row_a]
        q_entry = np.repeat(np.arange(len(e_row_a)), reps)
        q_k = np.arange(len(q_entry)) - np.repeat(np.cumsum(reps) - reps, reps)
        q_row = e_row_a[q_entry]
        q_pair = pair_offset[q_row] + q_k
        q_ref = pair_ref[q_pair]
        q_id = e_id_a[q_entry]
        keys = q_ref * self._vsize + q_id
        pos = np.searchsorted(self._ref_keys, keys)
        pos_c = np.minimum(pos, max(len(self._ref_keys) - 1, 0))
        found = (pos < len(self._ref_keys)) & (self._ref_keys[pos_c] == keys) if len(
            self._ref_keys) else np.zeros(len(keys), dtype=bool)
        r = self._ref_cnts[pos_c[found]]
        c = e_cnt_a[q_entry[found]]
        g = q_id[found]
        contrib = np.minimum(c, r) * r * self._idf2[g]
        val = np.bincount(q_pair[found] * n + self._order[g], weights=contrib,
                          minlength=n_pairs * n).astype(np.float64).reshape(n_pairs, n)
        denom = cand_norm[pair_cand] * self._ref_norm[pair_ref]
        nz = denom != 0
        val[nz] /= denom[nz]
        delta = cand_len[pair_cand] - self._ref_len[pair_ref]
        val *= np.exp(-(delta ** 2) / (2.0 * self.sigma ** 2))[:, None]
        per_cand = np.bincount(np.repeat(pair_cand, n) * n + np.tile(np.arange(n), n_pairs),
                               weights=val.ravel(), minlength=n_cand * n
                               ).astype(np.float64).reshape(n_cand, n)
        return per_cand.mean(axis=1) / n_pairs_per_cand * 10.0

    def corpus_score(self, res: Mapping[Hashable, str | Sequence[str]]) -> tuple[float, np.ndarray]:
        """Fixed-corpus CIDEr-D of one candidate per image, like ``Cider().compute_score``.

        ``res`` maps image id -> candidate (a string, or a one-element list as in
        coco-caption).  Returns ``(mean, per-image scores in the order of res)``.  Document
        frequencies are those of the constructor's corpus; when ``res`` covers exactly the
        corpus images this equals :func:`cider_d` (and pycocoevalcap's ``Cider``).
        """
        if not res:
            raise ValueError("res is empty")
        ids = list(res)
        cands = [_single(res[i], i) for i in ids]
        s = self.scores(cands, ids)
        return float(np.mean(s)), s


def _single(hypo: str | Sequence[str], image_id: Hashable) -> str:
    if isinstance(hypo, str):
        return hypo
    if len(hypo) != 1:
        raise ValueError(f"image {image_id!r}: expected exactly one candidate, got {len(hypo)}")
    return hypo[0]


def cider_d(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str | Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """Per-call CIDEr-D, equal to ``pycocoevalcap.cider.Cider(n, sigma).compute_score(gts, res)``.

    Document frequencies and ``N`` come from the references of the images in this call
    (``gts``).  ``gts`` and ``res`` must have the same keys; ``res`` values are a string or
    a one-element list.  Returns ``(mean, per-image scores in the order of gts)``.
    """
    if gts.keys() != res.keys():
        raise ValueError("gts and res must have the same image ids")
    if not gts:
        raise ValueError("gts is empty")
    scorer = CiderD(gts, n=n, sigma=sigma)
    ids = list(gts)
    s = scorer.scores([_single(res[i], i) for i in ids], ids)
    return float(np.mean(s)), s
