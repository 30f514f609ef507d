"""The PyTorch side: a dataset of (image features, boxes, captions), its collate, and a
batch sampler that groups images of similar box counts.

Two kinds of item, chosen with ``per_image``:

- ``per_image=False``: one item per caption. ``captions_per_image`` "all" uses every caption,
  an int ``k`` the first ``k`` of each image, "one-random" makes one item per image whose caption
  is drawn afresh each time it is read.
- ``per_image=True`` (cross-entropy and self-critical training, evaluation): one item per image
  with several captions: "all" of them (the batch pads to its largest count), the first ``k``
  (cycled when an image has fewer), or "one-random" (one, drawn afresh).

Captions are framed ``<bos> w1 .. wL <eos> <pad>..`` with the vocabulary's ids: pass
:meth:`CaptionDataset.collate` (not the bare :func:`collate`, whose ids are geocap's defaults)
to a DataLoader. With an imported ORT vocabulary ``pad = bos = eos = 0``, so a caption's end is
known from ``caption_lengths`` only, never from comparing ids with <pad>.

Random draws use torch's generator, which DataLoader seeds per worker and per epoch, so
``torch.manual_seed`` makes them reproducible.

The feature store is opened lazily in each DataLoader worker (``FeatureStore`` reopens after
``fork`` and pickles as its path), so no ``worker_init_fn`` is needed.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from geocap.data.items import DataError
from geocap.data.store import FeatureStore
from geocap.data.vocab import BOS, EOS, PAD, load_captions


class Sample(NamedTuple):
    """One dataset item, as numpy arrays.

    features ``[N, D]`` float32 (float16 with ``keep_float16``); boxes float32 ``[N, 4]``;
    captions int32 word ids without <bos>/<eos>, padded with <pad>: ``[max_len]`` per caption,
    ``[K, max_len]`` per image; lengths: an int, or int ``[K]``; image_id: an int.
    """
    features: np.ndarray
    boxes: np.ndarray
    captions: np.ndarray
    lengths: Union[int, np.ndarray]
    image_id: int


@dataclass
class Batch:
    """A collated batch (``collate``). B images, N = the batch's largest box count.

    features ``[B, N, D]`` (the items' dtype), boxes float32 ``[B, N, 4]``, attention_mask bool
    ``[B, N]`` (True = real box; padded boxes and features are 0; ``box_mask``, its name before, is
    a deprecated alias for one release); captions int64 ``[B, T]``
    (per caption) or ``[B, K, T]`` (per image), each row ``<bos> w1 .. wL <eos> <pad>..`` with T
    the batch's longest L + 2; caption_lengths int64 ``[B]`` or ``[B, K]`` = L + 2, 0 for the
    padding captions of an image with fewer than K; image_ids int64 ``[B]``.

    Teacher forcing: inputs ``captions[..., :-1]``, targets ``captions[..., 1:]``; the targets
    in the loss are the first ``caption_lengths - 1`` of each row (the words and <eos>). Do not
    find them by ``targets != pad``: a vocabulary whose <eos> is its <pad> (ORT's) would lose <eos>.
    """
    features: torch.Tensor
    boxes: torch.Tensor
    attention_mask: torch.Tensor
    captions: torch.Tensor
    caption_lengths: torch.Tensor
    image_ids: torch.Tensor

    @property
    def box_mask(self) -> torch.Tensor:
        """Deprecated alias of :attr:`attention_mask` (the mask's one name, as in the model)."""
        warnings.warn("Batch.box_mask is deprecated; use Batch.attention_mask", DeprecationWarning, stacklevel=2)
        return self.attention_mask

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return len(self.image_ids)


def _frame(ids: np.ndarray, length: int, out: np.ndarray, bos_id: int, eos_id: int) -> None:
    """``out[:length + 2] = <bos> ids[:length] <eos>`` (the rest of ``out`` is left as it is)."""
    out[0] = bos_id
    out[1:length + 1] = ids[:length]
    out[length + 1] = eos_id


def _check_id(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"collate: {name} must be a word id >= 0, got {value!r}")
    return int(value)


def collate(samples: Sequence[Sample], *, pad_id: int = PAD, bos_id: int = BOS, eos_id: int = EOS) -> Batch:
    """Pad a list of ``Sample`` into a ``Batch`` (see there for shapes), framing each caption
    ``bos_id w1 .. wL eos_id pad_id..``. The defaults are geocap's own ids (<pad> 0, <bos> 1,
    <eos> 2); :meth:`CaptionDataset.collate` passes its vocabulary's."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    pad_id, bos_id, eos_id = _check_id("pad_id", pad_id), _check_id("bos_id", bos_id), _check_id("eos_id", eos_id)
    b = len(samples)
    n = max(len(s.boxes) for s in samples)
    d = samples[0].features.shape[1]
    feats = np.zeros((b, n, d), dtype=samples[0].features.dtype)
    boxes = np.zeros((b, n, 4), dtype=np.float32)
    mask = np.zeros((b, n), dtype=bool)
    for i, s in enumerate(samples):
        k = len(s.boxes)
        feats[i, :k], boxes[i, :k], mask[i, :k] = s.features, s.boxes, True
    per_image = samples[0].captions.ndim == 2
    if any((s.captions.ndim == 2) != per_image for s in samples):
        raise ValueError("collate: a batch mixes per-caption and per-image samples")
    if per_image:
        kmax = max(len(s.lengths) for s in samples)
        t = max(int(np.max(s.lengths, initial=0)) for s in samples) + 2
        caps = np.full((b, kmax, t), pad_id, dtype=np.int64)
        lens = np.zeros((b, kmax), dtype=np.int64)
        for i, s in enumerate(samples):
            for j, length in enumerate(s.lengths):
                _frame(s.captions[j], int(length), caps[i, j], bos_id, eos_id)
                lens[i, j] = int(length) + 2
    else:
        t = max(int(s.lengths) for s in samples) + 2
        caps = np.full((b, t), pad_id, dtype=np.int64)
        lens = np.zeros(b, dtype=np.int64)
        for i, s in enumerate(samples):
            _frame(s.captions, int(s.lengths), caps[i], bos_id, eos_id)
            lens[i] = int(s.lengths) + 2
    return Batch(features=torch.from_numpy(feats), boxes=torch.from_numpy(boxes),
                 attention_mask=torch.from_numpy(mask),
                 captions=torch.from_numpy(caps), caption_lengths=torch.from_numpy(lens),
                 image_ids=torch.tensor([int(s.image_id) for s in samples], dtype=torch.int64))


class CaptionDataset(Dataset):
    """Features from a feature store, captions from a captions directory, for one split.

    ``split``: a split name of the captions directory ("train", "val", "test", "none") or
    "all". Images of the split without features raise ``DataError`` naming them and both files
    (``missing="skip"`` leaves them out; ``missing_ids`` lists them). See the module doc for
    ``per_image`` and ``captions_per_image``; ``keep_float16`` returns features as stored.
    """

    def __init__(self, store_path, captions_dir, split: str, *, per_image: bool = False,
                 captions_per_image: Union[str, int] = "all", keep_float16: bool = False, missing: str = "raise"):
        if captions_per_image not in ("all", "one-random"):
            if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) \
                    or captions_per_image < 1:
                raise ValueError(f"captions_per_image must be 'all', 'one-random' or a positive int, "
                                 f"got {captions_per_image!r}")
        if missing not in ("raise", "skip"):
            raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
        self.store = FeatureStore(store_path)
        self.captions = load_captions(captions_dir)
        self.split, self.per_image, self.keep_float16 = split, per_image, keep_float16
        self.captions_per_image = captions_per_image
        rows = self.captions.rows(split)
        if len(rows) == 0:
            raise DataError(f"{os.fspath(captions_dir)}: no captions in split {split!r} "
                            f"(splits: {', '.join(self.captions.split_names)})")
        # rows are grouped by image: one (first row, count) per image
        image_ids, first, counts = np.unique(self.captions.image_id[rows], return_index=True, return_counts=True)
        have = np.array([i in self.store for i in image_ids.tolist()], dtype=bool)
        self.missing_ids = image_ids[~have].tolist()
        if self.missing_ids and missing == "raise":
            shown = ", ".join(map(str, self.missing_ids[:5])) + (", ..." if len(self.missing_ids) > 5 else "")
            raise DataError(f"{self.store.path}: no features for {len(self.missing_ids)} of the {len(image_ids)} "
                            f"images of split {split!r} in {os.fspath(captions_dir)} (image {shown})")
        self.image_ids = image_ids[have]
        self.first_row = rows[first[have]]
        self.n_captions = counts[have]
        self.position = np.array([self.store.index_of(i) for i in self.image_ids.tolist()], dtype=np.int64)
        self._image_boxes = self.store.box_counts[self.position]
        if not per_image and captions_per_image != "one-random":
            k = self.n_captions if captions_per_image == "all" else np.minimum(self.n_captions, captions_per_image)
            self.item_image = np.repeat(np.arange(len(self.image_ids)), k)
            starts = np.repeat(self.first_row, k)
            within = np.arange(len(self.item_image)) - np.repeat(np.cumsum(k) - k, k)
            self.item_row = starts + within
        else:
            self.item_image = np.arange(len(self.image_ids))
            self.item_row = None
        self.store.close()  # workers open their own handle

    @property
    def vocab(self):
        return self.captions.vocab

    @property
    def frame_ids(self) -> dict:
        """``{"pad_id", "bos_id", "eos_id"}`` of the vocabulary: what :meth:`collate` frames with."""
        v = self.vocab
        return {"pad_id": v.pad_id, "bos_id": v.bos_id, "eos_id": v.eos_id}

    def collate(self, samples: Sequence[Sample]) -> Batch:
        """:func:`collate` with this dataset's vocabulary ids (a DataLoader ``collate_fn``)."""
        return collate(samples, **self.frame_ids)

    @property
    def box_counts(self) -> np.ndarray:
        """Boxes of each item's image, int64 ``[len(self)]`` (for ``BucketBatchSampler``)."""
        return self._image_boxes[self.item_image]

    def references(self, image_id: int) -> list:
        """Every reference caption of ``image_id`` (all splits), as space-joined tokens."""
        return self.captions.references(image_id)

    def __len__(self) -> int:
        return len(self.item_image)

    def _rows(self, image: int) -> np.ndarray:
        first, count = int(self.first_row[image]), int(self.n_captions[image])
        if self.captions_per_image == "one-random":
            return np.array([first + int(torch.randint(count, ()))])
        if self.captions_per_image == "all":
            return np.arange(first, first + count)
        return first + np.arange(self.captions_per_image) % count

    def __getitem__(self, i: int) -> Sample:
        image = int(self.item_image[i])
        feats, boxes = self.store.read(int(self.position[image]), float32=not self.keep_float16)
        if self.item_row is not None:
            row = int(self.item_row[i])
            caps, lens = self.captions.tokens[row], int(self.captions.length[row])
        else:
            rows = self._rows(image)
            caps, lens = self.captions.tokens[rows], self.captions.length[rows]
            if not self.per_image:
                caps, lens = caps[0], int(lens[0])
        return Sample(features=feats, boxes=boxes, captions=caps, lengths=lens, image_id=int(self.image_ids[image]))


class BucketBatchSampler(Sampler):
    """Batches of indices whose items have similar box counts, to cut padding.

    Each epoch: shuffle all indices, cut them into pools of ``pool_batches * batch_size``, sort
    each pool by box count, cut it into batches, and shuffle the batches. ``shuffle=False``
    keeps the index order before sorting each pool and the batch order. Deterministic given
    ``seed`` and the epoch (``set_epoch``; otherwise each new iteration is the next epoch).
    """

    def __init__(self, box_counts: Sequence[int], batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 pool_batches: int = 50, seed: int = 0):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError("batch_size and pool_batches must be positive")
        self.box_counts = np.asarray(box_counts)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.pool_batches, self.seed = pool_batches, seed
        self._epoch: Optional[int] = None
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        n = len(self.box_counts)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        epoch = self._epoch if self._epoch is not None else self._next_epoch
        self._next_epoch = epoch + 1
        self._epoch = None
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.box_counts)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pool = self.pool_batches * self.batch_size
        batches = []
        for start in range(0, n, pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.box_counts[chunk], kind="stable")]
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        for batch in batches:
            yield batch.tolist()
