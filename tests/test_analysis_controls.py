"""The controlled measures of geocap.analysis: each test plants attention whose answer is known and
checks that the controlled measure gives it where the naive one (pooled Spearman, affinity,
accuracy against 1/N) is fooled: attention that follows feature similarity alone in scenes where
category, position and features are linked; cross-attention that lands on *some* object."""
import json

import numpy as np
import pytest

from geocap.analysis import StatsCollector, grounding, proximity, run_analyses, thematic
from geocap.analysis.rows import (other_keys, partial_attention_correlation, rank_correlation, row_correlation,
                                  row_ranks)
from geocap.analysis.uncertainty import ImageMeans, SumTable, image_means, interval_verdict
from geocap.data.attention_record import Record

ZONES = np.array([[0.2, 0.2], [0.8, 0.2], [0.2, 0.8], [0.8, 0.8]])


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def scene(rng, image_id, *, drive, layers=2, heads=2, n=None, noise=0.3, features=True, caption_id=0):
    """An image whose categories have zones (position and category linked) and whose features carry
    the category only (no position). Encoder attention: softmax of a logit that ``drive`` names
    ("similarity": 6 x feature cosine; "distance": -6 x centre distance; "cluster": +2 for the query's
    category; joined by "+"), plus noise; "uniform": 1/N."""
    n = n or int(rng.integers(5, 12))
    cats = rng.integers(0, len(ZONES), size=n)
    centre = np.clip(ZONES[cats] + 0.12 * rng.normal(size=(n, 2)), 0.05, 0.95)
    half = rng.uniform(0.02, 0.06, size=(n, 2))
    boxes = np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)
    feats = (np.eye(len(ZONES), 24)[cats] + 0.6 * rng.normal(size=(n, 24))).astype(np.float32)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    logits = np.zeros((n, n))
    if "similarity" in drive:
        logits = logits + 6.0 * unit @ unit.T
    if "distance" in drive:
        logits = logits - 6.0 * np.linalg.norm(centre[:, None] - centre[None], axis=-1) / np.sqrt(2)
    if "cluster" in drive:
        logits = logits + 2.0 * (cats[:, None] == cats[None, :])
    enc = softmax(logits[None, None] + noise * rng.normal(size=(layers, heads, n, n)))
    if drive == "uniform":
        enc = np.full((layers, heads, n, n), 1.0 / n)
    return Record(image_id=image_id, caption_id=caption_id, boxes=boxes, tokens=["a", "<eos>"], labels=cats,
                  clusters=cats, features=feats if features else None, encoder_self=enc.astype(np.float16))


def scenes(drive, count=160, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [scene(rng, i, drive=drive, **kw) for i in range(count)]


def holds_zero(entry):
    return entry is not None and entry["ci95"][0] <= 0 <= entry["ci95"][1]


def check_entry(entry, images):
    """The contract: {mean, ci95, images}, the mean inside its interval, most of ``images`` images
    counted (an image whose rows are all undefined has no value)."""
    assert set(entry) == {"mean", "ci95", "images"}
    assert 0.9 * images <= entry["images"] <= images and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]


# --- building blocks -------------------------------------------------------------------------


def test_within_row_correlations_match_scipy_and_partial_removes_the_shared_part():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    r, ok = rank_correlation(a, b)
    assert ok.all()
    np.testing.assert_allclose(r, [spearmanr(x, y).statistic for x, y in zip(a, b)], atol=1e-12)
    # the partial correlation by its textbook formula, from the three pairwise correlations of the log
    # weights, the ranks of b and the control
    w = rng.dirichlet(np.ones(9), size=4)
    g = np.log(w) + b + rng.normal(size=(4, 9))
    p, ok = partial_attention_correlation(w, b, g)
    assert ok.all()
    rab, rag, rbg = (row_correlation(x, y)[0] for x, y in ((np.log(w), row_ranks(b)), (np.log(w), g),
                                                            (row_ranks(b), g)))
    np.testing.assert_allclose(p, (rab - rag * rbg) / np.sqrt((1 - rag ** 2) * (1 - rbg ** 2)), atol=1e-12)
    # attention whose logits are linear in the control has nothing left: undefined, never NaN
    p, ok = partial_attention_correlation(softmax(0.5 * g), b, g)
    assert not ok.any() and np.isfinite(p).all()
    # equal values in a row: undefined
    r, ok = rank_correlation(np.ones((2, 5)), b[:2, :5])
    assert not ok.any() and (r == 0).all()
    np.testing.assert_array_equal(other_keys(np.array([2, 5, 7])), [[5, 7], [2, 7], [2, 5]])


