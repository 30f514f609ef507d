"""Attention dumps: write throughput with and without maps, bytes per image by compression, and
read throughput of ``open_dump`` against reading the shards with h5py directly.

Data (two sets, both 64 images (``GEOCAP_BENCH_DUMP_IMAGES`` sets another number), features D = 64,
ORT's attention shape L = 6 layers, H = 8 heads):

- ``coco36``: COCO-shaped, 36 boxes per image, 5 random captions of 8-16 words, no ground truth
  (so k-means clusters, no hypothetical captions); a randomly initialised model (xavier, ORT's
  init: near-uniform attention, the hard case for compression);
- ``synth``: the synthetic scenes (3-12 objects, grounded captions, hypothetical captions on),
  a model trained for 60 steps (peakier attention, closer to a trained captioner's).

Write variants (one complete dump per round, into a fresh directory; batch 16 images, shards of
32): ``maps_lzf``, ``maps_gzip`` (shuffle + zlib level 1; lzf is the default), ``maps_none`` and
``stats_only`` (no maps; the analysis collector is ``geocap.analysis.StatsCollector`` when it exists, else a counting
stand-in, named in ``extra_info["collector"]``); each with ``writer`` "process" (the default:
the shard writer in a child process) and "inline" (in the model's process). ``extra_info``:
images/s, records/s, bytes per image, the writer's share of the wall time (``writer_share``: the
model process's time in the writer, or handing records over to the writer process and waiting
for it) and ``writer_child_share`` (the writer process's own time / wall time).

Read variants, over the dumps written above: ``h5py_raw`` reads every dataset of every shard
whole (the floor for any reader), ``open_dump_chunks`` iterates the records in chunks of 256,
``open_dump_index`` reads every record by index (``dump[i]``). ``extra_info``: records/s.

Run: ``python -m pytest bench/test_bench_dump.py --benchmark-only -q``. Numbers are reported,
never asserted.
"""
from __future__ import annotations

import os
import pickle
import time

import h5py
import numpy as np
import pytest
import torch

from geocap.checkpoint import save_checkpoint
from geocap.data.dump_format import open_dump
from geocap.data.items import Caption, CaptionSet, ImageFeatures
from geocap.data.store import write_store
from geocap.data.vocab import build_vocab, encode_captions, write_captions
from geocap.dump.job import dump
from geocap.model import ObjectRelationTransformer, ORTConfig

# GEOCAP_BENCH_DUMP_IMAGES: more images per dump, so that a job's fixed costs weigh less (384 in RESULTS.md)
N_IMAGES, D, LAYERS, HEADS = int(os.environ.get("GEOCAP_BENCH_DUMP_IMAGES", 64)), 64, 6, 8
WORDS = "a man dog riding on the red bus with two cats street near of table big small under tree".split()
SETTINGS = dict(batch_size=16, shard_images=32, progress=False)
WRITE_VARIANTS = ("maps_lzf", "maps_gzip", "maps_none", "stats_only")
_DUMPS: dict = {}


def _model_config(vocab_size: int) -> ORTConfig:
    return ORTConfig(vocab_size=vocab_size, feature_dim=D, layers=LAYERS, d_model=64, heads=HEADS, d_ff=128,
                     max_len=40)


@pytest.fixture(scope="module", autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)          # a shared 2-core machine: more threads only oversubscribe it
    yield
    torch.set_num_threads(old)


def _coco36(root) -> tuple:
    rng = np.random.default_rng(0)
    records = []
    for image_id in range(1, N_IMAGES + 1):
        xy = rng.random((36, 2), dtype=np.float32) * 0.5
        wh = rng.random((36, 2), dtype=np.float32) * 0.5
        records.append(ImageFeatures(image_id, rng.standard_normal((36, D), dtype=np.float32),
                                     np.concatenate([xy, xy + wh], axis=1), width=640, height=480))
    write_store(root / "features.h5", iter(records), feature_dtype="float16", progress=False)
    caps = [Caption(i, i * 5 + k, " ".join(rng.choice(WORDS, int(rng.integers(8, 17)))))
            for i in range(1, N_IMAGES + 1) for k in range(5)]
    caption_set = CaptionSet(caps, {i: "train" for i in range(1, N_IMAGES + 1)})
    vocab = build_vocab(caption_set, min_count=1)
    write_captions(root / "caps", encode_captions(caption_set, vocab))
    torch.manual_seed(0)
    config = _model_config(len(vocab))
    save_checkpoint(root / "model.pt", model=ObjectRelationTransformer(config), config=config, vocab=vocab, rng=False)
    return str(root), str(root / "model.pt")


