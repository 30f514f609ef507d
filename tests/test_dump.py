"""geocap dump: records round trip, modes, map subsets, stats-only, resume after SIGKILL, two
ranks, and clear errors for bad dumps. A randomly initialised tiny model on 30 synthetic images."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from geocap.checkpoint import save_checkpoint
from geocap.data.attention_record import MAP_NAMES, Record
from geocap.data.dump_format import DumpError, box_embedding, open_dump
from geocap.data.store import FeatureStore
from geocap.data.vocab import BOS, Vocabulary, load_captions
from geocap.dump.job import dump
from geocap.model import ObjectRelationTransformer, ORTConfig
from helpers import synth_data_dir

F16 = dict(atol=2e-3, rtol=2e-3)       # float16 storage of weights in [0, 1]
SETTINGS = dict(shard_images=4, batch_size=2, progress=False)   # train split: 16 images -> 4 shards


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_data_dir(tmp_path_factory.mktemp("dumpdata"), images=20)


def _save_model(data_dir, path, seed):
    vocab = Vocabulary.load(os.path.join(data_dir, "caps", "vocab.json"))
    torch.manual_seed(seed)
    config = ORTConfig(vocab_size=len(vocab), feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64, max_len=40)
    save_checkpoint(path, model=ObjectRelationTransformer(config), config=config, vocab=vocab, rng=False)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(data_dir, tmp_path_factory):
    return _save_model(data_dir, tmp_path_factory.mktemp("ckpt") / "model.pt", seed=0)


@pytest.fixture(scope="module")
def base(ckpt, data_dir, tmp_path_factory):
    """An uninterrupted one-rank dump of the train split (maps, referents, hypotheticals)."""
    out = tmp_path_factory.mktemp("base") / "dump"
    result = dump(ckpt, data_dir, "train", out, **SETTINGS)
    assert result.complete and result.shards_written == list(range(4)) and result.images == 16
    return str(out)


def _model(ckpt):
    from geocap.checkpoint import load_checkpoint
    return load_checkpoint(ckpt).build_model().eval()


def _recorded(model, vocab, store, image_id, words):
    """What the model records for one image and one caption (``words`` ending with <eos>)."""
    vocab_ids = {w: i for i, w in enumerate(vocab)}
    feats, boxes = store.read(store.index_of(image_id))
    inputs = torch.tensor([[BOS] + [vocab_ids[w] for w in words[:-1]]])
    with torch.no_grad():
        _, rec = model(torch.from_numpy(feats)[None], torch.from_numpy(boxes)[None], None, inputs,
                       return_attention=True)
    stack = lambda xs: torch.stack(xs, 1)[0].numpy()  # noqa: E731
    return boxes, {"encoder_self": stack(rec.encoder_probs), "encoder_entropy": stack(rec.encoder_entropy),
                   "decoder_self": stack(rec.decoder_probs), "decoder_entropy": stack(rec.decoder_entropy),
                   "cross": stack(rec.cross_probs), "cross_entropy": stack(rec.cross_entropy)}


def _same(a: Record, b: Record) -> None:
    """Two records read from two dumps are identical, field by field."""
    assert (a.image_id, a.caption_id, a.kind, a.tokens) == (b.image_id, b.caption_id, b.kind, b.tokens)
    assert a.extra == b.extra
    for name in ("boxes", "labels", "clusters", "features", "referents", "source_referents", *MAP_NAMES,
                 "encoder_entropy", "decoder_entropy", "cross_entropy"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), (name, a.image_id, a.caption_id)


def _same_dumps(path_a, path_b):
    a, b = open_dump(path_a, progress=False), open_dump(path_b, progress=False)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        _same(x, y)


def test_records_of_one_image_share_its_arrays(base):
    """As the writer's records do: the analyses compare objects by identity first (a value
    comparison per record otherwise), and a top-k encoder map is expanded once per image."""
    records = list(open_dump(base, progress=False))
    pairs = [(a, b) for a, b in zip(records, records[1:]) if a.image_id == b.image_id]
    assert len(pairs) >= len(records) // 2
    for a, b in pairs:
        for name in ("boxes", "labels", "clusters", "extra", "encoder_self", "encoder_entropy"):
            assert getattr(a, name) is getattr(b, name) is not None, name
        assert a.decoder_self is not b.decoder_self and a.cross is not b.cross
    assert records[0].boxes is not records[-1].boxes


def test_round_trip_teacher_forced(base, ckpt, data_dir):
    d = open_dump(base, progress=False)
    truth = json.load(open(os.path.join(data_dir, "ground_truth.json")))
    gt_images = {im["image_id"]: im for im in truth["images"]}
    categories = {c["id"]: c for c in truth["categories"]}
    caps = load_captions(os.path.join(data_dir, "caps"))
    train_ids = sorted({int(i) for i in caps.image_id[caps.rows("train")]})
    assert d.metadata["split"] == "train" and d.metadata["mode"] == "teacher-forced"
    assert d.metadata["clusters"] == "ground_truth" and d.metadata["n_images"] == 16
    records = list(d)
    assert len(records) == len(d) == sum(e["records"] for e in d.manifest["shards"])
    assert [r.image_id for r in records] == sorted(r.image_id for r in records)
    assert sorted({r.image_id for r in records}) == train_ids
    refs = [r for r in records if r.kind == "reference"]
    assert len(refs) == 5 * 16                          # every reference caption once
    assert len({(r.image_id, r.caption_id, r.kind) for r in records}) == len(records)
    hyps = [r for r in records if r.kind == "hypothetical"]
    assert hyps, "images with several categories give hypothetical captions"

    model = _model(ckpt)
    words = Vocabulary.load(os.path.join(data_dir, "caps", "vocab.json")).words
    store = FeatureStore(os.path.join(data_dir, "features.h5"))
    checked = 0
    for r in records[:12] + hyps[:6]:
        r.validate()
        im = gt_images[r.image_id]
        boxes, expected = _recorded(model, words, store, r.image_id, r.tokens)
        assert np.array_equal(r.boxes, boxes)
        assert r.tokens[-1] == "<eos>"
        assert np.array_equal(r.labels, [o["category_id"] for o in im["objects"]])
        assert np.array_equal(r.clusters, [o["cluster_id"] for o in im["objects"]])
        for name, value in expected.items():
            got = getattr(r, name)
            assert got.shape == value.shape, name
            np.testing.assert_allclose(got.astype(np.float32), value, **F16, err_msg=name)
        assert r.encoder_self.dtype == np.float16 and r.decoder_entropy.dtype == np.float32
        cap = next(c for c in im["captions"] if c["caption_id"] == r.caption_id)
        if r.kind == "reference":
            assert r.tokens[:-1] == cap["tokens"] and r.source_referents is None
            assert r.referents.tolist() == cap["refs"] + [-1]
        else:  # swapped nouns name another category present in the image, and point at it
            swapped = np.flatnonzero(r.source_referents >= 0)
            assert len(swapped) and len(r.tokens) - 1 >= len(cap["tokens"]) - 1
            for t in swapped:
                new_cat = categories[im["objects"][r.referents[t]]["category_id"]]
                old_cat = im["objects"][r.source_referents[t]]["category_id"]
                assert new_cat["id"] != old_cat
                assert r.tokens[t] in new_cat["name"].split() + new_cat["plural"].split()
        for t in np.flatnonzero(r.referents >= 0):   # a grounded word names its object's category
            cat = categories[im["objects"][r.referents[t]]["category_id"]]
            assert r.tokens[t] in {w for pair in cat["names"] for name in pair for w in name.split()}
        checked += 1
    assert checked == 18

    # sequence API: indexing, negative index, slices, chunks, pickling
    _same(d[-1], records[-1])
    _same(d[7], records[7])
    assert [x.caption_id for x in d[5:9]] == [x.caption_id for x in records[5:9]]
    chunks = list(d.iter_chunks(7, progress=False))
    assert sum(len(c) for c in chunks) == len(d) and max(len(c) for c in chunks) == 7
    _same(pickle.loads(pickle.dumps(d))[3], records[3])
    import geocap.data.dump_format as dump_format
    old, dump_format.OPEN_SHARDS = dump_format.OPEN_SHARDS, 2    # reopening closed shards gives the same records
    try:
        d.close()
        for i in (0, len(d) - 1, 40, 3, len(d) - 2):
            _same(d[i], records[i])
        assert len(d._shards) <= 2
    finally:
        dump_format.OPEN_SHARDS = old
    with pytest.raises(IndexError):
        d[len(d)]
    with pytest.raises(DumpError, match="not a stats-only dump"):
        d.shard_states()


def test_generated_mode_and_map_subset(ckpt, data_dir, tmp_path):
    from geocap.captioner import Captioner
    out = tmp_path / "gen"
    result = dump(ckpt, data_dir, "val", out, mode="generated", what="cross", beam_size=1, max_len=8, **SETTINGS)
    assert result.complete and result.images == 2
    d = open_dump(out, progress=False)
    with h5py.File(out / "shard-00000.h5", "r", locking=False) as h5:
        assert set(h5["maps"]) == {"cross"} and set(h5["entropy"]) == {"cross"}
    cap = Captioner.load(ckpt, device="cpu")
    store = FeatureStore(os.path.join(data_dir, "features.h5"))
    assert len(d) == 2 and {r.kind for r in d} == {"generated"}
    for r in d:
        feats, boxes = store.read(store.index_of(r.image_id))
        text = cap.caption(feats[None], boxes[None], beam_size=1, max_len=8)[0]
        words = text.split() + (["<eos>"] if len(text.split()) < 8 else [])
        assert r.tokens == words and r.caption_id == -1 and r.referents is None
        assert r.encoder_self is None and r.decoder_self is None and r.encoder_entropy is None
        _, expected = _recorded(cap.model, cap.vocab.words, store, r.image_id, r.tokens)
        np.testing.assert_allclose(r.cross.astype(np.float32), expected["cross"], **F16)
        np.testing.assert_allclose(r.cross_entropy, expected["cross_entropy"], **F16)


class CountingCollector:
    """A minimal stand-in for geocap.analysis.StatsCollector (same interface): records, tokens and
    the summed cross-attention entropy per layer."""

    def __init__(self):
        self.records, self.tokens, self.cross_entropy = 0, 0, None

    def update(self, record):
        assert record.cross is not None          # the collector sees the maps, the shard stores none
        self.records += 1
        self.tokens += record.num_tokens
        s = record.cross_entropy.astype(np.float64).sum(axis=(1, 2))
        self.cross_entropy = s if self.cross_entropy is None else self.cross_entropy + s

    def merge(self, other):
        self.records += other.records
        self.tokens += other.tokens
        self.cross_entropy = self.cross_entropy + other.cross_entropy

    def state(self):
        return {"records": np.array(self.records), "tokens": np.array(self.tokens),
                "cross_entropy": self.cross_entropy}

    @classmethod
    def from_state(cls, state):
        c = cls()
        c.records, c.tokens, c.cross_entropy = int(state["records"]), int(state["tokens"]), state["cross_entropy"]
        return c

    def to_json(self):
        return {"records": self.records, "tokens": self.tokens}


def test_stats_only(base, ckpt, data_dir, tmp_path):
    out = tmp_path / "stats"
    result = dump(ckpt, data_dir, "train", out, stats_only=True, stats_collector=CountingCollector, **SETTINGS)
    assert result.complete
    d = open_dump(out, progress=False)
    full = list(open_dump(base, progress=False))
    assert len(d) == len(full)
    for r, f in zip(d, full):
        assert r.encoder_self is None and r.decoder_self is None and r.cross is None
        assert r.tokens == f.tokens
        # row entropies: stored as float16 (every row, each within float16's rounding of the full dump's
        # float32 value), read back as float32
        for name in ("encoder_entropy", "decoder_entropy", "cross_entropy"):
            got, want = getattr(r, name), getattr(f, name)
            assert got.dtype == np.float32 and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
            assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2.0 ** -11, 2.0 ** -25)), name
    for name in sorted(os.listdir(out)):
        if name.endswith(".h5"):
            with h5py.File(out / name, "r", locking=False) as h5:
                assert "maps" not in h5 and "stats" in h5
                assert {h5[f"entropy/{k}"].dtype for k in MAP_NAMES} == {np.dtype(np.float16)}
    stats = d.stats(CountingCollector)
    assert stats.records == len(full) and stats.tokens == sum(f.num_tokens for f in full)
    expected = sum(f.cross_entropy.astype(np.float64).sum(axis=(1, 2)) for f in full)
    np.testing.assert_allclose(stats.cross_entropy, expected, rtol=1e-6)
    assert result.bytes < sum(os.path.getsize(os.path.join(base, n)) for n in os.listdir(base))


def test_kmeans_clusters_without_ground_truth(ckpt, data_dir, tmp_path):
    plain = tmp_path / "plain"                     # the same data without ground_truth.json
    plain.mkdir()
    shutil.copy(os.path.join(data_dir, "features.h5"), plain / "features.h5")
    shutil.copytree(os.path.join(data_dir, "caps"), plain / "caps")
    kw = dict(SETTINGS, what="encoder", clusters=3, limit=6, features=True)
    dump(ckpt, plain, "train", tmp_path / "a", **kw)
    dump(ckpt, plain, "train", tmp_path / "b", rank=1, world_size=2, **kw)
    dump(ckpt, plain, "train", tmp_path / "b", rank=0, world_size=2, **kw)
    a = open_dump(tmp_path / "a", progress=False)
    assert a.metadata["clusters"] == "kmeans" and np.asarray(a.metadata["cluster_centroids"]).shape == (3, 16)
    assert {r.kind for r in a} == {"reference"} and len(a) == 6 * 5
    clusters = np.concatenate([r.clusters for r in a])
    assert clusters.min() >= 0 and clusters.max() < 3 and len(set(clusters.tolist())) > 1
    assert all(r.referents is None and r.decoder_self is None and r.encoder_self is not None for r in a)
    store = FeatureStore(plain / "features.h5")
    for r in a:                                     # --features: each object's stored features
        assert r.features.dtype == np.float16
        assert np.array_equal(r.features, store.read(store.index_of(r.image_id), float32=False)[0])
    _same_dumps(tmp_path / "a", tmp_path / "b")     # every rank computed the same clusters
    with pytest.raises(ValueError, match="hypothetical captions need referents"):
        dump(ckpt, plain, "train", tmp_path / "c", hypothetical=True, **kw)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_compressions_store_the_same_records(base, ckpt, data_dir, tmp_path, compression):
    out = tmp_path / compression                  # the base dump is lzf (the default)
    dump(ckpt, data_dir, "train", out, compression=compression, limit=8, **SETTINGS)
    d, b = open_dump(out, progress=False), open_dump(base, progress=False)
    assert d.metadata["compression"] == compression and b.metadata["compression"] == "lzf"
    with h5py.File(out / "shard-00000.h5", "r", locking=False) as h5:
        assert h5["maps/cross"].compression == (None if compression == "none" else compression)
    assert len(d) == len(b[:len(d)])
    for x, y in zip(d, b[:len(d)]):
        _same(x, y)


@pytest.mark.parametrize("writer", ["inline", "process"])
def test_writers_store_the_same_records(base, ckpt, data_dir, tmp_path, writer):
    """The in-process writer and the writer process (the default, which wrote ``base``) write identical dumps."""
    out = tmp_path / writer
    result = dump(ckpt, data_dir, "train", out, writer=writer, **SETTINGS)
    assert result.complete and result.records == len(open_dump(base, progress=False))
    _same_dumps(base, out)
    entries = json.loads((out / "manifest.json").read_text())["shards"]
    assert all(("writer_child_seconds" in e) == (writer == "process") for e in entries)
    assert (result.writer_child_seconds > 0) == (writer == "process")
    with open(os.path.join(base, "manifest.json")) as fh:
        base_entries = json.load(fh)["shards"]
    assert all("writer_child_seconds" in e for e in base_entries)          # "process" is the default
    with pytest.raises(ValueError, match="writer must be one of process, inline"):
        dump(ckpt, data_dir, "train", tmp_path / "bad", writer="thread", **SETTINGS)


def _writer_args(rec):
    return dict(index=0, metadata_sha256="x", checkpoint_sha256="y", vocab=sorted(set(rec.tokens)), maps=(),
                entropies=(), encoder_lh=(1, 2), decoder_lh=(1, 2), has_labels=False, has_clusters=False,
                has_features=False, stats_only=False)


def test_writer_process_errors_reach_the_parent(tmp_path):
    from geocap.dump.writer_process import WriterProcess
    from geocap.view.synthetic import synthetic_records
    rec = next(synthetic_records([5], objects=3, tokens=4, layers=1, heads=2, captions=1))
    with WriterProcess(queue_images=2) as proc:
        proc.open(tmp_path / "a.h5", **_writer_args(rec))
        rec.extra = {"width": 2.5, "height": 480}
        proc.add_image([rec])                       # the error comes back later: at the next call or the close
        with pytest.raises(ValueError, match=r"image 5: extra\['width'\] must be a positive int"):
            for _ in range(50):
                proc.add_image([rec])
                time.sleep(0.02)
            proc.close()
        proc.abort()
        rec.extra = {"width": 640, "height": 480}
        proc.open(tmp_path / "b.h5", **_writer_args(rec))      # the child goes on with the next shard
        proc.add_image([rec])
        assert proc.close() == os.path.getsize(tmp_path / "b.h5") and proc.n_records == 1
        assert sorted(os.listdir(tmp_path)) == ["b.h5"]        # the failed shard's temporary file is gone
        proc.open(tmp_path / "d.h5", **_writer_args(rec))      # an error of a shard closing in the background
        rec.extra = {"width": -1, "height": 480}
        proc.add_image([rec])
        proc.send_close()
        with pytest.raises(ValueError, match=r"image 5: extra\['width'\]"):
            proc.collect(block=True)
        assert proc.collect(block=True) == []
        rec.extra = {"width": 640, "height": 480}
    with WriterProcess() as proc:                              # records that cannot be pickled
        proc.open(tmp_path / "c.h5", **_writer_args(rec))
        rec.extra = {"width": 640, "height": 480, "bad": lambda: 0}
        with pytest.raises(RuntimeError, match="could not send to the shard writer process"):
            for _ in range(10):
                proc.add_image([rec])
                time.sleep(0.05)
        rec.extra = {"width": 640, "height": 480}
    assert proc._proc.poll() is not None and not os.path.exists(tmp_path / "c.h5")
    with WriterProcess() as proc:
        proc.open(tmp_path / "c.h5", **_writer_args(rec))
        os.kill(proc.pid, signal.SIGKILL)                      # a dead writer raises, never hangs
        with pytest.raises(DumpError, match=f"c.h5: the shard writer process {proc.pid} died "
                                            r"\(killed by SIGKILL\)"):
            for _ in range(10):
                proc.add_image([rec])
            proc.close()
    with pytest.raises(ValueError, match="queue_images"):
        WriterProcess(queue_images=0)


def test_stats_only_with_the_analysis_collector(base, ckpt, data_dir, tmp_path):
    from geocap.analysis import StatsCollector
    out = tmp_path / "stats"
    dump(ckpt, data_dir, "train", out, stats_only=True, stats_collector=StatsCollector, limit=8, **SETTINGS)  # 2 shards
    stats = open_dump(out, progress=False).stats(StatsCollector)
    full = open_dump(base, progress=False)[:len(open_dump(out, progress=False))]
    sequential = StatsCollector()
    for r in full:
        sequential.update(r)
    assert isinstance(stats, StatsCollector) and stats.records == sequential.records == len(full)
    assert set(stats.state()) == set(sequential.state())
    np.testing.assert_allclose(stats.state()["collector.records"], sequential.state()["collector.records"])
    # the controlled measures, gathered shard by shard while dumping, equal one pass over the stored records
    got, want = stats.to_json(), sequential.to_json()
    assert want["proximity"]["per_image"]["distance"] is not None
    for section, key in (("proximity", "per_image"), ("thematic", "per_image"), ("grounding", "referent_effect")):
        assert json.dumps(got[section][key]) == json.dumps(want[section][key]) or \
            np.allclose(_numbers(got[section][key]), _numbers(want[section][key]), rtol=1e-9, atol=1e-12,
                        equal_nan=True), section


def test_stats_collector_runs_in_the_writer_process_with_the_same_result(ckpt, data_dir, tmp_path):
    """StatsCollector (in_writer_process) is updated in the writer process, not the model's: the
    states stored are identical to an inline dump's, and the records reach it with the maps it
    reads (a collector of the test module, not importable there, runs in the model's process)."""
    from geocap.analysis import StatsCollector
    assert StatsCollector.in_writer_process and not getattr(CountingCollector, "in_writer_process", False)
    states = {}
    for writer in ("inline", "process"):
        out = tmp_path / writer
        dump(ckpt, data_dir, "train", out, stats_only=True, stats_collector=StatsCollector, limit=8,
             **dict(SETTINGS, writer=writer))
        states[writer] = open_dump(out, progress=False).shard_states()
    assert len(states["inline"]) == len(states["process"]) == 2
    for inline, process in zip(states["inline"], states["process"]):
        assert set(inline) == set(process)
        for key in inline:
            np.testing.assert_array_equal(inline[key], process[key], err_msg=key)


def test_collector_runs_in_the_writer_process(monkeypatch, ckpt, data_dir, tmp_path):
    """The model's process never updates a StatsCollector when the writer process runs it
    (``update`` is ``update_image`` of one record: refusing the latter refuses both)."""
    from geocap.analysis import StatsCollector

    def refuse(self, records):
        raise AssertionError("updated in the model's process")
    monkeypatch.setattr(StatsCollector, "update_image", refuse)
    assert dump(ckpt, data_dir, "train", tmp_path / "d", stats_only=True, stats_collector=StatsCollector, limit=4,
                **dict(SETTINGS, writer="process")).complete


def _numbers(tree):
    """The numbers of a JSON-like tree, in order (None as NaN)."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [np.nan if tree is None else float(tree)]


def _cli_command(ckpt, data_dir, out):
    args = ["--checkpoint", ckpt, "--data", data_dir, "--split", "train", "--out", str(out), "--shard-images", "4",
            "--batch-size", "2", "--no-progress"]
    return [sys.executable, "-c", f"import sys; from geocap.cli import main; sys.exit(main(['dump'] + {args!r}))"]


def _writer_children(pid):
    """Pids of the shard writer children of process ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"geocap.dump.writer_process" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid):
    """Whether ``pid`` runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_resume_after_sigkill(base, ckpt, data_dir, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli_command(ckpt, data_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            manifest = out / "manifest.json"
            if manifest.exists():
                try:
                    done = len(json.loads(manifest.read_text())["shards"])
                except ValueError:
                    done = 0
                temps = [n for n in os.listdir(out) if ".tmp-" in n and n.startswith("shard-")]
                if done >= 1 and temps:
                    writers = _writer_children(proc.pid)
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = (done, temps)
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, f"the dump ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    assert proc.returncode == -signal.SIGKILL
    assert writers, "the dump runs its shard writer in a child process by default"
    deadline = time.time() + 3                  # the writer process dies with the dump (PR_SET_PDEATHSIG)
    while time.time() < deadline and any(_alive(pid) for pid in writers):
        time.sleep(0.02)
    assert not [pid for pid in writers if _alive(pid)], "a writer process outlived the killed dump"
    with pytest.raises(DumpError, match="unfinished dump"):
        open_dump(out)
    # rerun the same command: it resumes, removes the dead process's temporary file
    result = dump(ckpt, data_dir, "train", out, **SETTINGS)
    assert result.complete and len(result.shards_skipped) >= 1
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    _same_dumps(base, out)


def test_two_ranks_read_as_one(base, ckpt, data_dir, tmp_path):
    out = tmp_path / "ranks"
    first = dump(ckpt, data_dir, "train", out, rank=1, world_size=2, **SETTINGS)
    assert first.shards_written == [1, 3] and not first.complete
    with pytest.raises(DumpError, match="2 of 4 shards missing"):
        open_dump(out)
    second = dump(ckpt, data_dir, "train", out, rank=0, world_size=2, **SETTINGS)
    assert second.shards_written == [0, 2] and second.complete
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["rank"] for e in manifest["shards"]] == [0, 1, 0, 1]
    _same_dumps(base, out)


def test_bad_dumps(base, ckpt, data_dir, tmp_path):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(base, dst)
        return dst

    # resuming with another model (or other settings) is refused
    other = _save_model(data_dir, tmp_path / "other.pt", seed=1)
    with pytest.raises(DumpError, match="checkpoint_sha256"):
        dump(other, data_dir, "train", copy("resume_other"), **SETTINGS)
    with pytest.raises(DumpError, match="mode"):
        dump(ckpt, data_dir, "train", copy("resume_mode"), mode="generated", **SETTINGS)

    missing = copy("missing")
    os.remove(missing / "shard-00002.h5")
    with pytest.raises(DumpError, match="shard-00002.h5.*missing"):
        open_dump(missing)
    repaired = dump(ckpt, data_dir, "train", missing, **SETTINGS)   # a rerun writes it again
    assert repaired.shards_redone == [2] and repaired.shards_written == [2] and repaired.complete
    _same_dumps(base, missing)

    unfinished = copy("unfinished")
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match="unfinished dump: 2 of 4 shards missing"):
        open_dump(unfinished)

    truncated = copy("truncated")
    path = truncated / "shard-00001.h5"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DumpError, match="shard-00001.h5.*truncated"):
        open_dump(truncated)

    corrupt = copy("corrupt")               # same size, garbage over the map data
    path = corrupt / "shard-00003.h5"
    with h5py.File(path, "r", locking=False) as h5:
        offset = h5["maps/decoder_self"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 64] = os.urandom(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(DumpError, match="shard-00003.h5"):
        d = open_dump(corrupt, progress=False)
        for _ in d.iter_chunks(1000, progress=False):
            pass
    header = copy("header")                 # garbage over the HDF5 superblock
    path = header / "shard-00000.h5"
    raw = bytearray(path.read_bytes())
    raw[:512] = bytes(512)
    path.write_bytes(bytes(raw))
    with pytest.raises(DumpError, match="shard-00000.h5.*corrupt"):
        open_dump(header)

    foreign = copy("foreign")               # a shard of a dump by another model, sizes patched to fit
    other_dump = tmp_path / "other_dump"
    dump(other, data_dir, "train", other_dump, limit=4, **SETTINGS)
    shutil.copy(other_dump / "shard-00000.h5", foreign / "shard-00000.h5")
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = os.path.getsize(foreign / "shard-00000.h5")
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match="shard-00000.h5: written by another model"):
        open_dump(foreign)

    version = copy("version")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["format_version"] = 99
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match="format version 99"):
        open_dump(version)


def _gt_names(data_dir):
    truth = json.load(open(os.path.join(data_dir, "ground_truth.json")))
    return [c["name"] for c in sorted(truth["categories"], key=lambda c: c["id"])]


def test_label_names_and_image_sizes(base, ckpt, data_dir, tmp_path):
    store = FeatureStore(os.path.join(data_dir, "features.h5"))
    d = open_dump(base, progress=False)
    assert d.metadata["label_names"] == store.label_names == _gt_names(data_dir)
    for r in d:
        width, height = (int(v) for v in store.image_sizes[store.index_of(r.image_id)])
        assert width > 0 and height > 0 and r.extra == {"width": width, "height": height}
    with h5py.File(os.path.join(base, "shard-00000.h5"), "r", locking=False) as h5:
        assert h5["images/width"].dtype == np.int32 and h5["images/height"].shape == h5["images/image_id"].shape
    # the viewer built from the dump names the boxes and knows the image's shape
    from geocap.view import build_site
    from geocap.view.site import image_data_key
    build_site(d, tmp_path / "view", limit=1, grouped=True, progress=False)
    text = (tmp_path / "view" / "data" / image_data_key(d[0].image_id)).read_text()
    page = json.loads(text[text.index(",") + 1:text.rindex(");")])
    assert (page["width"], page["height"]) == (d[0].extra["width"], d[0].extra["height"])
    assert page["records"][0]["labels"] == [store.label_names[k] for k in d[0].labels]

    # a store without label names (names from ground_truth.json) and with one image's size unknown
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    with h5py.File(data / "features.h5", "r+", locking=False) as h5:
        del h5["label_names"]
        h5["image_sizes"][store.index_of(d[0].image_id)] = [-1, -1]
    out = tmp_path / "dump"
    dump(ckpt, data, "train", out, what="cross", limit=4, **SETTINGS)
    e = open_dump(out, progress=False)
    assert e.metadata["label_names"] == _gt_names(data_dir)
    assert [r.extra for r in e if r.image_id == d[0].image_id] and \
        all(r.extra == {} for r in e if r.image_id == d[0].image_id)
    assert all(r.extra == {"width": x.extra["width"], "height": x.extra["height"]}
               for r, x in zip(e, d) if r.image_id != d[0].image_id)
    # without ground truth either: no names
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(data / "features.h5", plain / "features.h5")
    shutil.copytree(data / "caps", plain / "caps")
    dump(ckpt, plain, "train", tmp_path / "plain_dump", what="cross", limit=2, clusters=0, **SETTINGS)
    assert open_dump(tmp_path / "plain_dump", progress=False).metadata["label_names"] is None


def _old_layout(path):
    """Rewrite the dump at ``path`` as written before image sizes, label names and the box
    embedding existed: no images/width|height datasets, no label_names in the metadata, no
    embedding in its model config (digest, shard attributes and byte counts patched to fit)."""
    from geocap.data.dump_format import metadata_digest
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["metadata"]["label_names"]
    del manifest["metadata"]["model_config"]["embedding"]
    manifest["metadata_sha256"] = metadata_digest(manifest["metadata"])
    for entry in manifest["shards"]:
        file = path / entry["file"]
        with h5py.File(file, "r+", locking=False) as h5:
            del h5["images/width"], h5["images/height"]
            h5.attrs["metadata_sha256"] = manifest["metadata_sha256"]
        entry["bytes"] = os.path.getsize(file)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_old_layout_dump_still_reads(base, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(base, old)
    _old_layout(old)
    d, b = open_dump(old, progress=False), open_dump(base, progress=False)
    assert "label_names" not in d.metadata and len(d) == len(b)
    assert "embedding" not in d.metadata["model_config"] and box_embedding(d.metadata) == "ort"
    for x, y in zip(d, b):
        assert x.extra == {} and y.extra
        x.extra = y.extra
        _same(x, y)
    # a size dataset that does not fit the shard's images is a clear error
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    with h5py.File(bad / "shard-00001.h5", "r+", locking=False) as h5:
        del h5["images/width"]
        h5.create_dataset("images/width", data=np.ones(2, np.int32))
    manifest["shards"][1]["bytes"] = os.path.getsize(bad / "shard-00001.h5")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match=r"shard-00001.h5: dataset images/width has shape \(2,\)"):
        open_dump(bad)


def test_dump_of_a_signed_model_records_its_box_embedding(base, data_dir, tmp_path):
    """The dump's metadata carry the model's box embedding, and its encoder maps are the signed
    model's own (not ORT's embedding under the signed model's weights)."""
    vocab = Vocabulary.load(os.path.join(data_dir, "caps", "vocab.json"))
    torch.manual_seed(0)
    config = ORTConfig(vocab_size=len(vocab), feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64, max_len=40,
                       embedding="signed")
    signed = ObjectRelationTransformer(config)
    path = str(tmp_path / "signed.pt")
    save_checkpoint(path, model=signed, config=config, vocab=vocab, rng=False)
    out = tmp_path / "dump"
    assert dump(path, data_dir, "train", out, limit=2, **SETTINGS).complete
    d = open_dump(out, progress=False)
    assert d.metadata["model_config"]["embedding"] == "signed" and box_embedding(d.metadata) == "signed"
    assert box_embedding(open_dump(base, progress=False).metadata) == "ort"
    assert box_embedding({"model_config": {"geometry": False, "embedding": "ort"}}) == "none"
    assert box_embedding({"label_names": None}) is None
    record = d[0]
    store = FeatureStore(os.path.join(data_dir, "features.h5"))
    words = record.tokens
    _, want = _recorded(_model(path), vocab.words, store, record.image_id, words)
    np.testing.assert_allclose(record.encoder_self, want["encoder_self"], **F16)
    unsigned = ObjectRelationTransformer(dataclasses.replace(config, embedding="ort"))
    unsigned.load_state_dict(signed.state_dict())
    _, ort_maps = _recorded(unsigned.eval(), vocab.words, store, record.image_id, words)
    assert np.abs(record.encoder_self - ort_maps["encoder_self"]).max() > 1e-2