@pytest.mark.parametrize("keys", [9, 70])          # pairwise counting, and scipy's sort for long rows
def test_row_ranks_average_ties_as_scipy(keys):
    from scipy.stats import rankdata

    values = np.random.default_rng(2).integers(0, 5, size=(3, 4, keys)).astype(np.float16)   # many ties
    np.testing.assert_array_equal(row_ranks(values), rankdata(values.astype(np.float64), axis=-1))


def test_image_means_give_a_t_interval_over_images_and_merge_exactly():
    from scipy.stats import t

    values = np.array([[0.3, 0.5], [0.35, 0.4], [0.25, -0.1], [0.3, 0.0]])     # 4 images x 2 layers
    table, means = SumTable(), ImageMeans()
    for i, v in enumerate(values):
        means.add(table, "m", i, v * 2, np.full(2, 2.0))     # an image's value: sum / count over its rows
    means.flush(table)
    got, missing = image_means(table, "m", "why")
    assert not missing
    for layer in range(2):
        x = values[:, layer]
        half = t.ppf(0.975, 3) * x.std(ddof=1) / 2
        assert got[layer]["images"] == 4
        np.testing.assert_allclose(got[layer]["mean"], x.mean(), atol=1e-12)
        np.testing.assert_allclose(got[layer]["ci95"], [x.mean() - half, x.mean() + half], atol=1e-12)
    assert interval_verdict(got[0]) == "positive" and interval_verdict(got[1]) == "inconclusive"
    assert interval_verdict({"mean": -1, "ci95": [-2, -0.5], "images": 3}) == "negative"


# --- proximity -------------------------------------------------------------------------------


def test_similarity_driven_attention_is_not_called_proximity():
    res = proximity(scenes("similarity")).to_json()
    # the naive pooled Spearman is clearly negative: it would call this attention "proximity"
    assert max(res["spearman_distance"]) < -0.1, res["spearman_distance"]
    # without the similarity control the within-row measure is fooled too (distance and features are linked) ...
    assert all(e["ci95"][1] < 0 for e in res["per_image"]["distance"])
    # ... with it, nothing is left: every layer's interval holds 0, and its mean is small
    for entry in res["per_image"]["distance_given_similarity"]:
        check_entry(entry, 160)
        assert holds_zero(entry) and abs(entry["mean"]) < 0.05, entry


@pytest.mark.parametrize("drive", ["distance", "similarity+distance"])
def test_distance_driven_attention_is_found_beyond_similarity(drive):
    res = proximity(scenes(drive)).to_json()
    for name in ("distance", "distance_given_similarity"):
        for entry in res["per_image"][name]:
            check_entry(entry, 160)
            assert entry["ci95"][1] < -0.3, (name, entry)


def test_records_without_features_give_the_plain_measure_and_a_reason():
    res = proximity(scenes("distance", count=30, features=False))
    data = res.to_json()
    assert data["per_image"]["distance_given_similarity"] is None
    assert "features" in data["unavailable"]["per_image.distance_given_similarity"]
    assert all(e["ci95"][1] < 0 for e in data["per_image"]["distance"])
    assert res.controlled()[0] == "distance" and "not controlled" in res.controlled_reading()


