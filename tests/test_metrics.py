"""geocap.metrics: CIDEr-D equal to pycocoevalcap's Cider, PTB tokenisation, caption metrics."""
import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from geocap.metrics import CiderD, cider_d, python_ptb_tokenize, tokenize_captions
from geocap.metrics import evaluate as ev
from geocap.metrics import tokenize as tk

pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")


def reference_cider(gts, res):
    mean, per = pycoco_cider.Cider().compute_score(gts, {k: [v] for k, v in res.items()})
    return mean, np.asarray(per)


def assert_equal_to_pycoco(gts, res):
    mean_ref, per_ref = reference_cider(gts, res)
    mean, per = cider_d(gts, res)
    assert per.shape == per_ref.shape
    np.testing.assert_allclose(per, per_ref, rtol=0, atol=1e-9)
    assert abs(mean - mean_ref) <= 1e-9
    return per


HANDCRAFTED_GTS = {
    1: ["a dog runs on the grass", "a brown dog running in a field", "the dog is running"],
    2: ["two cats sleep on a couch"],  # single reference
    3: ["a man a man a man rides a horse", "a man riding a horse on a beach"],  # repeats
    4: ["a red bus", "a red double decker bus on a street in london"],
    5: ["people standing around a table with food", "a group of people at a table"],
}
HANDCRAFTED_RES = {
    1: "a dog runs on the grass",  # identical to a reference
    2: "cats",  # much shorter than the reference
    3: "a man a man a man a man a man a man",  # repeated words, clipped by the references
    4: "a red bus on a street in london with many people walking on the street nearby",  # longer
    5: "",  # empty candidate
}


def test_handcrafted_equal_to_pycocoevalcap():
    per = assert_equal_to_pycoco(HANDCRAFTED_GTS, HANDCRAFTED_RES)
    assert per[4] == 0.0  # empty candidate
    assert per[0] == per.max() and per[0] > 1.0


def test_single_image_and_unseen_words():
    # N = 1: log(N) = 0, every idf weight is 0, every score 0 (as in pycocoevalcap)
    per = assert_equal_to_pycoco({"a": ["x y z"]}, {"a": "x y z"})
    assert per[0] == 0.0
    per = assert_equal_to_pycoco({"a": ["x y z"], "b": ["p q"]}, {"a": "u v w", "b": "p q"})
    assert per[0] == 0.0 and per[1] > 0.0


def test_empty_references_and_one_word_captions():
    gts = {0: ["", "dog"], 1: ["cat"], 2: ["a b", ""]}
    res = {0: "dog", 1: "", 2: "b"}
    assert_equal_to_pycoco(gts, res)
    # no reference n-gram at all: pycocoevalcap fails (max() of an empty sequence); we give 0
    with pytest.raises(ValueError):
        reference_cider({0: [""], 1: [""]}, {0: "a", 1: ""})
    np.testing.assert_array_equal(cider_d({0: [""], 1: [""]}, {0: "a", 1: ""})[1], [0.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_random_sets_equal_to_pycocoevalcap(seed):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(rng.randint(3, 40))]

    def sent(lo, hi):
        return " ".join(rng.choices(vocab, k=rng.randint(lo, hi)))

    gts = {i: [sent(0, 16) for _ in range(rng.randint(1, 6))] for i in range(rng.randint(2, 60))}
    res = {i: sent(0, 20) for i in gts}
    assert_equal_to_pycoco(gts, res)


words = st.sampled_from(["a", "b", "c", "d", "e"])
caption = st.lists(words, max_size=9).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.tuples(st.lists(caption, min_size=1, max_size=4), caption),
                     min_size=1, max_size=6))
def test_property_equal_to_pycocoevalcap(data):
    gts = {i: refs for i, (refs, _) in enumerate(data)}
    assume(any(r for refs in gts.values() for r in refs))  # pycocoevalcap needs some n-gram
    res = {i: cand for i, (_, cand) in enumerate(data)}
    per = assert_equal_to_pycoco(gts, res)
    assert np.all(per >= 0.0) and np.all(np.isfinite(per))


def test_fixed_corpus_mode():
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(15)]
    corpus = {i: [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(5)]
              for i in range(30)}
    scorer = CiderD(corpus)
    # scoring every corpus image once equals the per-call (pycocoevalcap) mode
    res = {i: " ".join(rng.choices(vocab, k=rng.randint(0, 12))) for i in corpus}
    mean, per = scorer.corpus_score(res)
    mean_ref, per_ref = reference_cider(corpus, res)
    np.testing.assert_allclose(per, per_ref, rtol=0, atol=1e-9)
    assert abs(mean - mean_ref) <= 1e-9
    # batches with repeated images (several samples per image) score each sample
    # independently with the corpus document frequencies
    ids = [3, 3, 3, 17, 0, 17]
    cands = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in ids]
    batch = scorer.scores(cands, ids)
    singles = [scorer.scores([c], [i])[0] for c, i in zip(cands, ids)]
    np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-12)
    # the corpus document frequencies differ from those of a per-call subset
    sub = {i: corpus[i] for i in (3, 17)}
    _, per_sub = cider_d(sub, {3: cands[0], 17: cands[3]})
    assert not np.allclose(per_sub, batch[[0, 3]])
    assert scorer.scores([], []).shape == (0,)
    with pytest.raises(KeyError):
        scorer.scores(["a"], [999])


def test_cider_input_validation():
    with pytest.raises(ValueError):
        cider_d({1: ["a"]}, {2: "a"})
    with pytest.raises(ValueError):
        CiderD({1: []})
    with pytest.raises(ValueError):
        cider_d({1: ["a"], 2: ["b"]}, {1: ["a", "b"], 2: ["b"]})


