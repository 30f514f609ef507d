"""Data loading vs. a model step: is the feature store ever the bottleneck on CPU?

Per feature size D (2048, bottom-up's, and 512), float16 store, 320 images x 36 boxes, batches
of 32 per-caption items (one random caption of five per image, as cross-entropy training reads
them). Every timed call handles one epoch of 10 batches:

- ``loader_w0``: DataLoader in the main process (store reads + collate);
- ``loader_w2``: DataLoader with 2 persistent forked workers (the store opened in each);
- ``model_step``: a deliberately cheap model proxy, forward + backward + SGD on 10 batches
  already in memory: ``Linear(D->512)``, one masked self-attention over the boxes, a
  512->2048->512 feed-forward (the real captioner has 6 + 6 such layers and a vocabulary
  projection, so it costs several times more);
- ``train_w0`` / ``train_w2``: the proxy fed by the in-process / 2-worker loader, as in training.

``extra_info`` gives batches per second of each; loading is not the bottleneck when
the loaders are much faster than ``model_step`` and ``train_*`` cost about what ``model_step``
does. (On a 2-core machine the workers compete with the model's threads for the cores, so
``train_w2`` can cost more than ``train_w0``.) Run: ``python -m pytest bench/test_bench_loader.py --benchmark-only -q``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from geocap.data.dataset import CaptionDataset, collate
from geocap.data.items import Caption, CaptionSet, ImageFeatures
from geocap.data.store import write_store
from geocap.data.vocab import build_vocab, encode_captions, write_captions

N_IMAGES, N_BOXES, BATCH, CAPTIONS = 320, 36, 32, 5
N_BATCHES = N_IMAGES // BATCH
WORDS = "a man dog riding on the red bus with two cats street near of table big small under tree".split()
ROUNDS = 3


def _records(d: int, rng: np.random.Generator):
    for image_id in range(N_IMAGES):
        xy = rng.random((N_BOXES, 2), dtype=np.float32) * 0.5
        wh = rng.random((N_BOXES, 2), dtype=np.float32) * 0.5
        yield ImageFeatures(image_id, rng.standard_normal((N_BOXES, d), dtype=np.float32),
                            np.concatenate([xy, xy + wh], axis=1), width=640, height=480)


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    caps = [Caption(i, i * CAPTIONS + k, " ".join(rng.choice(WORDS, int(rng.integers(8, 20)))))
            for i in range(N_IMAGES) for k in range(CAPTIONS)]
    caption_set = CaptionSet(caps, {i: "train" for i in range(N_IMAGES)})
    out = tmp_path_factory.mktemp("loader-bench") / "caps"
    write_captions(out, encode_captions(caption_set, build_vocab(caption_set, min_count=1)))
    return out


_STORES = {}


@pytest.fixture(scope="module")
def store_for(tmp_path_factory):
    def make(d: int):
        if d not in _STORES:
            path = tmp_path_factory.mktemp(f"store-{d}") / "features.h5"
            write_store(path, _records(d, np.random.default_rng(d)), feature_dtype="float16", progress=False)
            _STORES[d] = path
        return _STORES[d]
    return make


class ModelProxy(nn.Module):
    """A cheap stand-in for one training step's compute: embed, attend once, feed forward."""

    def __init__(self, d: int, width: int = 512):
        super().__init__()
        self.embed = nn.Linear(d, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))

    def forward(self, features, mask):
        x = torch.relu(self.embed(features))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        logits = logits.masked_fill(~mask[:, None, :], -1e9)
        x = x + logits.softmax(-1) @ v
        x = x + self.ff(x)
        return (x * mask[..., None]).pow(2).mean()


def _loader(ds, workers: int):
    return DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0, multiprocessing_context="fork" if workers else None)


def _stop_workers(loader):
    """Stop a loader's persistent workers now rather than when the benchmark drops ``run``."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


VARIANTS = ("loader_w0", "loader_w2", "model_step", "train_w0", "train_w2")


@pytest.mark.parametrize("d", [2048, 512])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_loader(benchmark, store_for, captions_dir, variant, d):
    ds = CaptionDataset(store_for(d), captions_dir, "train", captions_per_image="one-random")
    torch.manual_seed(0)
    model = ModelProxy(d)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        model(batch.features, batch.attention_mask).backward()
        opt.step()

    loader = _loader(ds, 2 if variant.endswith("w2") else 0)
    fixed = [collate([ds[i] for i in range(b * BATCH, (b + 1) * BATCH)]) for b in range(N_BATCHES)]
    if variant.startswith("loader"):
        def run():
            n = 0
            for batch in loader:
                n += len(batch)
            assert n == N_BATCHES * BATCH
    elif variant == "model_step":
        def run():
            for batch in fixed:
                step(batch)
    else:
        def run():
            for batch in loader:
                step(batch)

    benchmark.group = f"loader D={d} float16 B={BATCH} N={N_BOXES} cpu"
    # the warm-up round starts the persistent workers; the others need none
    try:
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if variant.endswith("w2") else 0)
    finally:
        _stop_workers(loader)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        variant=variant, baseline=variant == "model_step", subject=variant == "loader_w2", D=d, B=BATCH,
        boxes=N_BOXES, feature_dtype="float16", batches_per_call=N_BATCHES,
        batches_per_s=round(N_BATCHES / median, 1), torch_threads=torch.get_num_threads(),
        note=None if variant != "model_step" else "proxy: Linear(D->512) + 1 attention + FFN 512-2048-512, fwd+bwd+SGD")