def test_writer_rejects_bad_image_size(tmp_path):
    from geocap.dump.writer import ShardWriter
    from geocap.view.synthetic import synthetic_records
    rec = next(synthetic_records([5], objects=3, tokens=4, layers=1, heads=2, captions=1))
    writer = ShardWriter(tmp_path / "s.h5", index=0, metadata_sha256="x", checkpoint_sha256="y",
                         vocab=sorted(set(rec.tokens)), maps=(), entropies=(), encoder_lh=(1, 2), decoder_lh=(1, 2),
                         has_labels=False, has_clusters=False, has_features=False, stats_only=False)
    try:
        for bad in (0, -3, 2.5, "640", True):
            rec.extra = {"width": bad, "height": 480}
            with pytest.raises(ValueError, match=r"image 5: extra\['width'\] must be a positive int"):
                writer.add_image([rec])
    finally:
        writer.abort()
    assert not list(tmp_path.iterdir())


def test_fletcher32_is_hdf5s(tmp_path):
    """The gzip path stores chunks it compressed itself: its Fletcher-32 must be HDF5's, bit for
    bit (odd lengths, all-ones words that hit the end-around carry, several 360-word blocks)."""
    from geocap.dump.writer import fletcher32
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        for i, (n, filters) in enumerate([(4096, dict(compression="gzip", shuffle=True)), (777, {}),
                                          (1 << 16, dict(compression="lzf")), (1000, dict(compression="gzip")),
                                          (5000, {}), (1, {})]):
            for data in (rng.random(n).astype(np.float16), np.full(n, 0xFFFF, np.uint16).view(np.float16),
                         np.arange(n, dtype=np.uint8)):
                ds = h5.create_dataset(f"d{i}_{data.dtype}_{data[0]}", data=data, chunks=(n,), fletcher32=True,
                                       **filters)
                raw = ds.id.read_direct_chunk((0,))[1]
                assert fletcher32(raw[:-4]) == int.from_bytes(raw[-4:], "little"), (n, filters, len(raw))