@pytest.mark.parametrize("case", ["one object", "equal weights"])
def test_undefined_rows_give_none_with_a_reason_never_nan(case):
    recs = scenes("uniform", count=6) if case == "equal weights" else scenes("distance", count=6, n=1)
    for result in (proximity(recs), thematic(recs)):
        data = result.to_json()
        text = json.dumps(data, allow_nan=False)            # no NaN anywhere
        assert "NaN" not in text
        for name, entries in data["per_image"].items():
            if name == "affinity":
                continue
            assert entries is None, (name, entries)
            reason = data["unavailable"][f"per_image.{name}"]
            assert ("equal ranks" if case == "equal weights" else "fewer than 4") in reason, reason


def test_one_image_gives_no_interval_and_says_so():
    data = proximity(scenes("distance", count=1, n=8)).to_json()
    assert data["per_image"]["distance"] == [None, None]
    assert "interval needs 2" in data["unavailable"]["per_image.distance_layer1"]


# --- thematic --------------------------------------------------------------------------------


def test_similarity_driven_attention_is_not_called_thematic():
    res = thematic(scenes("similarity")).to_json()
    assert min(res["affinity_per_layer"]) > 1.15                   # the naive affinity: "stays within clusters"
    assert all(e["ci95"][0] > 0 for e in res["per_image"]["cluster"])
    for entry in res["per_image"]["cluster_given_similarity"]:
        assert holds_zero(entry) and abs(entry["mean"]) < 0.05, entry


def test_cluster_driven_attention_is_found_beyond_similarity():
    res = thematic(scenes("similarity+cluster")).to_json()
    for entry in res["per_image"]["cluster_given_similarity"]:
        assert entry["ci95"][0] > 0.2, entry


def test_thematic_per_image_measures_count_an_image_once_whatever_its_captions():
    one = scenes("similarity+cluster", count=20)
    five = [Record(**{**r.__dict__, "caption_id": c}) for r in one for c in range(5)]
    a, b = thematic(one).to_json()["per_image"], thematic(five).to_json()["per_image"]
    assert json.dumps(a) == json.dumps(b)


# --- grounding -------------------------------------------------------------------------------


def patch_record(rng, image_id, *, target, rows=6, cols=6, layers=2, heads=2, t=8):
    """A patch captioner's record: a class token (heavily attended) and rows x cols patches; 3-4
    categories whose regions are random patch sets; nouns on odd steps. Each step's most-attended
    patch is a random patch of the noun's own region (``target="own"``) or of a region picked
    uniformly among the image's categories (``"any"``: looks at *some* object)."""
    n = rows * cols + 1
    cells = [[c / cols, r / rows, (c + 1) / cols, (r + 1) / rows] for r in range(rows) for c in range(cols)]
    boxes = np.array([[0, 0, 1, 1]] + cells, dtype=np.float32)
    ncat = int(rng.integers(3, 5))
    free = rng.permutation(np.arange(1, n))
    sizes = rng.integers(1, 6, size=ncat)
    regions = [sorted(free[s - k:s].tolist()) for s, k in zip(np.cumsum(sizes), sizes)]
    referents = np.full(t, -1)
    referents[1:t - 1:2] = rng.integers(0, ncat, size=len(referents[1:t - 1:2]))
    logits = rng.normal(size=(layers, heads, t, n))
    logits[..., 0] += 3.0
    for step in range(t):
        region = regions[referents[step] if target == "own" and referents[step] >= 0 else rng.integers(0, ncat)]
        logits[:, :, step, rng.choice(region)] += 6.0
    return Record(image_id=image_id, boxes=boxes, tokens=[f"w{i}" for i in range(t - 1)] + ["<eos>"],
                  referents=referents, cross=softmax(logits).astype(np.float16),
                  extra={"special_objects": [0], "patch_grid": [rows, cols], "referent_objects": regions})


def patch_records(target, count=200, seed=0):
    rng = np.random.default_rng(seed)
    return [patch_record(rng, i, target=target) for i in range(count)]


