"""geocap.data.dataset: items per caption and per image, collate's padding and framing, real
DataLoader workers (fork) opening the store themselves, and the bucketing batch sampler."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from geocap.data.dataset import Batch, BucketBatchSampler, CaptionDataset, Sample, collate
from geocap.data.items import Caption, CaptionSet, DataError, ImageFeatures
from geocap.data.store import FeatureStore, write_store
from geocap.data.vocab import BOS, EOS, PAD, build_vocab, encode_captions, write_captions

D = 16
WORDS = "a dog cat sits on the mat red ball runs grass big small".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 train/val images with 1-40 boxes and 1-5 captions of 1-20 words; image 999 (test split)
    has captions but no features."""
    rng = np.random.default_rng(7)
    tmp = tmp_path_factory.mktemp("dataset")
    records, captions, splits = [], [], {}
    for i in range(24):
        image_id = 10 + i
        k = int(rng.integers(1, 41))
        xy = rng.random((k, 2), dtype=np.float32) * 0.5
        records.append(ImageFeatures(image_id, rng.standard_normal((k, D)).astype(np.float32),
                                     np.concatenate([xy, xy + 0.25], axis=1)))
        splits[image_id] = "train" if i % 4 else "val"
        for _ in range(int(rng.integers(1, 6))):
            words = list(rng.choice(WORDS, int(rng.integers(1, 21))))
            captions.append(Caption(image_id, len(captions), " ".join(words)))
    captions.append(Caption(999, len(captions), "a dog"))
    splits[999] = "test"
    write_store(tmp / "features.h5", records, feature_dtype="float32", progress=False)
    caption_set = CaptionSet(captions, splits)
    write_captions(tmp / "caps", encode_captions(caption_set, build_vocab(caption_set, min_count=1), max_len=12))
    return tmp / "features.h5", tmp / "caps", {r.image_id: r for r in records}, caption_set


def captions_of(caption_set, image_id):
    return [c for c in caption_set.captions if c.image_id == image_id]


def test_per_caption_items(data):
    store, caps, records, caption_set = data
    ds = CaptionDataset(store, caps, "train")
    train = [c for c in caption_set.captions if caption_set.splits[c.image_id] == "train"]
    assert len(ds) == len(train) and ds.store._state is None  # no handle left open for the workers
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        rec = records[s.image_id]
        np.testing.assert_array_equal(s.features, rec.features)
        np.testing.assert_array_equal(s.boxes, rec.boxes)
        assert s.captions.shape == (12,) and s.features.dtype == np.float32
        seen.append((s.image_id, ds.vocab.decode(s.captions[:s.lengths])))
    want = [(c.image_id, " ".join(c.text.split()[:12])) for c in sorted(train, key=lambda c: c.image_id)]
    assert seen == want
    assert ds.box_counts.tolist() == [len(records[i].boxes) for i, _ in seen]
    first_two = CaptionDataset(store, caps, "train", captions_per_image=2)
    assert len(first_two) == sum(min(2, len(captions_of(caption_set, i))) for i in set(dict(seen)))
    one = CaptionDataset(store, caps, "val", captions_per_image="one-random")
    assert len(one) == 6 and one[0].captions.shape == (12,)
    assert len(CaptionDataset(store, caps, "all", missing="skip")) == len(caption_set.captions) - 1


