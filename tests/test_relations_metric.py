"""geocap.metrics.relations: relation-word accuracy of captions against the synthetic ground truth."""
from __future__ import annotations

import json

import pytest

from geocap.data.synth import CATEGORY_IDS, RELATIONS, generate_synthetic
from geocap.metrics import find_relations, load_relation_truth, relation_accuracy

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
FLIP_PHRASE = {("to", "the", "left", "of"): ["to", "the", "right", "of"], ("left", "of"): ["right", "of"],
               ("to", "the", "right", "of"): ["to", "the", "left", "of"], ("right", "of"): ["left", "of"],
               ("above",): ["below"], ("over",): ["under"],
               ("below",): ["above"], ("under",): ["over"], ("beneath",): ["above"]}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(path of ground_truth.json, its JSON): 60 synthetic images, D = 8."""
    root = tmp_path_factory.mktemp("relsynth")
    generate_synthetic(root, images=60, seed=1, feature_dim=8, progress=False)
    path = root / "ground_truth.json"
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def truth(synth):
    return load_relation_truth(synth[0])


def _tiny(tmp_path, synth, objects):
    """A ground-truth file of one image (id 1) holding ``objects`` = [(category name, box)]."""
    data = dict(synth[1])
    data["images"] = [{"image_id": 1,
                       "objects": [{"category_id": CATEGORY_IDS[c], "box": list(b)} for c, b in objects]}]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return load_relation_truth(path)


def test_reference_captions_parse_as_written_and_score_one(synth, truth):
    _, gt = synth
    refs, expected_uses, with_relation = {}, 0, 0
    for image in gt["images"]:
        refs[image["image_id"]] = [" ".join(c["tokens"]) for c in image["captions"]]
        for c in image["captions"]:
            cats = [m["category_id"] for m in c["mentions"]]
            written = [(r["relation"], cats[r["subject"]], cats[r["object"]], r["start"], r["end"])
                       for r in c["relations"]]
            parsed = [(u.relation, u.subject, u.object, u.start, u.end)
                      for u in find_relations(" ".join(c["tokens"]), truth.lexicon)]
            assert parsed == written, c["tokens"]
            expected_uses += len(written)
            with_relation += bool(written)
    result = relation_accuracy(refs, truth)
    assert result.uses == expected_uses > 50 and result.correct == result.uses and result.accuracy == 1.0
    assert result.unresolved == 0
    assert result.captions == 5 * len(gt["images"]) and result.captions_with_relation == with_relation
    assert 0 < result.fraction_with_relation < 1
    # the raw (capitalised, full stop) form parses the same
    raw = {i["image_id"]: [c["caption"] for c in json.loads((synth[0].parent / "captions_coco.json").read_text())
                           ["annotations"] if c["image_id"] == i["image_id"]] for i in gt["images"][:10]}
    assert relation_accuracy(raw, truth).accuracy == 1.0


def test_flipped_relation_words_are_wrong(synth, truth):
    _, gt = synth
    flipped_caps, kept, flipped = {}, 0, 0
    for image in gt["images"]:
        out = []
        for c in image["captions"]:
            tokens = list(c["tokens"])
            for r in c["relations"][:1]:             # triples share one phrase
                if r["relation"] in FLIP:
                    tokens[r["start"]:r["end"]] = FLIP_PHRASE[tuple(tokens[r["start"]:r["end"]])]
            for r in c["relations"]:
                flipped += r["relation"] in FLIP
                kept += r["relation"] not in FLIP
            out.append(" ".join(tokens))
        flipped_caps[image["image_id"]] = out
    result = relation_accuracy(flipped_caps, truth)
    assert flipped > 10 and kept > 10
    assert result.uses == kept + flipped and result.correct == kept and result.unresolved == 0
    assert result.accuracy == pytest.approx(kept / (kept + flipped))
    for name in FLIP:
        assert result.per_relation[name]["correct"] == 0
    for name in set(RELATIONS) - set(FLIP):
        assert result.per_relation[name]["correct"] == result.per_relation[name]["uses"]


def test_geometry_decides(tmp_path, synth):
    # cup left of bowl (shared height); table below both, sharing their width
    t = _tiny(tmp_path, synth, [("cup", (0.1, 0.2, 0.2, 0.3)), ("bowl", (0.5, 0.2, 0.7, 0.3)),
                                ("table", (0.05, 0.6, 0.9, 0.9)), ("cup", (0.25, 0.22, 0.3, 0.28))])
    score = lambda *caps: relation_accuracy({1: list(caps)}, t)  # noqa: E731
    assert score("two cups are to the left of a bowl").accuracy == 1.0     # both cups: all pairs hold
    assert score("a bowl is right of two cups", "a mug is left of a bowl").accuracy == 1.0   # synonyms
    assert score("two cups are right of a bowl").accuracy == 0.0
    assert score("a bowl above a table", "two mugs over a table").accuracy == 1.0
    assert score("a table is above a bowl").correct == 0
    r = score("a cup and a bowl are above a table")                          # a triple: two uses
    assert (r.uses, r.correct) == (2, 2)
    r = score("a cup is on a table next to a bowl")                          # two phrases: cup-table, table-bowl
    assert (r.uses, r.correct, r.unresolved) == (2, 0, 0)


def test_one_relation_definition_for_captions_and_metric(tmp_path, synth, monkeypatch):
    """The synthetic captions and the metric both take the relations from geocap.data.relations:
    a changed threshold changes the relations the captions are written from, the thresholds the
    ground truth records, and the metric's judgement alike."""
    import geocap.data.relations as relations

    objects = [("cup", (0.1, 0.2, 0.2, 0.3)), ("bowl", (0.23, 0.2, 0.43, 0.3))]   # gap 0.03 = 0.3 x the cup's width
    caption = {1: ["a cup is next to a bowl"]}
    assert relation_accuracy(caption, _tiny(tmp_path, synth, objects)).accuracy == 1.0
    monkeypatch.setattr(relations, "NEXT_TO_GAP", 0.1)
    with pytest.raises(ValueError, match="relation threshold next_to_gap is 0.5 but geocap.data.relations uses 0.1"):
        load_relation_truth(synth[0])                 # written under the old definition: refused
    changed = tmp_path / "changed"
    generate_synthetic(changed, images=60, seed=1, feature_dim=8, progress=False)
    gt = json.loads((changed / "ground_truth.json").read_text())
    assert gt["parameters"]["relation_thresholds"]["next_to_gap"] == 0.1
    refs = {image["image_id"]: [" ".join(c["tokens"]) for c in image["captions"]] for image in gt["images"]}
    assert relation_accuracy(refs, load_relation_truth(changed / "ground_truth.json")).accuracy == 1.0
    assert refs != {image["image_id"]: [" ".join(c["tokens"]) for c in image["captions"]]
                    for image in synth[1]["images"]}        # fewer pairs are "next to": other captions
    tiny = dict(synth[1], parameters=gt["parameters"])
    assert relation_accuracy(caption, _tiny(tmp_path, (None, tiny), objects)).accuracy == 0.0