def _synth(root) -> tuple:
    from geocap.cli import main as cli_main
    from geocap.data.synth import generate_synthetic
    from geocap.train import TrainConfig, train
    generate_synthetic(root, images=N_IMAGES * 10 // 8, seed=0, feature_dim=D, progress=False)   # 64 train images
    assert cli_main(["prepro", "captions", "--karpathy", str(root / "dataset_coco.json"), "--out", str(root / "caps"),
                     "--min-count", "1"]) == 0
    result = train(TrainConfig(data=str(root), out=str(root / "run"), layers=LAYERS, d_model=64, heads=HEADS,
                               d_ff=128, batch_size=3, steps=60, optimizer="adamw", lr=3e-3, warmup=5, val_every=0,
                               checkpoint_every=0, progress=False, log_every=100))
    return str(root), os.path.join(result.out, "checkpoint-latest.pt")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return {"coco36": _coco36(tmp_path_factory.mktemp("coco36")),
            "synth": _synth(tmp_path_factory.mktemp("synth"))}


def _collector():
    try:
        from geocap.analysis import StatsCollector
        return StatsCollector, "geocap.analysis.StatsCollector"
    except ImportError:
        return _Counting, "counting stand-in"


class _Counting:
    """Stand-in with StatsCollector's interface while geocap.analysis has none: counts records and
    sums each layer's mean row entropy (touches every map the real one would)."""

    def __init__(self):
        self.n, self.sums = 0, {}

    def update(self, record):
        self.n += 1
        for name in ("encoder_self", "decoder_self", "cross"):
            m = getattr(record, name)
            if m is not None:
                p = m.astype(np.float32)
                h = -(p * np.log(np.maximum(p, 1e-12))).sum(-1).mean(axis=(1, 2))
                self.sums[name] = self.sums.get(name, 0) + h

    def merge(self, other):
        self.n += other.n
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0) + v

    def state(self):
        return {"n": np.array(self.n), **{k: np.asarray(v) for k, v in self.sums.items()}}

    @classmethod
    def from_state(cls, state):
        c = cls()
        c.n = int(state["n"])
        c.sums = {k: v for k, v in state.items() if k != "n"}
        return c

    def to_json(self):
        return {"n": self.n}


@pytest.mark.parametrize("writer", ["process", "inline"])
@pytest.mark.parametrize("variant", WRITE_VARIANTS)
@pytest.mark.parametrize("data", ["coco36", "synth"])
def test_bench_dump_write(benchmark, datasets, tmp_path, data, variant, writer):
    data_dir, ckpt = datasets[data]
    collector, collector_name = _collector()
    kw = dict(SETTINGS, writer=writer)
    if variant == "stats_only":
        kw.update(stats_only=True, stats_collector=collector)
    else:
        kw.update(compression=variant.split("_")[1])
    runs = []

    def run():
        out = tmp_path / f"dump-{len(runs)}"
        runs.append(dump(ckpt, data_dir, "train", out, **kw))
        return out

    out = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    if writer == "process":
        _DUMPS[(data, variant)] = str(out)
    r = runs[-1]
    best = min(runs, key=lambda x: x.seconds)
    benchmark.group = f"dump write {data} {variant}"
    benchmark.extra_info.update({
        "variant": f"writer_{writer}", "dump": variant, "baseline": writer == "inline", "images": r.images,
        "records": r.records,
        "images_per_s": round(best.images / best.seconds, 2), "records_per_s": round(best.records / best.seconds, 1),
        "bytes_per_image": round(r.bytes_per_image), "writer_share": round(best.writer_seconds / best.seconds, 3),
        "writer_child_share": round(best.writer_child_seconds / best.seconds, 3),
        "collector": collector_name if variant == "stats_only" else None})


def test_bench_dump_handover(benchmark):
    """Pickling one image's records, as ``multiprocessing`` does to hand them to the writer process
    (in the parent's queue feeder thread, which holds the GIL): ``extra_info``: KB and ms per image."""
    path = _DUMPS.get(("coco36", "maps_lzf"))
    if path is None:
        pytest.skip("run with test_bench_dump_write first (same session)")
    d = open_dump(path, progress=False)
    images: dict = {}
    for r in d:
        images.setdefault(r.image_id, []).append(r)
    d.close()
    per_image = list(images.values())

    def run():
        return sum(len(pickle.dumps(recs, protocol=pickle.HIGHEST_PROTOCOL)) for recs in per_image)

    n_bytes = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.group = "dump handover coco36"
    benchmark.extra_info.update({"images": len(per_image), "kb_per_image": round(n_bytes / len(per_image) / 1024, 1),
                                 "ms_per_image": round(1e3 * benchmark.stats.stats.median / len(per_image), 3)})


def _raw_read(path: str) -> int:
    records = 0
    for name in sorted(os.listdir(path)):
        if not name.endswith(".h5"):
            continue
        with h5py.File(os.path.join(path, name), "r", locking=False) as h5:
            records += int(h5.attrs["n_records"])
            datasets = []
            h5.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
            for ds in datasets:      # (a visititems callback that returns a value stops the visit)
                ds[()]
    return records


READ_VARIANTS = ("h5py_raw", "open_dump_chunks", "open_dump_index")


@pytest.mark.parametrize("variant", READ_VARIANTS)
@pytest.mark.parametrize("compression", ["maps_lzf", "maps_gzip"])
def test_bench_dump_read(benchmark, compression, variant):
    path = _DUMPS.get(("coco36", compression))
    if path is None:
        pytest.skip("run with test_bench_dump_write first (same session)")

    def run():
        if variant == "h5py_raw":
            return _raw_read(path)
        d = open_dump(path, progress=False)
        try:
            if variant == "open_dump_chunks":
                return sum(len(c) for c in d.iter_chunks(256, progress=False))
            return sum(1 for i in range(len(d)) if d[i] is not None)
        finally:
            d.close()

    t0 = time.perf_counter()
    n = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.group = f"dump read coco36 {compression}"
    median = benchmark.stats.stats.median if benchmark.stats else (time.perf_counter() - t0)
    benchmark.extra_info.update({"variant": variant, "baseline": variant == "h5py_raw", "records": n,
                                 "records_per_s": round(n / median, 1)})
