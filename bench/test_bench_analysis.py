"""Analysis throughput (records/s) over in-memory records of realistic size, per analysis and all
four at once (``StatsCollector``), against simply reading the same maps back from HDF5 with h5py.

Records: N = 36 objects, T = 16 tokens, L = 6 layers, H = 8 heads, all three maps in float16 (as a
dump stores them), 2048-d features, clusters and referents; four records per image (three
reference captions and one hypothetical) share the image's encoder maps and features. No stored
entropies: the entropy analysis runs the entropy op on every map (its slow path).
The h5py baseline (``h5py_read``) writes the same records to one lzf-compressed, chunked HDF5 file
(one group per record: ``encoder_self``, ``decoder_self``, ``cross``, ``features``) and times reading
every dataset back: the floor any analysis of a dump pays before analysing anything.

Run: ``python -m pytest bench/test_bench_analysis.py --benchmark-only -q``. extra_info holds
``records_per_s``; the group's comparison table gives each variant's time relative to h5py_read.
"""
import h5py
import numpy as np
import pytest

from geocap.analysis import (EntropyAccumulator, GroundingAccumulator, ProximityAccumulator, StatsCollector,
                             ThematicAccumulator)
from geocap.data.attention_record import Record

N, T, L, H, D = 36, 16, 6, 8, 2048
RECORDS = 96
GROUP = f"analysis N={N} T={T} L={L} H={H} x{RECORDS} records"


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _records():
    """Four records per image (three reference captions, one hypothetical), sharing the image's
    boxes, clusters, labels, features and encoder maps, as a dump's records do."""
    rng = np.random.default_rng(0)
    out = []
    causal = np.tril(np.ones((T, T), bool))
    for i in range(RECORDS):
        if i % 4 == 0:
            x1y1 = rng.uniform(0, 0.7, (N, 2))
            image = dict(boxes=np.concatenate([x1y1, x1y1 + rng.uniform(0.05, 0.3, (N, 2))], 1).astype(np.float32),
                         clusters=rng.integers(0, 6, N), labels=rng.integers(0, 25, N),
                         features=rng.normal(size=(N, D)).astype(np.float16),
                         encoder_self=_softmax(rng.normal(size=(L, H, N, N)) * 2).astype(np.float16))
        referents = np.full(T, -1)
        referents[1:T - 1:3] = rng.integers(0, N, len(referents[1:T - 1:3]))
        kind = "hypothetical" if i % 4 == 3 else "reference"
        rec = Record(
            image_id=i // 4, caption_id=i % 4, kind=kind, tokens=[f"w{t}" for t in range(T - 1)] + ["<eos>"],
            referents=referents,
            source_referents=np.where(referents >= 0, (referents + 1) % N, -1) if kind == "hypothetical" else None,
            decoder_self=_softmax(np.where(causal, rng.normal(size=(L, H, T, T)) * 2, -np.inf)).astype(np.float16),
            cross=_softmax(rng.normal(size=(L, H, T, N)) * 2).astype(np.float16),
            **image,
        )
        out.append(rec.validate())
    return out


@pytest.fixture(scope="module")
def records():
    return _records()


@pytest.fixture(scope="module")
def h5_file(records, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_analysis") / "records.h5"
    with h5py.File(path, "w") as f:
        for i, rec in enumerate(records):
            g = f.create_group(str(i))
            for name in ("encoder_self", "decoder_self", "cross", "features"):
                g.create_dataset(name, data=getattr(rec, name), compression="lzf", chunks=True)
    return path


VARIANTS = {
    "entropy": EntropyAccumulator,
    "thematic": ThematicAccumulator,
    "proximity": ProximityAccumulator,
    "grounding": GroundingAccumulator,
    "all_four": StatsCollector,
}


def _info(benchmark, variant, **extra):
    benchmark.group = GROUP
    benchmark.extra_info.update({"variant": variant, "N": N, "T": T, "L": L, "H": H, "records": RECORDS, **extra})


def _rate(benchmark):
    benchmark.extra_info["records_per_s"] = RECORDS / benchmark.stats.stats.median


def test_bench_h5py_read(benchmark, h5_file):
    _info(benchmark, "h5py_read", baseline=True)

    def run():
        with h5py.File(h5_file, "r") as f:
            for key in f:
                for name in ("encoder_self", "decoder_self", "cross", "features"):
                    f[key][name][()]

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _rate(benchmark)


def test_bench_entropy_from_stored_entropies(benchmark, records):
    """The entropy analysis' fast path: records carrying the kernels' per-row entropies (as dumps do)."""
    _info(benchmark, "entropy_stored")
    stored = []
    for rec in records:
        fields = {}
        for kind, name in (("encoder_self", "encoder_entropy"), ("decoder_self", "decoder_entropy"),
                           ("cross", "cross_entropy")):
            p = getattr(rec, kind).astype(np.float64)
            fields[name] = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1).astype(np.float32)
        stored.append(Record(image_id=rec.image_id, caption_id=rec.caption_id, kind=rec.kind, boxes=rec.boxes,
                             tokens=rec.tokens, **fields))

    def run():
        acc = EntropyAccumulator()
        for rec in stored:
            acc.update(rec)
        return acc.result()

    assert benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1).rows["cross"] > 0
    _rate(benchmark)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_analysis(benchmark, records, variant):
    _info(benchmark, variant, subject=variant == "all_four")

    def run():
        acc = VARIANTS[variant]()
        for rec in records:
            acc.update(rec)
        return acc.result() if variant != "all_four" else acc.to_json()

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out is not None
    _rate(benchmark)
