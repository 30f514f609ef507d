"""geocap.study's aggregation: per-image statistics that reproduce evaluate's corpus metrics, the
paired t intervals over seeds (and their calibration on simulated null studies), the findings'
verdicts on planted analyses (the controlled measures of hand-made analysis.json dicts, the untrained
control), the blind captioner, the convergence criterion, study.json's keys and the report. Fast: no
training (analysis dicts come from geocap.analysis run on records built in memory)."""
import copy
import json
import random

import numpy as np
import pytest

from geocap.analysis import StatsCollector
from geocap.data.relations import RELATIONS
from geocap.metrics import caption_metrics, load_relation_truth, relation_accuracy
from geocap.study import ModelResult, summarize, write_report
from geocap.study.findings import attention_findings, attention_summary, feature_cosine_check, verdict
from geocap.study.report import FIGURES, format_interval, format_number
from geocap.study.stats import ImageStats, combine_seeds, excludes_zero, image_statistics, metric_values, seed_intervals
from test_analysis import hypothetical, make_record

WORDS = "a the cup table on left of right dog cat kitchen two three under next to is there photo".split()


def random_caption(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def near_caption(rng, ref):
    """``ref`` with a word or two dropped or replaced (realistic overlap, brevity penalty on and off)."""
    words = ref.split()
    for _ in range(rng.randint(0, 2)):
        i = rng.randrange(len(words))
        if rng.random() < 0.5 and len(words) > 1:
            del words[i]
        else:
            words[i] = rng.choice(WORDS)
    return " ".join(words + ([rng.choice(WORDS)] if rng.random() < 0.3 else []))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic dataset: its ground truth path and raw references of every image."""
    from geocap.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, images=60, seed=0, feature_dim=16, progress=False)
    refs = {}
    for ann in json.loads((root / "captions_coco.json").read_text())["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return str(root / "ground_truth.json"), refs


# -- per-image statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("trial", range(4))
def test_per_image_statistics_reproduce_the_corpus_metrics(trial):
    rng = random.Random(trial)
    refs = {i: [random_caption(rng) for _ in range(5)] for i in range(1, 50)}
    caps = {i: near_caption(rng, refs[i][0]) if trial % 2 else random_caption(rng) for i in refs}
    values = metric_values(image_statistics(refs, caps, tokenizer="python"))
    expected, _ = caption_metrics(refs, caps, tokenizer="python", meteor=False, spice=False)
    assert values["bleu_4"][0] == expected["Bleu_4"]                       # exactly pycocoevalcap's Bleu(4)
    assert values["cider_d"][0] == pytest.approx(expected["CIDEr"], rel=1e-12, abs=1e-12)
    assert values["rouge_l"][0] == pytest.approx(expected["ROUGE_L"], rel=1e-12, abs=1e-12)


def test_relation_counts_per_image_sum_to_evaluate_s(synth):
    truth_path, refs = synth
    truth = load_relation_truth(truth_path)
    ids = sorted(refs)
    caps = {i: refs[ids[(k + 1) % len(ids)]][0] for k, i in enumerate(ids)}   # another image's relations
    stats = image_statistics(refs, caps, ground_truth=truth)
    whole = relation_accuracy(caps, truth)
    assert stats.relation_uses.sum() == whole.uses > 0 and stats.relation_correct.sum() == whole.correct
    for k, name in enumerate(RELATIONS):
        assert stats.relation_uses[:, k].sum() == whole.per_relation[name]["uses"]
    assert metric_values(stats)["relation_accuracy"][0] == pytest.approx(whole.accuracy)
    own = image_statistics(refs, {i: refs[i][0] for i in ids}, ground_truth=truth)   # references score 1.0
    assert metric_values(own)["relation_accuracy"][0] == 1.0


# -- bootstrap -----------------------------------------------------------------------------------------

def planted_stats(n=60, seeds=2, seed=0, good=True, caption_seed=None):
    """Per seed: captions equal to a reference (good) or random words (not good); references from
    ``seed``, captions from ``caption_seed`` (default: the same stream)."""
    rng = random.Random(seed)
    refs = {i: [random_caption(rng) for _ in range(5)] for i in range(1, n + 1)}
    rng = rng if caption_seed is None else random.Random(caption_seed)
    out = []
    for _ in range(seeds):
        caps = {i: refs[i][rng.randrange(5)] if good else random_caption(rng) for i in refs}
        out.append(image_statistics(refs, caps))
    return out


def test_seed_intervals_are_paired_t_over_seeds():
    from scipy.stats import t as student_t

    good, bad = planted_stats(seeds=3, good=True), planted_stats(seeds=3, good=False)
    pairs = [("ort", "none"), ("directional", "ort")]
    a = seed_intervals({"ort": good, "none": bad, "directional": good}, pairs=pairs)
    assert a == seed_intervals({"ort": good, "none": bad, "directional": good}, pairs=pairs)
    cider = {(x["a"], x["b"]): x for x in a["comparisons"] if x["metric"] == "cider_d"}
    d = np.array([metric_values(g)["cider_d"][0] - metric_values(b)["cider_d"][0] for g, b in zip(good, bad)])
    half = student_t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    got = cider["ort", "none"]
    assert got["difference"] == pytest.approx(d.mean()) and got["per_seed"] == pytest.approx(list(d))
    assert got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half]) and got["excludes_zero"]
    same = cider["directional", "ort"]                      # identical models: exactly 0 on every seed
    assert same["difference"] == 0.0 and same["ci95"] is None and not same["excludes_zero"]   # no spread: no interval
    values = [metric_values(s)["cider_d"][0] for s in good]
    mean, (lo, hi) = a["variants"]["ort"]["mean"]["cider_d"], a["variants"]["ort"]["ci95"]["cider_d"]
    spread = student_t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert mean == pytest.approx(np.mean(values)) and [lo, hi] == pytest.approx([mean - spread, mean + spread])


def test_models_both_perfect_do_not_differ():
    """Two variants each captioning with one of the references: BLEU-4, ROUGE-L and relation accuracy
    are 1 for both (up to BLEU's float guards), so no difference excludes 0 (one seed: image resamples)."""
    rng = random.Random(0)
    refs = {i: [random_caption(rng) for _ in range(5)] for i in range(1, 61)}
    shortest = image_statistics(refs, {i: min(r, key=len) for i, r in refs.items()})
    longest = image_statistics(refs, {i: max(r, key=len) for i, r in refs.items()})
    got = seed_intervals({"ort": [shortest], "none": [longest]}, n_boot=200, seed=0, pairs=[("ort", "none")])
    bleu = next(c for c in got["comparisons"] if c["metric"] == "bleu_4")
    assert abs(bleu["difference"]) < 1e-8 and not bleu["excludes_zero"], bleu
    cider = next(c for c in got["comparisons"] if c["metric"] == "cider_d")
    assert cider["ci95"] is not None and "one seed" in cider["interval"]


def test_one_seed_intervals_shrink_with_more_images():
    def width(n):
        got = seed_intervals({"ort": planted_stats(n=n, seeds=1, good=False)}, n_boot=400, seed=0)
        lo, hi = got["variants"]["ort"]["ci95"]["cider_d"]
        return hi - lo

    assert width(200) < 0.75 * width(25)


def null_study_stats(rng, seeds, images, seed_sd, image_sd, noise_sd):
    """Two variants of the same quality: per-image CIDEr-D = image difficulty (shared by every model)
    + a seed effect per model + per-model image noise."""
    difficulty = rng.normal(0.8, image_sd, images)

    def model():
        cider = difficulty + rng.normal(0, seed_sd) + rng.normal(0, noise_sd, images)
        zeros = np.zeros((images, 4), np.int64)
        rel = np.zeros((images, len(RELATIONS)), np.int64)
        return ImageStats(image_ids=np.arange(images), cider=cider, bleu_correct=zeros, bleu_guess=zeros + 1,
                          bleu_testlen=np.ones(images, np.int64), bleu_reflen=np.ones(images, np.int64),
                          rouge=np.zeros(images), relation_uses=rel, relation_correct=rel, tokenizer="python")

    return {"a": [model() for _ in range(seeds)], "b": [model() for _ in range(seeds)]}


@pytest.mark.parametrize("seeds", [3, 5])
def test_null_studies_exclude_zero_at_most_7_percent_of_the_time(seeds):
    """Calibration: 500 simulated null studies with seed variance (0.05, the size of the study's seed
    spread in CIDEr-D) and image variance (difficulty 0.3 shared, 0.4 per model, 300 test images).
    The nominal 95 % interval of a - b excludes 0 in at most 7 % of them; an interval with 1.96 in place
    of t's quantile (what the test must catch) excludes it far more often."""
    rng = np.random.default_rng(seeds)
    excluded = naive = 0
    trials = 500
    for _ in range(trials):
        got = seed_intervals(null_study_stats(rng, seeds, 300, 0.05, 0.3, 0.4), pairs=[("a", "b")],
                             metrics=["cider_d"])
        c = next(x for x in got["comparisons"] if x["metric"] == "cider_d")
        excluded += c["excludes_zero"]
        d = np.array(c["per_seed"])
        naive += abs(d.mean()) > 1.959964 * d.std(ddof=1) / np.sqrt(seeds)
    assert excluded / trials <= 0.07, excluded
    assert excluded / trials >= 0.02, excluded                     # not calibrated by never excluding 0
    assert naive / trials > 0.08, naive


def test_controls_are_compared_with_every_seed():
    good, bad = planted_stats(seeds=3, good=True), planted_stats(seeds=1, good=False, caption_seed=9)[0]
    got = seed_intervals({"ort": good}, controls={"blind": bad}, control_pairs=[("ort", "blind", ["cider_d"])],
                         n_boot=300)
    c = got["comparisons"]
    assert [(x["a"], x["b"], x["metric"]) for x in c] == [("ort", "blind", "cider_d")]
    blind = metric_values(bad)["cider_d"][0]
    assert c[0]["per_seed"] == pytest.approx([metric_values(g)["cider_d"][0] - blind for g in good])
    assert got["controls"]["blind"]["mean"]["cider_d"] == pytest.approx(blind)
    lo, hi = got["controls"]["blind"]["ci95"]["cider_d"]
    assert lo < blind < hi and c[0]["excludes_zero"]


def test_combine_seeds_rule():
    one = combine_seeds([0.5], [0.1])
    assert one["ci95"] == pytest.approx([0.5 - 1.959963984540054 * 0.1, 0.5 + 1.959963984540054 * 0.1])
    assert combine_seeds([0.5], None)["ci95"] is None
    three = combine_seeds([1.0, 2.0, 3.0], [0.01, 0.01, 0.01])      # between-seed spread dominates
    half = 4.302652729911275 * np.sqrt(1.0 / 3)                    # t(0.975, 2) x sqrt(s_b^2 / K)
    assert three["ci95"] == pytest.approx([2 - half, 2 + half])
    floor = combine_seeds([1.0, 1.0, 1.0], [0.3, 0.3, 0.3])        # within-seed se as the floor
    assert floor["ci95"][1] - 1.0 == pytest.approx(4.302652729911275 * 0.3 / np.sqrt(3))
    assert combine_seeds([None, 1.0, 2.0])["seeds"] == 2


def test_identical_seeds_give_no_interval_not_a_zero_width_one():
    """A variant never right in any seed (every per-seed difference against a fixed control the
    same): no spread is known, so no interval, and the difference does not 'exclude 0'."""
    same = combine_seeds([-0.1687] * 5, floor=False)
    assert same["ci95"] is None and same["estimate"] == pytest.approx(-0.1687) and "no interval" in same["method"]
    assert combine_seeds([0.2] * 3, [0.0] * 3)["ci95"] is None          # the floor is 0 too
    assert combine_seeds([0.2] * 3, [0.05] * 3)["ci95"] is not None     # an image se keeps the interval
    assert combine_seeds([0.2], [0.0])["ci95"] is None
    assert not excludes_zero(same["ci95"])
    assert excludes_zero(combine_seeds([-0.17, -0.16, -0.18], floor=False)["ci95"])


# -- findings on planted analyses ----------------------------------------------------------------------

L = 3


def analysis_of(records):
    collector = StatsCollector()
    for r in records:
        collector.update(r)
    data = {name: result.to_json() for name, result in collector.results().items()}
    return json.loads(json.dumps(data, allow_nan=False))


def model_analysis(seed, sharpness, follow=True, count=30):
    rng = np.random.default_rng(seed)
    recs = [make_record(rng, i, sharpness=sharpness) for i in range(count)]
    return analysis_of(recs + hypothetical(recs, follow))


@pytest.fixture(scope="module")
def analyses():
    """Three seeds each: attention sharpening with depth, blurring with depth, and flat."""
    return {trend: [model_analysis(s, sharp) for s in range(3)]
            for trend, sharp in (("falling", [0.5, 2.0, 6.0]), ("rising", [6.0, 2.0, 0.5]), ("flat", [1, 1, 1]))}


def by_name(findings):
    return {f["name"]: f for f in findings}


@pytest.mark.parametrize("trend,expected", [("falling", "holds"), ("rising", "does not hold"),
                                            ("flat", "inconclusive")])
def test_entropy_verdicts_on_planted_records(analyses, trend, expected):
    got = by_name(attention_findings("ort", [attention_summary(a) for a in analyses[trend]]))
    for kind in ("encoder_self", "decoder_self", "cross"):
        f = got[f"entropy_{kind}"]
        assert f["verdict"] == expected, f["measured"]
        assert f["variants"] == ["ort"] and set(f) == {"name", "seed_claim", "measured", "verdict", "variants",
                                                       "measure"}


def planted_curve(section: dict, values_key, unc_key, values, se):
    section[values_key] = list(values)
    if unc_key is not None:
        section[unc_key] = {"se": [se] * len(values), "units": 30, "trend": "", "change": values[-1] - values[0],
                            "change_se": se * 1.4}


def with_curves(base, seed, *, entropy=None, spearman=None, affinity=None, grounding=None, follow=None,
                same_step=None, noise=0.0, se=0.005):
    """``base`` (a real analysis.json dict) with planted by-layer values (plus per-seed noise), without
    the controlled measures (an analysis.json written before them: the findings' fallback path)."""
    a = copy.deepcopy(base)
    a["proximity"].pop("per_image", None), a["thematic"].pop("per_image", None)
    a["grounding"].pop("referent_effect", None)
    jitter = np.random.default_rng(seed).normal(0, noise, size=L) if noise else np.zeros(L)
    if spearman is not None:
        a["proximity"]["spearman_distance"] = list(np.add(spearman, jitter))
    if affinity is not None:
        planted_curve(a["thematic"], "affinity_per_layer", "affinity_per_layer_uncertainty",
                      np.add(affinity, jitter), se)
    g = a["grounding"]
    for key, unc_key, values in (("accuracy", "accuracy", grounding), ("hypothetical_follow_rate",
                                 "hypothetical_follow_rate", follow),
                                 ("hypothetical_follow_rate_same_step", "hypothetical_follow_rate_same_step",
                                  same_step)):
        if values is not None:
            g[key] = list(np.add(values, jitter))
            g["uncertainty"][unc_key] = {"se": [se] * L, "units": 30, "trend": "",
                                         "change": g[key][-1] - g[key][0], "change_se": se * 1.4}
    return a


PLANTS = {
    # proximity has no standard error in these records: the seeds' own spread (noise) makes its interval
    "proximity": {"holds": dict(spearman=[-0.5, -0.3, -0.1], noise=0.01),
                  "does not hold": dict(spearman=[-0.1, -0.3, -0.5], noise=0.01),
                  "inconclusive": dict(spearman=[-0.2, -0.2, -0.2], noise=0.05)},
    "thematic_affinity": {"holds": dict(affinity=[1.6, 1.3, 1.05]), "does not hold": dict(affinity=[0.8, 1.0, 1.2]),
                          "inconclusive": dict(affinity=[1.2, 1.2, 1.2], noise=0.05)},
    "grounding": {"holds": dict(grounding=[0.16, 0.22, 0.29]), "does not hold": dict(grounding=[0.3, 0.2, 0.1]),
                  "inconclusive": dict(grounding=[0.2, 0.2, 0.2], noise=0.02)},
    "hypothetical_captions": {"holds": dict(follow=[0.3, 0.5, 0.7], same_step=[0.2, 0.2, 0.2]),
                              "does not hold": dict(follow=[0.1, 0.1, 0.1], same_step=[0.3, 0.3, 0.3]),
                              "inconclusive": dict(follow=[0.3, 0.3, 0.3], same_step=[0.3, 0.3, 0.3], noise=0.03)},
}


@pytest.mark.parametrize("name", sorted(PLANTS))
@pytest.mark.parametrize("expected", ["holds", "does not hold", "inconclusive"])
def test_attention_verdicts_on_planted_curves(analyses, name, expected):
    base = analyses["flat"][0]
    summaries = [attention_summary(with_curves(base, s, **PLANTS[name][expected])) for s in range(3)]
    f = by_name(attention_findings("none", summaries))[name]
    assert f["verdict"] == expected, f["measured"]
    assert all(m["ci95"] is not None for m in f["measured"] if m.get("tests"))


def test_one_seed_without_standard_errors_is_inconclusive(analyses):
    base = analyses["flat"][0]
    f = by_name(attention_findings("ort", [attention_summary(with_curves(base, 0, spearman=[-0.5, -0.3, -0.1]))]))
    assert f["proximity"]["verdict"] == "inconclusive"


def test_feature_cosine_check(analyses):
    summaries = [attention_summary(a) for a in analyses["flat"]]
    f = feature_cosine_check(["ort"], summaries)
    assert f["result"] == "holds" and "verdict" not in f    # a data check: make_record's cluster centres
    flipped = copy.deepcopy(summaries)
    for s in flipped:
        s["feature_cosine"] = {"same": s["feature_cosine"]["diff"], "diff": s["feature_cosine"]["same"]}
    assert feature_cosine_check(["ort"], flipped)["result"] == "does not hold"


def test_verdict_rule():
    assert verdict([{"ci95": [0.1, 0.2], "claimed_sign": 1}, {"ci95": [-0.3, -0.1], "claimed_sign": -1}]) == "holds"
    assert verdict([{"ci95": [0.1, 0.2], "claimed_sign": 1}, {"ci95": [-0.3, 0.1], "claimed_sign": -1}]) \
        == "inconclusive"
    assert verdict([{"ci95": [0.1, 0.2], "claimed_sign": 1}, {"ci95": [0.1, 0.3], "claimed_sign": -1}]) \
        == "does not hold"
    assert verdict([{"ci95": None, "claimed_sign": 1}]) == verdict([]) == "inconclusive"


# -- summarize and the report --------------------------------------------------------------------------

def metrics_json(refs, caps, truth):
    m, _ = caption_metrics(refs, caps, tokenizer="python", meteor=False, spice=False)
    return {"metrics": m, "tokenizer": "python",
            "relation_accuracy": relation_accuracy(caps, load_relation_truth(truth)).accuracy}


def study_results(synth, analyses, *, seeds=(0, 1), good=("ort", "directional"),
                  variants=("ort", "none", "directional", "absolute")):
    truth, refs = synth
    ids = sorted(refs)
    results = []
    for variant in variants:
        for k, seed in enumerate(seeds):
            rng = random.Random(f"{variant}{seed}")
            if variant in good:     # a reference of the image (relations true), else of another image
                caps = {i: refs[i][rng.randrange(5)] for i in ids}
            else:
                caps = {i: refs[ids[(n + 7) % len(ids)]][rng.randrange(5)] for n, i in enumerate(ids)}
            results.append(ModelResult(variant=variant, seed=seed, references=refs, captions=caps, ground_truth=truth,
                                       analysis=analyses["falling"][k], metrics=metrics_json(refs, caps, truth),
                                       val_curve=[[s, 3.0 - s / 1000, 0.01] for s in range(100, 1001, 50)],
                                       steps=1000, untrained_analysis=analyses["flat"][k]))
    return results


def blind_of(synth):
    """The blind captioners' captions of the synth fixture's images, fitted on its own references."""
    from geocap.study.blind import BlindCaptioner

    truth_path, refs = synth
    truth = load_relation_truth(truth_path)
    blind = BlindCaptioner.fit([c for r in refs.values() for c in r], truth)
    rules = {"all": blind, "left/right": blind.restrict(["left of", "right of"]),
             "above/below": blind.restrict(["above", "below"])}
    return {name: {i: rule.caption(truth.images[i].categories) for i in refs} for name, rule in rules.items()}


@pytest.fixture(scope="module")
def study(synth, analyses):
    return summarize(study_results(synth, analyses), blind=blind_of(synth), n_boot=300, seed=0)


def test_summarize_keys_values_and_cross_check(study):
    assert set(study) == {"variants", "comparisons", "findings", "data_checks", "verdicts", "controls"}
    assert set(study["variants"]) == {"ort", "none", "directional", "absolute"}
    for v, entry in study["variants"].items():
        assert set(entry) == {"seeds", "mean", "ci95", "final_val_loss_sd"}
        assert [s["seed"] for s in entry["seeds"]] == [0, 1]
        finals = [s["val_curve"][-1][1] for s in entry["seeds"]]
        assert entry["final_val_loss_sd"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5, rel=1e-9)
        assert all(s["schedule_convergence"] is None for s in entry["seeds"])     # these results have no check
        for s in entry["seeds"]:
            assert {"seed", "cider_d", "bleu_4", "rouge_l", "relation_accuracy", "relations", "evaluate"} <= set(s)
            assert set(s["relations"]) == set(RELATIONS)
            assert all(set(r) >= {"accuracy", "uses"} for r in s["relations"].values())
            assert s["bleu_4"] == s["evaluate"]["bleu_4"]
            assert s["cider_d"] == pytest.approx(s["evaluate"]["cider_d"], rel=1e-12)
            assert s["rouge_l"] == pytest.approx(s["evaluate"]["rouge_l"], rel=1e-12)
            assert s["relation_accuracy"] == pytest.approx(s["evaluate"]["relation_accuracy"])
        for m in ("cider_d", "bleu_4", "rouge_l", "relation_accuracy"):
            assert entry["mean"][m] == pytest.approx(np.mean([s[m] for s in entry["seeds"]]))
            values = [s[m] for s in entry["seeds"]]
            if max(values) - min(values) > 1e-12:
                assert len(entry["ci95"][m]) == 2
            else:                                       # identical seeds: no spread, so no interval
                assert entry["ci95"][m] is None
    assert study["variants"]["ort"]["mean"]["relation_accuracy"] == 1.0
    assert study["variants"]["ort"]["ci95"]["relation_accuracy"] is None     # right every time in both seeds
    pairs = {(c["a"], c["b"]) for c in study["comparisons"]}
    variants = ("ort", "none", "directional", "absolute")
    assert pairs == {("ort", "none"), ("directional", "ort"), ("directional", "none"), ("ort", "absolute"),
                     ("absolute", "none"), ("directional", "absolute")} | \
        {(v, b) for v in variants for b in ("blind", "blind left/right", "blind above/below")}
    for f in study["findings"]:
        assert {"name", "seed_claim", "measured", "verdict", "variants", "control"} <= set(f), f["name"]
        assert f["verdict"] in ("holds", "does not hold", "inconclusive")
        assert all(c["kind"] in ("untrained", "blind") and "ci95" in c and "estimate" in c for c in f["control"])
    assert [c["name"] for c in study["data_checks"]] == ["feature_cosine"]
    assert "feature_cosine" not in {f["name"] for f in study["findings"]}
    assert study["verdicts"]["tested"] == len(study["findings"]) == 4 * 7 + 6
    got = by_name([f for f in study["findings"] if f["variants"] == ["ort", "none"]])
    assert got["geometry_captions"]["verdict"] == "holds" and got["geometry_relations"]["verdict"] == "holds"
    # ort (right captions) beats the blind captioner on relations, none (another image's) does not
    blind = {c["a"]: c for c in study["comparisons"] if c["b"] == "blind" and c["metric"] == "relation_accuracy"}
    assert blind["ort"]["difference"] > 0 and blind["none"]["difference"] < blind["ort"]["difference"]
    # ort is right every time in both seeds: the same difference per seed, no spread, so no interval
    assert blind["ort"]["ci95"] is None and not blind["ort"]["excludes_zero"]
    relations = got["geometry_relations"]
    assert relations["control"][0]["kind"] == "blind"
    assert relations["control"][0]["estimate"] == study["controls"]["blind"]["mean"]["relation_accuracy"]
    assert {m["quantity"] for m in relations["measured"] if "- blind" in m["quantity"]} == \
        {f"relation accuracy, {v} - blind" for v in variants}
    # the converged curves: falling 1e-3 per step, 19 points: not converged; the criterion's numbers are there
    conv = study["variants"]["ort"]["seeds"][0]["convergence"]
    assert conv["converged"] is False and conv["slope"] == pytest.approx(-1e-3)
    json.dumps(study, allow_nan=False)


def test_geometry_findings_follow_the_captions(synth, analyses):
    """ort with wrong captions, none with right ones: ORT's geometry 'does not hold'; directional as
    good as ort on left/right: inconclusive."""
    got = summarize(study_results(synth, analyses, good=("none",), variants=("ort", "none", "directional")),
                    n_boot=200, seed=1)
    findings = {f["name"]: f for f in got["findings"] if "entropy" not in f["name"]}
    assert findings["geometry_captions"]["verdict"] == "does not hold"
    assert findings["geometry_relations"]["verdict"] == "does not hold"


def test_summarize_refuses_bad_input(synth, analyses):
    results = study_results(synth, analyses)
    bad = copy.deepcopy(results)
    bad[1].captions.pop(sorted(bad[1].captions)[3])
    with pytest.raises(ValueError, match=r"variant 'ort' seed 1: no caption for test image"):
        summarize(bad, n_boot=10)
    bad = copy.deepcopy(results)
    bad[2].variant = "signed"
    with pytest.raises(ValueError, match=r"variant 'signed' seed 0: unknown variant"):
        summarize(bad, n_boot=10)
    with pytest.raises(ValueError, match="blind rule 'sideways'"):
        summarize(results, blind={"sideways": {}}, n_boot=10)
    bad = copy.deepcopy(results)
    for r in bad[2:4]:                   # both seeds of 'none' on one image fewer
        first = sorted(r.references)[0]
        r.references = {i: v for i, v in r.references.items() if i != first}
        r.captions = {i: v for i, v in r.captions.items() if i != first}
    with pytest.raises(ValueError, match=r"variant 'none' seed 0: its test images differ"):
        summarize(bad, n_boot=10)
    with pytest.raises(ValueError, match=r"variant 'none': seeds \[0\] differ"):
        summarize(results[:3] + results[4:], n_boot=10)


def test_report_holds_every_number_of_the_tables(study, tmp_path):
    study = dict(study, settings={"variants": ["ort", "none", "directional", "absolute"], "seeds": 2, "quick": True})
    write_report(study, tmp_path)
    text = (tmp_path / "study.md").read_text()
    for name in FIGURES.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (tmp_path / "study.html").read_text()
    assert "`true`" in text and "paired t over seeds" in text and "Verdict rule" in text
    assert f"Verdicts tested: {study['verdicts']['tested']}" in text and "## Data checks" in text
    assert "blind captioner" in text and "untrained" in text
    for v, entry in study["variants"].items():
        for m in ("cider_d", "bleu_4", "rouge_l", "relation_accuracy"):
            assert f"{format_number(entry['mean'][m])} {format_interval(entry['ci95'][m])}" in text
            for s in entry["seeds"]:
                assert format_number(s[m]) in text and format_number(s["evaluate"][m]) in text
        for name, rel in entry["mean"]["relations"].items():
            assert (f"{format_number(rel['accuracy'])} {format_interval(entry['ci95']['relations'][name])} "
                    f"({rel['uses']} uses)") in text
    for c in study["comparisons"]:
        assert f"| {c['a']} - {c['b']} | {c['metric']} | {format_number(c['difference'])} | " \
               f"{format_interval(c['ci95'])} |" in text
    for f in study["findings"]:
        assert f"### {f['name']} ({', '.join(f['variants'])}): {f['verdict']}" in text
        for m in f["measured"]:
            if "estimate" in m:
                assert f"{format_number(m['estimate'])} {format_interval(m['ci95'])}" in text
            if m.get("control"):
                c = m["control"]
                assert f"{format_number(c['difference'])} {format_interval(c['difference_ci95'])}" in text
    for s in (s for e in study["variants"].values() for s in e["seeds"]):
        assert format_number(s["convergence"]["final_loss"]) in text
    assert not list(tmp_path.glob("*.tmp-*"))


def test_one_seed_one_variant_without_ground_truth(synth, analyses, tmp_path):
    """The smallest study still summarises: relation accuracy undefined (None, never NaN), intervals
    from image sampling only, the report says so, and the geometry findings are inconclusive."""
    r = study_results(synth, analyses, seeds=(0,))[0]
    r.ground_truth = None
    got = summarize([r], n_boot=100)
    entry = got["variants"]["ort"]
    assert entry["mean"]["relation_accuracy"] is None and entry["ci95"]["relation_accuracy"] is None
    assert entry["seeds"][0]["relations"]["left of"] == {"accuracy": None, "uses": 0, "correct": 0}
    assert got["comparisons"] == []
    assert not [f for f in got["findings"] if f["name"].startswith(("geometry", "directional", "relative"))]
    assert got["verdicts"]["tested"] == 7                     # the attention findings only
    json.dumps(got, allow_nan=False)
    write_report(got, tmp_path)
    assert "One seed only" in (tmp_path / "study.md").read_text()


def test_convergence_criterion_against_the_curve_s_noise():
    from geocap.study.convergence import convergence

    steps = 1000
    rng = np.random.default_rng(0)
    points = range(25, 1001, 25)                                         # 8 validations in the last fifth
    flat = [[s, 2.0 + rng.normal(0, 0.01), 0.01] for s in points]
    falling = [[s, 3.0 - s / 1000 + rng.normal(0, 0.01), 0.01] for s in points]    # -0.2 per fifth: 10 %
    rising = [[s, 2.0 + s / 1e4, 0.01] for s in points]                  # over-fitting: no gain left
    assert convergence(flat, steps)["converged"] is True
    got = convergence(falling, steps)
    assert got["converged"] is False and got["slope_ci95"][0] < -1e-3 < got["slope_ci95"][1]
    assert got["relative_gain"] == pytest.approx(0.2 * 1000 * -got["slope_ci95"][0] / got["final_loss"])
    assert got["residual_sd"] == pytest.approx(0.01, rel=0.6) and got["validation_se"] == 0.01
    assert convergence(rising, steps)["converged"] is True
    # the same small fall converges or not by the noise: a gain of 0.5 % per fifth with scatter 0.02
    # cannot be told from 2 % (undecided towards "not converged"); without scatter it is under 1 %
    small = [[s, 2.0 - s * 5e-5 / 1000 * 1000 / 1000, 0.0] for s in points]
    assert convergence(small, steps)["converged"] is True
    noisy = [[s, 2.0 - s * 5e-6 + rng.normal(0, 0.05), 0.05] for s in points]
    assert convergence(noisy, steps)["converged"] is False
    assert convergence([], steps)["converged"] is None
    assert convergence(flat[-3:], steps)["converged"] is None             # 3 points in the last fifth
    with pytest.raises(ValueError, match="steps"):
        convergence(flat, 0)
    with pytest.raises(ValueError, match="curve"):
        convergence([[1]], steps)


# -- the controlled measures of the analyses (hand-made analysis.json dicts in their shape) -------------

def rows(means, half=0.02, images=30):
    """A controlled measure as the analyses write it: per layer {"mean", "ci95", "images"}."""
    return [{"mean": m, "ci95": [m - half, m + half], "images": images} for m in means]


def with_controlled(base, seed, *, distance=None, given_similarity=None, referent=None, thematic=None,
                    noise=0.01):
    a = copy.deepcopy(base)
    jitter = np.random.default_rng(seed).normal(0, noise, size=L)
    if distance is not None or given_similarity is not None:
        a["proximity"]["per_image"] = {
            "distance": None if distance is None else rows(np.add(distance, jitter)),
            "distance_given_similarity": None if given_similarity is None else rows(np.add(given_similarity, jitter))}
    if referent is not None:
        a["grounding"]["referent_effect"] = rows(np.add(referent, jitter))
    if thematic is not None:   # as the analyses write it: the naive per-image affinity first
        a["thematic"]["per_image"] = {"affinity": rows([1.5, 1.4, 1.3]), "cluster": rows(np.add(thematic, jitter)),
                                      "cluster_given_similarity": None}
    return a


def test_findings_read_the_controlled_measures_when_present(analyses):
    base = analyses["flat"][0]
    # geocap.analysis writes them: the summary of a real analysis.json reads each one
    assert attention_summary(base)["measures"] == {"proximity": "per_image.distance_given_similarity",
                                                   "thematic": "per_image.cluster_given_similarity",
                                                   "grounding": "referent_effect"}
    # the pooled Spearman says 'holds'; the controlled measures say otherwise, and they decide
    naive = dict(spearman=[-0.5, -0.3, -0.1], affinity=[1.6, 1.3, 1.05], grounding=[0.16, 0.22, 0.29])
    trained = [attention_summary(with_controlled(with_curves(base, s, **naive), s, distance=[-0.4, -0.2, -0.1],
                                                 given_similarity=[0.0, 0.0, 0.0], referent=[0.0, 0.0, 0.0],
                                                 thematic=[0.0, 0.0, 0.0])) for s in range(3)]
    got = by_name(attention_findings("ort", trained))
    for name in ("proximity", "thematic_affinity", "grounding"):
        assert got[name]["verdict"] == "inconclusive", got[name]["measured"]
    assert "distance_given_similarity" in got["proximity"]["measure"]
    assert got["proximity"]["measured"][0]["quantity"].startswith("controlled correlation")
    assert "referent effect" in got["grounding"]["measure"]
    assert "per_image.cluster" in got["thematic_affinity"]["measure"]
    # and where they show the effect, it holds
    planted = [attention_summary(with_controlled(base, s, given_similarity=[-0.3, -0.2, -0.05],
                                                 referent=[0.05, 0.15, 0.3], thematic=[0.2, 0.1, 0.0]))
               for s in range(3)]
    got = by_name(attention_findings("ort", planted))
    for name in ("proximity", "thematic_affinity", "grounding"):
        assert got[name]["verdict"] == "holds", got[name]["measured"]
    effect = got["grounding"]["measured"][0]
    assert effect["quantity"] == "referent effect, last layer"
    assert effect["estimate"] == pytest.approx(np.mean([s["referent_effect"]["values"][-1] for s in planted]))
    # without features the partial measure is None: the per-image distance is used, and said so
    only = [attention_summary(with_controlled(base, s, distance=[-0.3, -0.2, -0.05])) for s in range(3)]
    got = by_name(attention_findings("ort", only))
    assert got["proximity"]["verdict"] == "holds" and "per_image.distance" in got["proximity"]["measure"]


def test_findings_fall_back_clearly_without_the_controlled_measures(analyses):
    summaries = [attention_summary(with_curves(analyses["flat"][0], s, spearman=[-0.5, -0.3, -0.1], noise=0.01))
                 for s in range(3)]
    assert summaries[0]["proximity_controlled"] is None and summaries[0]["referent_effect"] is None
    got = by_name(attention_findings("ort", summaries))
    assert got["proximity"]["verdict"] == "holds" and "absent" in got["proximity"]["measure"]
    assert "absent" in got["grounding"]["measure"] and "absent" in got["thematic_affinity"]["measure"]


def test_controlled_measure_rows_are_checked():
    from geocap.study.findings import controlled_curve

    curve = controlled_curve(rows([0.1, 0.3], half=1.959963984540054 * 0.05))
    assert curve["values"] == pytest.approx([0.1, 0.3]) and curve["se"] == pytest.approx([0.05, 0.05])
    assert curve["change"] == pytest.approx(0.2) and curve["change_se"] == pytest.approx(0.05 * np.sqrt(2))
    assert controlled_curve(None) is None
    with pytest.raises(ValueError, match="layer 2"):
        controlled_curve(rows([0.1]) + [{"mean": 0.2}])


def test_untrained_control_says_whether_an_effect_is_learned(analyses):
    falling = [attention_summary(a) for a in analyses["falling"]]
    flat = [attention_summary(a) for a in analyses["flat"]]
    learned = by_name(attention_findings("ort", falling, flat))["entropy_cross"]
    control = learned["control"][0]
    assert control["kind"] == "untrained" and control["learned"] == "holds"
    assert control["estimate"] == pytest.approx(np.mean([s["entropy_cross"]["change"] for s in flat]))
    assert control["difference"] == pytest.approx(learned["measured"][0]["estimate"] - control["estimate"])
    assert control["difference_ci95"][1] < 0
    same = by_name(attention_findings("ort", falling, falling))["entropy_cross"]
    assert same["verdict"] == "holds" and same["control"][0]["learned"] == "inconclusive"   # not learned
    assert same["control"][0]["difference"] == 0.0
    with pytest.raises(ValueError, match="untrained"):
        attention_findings("ort", falling, flat[:2])


# -- the blind captioner ----------------------------------------------------------------------------------

def test_blind_captioner_states_the_most_frequent_relation_of_the_categories_present(synth):
    from geocap.metrics.relations import find_relations
    from geocap.study.blind import BlindCaptioner

    truth = load_relation_truth(synth[0])
    lexicon = truth.lexicon
    noun = {c: " ".join(t) for t, c in sorted(lexicon.nouns.items(), key=lambda x: -len(x[0]))}
    a, b, c = sorted(noun)[:3]
    train = [f"a {noun[a]} left of a {noun[b]}"] * 3 + [f"a {noun[a]} right of a {noun[b]}"] * 2 + \
        [f"a {noun[b]} above a {noun[c]}"] * 5 + [f"a {noun[a]} left of a {noun[a]}"] * 9   # same category: not counted
    blind = BlindCaptioner.fit(train, truth)
    assert blind.choose([a, b]) == (a, "left of", b)                  # 3 uses beat 2
    assert blind.choose([a, b, c]) == (b, "above", c)                 # 5 beat 3
    assert blind.choose([a, c]) is None and blind.choose([a, a]) is None
    caption = blind.caption([b, a, a])
    assert [(u.subject, u.relation, u.object) for u in find_relations(caption, lexicon)] == [(a, "left of", b)]
    assert find_relations(blind.caption([a, c]), lexicon) == []       # no counted pair present: no relation
    assert blind.restrict(["above", "below"]).choose([a, b, c]) == (b, "above", c)
    assert blind.restrict(["above", "below"]).choose([a, b]) is None
    with pytest.raises(ValueError, match="none of"):
        blind.restrict(["inside"])
    with pytest.raises(ValueError, match="no relation"):
        BlindCaptioner.fit(["a cat"], truth)
    with pytest.raises(ValueError, match="without objects"):
        blind.caption([])


def test_blind_captions_of_real_references_are_read_back_and_scored(synth):
    """On the synthetic references the blind captions state one relation each, which the judge parses
    back as the rule chose it; its accuracy lies between 0 and 1 (it knows categories, not boxes)."""
    from geocap.metrics.relations import find_relations
    from geocap.study.blind import BlindCaptioner

    truth_path, refs = synth
    truth = load_relation_truth(truth_path)
    blind = BlindCaptioner.fit([c for r in refs.values() for c in r], truth)
    captions = {i: blind.caption(truth.images[i].categories) for i in refs}
    for i, caption in captions.items():
        chosen = blind.choose(truth.images[i].categories)
        uses = [(u.subject, u.relation, u.object) for u in find_relations(caption, truth.lexicon)]
        assert uses == ([] if chosen is None else [chosen])
    score = relation_accuracy(captions, truth)
    assert score.uses > len(refs) // 2 and 0 < score.accuracy < 1


def test_figure_bands_stay_in_the_measure_s_range_and_two_seeds_get_a_note(study, tmp_path):
    from geocap.study.report import clipped_band, few_seeds_note

    rows = [{"layer": 1, "estimate": 0.5, "ci95": [-1.3, 2.0]}, {"layer": 2, "estimate": 0.9, "ci95": [0.8, 1.1]},
            {"layer": 3, "estimate": None, "ci95": None}]
    lo, hi = clipped_band(rows, (0.0, 1.0))
    assert list(lo[:2]) == [0.0, 0.8] and list(hi[:2]) == [1.0, 1.0] and np.isnan(lo[2]) and np.isnan(hi[2])
    lo, hi = clipped_band(rows, (None, None))
    assert list(lo[:2]) == [-1.3, 0.8] and list(hi[:2]) == [2.0, 1.1]
    note = few_seeds_note(study["variants"])                   # the fixture's study has two seeds
    assert note.startswith("2 seeds per variant give no useful interval")
    write_report(study, tmp_path)
    assert note in (tmp_path / "study.md").read_text()
    three = {v: dict(e, seeds=e["seeds"] * 3) for v, e in study["variants"].items()}
    assert few_seeds_note(three) is None