def _flip_bit(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _chunk_offset(path, name):
    with h5py.File(path, "r", locking=False) as h5:
        return h5[name].id.get_chunk_info(0).byte_offset


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_checksums_catch_same_size_damage(ckpt, data_dir, tmp_path, compression):
    """One flipped bit anywhere in a shard (same size) is an error naming the shard, never other
    numbers; a rerun of the dump writes that shard again and the dump equals an undamaged one."""
    settings = dict(SETTINGS, compression=compression, limit=12)            # 3 shards
    clean = tmp_path / "clean"
    dump(ckpt, data_dir, "train", clean, **settings)
    damaged = tmp_path / "damaged"
    shutil.copytree(clean, damaged)
    # a map chunk (uncompressed data read back as other numbers without a checksum)
    _flip_bit(damaged / "shard-00001.h5", _chunk_offset(damaged / "shard-00001.h5", "maps/cross") + 100)
    # a small per-record array read when the shard is opened
    _flip_bit(damaged / "shard-00002.h5", _chunk_offset(damaged / "shard-00002.h5", "records/n_tokens") + 2)
    d = open_dump(damaged, progress=False, check=False)
    with pytest.raises(DumpError, match="shard-00001.h5: cannot read maps/cross"):
        for _ in d.iter_chunks(1000, progress=False):
            pass
    with pytest.raises(DumpError, match="shard-00002.h5"):
        open_dump(damaged, progress=False)
    d.close()                                      # HDF5 would serve shard 0 from the open file
    # the vocabulary (variable-length strings, no HDF5 filter): its CRC-32 attribute, checked on
    # every normal read, and the file's digest see it
    path = damaged / "shard-00000.h5"
    raw = path.read_bytes()
    words = [w for w in sorted(open_dump(clean, progress=False)[0].tokens, key=len, reverse=True)
             if raw.count(w.encode()) == 1]
    _flip_bit(path, raw.index(words[0].encode()))
    with pytest.raises(DumpError, match=r"shard-00000.h5: dataset vocab is damaged"):
        open_dump(damaged, progress=False, check=False)[0]
    with pytest.raises(DumpError, match=r"shard-00000.h5: shard file's SHA-256 differs"):
        open_dump(damaged, progress=False, verify=True)
    # a rerun hashes the listed shards, writes the damaged ones again, and the dump is whole
    redo = dump(ckpt, data_dir, "train", damaged, **settings)
    assert redo.shards_redone == [0, 1, 2] == redo.shards_written and redo.complete
    open_dump(damaged, progress=False, verify=True)
    _same_dumps(clean, damaged)


def test_string_datasets_carry_a_crc_checked_on_read(tmp_path):
    """File names and words (variable-length strings, which take no Fletcher-32): one flipped
    byte is an error naming the file and the dataset, never a misspelt name."""
    from geocap.data.dump_format import read_strings
    from geocap.dump.writer import _create_strings

    path = tmp_path / "s.h5"
    names = ["img_0001.png", "umbrella", "", "café"]
    with h5py.File(path, "w") as h5:
        _create_strings(h5, "images/file_name", names)
    with h5py.File(path, "r") as h5:
        assert read_strings(h5, "images/file_name", str(path)) == names
    _flip_bit(path, path.read_bytes().index(b"umbrella") + 7)
    with h5py.File(path, "r") as h5:
        with pytest.raises(DumpError, match=r"s\.h5: dataset images/file_name is damaged"):
            read_strings(h5, "images/file_name", str(path))


def test_dump_without_checksums_reads_with_a_warning(base, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(base, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="4 of its shards .* written without checksums"):
        d = open_dump(old, progress=False)
    assert len(d) == len(open_dump(base, progress=False))


def test_dead_writer_process_is_a_one_line_error(base, ckpt, data_dir, tmp_path):
    """The shard writer child killed mid-dump: ``geocap dump`` ends with one ``geocap: error:``
    line naming the shard and the dump folder; the same command then resumes."""
    out = tmp_path / "dead"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli_command(ckpt, data_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    writers = []
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not writers:
            writers = _writer_children(proc.pid)
            time.sleep(0.002)
        assert writers, f"no writer process seen: {proc.stderr.read().decode()[-500:]}"
        os.kill(writers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, stderr.decode()[-2000:]
    assert lines[0].startswith(f"geocap: error: {out}{os.sep}shard-0000"), lines[0]
    assert f"the shard writer process {writers[0]} died (killed by SIGKILL)" in lines[0]
    assert lines[0].endswith(f"rerun the same command to resume the dump {out}"), lines[0]
    result = dump(ckpt, data_dir, "train", out, **SETTINGS)
    assert result.complete
    _same_dumps(base, out)


def _listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def test_commands_refuse_to_write_into_a_foreign_folder(base, ckpt, data_dir, tmp_path, capsys):
    """``geocap dump --out`` into a folder that is not a dump, ``geocap analyze DUMP --out DUMP``
    (or any folder that is not a report): one error line, nothing written."""
    from geocap.cli import main
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = _listing(foreign)
    assert main(["dump", "--checkpoint", ckpt, "--data", data_dir, "--split", "train", "--out", str(foreign),
                 "--limit", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"geocap: error: --out: {foreign} is not empty and is not a geocap dump; refusing to write "
                   f"into it"]
    assert _listing(foreign) == before
    dump_copy = tmp_path / "dump"
    shutil.copytree(base, dump_copy)
    before_dump = _listing(dump_copy)
    for out, why in ((dump_copy, "is the dump itself"),
                     (foreign, "is not empty and is not a geocap analysis report; refusing to write into it")):
        assert main(["analyze", str(dump_copy), "--out", str(out), "--no-progress"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"geocap: error: --out: {out} {why}"
                                                                 + ("; the report needs a folder of its own"
                                                                    if out == dump_copy else "")]
    assert _listing(dump_copy) == before_dump and _listing(foreign) == before


def test_dump_takes_its_collector_and_imports_no_analysis(ckpt, data_dir, tmp_path):
    """The dump sits below the analyses: a stats-only dump needs its collector passed in, and
    nothing of geocap.analysis is imported by the job."""
    code = (f"import sys\nfrom geocap.dump.job import dump\n"
            f"try:\n    dump({ckpt!r}, {str(data_dir)!r}, 'train', {str(tmp_path / 'd')!r}, stats_only=True,"
            f" limit=4, shard_images=4, progress=False)\nexcept ValueError as err:\n    print('error:', err)\n"
            f"print('analysis imported:', any(m.split('.')[0] == 'analysis' or m.startswith('geocap.analysis')"
            f" for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "error: stats_only needs stats_collector" in out and "analysis imported: False" in out, out


def test_device_resolution_is_shared_and_names_the_device():
    from geocap.distributed import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, 0).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: not a torch device .*'gpu7'"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1': CUDA is not available"):
            resolve_device("cuda:1")
    import geocap.dump.job
    import geocap.train.loop
    assert not hasattr(geocap.dump.job, "_resolve_device") and not hasattr(geocap.train.loop, "_resolve_device")


def test_content_digest_compares_records_not_files(base, ckpt, data_dir, tmp_path):
    """The same records under another compression: other shard files (other SHA-256s), the same
    content digest; one number changed in one record: another content digest."""
    from geocap.data.dump_format import content_sha256

    other = tmp_path / "gzip"
    dump(ckpt, data_dir, "train", other, **dict(SETTINGS, compression="gzip"))
    def files(path):
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as fh:
            return [e["sha256"] for e in json.load(fh)["shards"]]
    assert files(other) != files(base)
    assert content_sha256(open_dump(other, progress=False)) == content_sha256(open_dump(base, progress=False))
    changed = tmp_path / "changed"
    shutil.copytree(base, changed)
    with h5py.File(changed / "shard-00001.h5", "r+") as h5:
        h5["records/caption_id"][0] += 1
    assert content_sha256(open_dump(changed, progress=False, check=False)) != content_sha256(
        open_dump(base, progress=False))


def test_a_stop_request_lost_as_an_exception_stops_the_dump_at_the_next_batch(ckpt, data_dir, tmp_path, monkeypatch):
    """The stop flag (geocap.stop) set while the first shard is written, its exception lost: the
    dump stops at the next batch, with no shard renamed, no temporary left, and resumes whole."""
    from geocap import stop
    from geocap.dump.writer import ShardWriter

    add_image = ShardWriter.add_image

    def add_and_request(self, recs):
        add_image(self, recs)
        stop.request_stop()
    monkeypatch.setattr(ShardWriter, "add_image", add_and_request)
    out = tmp_path / "stopped"
    with stop.stop_signals():
        with pytest.raises(stop.Interrupted):
            dump(ckpt, data_dir, "train", out, **dict(SETTINGS, writer="inline"))
    assert sorted(os.listdir(out)) == ["manifest.json", "manifest.lock"]
    monkeypatch.undo()
    assert dump(ckpt, data_dir, "train", out, **dict(SETTINGS, writer="inline")).complete


# the modules that read dumps, and what they must not import: the model's layer and the dump writer
DUMP_READERS = ("geocap.data.dump_format", "geocap.analysis", "geocap.cli.analyze", "geocap.view.site")
MODEL_LAYER = ("geocap.model", "geocap.dump", "geocap.checkpoint", "geocap.train", "geocap.decoding",
               "geocap.captioner")


def _model_layer_imported_by(module: str) -> list:
    layer = [m.split(".") for m in MODEL_LAYER]
    code = (f"import json, sys\nimport {module}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[:2] in {layer!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", DUMP_READERS)
def test_dump_readers_import_nothing_of_the_model_layer(module):
    """Analyses depend on the kernels and the record format only: the dump format (the reader of
    what geocap.dump writes) is in the data layer so that reading a dump imports neither the model
    nor the dump writer's package."""
    assert _model_layer_imported_by(module) == []


def test_the_model_layer_check_sees_an_import_of_the_model_layer():
    assert "geocap.dump" in _model_layer_imported_by("geocap.hf.dump")        # the check can fail


def test_rank_from_the_environment_names_a_bad_variable(monkeypatch):
    """dump's rank comes from geocap.distributed's one reader of RANK / WORLD_SIZE."""
    from geocap.dump.plan import check_rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert check_rank(None, None) == (1, 2) and check_rank(0, None) == (0, 2)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="environment variable RANK='one' is not an int"):
        check_rank(None, None)
    monkeypatch.setenv("RANK", "")
    assert check_rank(None, None) == (0, 2)