def test_per_image_items_and_collate(data):
    store, caps, records, caption_set = data
    ds = CaptionDataset(store, caps, "val", per_image=True)
    samples = [ds[i] for i in range(len(ds))]
    assert [s.image_id for s in samples] == sorted(i for i, sp in caption_set.splits.items() if sp == "val")
    batch = collate(samples)
    b, n = len(samples), max(len(records[s.image_id].boxes) for s in samples)
    kmax = max(len(captions_of(caption_set, s.image_id)) for s in samples)
    assert isinstance(batch, Batch) and len(batch) == b
    assert batch.features.shape == (b, n, D) and batch.features.dtype == torch.float32
    assert batch.boxes.shape == (b, n, 4) and batch.attention_mask.dtype == torch.bool
    assert batch.captions.dim() == 3 and batch.captions.shape[:2] == (b, kmax)
    assert batch.image_ids.tolist() == [s.image_id for s in samples]
    for i, s in enumerate(samples):
        rec, k = records[s.image_id], len(records[s.image_id].boxes)
        assert batch.attention_mask[i].tolist() == [True] * k + [False] * (n - k)
        np.testing.assert_array_equal(batch.features[i, :k].numpy(), rec.features)
        assert not batch.features[i, k:].any() and not batch.boxes[i, k:].any()
        caps_i = captions_of(caption_set, s.image_id)
        for j in range(kmax):
            row, length = batch.captions[i, j].tolist(), int(batch.caption_lengths[i, j])
            if j >= len(caps_i):
                assert length == 0 and set(row) == {PAD}
                continue
            words = caps_i[j].text.split()[:12]
            assert length == len(words) + 2 and row[0] == BOS and row[length - 1] == EOS
            assert set(row[length:]) <= {PAD} and ds.vocab.decode(row) == " ".join(words)
    assert batch.captions.shape[2] == int(batch.caption_lengths.max())
    moved = batch.to("cpu")
    assert torch.equal(moved.captions, batch.captions)

    fixed = CaptionDataset(store, caps, "val", per_image=True, captions_per_image=3)
    for i in range(len(fixed)):
        s = fixed[i]
        texts = [" ".join(c.text.split()[:12]) for c in captions_of(caption_set, s.image_id)]
        assert s.captions.shape == (3, 12)
        assert [fixed.vocab.decode(c) for c in s.captions] == [texts[j % len(texts)] for j in range(3)]
    rand = CaptionDataset(store, caps, "val", per_image=True, captions_per_image="one-random")
    assert rand[0].captions.shape == (1, 12) and collate([rand[0], rand[1]]).captions.shape[1] == 1
    torch.manual_seed(0)
    draws = {rand.vocab.decode(rand[0].captions[0]) for _ in range(40)}
    assert draws == {" ".join(c.text.split()[:12]) for c in captions_of(caption_set, rand[0].image_id)}


def test_per_caption_collate_and_float16(data):
    store, caps, records, _ = data
    ds = CaptionDataset(store, caps, "train", keep_float16=True)
    assert ds[0].features.dtype == np.float32  # the store holds float32: "as stored"
    path16 = store.parent / "features16.h5"
    write_store(path16, FeatureStore(store), progress=False)
    ds16 = CaptionDataset(path16, caps, "train", keep_float16=True)
    batch = collate([ds16[i] for i in range(5)])
    assert batch.features.dtype == torch.float16 and batch.captions.dim() == 2
    assert batch.caption_lengths.tolist() == [int(ds16[i].lengths) + 2 for i in range(5)]
    assert batch.captions.shape[1] == int(batch.caption_lengths.max())
    with pytest.raises(ValueError, match="mixes"):
        collate([ds16[0], CaptionDataset(path16, caps, "train", per_image=True)[0]])


def test_dataloader_workers_open_their_own_handles(data):
    store, caps, records, caption_set = data
    ds = CaptionDataset(store, caps, "train")
    ds.store.image_ids  # leave a handle open in the parent: forked workers must not share it
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate,
                        multiprocessing_context="fork")
    got = []
    for batch in loader:
        for i, image_id in enumerate(batch.image_ids.tolist()):
            k = int(batch.attention_mask[i].sum())
            np.testing.assert_array_equal(batch.features[i, :k].numpy(), records[image_id].features)
            got.append((image_id, ds.vocab.decode(batch.captions[i].tolist())))
    want = [(ds[i].image_id, ds.vocab.decode(ds[i].captions[:ds[i].lengths])) for i in range(len(ds))]
    assert sorted(got) == sorted(want)
    clone = pickle.loads(pickle.dumps(ds))  # what spawn-started workers receive
    assert clone.store._state is None and clone[3].image_id == ds[3].image_id


def test_spawned_workers_get_the_store_by_path(data):
    store, caps, records, _ = data
    ds = CaptionDataset(store, caps, "val", per_image=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate, multiprocessing_context="spawn")
    ids = []
    for batch in loader:
        for i, image_id in enumerate(batch.image_ids.tolist()):
            k = int(batch.attention_mask[i].sum())
            np.testing.assert_array_equal(batch.boxes[i, :k].numpy(), records[image_id].boxes)
            ids.append(image_id)
    assert ids == ds.image_ids.tolist()