# ------------------------------------------------------------------ tokenisation

PLAIN_CAPTIONS = [
    "A man's dog (brown) is running.",
    'Two people don\'t like "this" thing!',
    "A black-and-white cat; sitting on a [mat] -- near 3.5 m/s & stuff...",
    "It's a couple's I'm we're they've she'll he'd",
    "cannot gonna   Hello,world  : ok?",
    "the U.S. flag e.g. Mr. Smith",
    "a {brace} and $5 50% off",
    "A group of people standing around a table.",
    "Two dogs' toys, 1,000 balls at 10:30.",
    "A man riding a wave on top of a surfboard .",
    "The kids' room is blue!!",
    "'hello' said the dog",
    "A DOG RUNS.\nA cat sleeps",
    "",
]


def test_python_fallback_alone():
    assert python_ptb_tokenize("A man's dog (brown) is running.") == \
        "a man 's dog -lrb- brown -rrb- is running"
    assert python_ptb_tokenize('Two people don\'t like "this" thing!') == \
        "two people do n't like this thing"
    assert python_ptb_tokenize("Hello,world -- 1,000 birds; ok?") == "hello world 1,000 birds ok"
    assert python_ptb_tokenize("A U.S. flag ...") == "a u.s. flag"
    assert python_ptb_tokenize("  ") == ""
    out, backend = tokenize_captions({1: ["A Dog.", "a cat!"], 2: "Birds, flying."}, "python")
    assert backend == "python"
    assert out == {1: ["a dog", "a cat"], 2: ["birds flying"]}


@pytest.mark.skipif(not tk.java_available(), reason="java not installed")
def test_python_fallback_matches_ptbtokenizer():
    pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    caps = {i: [c] for i, c in enumerate(PLAIN_CAPTIONS)}
    java, backend = tokenize_captions(caps, "java")
    assert backend == "java"
    for i, c in enumerate(PLAIN_CAPTIONS):
        assert python_ptb_tokenize(c) == java[i][0], c


def test_auto_backend_without_java(monkeypatch):
    monkeypatch.setattr(tk, "java_available", lambda: False)
    out, backend = tokenize_captions({"x": ["A Cat."]})
    assert backend == "python" and out == {"x": ["a cat"]}


# ------------------------------------------------------------------ caption metrics

GTS = {
    10: ["A dog runs on the grass.", "A brown dog running in a field."],
    11: ["Two cats sleep on a couch.", "Two cats sleeping on a sofa."],
    12: ["A man rides a horse on the beach.", "A person riding a horse."],
}
PERFECT = {10: "A dog runs on the grass.", 11: "Two cats sleep on a couch.",
           12: "A man rides a horse on the beach."}
BAD = {10: "a plate of food", 11: "a red bus", 12: "a kite in the sky"}
ALWAYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(tk, "java_available", lambda: False)
    monkeypatch.setattr(ev, "java_available", lambda: False)


def test_caption_metrics_without_java(no_java):
    metrics, skipped = ev.caption_metrics(GTS, PERFECT)
    assert set(metrics) == ALWAYS
    assert set(skipped) == {"METEOR", "SPICE", "tokenizer"}
    assert "java" in skipped["METEOR"] and "java" in skipped["SPICE"]
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ROUGE_L"] == pytest.approx(1.0)
    assert metrics["CIDEr"] > 3.0
    bad, _ = ev.caption_metrics(GTS, BAD)
    assert bad["CIDEr"] < 0.5 and bad["Bleu_4"] < 1e-3
    assert set(bad) == ALWAYS


@pytest.mark.skipif(not tk.java_available(), reason="java not installed")
def test_caption_metrics_with_java():
    metrics, skipped = ev.caption_metrics(GTS, PERFECT)
    assert ALWAYS | {"METEOR"} <= set(metrics) <= set(ev.METRIC_NAMES)
    assert "tokenizer" not in skipped
    assert set(metrics).isdisjoint(skipped)
    assert set(metrics) | set(skipped) == set(ev.METRIC_NAMES)
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["METEOR"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["CIDEr"] > 3.0
    if not ev.spice_models_present():
        assert "not installed" in skipped["SPICE"]


@pytest.mark.skipif(not tk.java_available(), reason="java not installed")
def test_meteor_failure_is_reported_as_skipped(monkeypatch):
    meteor_mod = pytest.importorskip("pycocoevalcap.meteor.meteor")
    monkeypatch.setattr(meteor_mod, "METEOR_JAR", "no-such-meteor.jar")
    metrics, skipped = ev.caption_metrics(GTS, PERFECT, spice=False)
    assert "METEOR" not in metrics
    assert "METEOR" in skipped and "failed" in skipped["METEOR"]
    assert skipped["SPICE"] == "disabled by the caller"
    assert ALWAYS <= set(metrics)


def test_caption_metrics_validation(no_java):
    with pytest.raises(ValueError):
        ev.caption_metrics(GTS, {10: "a dog"})
    with pytest.raises(ValueError):
        ev.caption_metrics({1: []}, {1: "a"})


def test_write_results_coco_format(tmp_path):
    res = {np.int64(5): "a dog", 7: ["a cat"]}
    path = ev.write_results(tmp_path / "sub" / "results.json", res)
    data = json.loads(path.read_text())
    assert data == [{"image_id": 5, "caption": "a dog"}, {"image_id": 7, "caption": "a cat"}]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left
    ev.write_results(path, {1: "x"})  # overwrite in place
    assert json.loads(path.read_text()) == [{"image_id": 1, "caption": "x"}]
    with pytest.raises(ValueError):
        ev.write_results(path, {1: ["x", "y"]})
    assert json.loads(path.read_text()) == [{"image_id": 1, "caption": "x"}]
