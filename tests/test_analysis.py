"""geocap.analysis: each analysis recovers an answer planted in records built in memory; the
accumulators merge and round-trip exactly; missing fields are reported, never NaN; the report and
``geocap analyze`` write every file."""
import argparse
import json

import h5py
import numpy as np
import pytest

from geocap.analysis import (EntropyAccumulator, StatsCollector, ThematicAccumulator, entropy, grounding, proximity,
                             run_analyses, thematic)
from geocap.analysis.reservoir import PairReservoir, pair_keys
from geocap.data.attention_record import MAP_NAMES, Record
from geocap.errors import DataError

L, H, N, T = 3, 4, 8, 6
CLUSTERS = 3


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def causal_softmax(logits):
    t = logits.shape[-1]
    return softmax(np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf))


def make_record(rng, image_id, *, kind="reference", caption_id=0, n=N, t=T, layers=L, heads=H, sharpness=None,
                maps=MAP_NAMES, with_clusters=True, with_labels=False, with_features=True, with_referents=True):
    """A record with random (Dirichlet-like) attention; ``sharpness[l]`` scales layer l's logits."""
    sharp = (np.ones(layers) if sharpness is None else np.asarray(sharpness, float))[:, None, None, None]
    x1y1 = rng.uniform(0, 0.7, size=(n, 2))
    wh = rng.uniform(0.05, 0.3, size=(n, 2))
    boxes = np.concatenate([x1y1, np.minimum(x1y1 + wh, 1.0)], axis=1).astype(np.float32)
    clusters = rng.integers(0, CLUSTERS, size=n)
    centres = np.eye(CLUSTERS, 16)
    features = (centres[clusters] + 0.2 * rng.normal(size=(n, 16))).astype(np.float32)
    rec = Record(image_id=image_id, caption_id=caption_id, kind=kind, boxes=boxes,
                 tokens=[f"w{i}" for i in range(t - 1)] + ["<eos>"],
                 clusters=clusters if with_clusters else None, labels=clusters * 10 if with_labels else None,
                 features=features if with_features else None)
    if with_referents:
        referents = np.full(t, -1)
        referents[1:t - 1:2] = rng.integers(0, n, size=len(referents[1:t - 1:2]))
        rec.referents = referents
    if "encoder_self" in maps:
        rec.encoder_self = softmax(sharp * rng.normal(size=(layers, heads, n, n))).astype(np.float16)
    if "decoder_self" in maps:
        rec.decoder_self = causal_softmax(sharp * rng.normal(size=(layers, heads, t, t))).astype(np.float16)
    if "cross" in maps:
        rec.cross = softmax(sharp * rng.normal(size=(layers, heads, t, n))).astype(np.float16)
    return rec