def test_bucket_batch_sampler_groups_similar_box_counts(data):
    store, caps, _, _ = data
    ds = CaptionDataset(store, caps, "all", missing="skip")
    counts = ds.box_counts
    sampler = BucketBatchSampler(counts, 4, pool_batches=100, seed=3)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert len(epoch0) == len(sampler) == -(-len(ds) // 4)
    for batches in (epoch0, epoch1):
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert epoch0 != epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # deterministic per (seed, epoch)
    padded = sum(len(b) * counts[b].max() for b in epoch0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))
    random_padded = sum(len(b) * counts[b].max() for b in np.array_split(order, len(epoch0)))
    assert padded < 0.8 * random_padded
    dropping = BucketBatchSampler(counts, 4, drop_last=True)
    assert all(len(b) == 4 for b in dropping) and len(list(dropping)) == len(dropping) == len(ds) // 4
    plain = list(BucketBatchSampler(counts, 4, shuffle=False, pool_batches=1))
    assert [i for b in plain for i in sorted(b)] == list(range(len(ds)))
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    assert sum(len(b) for b in loader) == len(ds)


def test_bad_arguments_and_missing_features(data, tmp_path):
    store, caps, _, _ = data
    with pytest.raises(DataError) as err:
        CaptionDataset(store, caps, "test")
    assert "image 999" in str(err.value) and str(store) in str(err.value) and str(caps) in str(err.value)
    with pytest.raises(DataError, match="no captions in split 'nope'"):
        CaptionDataset(store, caps, "nope")
    skipping = CaptionDataset(store, caps, "all", missing="skip")
    assert skipping.missing_ids == [999] and 999 not in skipping.image_ids
    for bad in (0, "some", True):
        with pytest.raises(ValueError, match="captions_per_image"):
            CaptionDataset(store, caps, "train", captions_per_image=bad)
    with pytest.raises(DataError, match="no such feature store"):
        CaptionDataset(tmp_path / "none.h5", caps, "train")
    with pytest.raises(DataError, match="vocab.json"):
        CaptionDataset(store, tmp_path, "train")
    with pytest.raises(ValueError):
        collate([])
    assert isinstance(CaptionDataset(store, caps, "val")[0], Sample)


def test_collate_frames_with_the_vocabulary_ids(data, tmp_path):
    """An ORT-layout vocabulary (pad = bos = eos = 0, no <unk>): CaptionDataset.collate frames
    each caption with its ids, per image and per caption; the bare collate keeps geocap's."""
    from geocap.data.vocab import Vocabulary
    store, caps, _, caption_set = data
    default = build_vocab(caption_set, min_count=1)
    ort = Vocabulary(["<eos>"] + default.words[4:], pad_id=0, bos_id=0, eos_id=0, unk_id=None)
    write_captions(tmp_path / "ortcaps", encode_captions(caption_set, ort, max_len=12))
    ds = CaptionDataset(store, tmp_path / "ortcaps", "val", per_image=True)
    assert ds.frame_ids == {"pad_id": 0, "bos_id": 0, "eos_id": 0}
    samples = [ds[i] for i in range(len(ds))]
    batch = ds.collate(samples)
    for i, s in enumerate(samples):
        texts = [" ".join(c.text.split()[:12]) for c in captions_of(caption_set, s.image_id)]
        for j, text in enumerate(texts):
            row, length = batch.captions[i, j].tolist(), int(batch.caption_lengths[i, j])
            words = text.split()
            assert length == len(words) + 2 and row[0] == 0 and row[length - 1] == 0
            assert 0 not in row[1:length - 1] and set(row[length:]) <= {0}
            assert [ort.words[w] for w in row[1:length - 1]] == words
    default_framed = collate(samples)  # geocap's ids: <bos> 1, <eos> 2, <pad> 0
    real = batch.caption_lengths > 0
    assert (default_framed.captions[:, :, 0][real] == BOS).all() and (batch.captions[:, :, 0] == 0).all()
    assert torch.equal(default_framed.caption_lengths, batch.caption_lengths)
    per_caption = CaptionDataset(store, tmp_path / "ortcaps", "train")
    flat = per_caption.collate([per_caption[i] for i in range(6)])
    ends = flat.captions.gather(1, flat.caption_lengths[:, None] - 1)
    assert (flat.captions[:, 0] == 0).all() and (ends == 0).all()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="eos_id must be a word id"):
            collate(samples, eos_id=bad)