def test_looking_at_some_object_is_not_grounding():
    res = grounding(patch_records("any")).to_json()
    # the naive measure: accuracy far above chance
    assert min(res["accuracy"]) > 2.5 * res["chance"], (res["accuracy"], res["chance"])
    for entry in res["referent_effect"]:
        check_entry(entry, 200)
        assert holds_zero(entry) and abs(entry["mean"]) < 0.06, entry


def test_looking_at_the_nouns_own_object_is_a_large_referent_effect():
    res = grounding(patch_records("own")).to_json()
    for entry in res["referent_effect"]:
        assert entry["ci95"][0] > 0.8, entry
    assert res["referent_effect_parts"]["wrong"][0]["mean"] == 0.0
    assert res["referent_effect_tokens"] == 600


def object_record(image_id, labels, referent, argmax, *, n_tokens=3, layers=1, heads=1):
    """An object-based (ORT) record: token 1 names ``referent``; every row's head-mean argmax is ``argmax``."""
    n = len(labels)
    cross = np.full((layers, heads, n_tokens, n), 0.5 / (n - 1))
    cross[..., argmax] = 0.5
    referents = np.full(n_tokens, -1)
    referents[1] = referent
    return Record(image_id=image_id, boxes=np.tile([[0, 0, 0.5, 0.5]], (n, 1)).astype(np.float32),
                  tokens=["a", "b", "<eos>"], labels=np.asarray(labels), referents=referents, cross=cross)


@pytest.mark.parametrize("argmax, own, wrong", [(0, 1.0, 0.0), (1, 0.0, 0.0), (2, 0.0, 0.5), (3, 0.0, 0.5)])
def test_object_records_compare_with_objects_of_other_categories(argmax, own, wrong):
    # objects 0 and 1 are both cars; the noun names object 0: object 1 is neither its referent nor a wrong one
    records = [object_record(i, [7, 7, 3, 4], referent=0, argmax=argmax) for i in range(3)]
    res = grounding(records).to_json()
    parts = res["referent_effect_parts"]
    assert parts["own"][0]["mean"] == own and parts["wrong"][0]["mean"] == wrong
    assert res["referent_effect"][0]["mean"] == own - wrong


def test_a_noun_with_no_other_category_in_its_image_has_no_effect_and_a_reason():
    res = grounding([object_record(i, [5, 5, 5], referent=0, argmax=0) for i in range(3)]).to_json()
    assert res["referent_effect"] is None and res["accuracy"] == [1.0]
    assert "has a wrong referent" in res["unavailable"]["referent_effect"]


# --- merging, report --------------------------------------------------------------------------


def mixed(count=40):
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        rec = scene(rng, i, drive="similarity+distance", n=8)
        patch = object_record(i, rec.labels, referent=int(rng.integers(0, 8)), argmax=int(rng.integers(0, 8)),
                              layers=2, heads=2)
        for c in range(2):
            out.append(Record(**{**rec.__dict__, "caption_id": c, "tokens": patch.tokens,
                                 "referents": patch.referents, "cross": patch.cross}))
    return out


def test_shards_merge_to_the_single_pass_result_exactly():
    recs = mixed()
    whole = StatsCollector()
    for r in recs:
        whole.update(r)
    parts = []
    for a, b in ((0, 22), (22, 50), (50, 80)):               # shards hold whole images (2 records each)
        part = StatsCollector()
        for r in recs[a:b]:
            part.update(r)
        parts.append(StatsCollector.from_state(part.state()))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    got, want = merged.to_json(), whole.to_json()
    for section, key in (("proximity", "per_image"), ("thematic", "per_image"), ("grounding", "referent_effect")):
        assert _close(got[section][key], want[section][key]), section
    assert want["grounding"]["referent_effect"] is not None


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a))
    return a == b


def test_report_reads_the_controlled_measures_and_names_the_naive_one(tmp_path):
    data = run_analyses(scenes("similarity", count=60), tmp_path, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "controlled" in report and "naive measure" in report
    assert "Verdict: inconclusive" in report             # proximity given similarity: holds 0
    assert data["proximity"]["per_image"]["distance_given_similarity"] is not None