def test_unresolvable_mentions_count_as_wrong(tmp_path, synth):
    t = _tiny(tmp_path, synth, [("cup", (0.1, 0.2, 0.2, 0.3)), ("bowl", (0.5, 0.2, 0.7, 0.3))])
    cases = ["a zebra is left of a bowl",          # unknown noun: no subject
             "a cup is left of",                   # no object
             "left of a bowl",                     # nothing before the phrase
             "a dog is left of a bowl",            # a category the image does not hold
             "a cup is left of a cup"]             # the same group on both sides
    r = relation_accuracy({1: cases}, t)
    assert (r.uses, r.correct, r.unresolved, r.captions_with_relation) == (5, 0, 5, 5)
    assert r.accuracy == 0.0 and r.per_relation["left of"] == {"uses": 5, "correct": 0}
    ok = relation_accuracy({1: cases + ["a cup to the left of a bowl"]}, t)
    assert (ok.uses, ok.correct, ok.unresolved) == (6, 1, 5)


def test_no_relations_and_empty_input(truth, synth):
    empty = relation_accuracy({}, truth)
    assert (empty.captions, empty.uses, empty.accuracy, empty.fraction_with_relation) == (0, 0, None, None)
    assert json.loads(json.dumps(empty.as_dict()))["relation_accuracy"] is None     # null, never NaN
    image = synth[1]["images"][0]
    place = synth[1]["clusters"][image["theme_id"]]["place"]
    none = relation_accuracy({image["image_id"]: ["", f"a photo of a cup {place}", "a cup and a bowl"]}, truth)
    assert (none.captions, none.uses, none.captions_with_relation, none.accuracy) == (3, 0, 0, None)
    assert none.fraction_with_relation == 0.0


def test_bad_input(truth, synth, tmp_path):
    with pytest.raises(ValueError, match="image 123456"):
        relation_accuracy({123456: "a cup on a table"}, truth)
    with pytest.raises(ValueError, match="image 1: a caption must be a string"):
        relation_accuracy({1: [None]}, truth)
    with pytest.raises(ValueError, match="captions must map"):
        relation_accuracy(["a cup"], truth)
    with pytest.raises(ValueError, match="missing"):
        load_relation_truth(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    for change, message in [(lambda d: d.update(format="other"), "not a geocap-synth-ground-truth"),
                            (lambda d: d["parameters"]["relation_thresholds"].update(on_depth=0.4), "on_depth"),
                            (lambda d: d["relations"].update(near=["near"]), "'near'"),
                            (lambda d: d["images"][0]["objects"][0].pop("box"), "image 1: malformed")]:
        data = json.loads(synth[0].read_text())
        change(data)
        bad.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            load_relation_truth(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_relation_truth(bad)
