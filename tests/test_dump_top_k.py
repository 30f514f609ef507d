"""Compact encoder maps (``geocap dump --encoder-top-k``): each row's k largest weights stored,
read back dense with the rest 0, the lost weight stated; everything else as a whole-map dump."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from geocap.data.dump_format import TOP_K_INDEX, DumpError, open_dump
from geocap.data.top_k_rows import expand_top_k, keep_top_k
from geocap.dump.job import dump
from helpers import synth_data_dir
from test_dump import SETTINGS, _save_model

K = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_data_dir(tmp_path_factory.mktemp("topkdata"), images=20)


@pytest.fixture(scope="module")
def ckpt(data_dir, tmp_path_factory):
    return _save_model(data_dir, tmp_path_factory.mktemp("ckpt") / "model.pt", seed=0)


@pytest.fixture(scope="module")
def dumps(ckpt, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    dump(ckpt, data_dir, "train", root / "whole", **SETTINGS)
    dump(ckpt, data_dir, "train", root / "top", encoder_top_k=K, **SETTINGS)
    return str(root / "whole"), str(root / "top")


def _rows(n=7, rows=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, rows, n)) * 2
    return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float16)


def test_keep_top_k_keeps_the_largest_and_states_the_loss():
    maps = _rows()
    kept = keep_top_k(maps, K)
    assert kept.values.shape == kept.index.shape == (2, 5, K) and kept.index.dtype == np.uint16
    dense = expand_top_k(kept.values, kept.index, 7)
    for row, back in zip(maps.reshape(-1, 7), dense.reshape(-1, 7)):
        top = np.argsort(-row.astype(np.float32), kind="stable")[:K]
        assert set(np.flatnonzero(back)) == set(top)
        assert np.array_equal(back[top], row[top])
    lost = 1.0 - dense.astype(np.float64).sum(-1)
    np.testing.assert_allclose(kept.missing, np.maximum(lost, 0), atol=1e-6)
    assert kept.max_dropped == pytest.approx(float(np.sort(maps.astype(np.float32), -1)[..., -K - 1].max()))
    whole = keep_top_k(maps, 7)                  # k >= columns: every weight kept, nothing lost
    assert np.array_equal(expand_top_k(whole.values, whole.index, 7), maps) and whole.max_dropped == 0.0
    ties = keep_top_k(np.full((1, 4), 0.25, np.float16), 2)   # ties go to the lower columns
    assert ties.index.tolist() == [[0, 1]] and ties.missing[0] == pytest.approx(0.5)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3"])
def test_keep_top_k_refuses_a_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        keep_top_k(_rows(), k)


def test_expand_top_k_refuses_bad_columns():
    kept = keep_top_k(_rows(), K)
    with pytest.raises(ValueError, match="out of range"):
        expand_top_k(kept.values, kept.index, 2)


def test_top_k_dump_reads_back_dense_and_equal_elsewhere(dumps):
    whole, top = (open_dump(p, progress=False) for p in dumps)
    assert len(whole) == len(top) > 0 and top.encoder_top_k() == K and whole.encoder_top_k() is None
    assert top.metadata["encoder_top_k"] == K and "encoder_top_k" not in whole.metadata
    worst, seen_large = 0.0, False
    for a, b in zip(whole, top):
        assert (a.image_id, a.caption_id, a.tokens) == (b.image_id, b.caption_id, b.tokens)
        for name in ("boxes", "decoder_self", "cross", "encoder_entropy", "decoder_entropy", "cross_entropy"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        n = a.num_objects
        assert b.encoder_self.shape == a.encoder_self.shape and b.encoder_self.dtype == np.float16
        if n <= K:
            assert np.array_equal(a.encoder_self, b.encoder_self)     # short rows are kept whole
            continue
        seen_large = True
        expected = keep_top_k(a.encoder_self, K)
        assert np.array_equal(b.encoder_self, expand_top_k(expected.values, expected.index, n))
        assert np.count_nonzero(b.encoder_self, axis=-1).max() <= K
        worst = max(worst, float(expected.missing.max()))
    assert seen_large and worst > 0.05        # the test data do lose weight, so the bound is tested
    assert top.encoder_missing() == pytest.approx(worst, rel=1e-6) and whole.encoder_missing() == 0.0


def test_top_k_shards_hold_no_whole_encoder_maps(dumps):
    with h5py.File(f"{dumps[1]}/shard-00000.h5", "r", locking=False) as h5:
        assert "encoder_self" not in h5["maps"] and int(h5.attrs["encoder_top_k"]) == K
        assert h5[f"maps/{TOP_K_INDEX}"].dtype == np.uint16


@pytest.mark.parametrize("options, match", [
    (dict(encoder_top_k=0), "encoder_top_k must be a positive int"),
    (dict(encoder_top_k=4, maps="decoder,cross"), "stores none"),
    (dict(encoder_top_k=4, stats_only=True), "stores none"),
])
def test_bad_top_k_options_name_the_option(ckpt, data_dir, tmp_path, options, match):
    from geocap.analysis import StatsCollector

    with pytest.raises(ValueError, match=match):
        dump(ckpt, data_dir, "train", tmp_path / "d", stats_collector=StatsCollector, **options, **SETTINGS)


def test_a_corrupt_top_k_column_names_the_image(dumps, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dumps[1], copy)
    with h5py.File(copy / "shard-00000.h5", "r+", locking=False) as h5:
        index = h5[f"maps/{TOP_K_INDEX}"]
        index[0] = 999
        image = int(h5["images/image_id"][0])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = (copy / "shard-00000.h5").stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match=f"image {image}: corrupt top-k encoder map"):
        open_dump(copy, progress=False)[0]


def test_analysis_report_states_the_compact_maps(dumps, tmp_path):
    from geocap.analysis import run_analyses

    top = open_dump(dumps[1], progress=False)
    data = run_analyses(top, tmp_path / "report", progress=False)
    assert data["compact_maps"] == {"encoder_top_k": K, "max_missing": pytest.approx(top.encoder_missing())}
    assert f"each row's {K} largest weights" in (tmp_path / "report" / "report.md").read_text()
    assert "compact_maps" not in run_analyses(open_dump(dumps[0], progress=False), tmp_path / "r2", progress=False)