def records(count=24, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [make_record(rng, i, **kw) for i in range(count)]


def norm_entropy_numpy(p, valid):
    """Reference: normalised entropy of rows of p [..., K] with ``valid`` [R] keys per row."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    return h / np.log(valid)


# --- entropy -------------------------------------------------------------------------------


def test_entropy_falls_with_depth_and_matches_the_definition():
    recs = records(sharpness=[0.5, 2.0, 6.0])
    res = entropy(recs)
    for kind in MAP_NAMES:
        layers = res.per_layer(kind)
        assert layers[0] > layers[1] > layers[2], (kind, layers)
        assert layers[0] > 0.9 and layers[2] < 0.6, (kind, layers)
    # the definition, in float64 numpy on the same (float16) maps; the op computes in float32
    enc = np.stack([r.encoder_self.astype(np.float64) for r in recs])
    expected = norm_entropy_numpy(enc, N).mean(axis=(0, 3))
    np.testing.assert_allclose(res.per_head["encoder_self"], expected, atol=1e-5)
    dec = np.stack([r.decoder_self.astype(np.float64) for r in recs])[..., 1:, :]      # row 0: one valid key
    expected = norm_entropy_numpy(dec, np.arange(2, T + 1)).mean(axis=(0, 3))
    np.testing.assert_allclose(res.per_head["decoder_self"], expected, atol=1e-5)
    assert res.rows["decoder_self"] == len(recs) * (T - 1)
    assert res.rows["encoder_self"] == len(recs) * N


def test_entropy_from_stored_entropies_equals_entropy_from_maps():
    recs = records(sharpness=[0.5, 2.0, 6.0])
    from_maps = entropy(recs)
    for r in recs:
        for kind, name in (("encoder_self", "encoder_entropy"), ("decoder_self", "decoder_entropy"),
                           ("cross", "cross_entropy")):
            p = getattr(r, kind).astype(np.float64)
            setattr(r, name, -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1).astype(np.float32))
            setattr(r, kind, None)
    from_stored = entropy(recs)
    for kind in MAP_NAMES:
        np.testing.assert_allclose(from_stored.per_head[kind], from_maps.per_head[kind], atol=1e-4)


# --- thematic ------------------------------------------------------------------------------


def plant_within_cluster(recs, layer, strength=4.0):
    for r in recs:
        same = (r.clusters[:, None] == r.clusters[None, :]).astype(float)
        enc = r.encoder_self.astype(np.float64)
        enc[layer] = softmax(np.log(enc[layer]) + strength * same)
        r.encoder_self = enc.astype(np.float16)
    return recs


def test_thematic_affinity_finds_the_layer_that_attends_within_clusters():
    recs = plant_within_cluster(records(count=40), layer=1)
    res = thematic(recs)
    assert res.affinity.shape == (L, H)
    assert (res.affinity[1] > 2.0).all(), res.affinity
    assert (np.abs(res.affinity[[0, 2]] - 1.0) < 0.25).all(), res.affinity
    assert res.same_cluster_cosine > res.diff_cluster_cosine + 0.3
    assert res.cluster_sources["clusters"] == 40


def test_thematic_affinity_is_exactly_one_for_uniform_attention():
    recs = records(count=5)
    for r in recs:
        r.encoder_self = np.full((L, H, N, N), 1.0 / N)
    res = thematic(recs)
    np.testing.assert_allclose(res.affinity, 1.0, rtol=1e-12)


def test_thematic_clusters_from_labels_then_kmeans_fallback():
    by_labels = thematic(plant_within_cluster(records(count=20, with_labels=True), layer=2))
    assert by_labels.cluster_sources == {"clusters": 20, "labels": 0, "kmeans": 0}
    recs = plant_within_cluster(records(count=30), layer=2)
    for r in recs:
        r.clusters, r.labels = None, r.clusters * 7
    assert thematic(recs).cluster_sources["labels"] == 30
    for r in recs:
        r.labels = None
    acc = ThematicAccumulator(k=CLUSTERS, kmeans_buffer=10)
    for r in recs:
        acc.update(r)
    res = acc.result()
    assert res.cluster_sources["kmeans"] == 30 and acc.centroids.shape == (CLUSTERS, 16)
    # well separated features: k-means recovers the planted clusters, so the planted layer stands out
    assert (res.affinity[2] > 1.5).all() and (np.abs(res.affinity[0] - 1.0) < 0.3).all(), res.affinity


# --- proximity -----------------------------------------------------------------------------


def test_proximity_spearman_recovers_attention_decaying_with_distance():
    recs = records(count=30)
    for r in recs:
        c = np.stack([(r.boxes[:, 0] + r.boxes[:, 2]) / 2, (r.boxes[:, 1] + r.boxes[:, 3]) / 2], 1)
        d = np.linalg.norm(c[:, None] - c[None], axis=-1)
        f = r.features / np.linalg.norm(r.features, axis=1, keepdims=True)
        enc = r.encoder_self.astype(np.float64)
        enc[0] = softmax(-d / 0.05 + 0.1 * np.random.default_rng(r.image_id).normal(size=(H, N, N)))
        enc[2] = softmax(6.0 * (f @ f.T) + 0 * enc[2])
        r.encoder_self = enc.astype(np.float16)
    res = proximity(recs, reservoir=500, bins=8)
    assert res.spearman_distance[0] < -0.8, res.spearman_distance
    assert abs(res.spearman_distance[1]) < 0.15, res.spearman_distance
    assert res.spearman_similarity[2] > 0.8 and abs(res.spearman_similarity[1]) < 0.15, res.spearman_similarity
    assert res.sampled["distance"] == 500 and res.pairs["distance"] == 30 * N * (N - 1)
    curve = res.curves["distance"][0]
    filled = np.isfinite(curve)
    assert np.all(np.diff(curve[filled]) < 0), curve                   # binned means fall with distance
    assert res.counts["distance"].sum() == 30 * N * (N - 1)


def captions_of(recs, captions=5):
    """Each record repeated as ``captions`` records of its image (new caption ids, same encoder
    maps, boxes and features), consecutively, as a dump holds them."""
    return [Record(image_id=r.image_id, caption_id=c, boxes=r.boxes, tokens=r.tokens, clusters=r.clusters,
                   features=r.features, referents=r.referents, encoder_self=r.encoder_self,
                   decoder_self=r.decoder_self, cross=r.cross) for r in recs for c in range(captions)]


def test_proximity_counts_each_image_once_and_leaves_out_thin_bins():
    from geocap.analysis.proximity import MIN_BIN_PAIRS

    images = records(count=12)
    res = proximity(captions_of(images), bins=10)
    pairs = 12 * N * (N - 1)
    assert res.images == 12 and res.records == 60 and res.records_repeating_an_image == 48
    assert res.pairs["distance"] == res.sampled["distance"] == pairs          # each image once, all pairs kept
    assert res.counts["distance"].sum() == pairs
    # the curves equal those of one record per image: the repeats add nothing
    np.testing.assert_array_equal(res.curves["distance"], proximity(images, bins=10).curves["distance"])
    text = res.reading()
    assert f"all {pairs} ordered pairs" in text and "of 12 images" in text and "sampled" not in text
    # boxes within 0.3 of each other: the far distance bins hold fewer than MIN_BIN_PAIRS pairs
    thin = res.counts["distance"] < MIN_BIN_PAIRS
    assert thin.any() and (~thin).any(), res.counts["distance"]
    shown = res.shown_curve("distance")
    assert np.isnan(shown[:, thin]).all()
    np.testing.assert_array_equal(shown[:, ~thin], res.curves["distance"][:, ~thin])
    assert f"fewer than {MIN_BIN_PAIRS} pairs" in text


def test_pair_reservoir_keeps_the_smallest_keys_in_any_order():
    rng = np.random.default_rng(1)
    keys = pair_keys(3, 17, np.arange(200) // 20, np.arange(200) % 20)
    x, y = rng.normal(size=200), rng.normal(size=(2, 200))
    assert len(np.unique(keys)) == 200
    one = PairReservoir(30)
    one.add(keys, x, y)
    a, b = PairReservoir(30), PairReservoir(30)
    order = rng.permutation(200)
    for part, res in ((order[:90], a), (order[90:], b)):
        for chunk in np.array_split(part, 7):
            res.add(keys[chunk], x[chunk], y[:, chunk])
    a.merge(b)
    assert len(a) == len(one) == 30 and a.seen == 200
    np.testing.assert_array_equal(a.keys, np.sort(keys)[:30])
    np.testing.assert_array_equal(a.keys, one.keys)
    np.testing.assert_array_equal(a.y, one.y)
    # the same image offered again (another record of it): its pairs are not sampled twice
    a.add(keys, x, y)
    a.compact()
    np.testing.assert_array_equal(a.keys, one.keys)
    np.testing.assert_array_equal(a.x, one.x)
    # no collisions over many images x pairs (a symmetric hash once mapped (image a, 0, b) to (b, 0, a))
    i, j = np.nonzero(~np.eye(36, dtype=bool))
    grid = np.concatenate([pair_keys(0, image, i, j) for image in range(150)])
    assert len(np.unique(grid)) == len(grid)


def test_pair_reservoir_parts_stored_cut_merge_exactly():
    """Parts stored cut to a few pairs (what a dump shard stores) merge to the single pass's sample
    while each cut keeps the part's share of it, and otherwise to a smaller uniform sample: every
    pair below the smallest cut (a prefix of the single pass's sample), never a pair above it while
    one below is missing (a merge that ignored the parts' bounds would give that)."""
    rng = np.random.default_rng(2)
    n = 600
    keys = pair_keys(5, 3, np.arange(n) // 30, np.arange(n) % 30)
    x, y = rng.normal(size=n), rng.normal(size=(2, n))
    one = PairReservoir(40)
    one.add(keys, x, y)
    parts = [PairReservoir(40) for _ in range(4)]
    for k, part in enumerate(parts):
        part.add(keys[k::4], x[k::4], y[:, k::4])

    def merged(stored):
        out = PairReservoir.from_state(parts[0].state("s", stored), "s", 40)
        for part in parts[1:]:
            state = part.state("s", stored)
            assert len(state["s.keys"]) == min(stored, 40) and state["s.y"].shape == (2, min(stored, 40))
            out.merge(PairReservoir.from_state(state, "s", 40))
        return out

    shares = [np.isin(one.keys, keys[k::4]).sum() for k in range(4)]
    assert max(shares) <= 20 and min(shares) >= 5
    generous = merged(20)
    assert generous.seen == n and len(generous) == 40
    for name in ("keys", "x", "y"):
        np.testing.assert_array_equal(getattr(generous, name), getattr(one, name))
    stingy = merged(min(shares) - 1)                 # every part cut below its share
    assert 3 <= len(stingy) < 40 and stingy.seen == n
    np.testing.assert_array_equal(stingy.keys, one.keys[:len(stingy)])
    np.testing.assert_array_equal(stingy.y, one.y[:, :len(stingy)])
    assert stingy.bound == stingy.keys[-1]
    # merging on keeps to the bound: the other pairs of a part come in and only those below it stay
    stingy.merge(parts[0])
    np.testing.assert_array_equal(stingy.keys, one.keys[:len(stingy)])
    with pytest.raises(DataError, match="no bound"):
        PairReservoir.from_state({k: v for k, v in one.state("s").items() if k != "s.bound"}, "s", 40)


# --- grounding -----------------------------------------------------------------------------


def test_grounding_finds_the_head_that_points_nouns_at_their_referents():
    recs = records(count=60, n=6)
    planted = (1, 2)
    for r in recs:
        cross = r.cross.astype(np.float64)
        for t in np.flatnonzero(r.referents >= 0):
            row = np.full(r.num_objects, 0.02)
            row[r.referents[t]] = 1.0
            cross[planted][t] = row / row.sum()
        r.cross = cross.astype(np.float16)
    res = grounding(recs)
    assert res.accuracy_per_head[planted] == 1.0
    others = np.delete(res.accuracy_per_head.ravel(), planted[0] * H + planted[1])
    assert res.chance == pytest.approx(1 / 6)
    assert np.all(np.abs(others - res.chance) < 0.15), res.accuracy_per_head
    assert res.tokens == 60 * 2
    assert res.follow_rate is None and "hypothetical_follow_rate" in res.unavailable
    assert not res.best_head_below_head_mean() and "No single head" not in res.reading()


def hypothetical(recs, follow: bool):
    """Hypothetical twins of ``recs``: referents[t] swapped; row t + 1 attends to the new (follow)
    or the original (not follow) object in every head."""
    out = []
    for r in recs:
        src = r.referents.copy()
        new = np.where(src >= 0, (src + 1) % r.num_objects, -1)
        cross = r.cross.astype(np.float64)
        for t in np.flatnonzero(src >= 0):
            row = np.full(r.num_objects, 0.01)
            row[new[t] if follow else src[t]] = 1.0
            cross[:, :, t + 1] = row / row.sum()
        out.append(Record(image_id=r.image_id, boxes=r.boxes, tokens=r.tokens, kind="hypothetical",
                          referents=new, source_referents=src, cross=cross))
    return out


@pytest.mark.parametrize("follow", [True, False])
def test_grounding_hypothetical_follow_rate(follow):
    recs = records(count=10)
    res = grounding(recs + hypothetical(recs, follow))
    assert res.hypothetical_tokens == 20 and res.tokens == 20
    np.testing.assert_array_equal(res.follow_rate, np.full(L, 1.0 if follow else 0.0))
    np.testing.assert_array_equal(res.source_rate, np.full(L, 0.0 if follow else 1.0))
    assert res.hypothetical_chance == pytest.approx(1 / N)
    # the other analyses ignore hypothetical records
    assert entropy(recs + hypothetical(recs, follow)).skipped_hypothetical == 10


def test_head_mean_beating_every_head_is_explained():
    """Two of four heads point at a wrong object (a different one each) on every grounded token, so each
    head grounds half the tokens while the head mean grounds all of them."""
    recs = records(count=40, n=6)
    for r in recs:
        cross = r.cross.astype(np.float64)
        for k, t in enumerate(np.flatnonzero(r.referents >= 0)):
            ref = r.referents[t]
            for h in range(H):
                row = np.full(r.num_objects, 0.02)
                if (h + k + r.image_id) % 2:
                    row[(ref + 1 + h % 2) % r.num_objects] = 0.45
                    row[ref] = 0.35
                else:
                    row[ref] = 0.6
                cross[:, h, t] = row / row.sum()
        r.cross = cross.astype(np.float16)
    res = grounding(recs)
    np.testing.assert_array_equal(res.accuracy, np.ones(L))
    assert np.max(res.accuracy_per_head) < 0.75, res.accuracy_per_head
    assert res.best_head_below_head_mean()
    assert "No single head reaches the head-mean map" in res.reading()


def test_hypothetical_reading_gives_the_same_step_baseline():
    recs = records(count=10)
    res = grounding(recs + hypothetical(recs, True))
    best = int(np.argmax(res.follow_rate))
    text = res.reading()
    assert f"for {res.follow_rate[best]:.1%} of 20 swaps" in text
    assert f"against {res.follow_rate_same_step[best]:.1%} at the step of the word itself" in text
    data = res.to_json()
    assert data["hypothetical_follow_rate_same_step"][best] == pytest.approx(res.follow_rate_same_step[best])


def test_rate_axes_zoom_onto_the_values():
    from geocap.analysis.plotting import rate_limits

    low, high = rate_limits([0.21, 0.24, np.nan], [0.26])
    assert 0.19 < low < 0.21 and 0.26 < high < 0.28          # not 0..1.05: a 0.05 difference stays visible
    assert rate_limits([0.5]) == pytest.approx((0.475, 0.525))
    assert rate_limits([0.0, 1.0]) == (0.0, 1.0) and rate_limits([np.nan]) == (0.0, 1.0)


# --- uncertainty ---------------------------------------------------------------------------


def test_layer_uncertainty_is_the_image_clustered_standard_error():
    from geocap.analysis.accumulator import SumTable
    from geocap.analysis.uncertainty import ImageUnits, ratio_with_covariance

    rng = np.random.default_rng(3)
    images = 15
    image = np.repeat(np.arange(images), rng.integers(1, 4, images))        # 1-3 consecutive records per image
    x, n = rng.uniform(0, 5, (len(image), L)), rng.integers(1, 6, len(image)).astype(float)

    def fold_units(rows):
        table, units = SumTable(), ImageUnits()
        for r in rows:
            units.add(table, "q", image[r], x[r], n[r])
        units.flush(table)
        return table

    one = fold_units(range(len(image)))
    split = int(np.flatnonzero(image == 7)[0])                                # parts hold whole images
    merged = fold_units(range(split))
    merged.merge(fold_units(range(split, len(image))))
    # the textbook cluster-robust covariance of a ratio, from per-image sums
    xs = np.stack([x[image == i].sum(0) for i in range(images)])
    ns = np.array([n[image == i].sum() for i in range(images)])
    r = xs.sum(0) / ns.sum()
    z = (xs - r * ns[:, None]) / ns.sum()
    expected = images / (images - 1) * z.T @ z
    for table in (one, merged):
        values, cov, units = ratio_with_covariance(table, "q")
        assert units == images
        np.testing.assert_allclose(values, r, rtol=1e-12)
        np.testing.assert_allclose(cov, expected, rtol=1e-9, atol=1e-15)


def test_a_flat_by_layer_curve_is_not_called_a_rise_or_a_fall():
    flat = records(count=30)                                    # every layer drawn alike
    text = entropy(flat).reading() + " " + thematic(flat).reading() + " " + grounding(flat).reading()
    assert "rises" not in text and "falls" not in text, text
    assert text.count("no change beyond its uncertainty") == 5, text   # 3 entropies, affinity, grounding
    steep = entropy(records(count=30, sharpness=[0.5, 2.0, 6.0]))
    assert steep.reading().count("falls from") == 3
    summary = steep.to_json()["per_layer_uncertainty"]["cross"]
    assert summary["trend"] == "falls" and summary["units"] == 30
    assert abs(summary["change"]) > 2 * summary["change_se"] > 0


# --- collector: merge, state, missing fields -----------------------------------------------


def planted_mix(count=24):
    recs = plant_within_cluster(records(count=count, sharpness=[0.5, 2.0, 6.0]), layer=1)
    recs += [make_record(np.random.default_rng(9), 100 + i, with_clusters=False, with_labels=True) for i in range(4)]
    return recs + hypothetical(recs[:6], True)


def assert_json_close(a, b, path="$"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_json_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_merge_equals_one_pass_and_state_round_trips_through_hdf5(tmp_path):
    recs = planted_mix()
    one = StatsCollector(reservoir=200)
    for r in recs:
        one.update(r)
    parts = [StatsCollector(reservoir=200) for _ in range(3)]
    for i, r in enumerate(recs):
        parts[i % 3].update(r)
    merged = StatsCollector.from_state(parts[0].state()).merge(parts[1])
    merged.merge(StatsCollector.from_state(parts[2].state()))
    expected = one.to_json()
    assert expected["proximity"]["spearman_sample_pairs"]["distance"] == 200
    # the collector (which shares per-record work between analyses) equals each analysis alone
    assert_json_close(expected["thematic"], thematic(recs).to_json())
    assert_json_close(expected["proximity"], proximity(recs, reservoir=200).to_json())
    assert_json_close(expected["entropy"], entropy(recs).to_json())
    assert_json_close(expected["grounding"], grounding(recs).to_json())
    assert_json_close(expected, merged.to_json())
    path = tmp_path / "state.h5"
    with h5py.File(path, "w") as f:
        for key, value in one.state().items():
            f[key] = value
    with h5py.File(path, "r") as f:
        state = {key: f[key][()] for key in f}
    assert_json_close(expected, StatsCollector.from_state(state).to_json())
    assert StatsCollector.from_state(state).state().keys() == one.state().keys()


def test_shard_states_store_their_share_of_the_pair_sample_and_merge_exactly(monkeypatch):
    """A collector told its shard's share (as a dump does) stores its pair samples cut to about twice
    that share of the merged sample, and the merged shards still give the single pass's statistics;
    a state of the previous version is refused, naming both versions."""
    import importlib

    monkeypatch.setattr(importlib.import_module("geocap.analysis.proximity"), "SHARD_SLACK", 10)
    recs = planted_mix()
    one = StatsCollector(reservoir=100)
    for r in recs:
        one.update(r)
    images = sorted({r.image_id for r in recs})
    shards = [images[k::4] for k in range(4)]
    states = []
    for shard in shards:
        part = StatsCollector(reservoir=100)
        part.shard_share(len(shard), len(images))
        for r in recs:
            if r.image_id in shard:
                part.update(r)
        held = len(part.parts["proximity"].samples["distance"])
        states.append(part.state())
        stored = len(states[-1]["proximity.sample_distance.keys"])
        assert stored == 2 * 100 * len(shard) // len(images) + 10 < held, (held, stored)      # cut
    merged = StatsCollector.from_state(states[0])
    for state in states[1:]:
        merged.merge(StatsCollector.from_state(state))
    expected = one.to_json()
    assert expected["proximity"]["spearman_sample_pairs"]["distance"] == 100
    assert_json_close(expected, merged.to_json())
    old = dict(states[0], **{"collector.version": np.asarray(3)})
    with pytest.raises(DataError, match="version 3 is not supported.*reads version 4"):
        StatsCollector.from_state(old)


def test_missing_fields_are_reported_never_nan():
    bare = records(count=4, maps=(), with_clusters=False, with_features=False, with_referents=False)
    data = StatsCollector().update(bare[0]).update(bare[1]).to_json()
    json.dumps(data, allow_nan=False)
    for kind in MAP_NAMES:
        assert data["entropy"][kind] is None and "encoder" in data["entropy"]["unavailable"]["encoder_self"]
    assert data["thematic"]["affinity"] is None and "clusters" in data["thematic"]["unavailable"]["affinity"]
    assert data["proximity"]["spearman_distance"] is None
    assert "encoder_self" in data["proximity"]["unavailable"]["spearman_distance"]
    assert data["grounding"]["accuracy"] is None and "cross" in data["grounding"]["unavailable"]["accuracy"]
    # partial: maps but no features -> cosines and similarity reported missing, the rest computed
    partial = records(count=4, with_features=False)
    data = StatsCollector().update(partial[0]).update(partial[1]).to_json()
    json.dumps(data, allow_nan=False)
    assert data["thematic"]["affinity"] is not None and data["thematic"]["same_cluster_cosine"] is None
    assert "features" in data["thematic"]["unavailable"]["same_cluster_cosine"]
    assert data["proximity"]["spearman_distance"] is not None and data["proximity"]["spearman_similarity"] is None
    assert "features" in data["proximity"]["unavailable"]["spearman_similarity"]


def test_bad_input_raises_naming_the_record():
    rec = records(count=1)[0]
    rec.encoder_self = rec.encoder_self.astype(np.float32)
    rec.encoder_self[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image 0"):
        StatsCollector().update(rec)
    from geocap.analysis.accumulator import as_map
    for name in ("encoder_self", "cross"):         # each bad weight, wherever it is, names the map
        for bad in (np.nan, np.inf, -1e-3):
            rec = records(count=1)[0]
            setattr(rec, name, getattr(rec, name).astype(np.float32))
            np.testing.assert_array_equal(as_map(rec, name), getattr(rec, name))
            getattr(rec, name)[-1, -1, -1, -1] = bad
            with pytest.raises(DataError, match=f"image 0 .*{name} holds NaN, infinite or negative"):
                as_map(rec, name)
            with pytest.raises(DataError, match=f"image 0 .*{name}.* (NaN|infinite|negative)"):
                StatsCollector().update(rec)
    a, b = records(count=1)[0], records(count=1, layers=2)[0]
    acc = EntropyAccumulator().update(a)
    with pytest.raises(ValueError, match="cannot be pooled"):
        acc.update(b)
    with pytest.raises(ValueError, match="version"):
        StatsCollector.from_state({**StatsCollector().state(), "collector.version": np.asarray(99)})
    with pytest.raises(ValueError, match="Record"):
        StatsCollector().update({"image_id": 1})


# --- report and CLI ------------------------------------------------------------------------


def check_outputs(out, layers=L, heads=H):
    data = json.loads((out / "analysis.json").read_text())
    for kind in ("encoder_self", "decoder_self", "cross"):
        assert np.shape(data["entropy"][kind]) == (layers, heads)
    for key in ("same_cluster_cosine", "diff_cluster_cosine"):
        assert isinstance(data["thematic"][key], float)
    assert np.shape(data["thematic"]["affinity"]) == (layers, heads)
    for key in ("spearman_distance", "spearman_similarity"):
        assert np.shape(data["proximity"][key]) == (layers,)
    assert np.shape(data["grounding"]["accuracy"]) == (layers,)
    assert isinstance(data["grounding"]["chance"], float)
    assert np.shape(data["grounding"]["hypothetical_follow_rate"]) == (layers,)
    report = (out / "report.md").read_text()
    for name in ("entropy", "thematic", "proximity", "grounding"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in report
    assert not list(out.glob("*.tmp-*"))
    check_html(out, report)
    return data, report


def check_html(out, report):
    """report.html: the report rendered, an <img> for every figure on disk, every table of report.md."""
    import re

    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "http" not in html.replace("../view/index.html", "")
    images = set(re.findall(r'<img alt="[^"]*" src="([^"]+)"', html))
    assert images == {p.name for p in out.glob("*.png")}, images
    tables = report.count("\n|---")
    assert html.count("<table>") == tables
    cells = re.sub(r"\s*\n\s*", "", html)
    for row in re.findall(r"^\| (.*) \|$", report, flags=re.M):
        tag = "th" if f"| {row} |\n|---" in report else "td"
        assert "".join(f"<{tag}>{cell}</{tag}>" for cell in row.split(" | ")) in cells, row


def test_run_analyses_writes_json_figures_and_report(tmp_path):
    recs = planted_mix()
    dump = FakeDump(recs)                       # read in chunks, as a dump is
    data, report = check_outputs_after(run_analyses(dump, tmp_path / "out", viewer_href="../view/index.html",
                                                    progress=False), tmp_path / "out")
    assert "falls from" in report and "(../view/index.html)" in report
    assert data["records"] == len(recs)
    assert data["model"] == {"encoder": [L, H], "decoder": [L, H]}
    assert f"encoder {L} layers x {H} heads, decoder {L} layers x {H} heads" in report
    # the proximity tables: every bin's pairs and, for bins with enough pairs, its means as in analysis.json
    from geocap.analysis.proximity import MIN_BIN_PAIRS

    prox = data["proximity"]
    for measure in ("distance", "similarity"):
        edges = prox[f"{measure}_bin_edges"]
        for b, pairs in enumerate(prox[f"{measure}_bin_pairs"]):
            means = [f"{layer[b]:.4f}" if pairs >= MIN_BIN_PAIRS else "-" for layer in prox[f"{measure}_curve"]]
            row = " | ".join([f"{edges[b]:.2f} to {edges[b + 1]:.2f}", str(int(pairs))] + means)
            assert f"| {row} |" in report, row
    # the uncertainties the text quotes are analysis.json's
    for kind, summary in data["entropy"]["per_layer_uncertainty"].items():
        assert f"(change {summary['change']:+.3f} ± {summary['change_se']:.3f}; standard errors over " \
               f"{summary['units']} images)" in report, kind
    # another model's records: its size is read from them
    other = records(count=3, layers=2, heads=5)
    run_analyses(other, tmp_path / "other", progress=False)
    assert "encoder 2 layers x 5 heads" in (tmp_path / "other" / "report.md").read_text()
    # nothing computable: still every file, with the reasons in the report
    bare = records(count=2, maps=(), with_clusters=False, with_features=False, with_referents=False)
    run_analyses(bare, tmp_path / "bare", progress=False)
    report = (tmp_path / "bare" / "report.md").read_text()
    assert "Not computed" in report and (tmp_path / "bare" / "grounding.png").exists()
    assert "Model size unknown" in report
    check_html(tmp_path / "bare", report)


def check_outputs_after(returned, out):
    data, report = check_outputs(out)
    assert returned == data
    return data, report


class FakeDump(list):
    """What geocap.data.dump_format.open_dump returns, for the CLI test: a sequence of records with
    ``metadata``, ``iter_chunks`` and, when stats-only, ``stats()``."""

    def __init__(self, recs, stats=None):
        super().__init__([] if stats else recs)
        self.metadata = {"stats_only": stats is not None}
        self._stats = stats

    def iter_chunks(self, size):
        for i in range(0, len(self), size):
            yield self[i:i + size]

    def stats(self, collector_class):
        assert collector_class is type(self._stats)
        return self._stats


def test_analyze_cli_on_a_stats_only_dump(tmp_path, monkeypatch):
    """The CLI on a stats-only dump: its merged statistics, not its (absent) records."""
    import geocap.cli.analyze as cli

    recs = planted_mix()
    collector = StatsCollector()
    for r in recs:
        collector.update(r)
    dump_path = tmp_path / "dump"
    dump_path.mkdir()
    monkeypatch.setattr(cli, "_open_dump", lambda path, progress: FakeDump(recs, collector))
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(dump_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    data, _ = check_outputs(tmp_path / "out")
    assert_json_close(collector.to_json(), data)
    bad = parser.parse_args(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="does not exist"):
        bad.func(bad)


def patch_record(cross_row, *, regions, referent, special=(0,)):
    """One record over 1 special token + a 2x2 patch grid, a 2-token caption whose first token
    names ``regions[referent]``; ``cross_row`` [5] is its cross-attention row (1 layer, 1 head)."""
    cross = np.full((1, 1, 2, 5), 0.2)
    cross[0, 0, 0] = cross_row
    boxes = np.array([[0, 0, 1, 1], [0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]], np.float32)
    return Record(image_id=1, boxes=boxes, tokens=["dog", "<eos>"], cross=cross,
                  referents=np.array([referent, -1]),
                  extra={"special_objects": list(special), "patch_grid": [2, 2], "referent_objects": regions})


@pytest.mark.parametrize("row, hit", [
    ([0.5, 0.05, 0.3, 0.1, 0.05], 1),      # the class token is the max: left out, patch 2 (in the region) wins
    ([0.5, 0.3, 0.05, 0.1, 0.05], 0),      # the best patch (1) is outside the region
    ([0.1, 0.1, 0.1, 0.6, 0.1], 1),        # the region's second patch
])
def test_grounding_over_patch_regions_leaves_special_tokens_out(row, hit):
    result = grounding([patch_record(np.array(row), regions=[[2, 3], [1]], referent=0)])
    assert result.tokens == 1
    assert result.accuracy.tolist() == [hit]
    assert result.chance == pytest.approx(2 / 4)           # a 2-patch region among 4 patches


def test_records_check_their_patch_extras():
    with pytest.raises(ValueError, match="referents must be -1 or an index into extra\\['referent_objects'\\] < 2"):
        patch_record(np.full(5, .2), regions=[[2, 3], [1]], referent=2).validate()
    with pytest.raises(ValueError, match="referent_objects'\\]\\[0\\] must be distinct object indices"):
        patch_record(np.full(5, .2), regions=[[2, 9]], referent=0).validate()
    with pytest.raises(ValueError, match="patch_grid"):
        patch_record(np.full(5, .2), regions=[[1]], referent=0, special=()).validate()


def test_thematic_and_proximity_leave_special_objects_out():
    """A record with a class token (index 0, heavily attended) analyses as the same record
    without it: its attention to the others, its clusters, pairs and cosines are the regular ones."""
    rng = np.random.default_rng(3)
    base = [make_record(rng, i, n=7, layers=2, heads=2) for i in range(6)]
    with_cls = []
    for r in base:
        n = r.num_objects
        enc = np.zeros((2, 2, n + 1, n + 1))
        enc[:, :, 1:, 1:] = r.encoder_self.astype(np.float64) * 0.4
        enc[:, :, 1:, 0] = 0.6                          # the class token takes most of every row
        enc[:, :, 0, :] = 1.0 / (n + 1)
        boxes = np.concatenate([[[0, 0, 1, 1]], r.boxes]).astype(np.float32)
        features = np.concatenate([rng.normal(size=(1, r.features.shape[1])), r.features]).astype(np.float32)
        with_cls.append(Record(image_id=r.image_id, boxes=boxes, tokens=r.tokens, encoder_self=enc,
                               clusters=np.concatenate([[r.clusters[0]], r.clusters]), features=features,
                               extra={"special_objects": [0]}))
    plain = [Record(image_id=r.image_id, boxes=r.boxes, tokens=r.tokens, encoder_self=r.encoder_self,
                    clusters=r.clusters, features=r.features) for r in base]
    a, b = thematic(with_cls), thematic(plain)
    np.testing.assert_allclose(a.affinity, b.affinity)
    assert (a.same_cluster_cosine, a.diff_cluster_cosine) == pytest.approx((b.same_cluster_cosine,
                                                                            b.diff_cluster_cosine))
    p, q = proximity(with_cls), proximity(plain)
    assert p.pairs == q.pairs
    assert p.spearman_distance == pytest.approx(q.spearman_distance)
    for r in with_cls:
        r.extra = {}                                    # counted as an object, the class token changes both
    assert not np.allclose(thematic(with_cls).affinity, b.affinity)
    assert proximity(with_cls).pairs != q.pairs


def test_sum_table_scalars_add_as_float64_and_keep_their_shape():
    """Counts are kept as Python floats: the same sums as float64 arrays, bit for bit, through state
    round trips and merges; a scalar name given an array later (or an array name a scalar) is refused."""
    from geocap.analysis.accumulator import SumTable
    from geocap.errors import DataError

    rng = np.random.default_rng(0)
    values = [*rng.random(50), *rng.integers(0, 9, 20), np.float32(0.1), True, np.int64(3)]
    table, reference = SumTable(), np.zeros((), np.float64)
    for v in values:
        table.add("x", v)
        reference += np.float64(v)
    assert table.scalar("x") == float(reference) and table.get("x").shape == ()
    table.add("a", np.arange(3.0))
    back = SumTable.from_state(table.state())
    back.merge(table)
    assert back.scalar("x") == float(reference + reference)
    np.testing.assert_array_equal(back.get("a"), 2 * np.arange(3.0))
    with pytest.raises(DataError, match="x has shape"):
        table.add("x", np.ones(2))
    with pytest.raises(DataError, match="a has shape"):
        table.add("a", 1.0)
