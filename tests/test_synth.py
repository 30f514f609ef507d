"""geocap.data.synth: the synthetic scenes are valid, their captions true of their boxes, the
features calibrated, the files readable by the public tools, and everything deterministic.

The geometric definitions are re-implemented here, pair by pair in plain Python, independently
of the vectorised ``relation_matrix``.
"""
import argparse
import contextlib
import io
import json
import math
import os

import h5py
import numpy as np
import pytest

from geocap.data import synth as S

SEEDS = (0, 1, 2)


# ----------------------------------------------------------------------------- independent geometry


def holds(relation: str, a, b) -> bool:
    """Whether "box a <relation> box b", from the definitions in the docstring of geocap.data.relations."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    share_height = min(ay2, by2) - max(ay1, by1)
    share_width = min(ax2, bx2) - max(ax1, bx1)
    if relation == "left of":
        return ax2 <= bx1 and share_height > 0
    if relation == "right of":
        return holds("left of", b, a)
    if relation == "above":
        return ay2 <= by1 and share_width > 0
    if relation == "below":
        return holds("above", b, a)
    if relation == "on":
        depth = ay2 - by1                                   # how far A's bottom is below B's top
        return 0 < depth <= 0.3 * (by2 - by1) and ay1 < by1 and bx1 <= ax1 and ax2 <= bx2
    if relation == "inside":
        contained = bx1 <= ax1 and by1 <= ay1 and ax2 <= bx2 and ay2 <= by2
        return contained and (ax2 - ax1) * (ay2 - ay1) <= 0.5 * (bx2 - bx1) * (by2 - by1)
    if relation == "next to":
        gap = max(ax1, bx1) - min(ax2, bx2)
        return (0 <= gap <= 0.5 * min(ax2 - ax1, bx2 - bx1)
                and share_height >= 0.5 * min(ay2 - ay1, by2 - by1))
    raise AssertionError(relation)


@pytest.fixture(scope="module")
def images():
    """Scenes and captions (no features) for a few seeds."""
    return [im for seed in SEEDS for im in S.generate_scenes(300, seed)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = S.generate_synthetic(out, images=120, seed=5, feature_dim=32, progress=False)
    with open(out / "ground_truth.json") as f:
        truth = json.load(f)
    return out, summary, truth


# ----------------------------------------------------------------------------- determinism


def _digest(images):
    return [(im.image_id, im.split, im.scene.width, im.scene.height, im.scene.categories.tolist(),
             im.scene.boxes.tobytes(), im.scene.part_of.tolist(), [(c.raw, c.refs) for c in im.captions])
            for im in images]


def test_same_seed_same_scenes_and_prefix_stable():
    a, b = S.generate_scenes(60, seed=7), S.generate_scenes(60, seed=7)
    assert _digest(a) == _digest(b)
    assert _digest(S.generate_scenes(25, seed=7)) == _digest(a[:25])      # a run of n = the first n
    assert _digest(S.generate_scenes(60, seed=8)) != _digest(a)


def test_written_files_are_deterministic(tmp_path):
    for name in ("a", "b"):
        S.generate_synthetic(tmp_path / name, images=40, seed=3, feature_dim=16, progress=False)
    for key in ("captions", "karpathy", "ground_truth"):
        file = S.FILES[key]
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    with h5py.File(tmp_path / "a" / "features.h5", "r") as fa, h5py.File(tmp_path / "b" / "features.h5", "r") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)


# ----------------------------------------------------------------------------- features


def test_relu_cosine_matches_monte_carlo():
    rng = np.random.default_rng(0)
    x, e = rng.standard_normal((2, 1_000_000))
    for rho, bias in ((0.0, -0.03), (0.4, -0.3), (0.8, 0.5)):
        y = rho * x + math.sqrt(1 - rho * rho) * e
        fx, fy = np.maximum(x + bias, 0), np.maximum(y + bias, 0)
        assert S.relu_cosine(rho, bias) == pytest.approx((fx * fy).mean() / (fx * fx).mean(), abs=3e-3)


def test_feature_model_hits_the_targets_analytically():
    m = S.feature_model()
    assert m.cluster_scale ** 2 + m.category_scale ** 2 + m.noise_scale ** 2 == pytest.approx(1.0)
    assert S.relu_cosine(0.0, m.bias) == pytest.approx(0.31, abs=1e-6)
    assert S.relu_cosine(m.cluster_scale ** 2, m.bias) == pytest.approx(0.50, abs=1e-6)
    assert S.relu_cosine(m.cluster_scale ** 2 + m.category_scale ** 2, m.bias) == pytest.approx(0.60, abs=1e-6)


@pytest.mark.parametrize("dim", [2048, 256])
def test_cosine_similarities_are_calibrated(images, dim):
    records = []
    for record in S.iter_features(images[:200], seed=0, feature_dim=dim):
        records.append(record)
    feats = np.concatenate([r.features for r in records])[:1500]
    cats = np.concatenate([r.labels for r in records])[:1500]
    assert feats.dtype == np.float32 and feats.shape[1] == dim and (feats >= 0).all()
    sims = S.similarity_by_pair_type(feats, cats)
    assert sims["same cluster"] == pytest.approx(0.50, abs=0.05)
    assert sims["different clusters"] == pytest.approx(0.31, abs=0.05)
    assert sims["same category"] == pytest.approx(0.60, abs=0.05)
    if dim == 2048:                                      # the default dimension: tight
        assert sims["same cluster"] == pytest.approx(0.50, abs=0.01)
        assert sims["different clusters"] == pytest.approx(0.31, abs=0.01)


def test_prototypes_are_orthogonal_and_standardised():
    clusters, cats = S.prototypes(64, seed=0)
    protos = np.concatenate([clusters, cats])
    np.testing.assert_allclose(protos.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(protos @ protos.T / 64, np.eye(len(protos)), atol=1e-10)
    small = np.concatenate(S.prototypes(8, seed=0))                 # too few dimensions to be orthogonal
    np.testing.assert_allclose((small ** 2).mean(axis=1), 1, atol=1e-12)


# ----------------------------------------------------------------------------- scenes


def test_boxes_are_valid_and_scenes_sized(images):
    sizes = set(S.IMAGE_SIZES)
    for im in images:
        s = im.scene
        n = len(s.categories)
        assert S.MIN_OBJECTS <= n <= S.MAX_OBJECTS
        assert s.boxes.dtype == np.float32 and s.boxes.shape == (n, 4) and s.part_of.shape == (n,)
        assert (s.width, s.height) in sizes
        assert (s.boxes >= 0).all() and (s.boxes <= 1).all()
        assert (s.boxes[:, 2] - s.boxes[:, 0] >= S.MIN_SIZE - 1e-6).all()
        assert (s.boxes[:, 3] - s.boxes[:, 1] >= S.MIN_SIZE - 1e-6).all()


def test_parts_lie_inside_their_whole(images):
    parts = 0
    for im in images:
        s = im.scene
        for i, whole in enumerate(s.part_of.tolist()):
            category = S.CATEGORIES[s.categories[i]]
            if whole < 0:
                assert not category.part_only, category.name
                continue
            parts += 1
            whole_name = S.CATEGORIES[s.categories[whole]].name
            assert category.name in {p for p, _, _ in S.PARTS[whole_name]}
            assert s.part_of[whole] == -1
            assert holds("inside", s.boxes[i], s.boxes[whole]), (im.image_id, i, whole)
    assert parts > 100


def test_scenes_follow_their_theme(images):
    objects = [(int(S.CLUSTER_OF[k]), im.scene.theme) for im in images
               for k, p in zip(im.scene.categories, im.scene.part_of) if p < 0]
    share = np.mean([cluster == theme for cluster, theme in objects])
    assert 0.75 < share < 0.9                                    # 0.8 by design; the rest distractors
    assert len(S.CLUSTERS) == 6 and 20 <= len(S.CATEGORIES) <= 28


def test_relation_matrix_agrees_with_the_definitions(images):
    for im in images[:150]:
        boxes = im.scene.boxes
        rel = S.relation_matrix(boxes)
        for r, name in enumerate(S.RELATIONS):
            expected = [[i != j and holds(name, boxes[i], boxes[j]) for j in range(len(boxes))]
                        for i in range(len(boxes))]
            np.testing.assert_array_equal(rel[r], expected, err_msg=f"{name} in image {im.image_id}")


def test_relation_matrix_examples():
    boxes = np.array([[0.1, 0.5, 0.3, 0.9],     # 0 a ground object
                      [0.35, 0.6, 0.5, 0.9],    # 1 next to 0, right of it
                      [0.15, 0.1, 0.25, 0.2],   # 2 high above 0
                      [0.15, 0.45, 0.25, 0.55],  # 3 resting on 0
                      [0.12, 0.7, 0.2, 0.85]])  # 4 inside 0
    rel = {name: S.relation_matrix(boxes)[r] for r, name in enumerate(S.RELATIONS)}
    assert rel["left of"][0, 1] and rel["right of"][1, 0] and rel["next to"][0, 1] and rel["next to"][1, 0]
    assert rel["above"][2, 0] and rel["below"][0, 2] and not rel["on"][2, 0]
    assert rel["on"][3, 0] and not rel["inside"][3, 0] and not rel["above"][3, 0]
    assert rel["inside"][4, 0] and not rel["inside"][0, 4]
    assert not any(rel[name][i, i] for name in rel for i in range(5))


# ----------------------------------------------------------------------------- captions


def test_every_relation_word_is_true_of_its_boxes(images):
    uses = 0
    for im in images:
        boxes = im.scene.boxes
        for c in im.captions:
            for r in c.relations:
                assert " ".join(c.tokens[r.start:r.end]) in S.RELATION_PHRASES[r.relation], c.raw
                for a in c.mentions[r.subject].objects:
                    for b in c.mentions[r.object].objects:
                        assert holds(r.relation, boxes[a], boxes[b]), (im.image_id, c.raw, a, b)
                uses += 1
    assert uses > 1000


def test_every_relation_occurs(images):
    seen = {r.relation for im in images for c in im.captions for r in c.relations}
    assert seen == set(S.RELATIONS)


def test_referents_point_at_objects_of_the_named_category(images):
    for im in images:
        cats = im.scene.categories
        for c in im.captions:
            assert len(c.refs) == len(c.tokens) == len(c.raw[:-1].split()) and c.raw.endswith(".")
            assert all(-1 <= ref < len(cats) for ref in c.refs)
            in_mention = set()
            for m in c.mentions:
                head = m.objects[0]
                nouns = [t for t in range(m.start + 1, m.end)]
                assert all(c.refs[t] == head for t in nouns) and c.refs[m.start] == -1
                assert cats[head] == m.category
                category = S.CATEGORIES[m.category]
                noun = " ".join(c.tokens[m.start + 1:m.end])
                assert noun in {(s if m.count == 1 else p) for s, p in category.names}, c.raw
                in_mention.update(range(m.start, m.end))
            assert all(ref == -1 for t, ref in enumerate(c.refs) if t not in in_mention)


def test_counts_are_correct(images):
    plural = 0
    for im in images:
        cats = im.scene.categories.tolist()
        for c in im.captions:
            assert 1 <= len(c.mentions) <= 3
            for m in c.mentions:
                assert list(m.objects) == [i for i, k in enumerate(cats) if k == m.category]
                word = c.tokens[m.start]
                if m.count == 1:
                    assert word in ("a", "an")
                else:
                    assert word == S.NUMBERS[m.count]
                    plural += 1
    assert plural > 500


def test_geometry_blind_guess_loses(images):
    """"left of" vs "right of" cannot be guessed from the categories: predicting each use by the
    majority among the other images' uses with the same (subject, object) categories is right
    about half the time (other images only: one image's captions repeat its facts)."""
    uses = [(k, int(im.scene.categories[c.mentions[r.subject].objects[0]]),
             int(im.scene.categories[c.mentions[r.object].objects[0]]), r.relation == "left of")
            for k, im in enumerate(images) for c in im.captions for r in c.relations
            if r.relation in ("left of", "right of")]
    assert len(uses) > 500
    cells = {}
    for image, a, b, left in uses:
        cells.setdefault((a, b), []).append((image, left))
    right_guesses = 0
    for image, a, b, left in uses:
        others = [other_left for other, other_left in cells[a, b] if other != image]
        right_guesses += (sum(others) * 2 >= len(others)) == left
    assert 0.4 < right_guesses / len(uses) < 0.6
    assert 0.4 < np.mean([left for *_, left in uses]) < 0.6


def test_captions_per_image_and_ids(images):
    for im in images[:300]:
        assert [c.caption_id for c in im.captions] == [5 * (im.image_id - 1) + k + 1 for k in range(5)]
        assert len({c.raw for c in im.captions}) >= 2


# ----------------------------------------------------------------------------- files


def test_only_the_four_files_are_left(written):
    out, summary, _ = written
    assert sorted(os.listdir(out)) == sorted(S.FILES.values())
    assert summary.images == 120 and summary.captions == 600 and summary.bytes > 0
    assert set(summary.files) == set(S.FILES)


def test_coco_captions_load_with_pycocotools(written):
    from pycocotools.coco import COCO

    out, _, truth = written
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "captions_coco.json"))
    assert sorted(coco.imgs) == list(range(1, 121))
    assert len(coco.anns) == 600
    for image in truth["images"][:20]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["image_id"]))
        assert [a["id"] for a in anns] == [c["caption_id"] for c in image["captions"]]
        assert [a["caption"].lower()[:-1].split() for a in anns] == [c["tokens"] for c in image["captions"]]
        img = coco.imgs[image["image_id"]]
        assert (img["width"], img["height"]) == (image["width"], image["height"])
        assert img["file_name"].endswith(".jpg")


def test_karpathy_file_structure(written):
    out, _, truth = written
    with open(out / "dataset_coco.json") as f:
        data = json.load(f)
    assert data["dataset"] == "coco" and len(data["images"]) == 120
    splits = [im["split"] for im in data["images"]]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (96, 12, 12)
    sentids = []
    for i, (im, gt) in enumerate(zip(data["images"], truth["images"])):
        assert set(im) >= {"cocoid", "split", "filename", "filepath", "imgid", "sentences", "sentids"}
        assert im["cocoid"] == gt["image_id"] and im["imgid"] == i and im["split"] == gt["split"]
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert len(im["sentences"]) == 5
        for s, c in zip(im["sentences"], gt["captions"]):
            assert set(s) >= {"tokens", "raw", "sentid"}
            assert s["tokens"] == c["tokens"] and s["sentid"] == c["caption_id"]
            assert all(t == t.lower() and t.isalpha() for t in s["tokens"])
        sentids += im["sentids"]
    assert len(set(sentids)) == 600


def test_readers_take_the_files(written):
    readers = pytest.importorskip("geocap.data.readers")
    out, _, _ = written
    expected = S.caption_set(S.generate_scenes(120, seed=5))
    karpathy = readers.read_karpathy(out / "dataset_coco.json")
    assert karpathy.splits == expected.splits
    assert [(c.image_id, c.caption_id, c.text, c.tokens) for c in karpathy.captions] == \
           [(c.image_id, c.caption_id, c.text, c.tokens) for c in expected.captions]
    coco = readers.read_coco_captions(out / "captions_coco.json")
    assert [(c.image_id, c.caption_id, c.text) for c in coco.captions] == \
           [(c.image_id, c.caption_id, c.text) for c in expected.captions]


def test_ground_truth_sidecar(written):
    _, _, truth = written
    assert [c["name"] for c in truth["categories"]] == S.category_names()
    assert [c["name"] for c in truth["clusters"]] == [c.name for c in S.CLUSTERS]
    assert truth["parameters"]["seed"] == 5 and truth["parameters"]["feature_dim"] == 32
    assert truth["parameters"]["feature_model"]["targets"]["same cluster"] == 0.5
    for image in truth["images"]:
        for obj in image["objects"]:
            cat = truth["categories"][obj["category_id"]]
            assert obj["category"] == cat["name"] and obj["cluster_id"] == cat["cluster_id"]
            assert obj["cluster"] == truth["clusters"][obj["cluster_id"]]["name"]
        for c in image["captions"]:
            assert len(c["refs"]) == len(c["tokens"])
            for m in c["mentions"]:
                for t in range(m["start"] + 1, m["end"]):
                    assert image["objects"][c["refs"][t]]["category_id"] == m["category_id"]
            for r in c["relations"]:
                for a in c["mentions"][r["subject"]]["objects"]:
                    for b in c["mentions"][r["object"]]["objects"]:
                        assert holds(r["relation"], image["objects"][a]["box"], image["objects"][b]["box"])


def test_feature_store_round_trips(written):
    from geocap.data.store import FeatureStore

    out, _, truth = written
    expected = {r.image_id: r for r in S.iter_features(S.generate_scenes(120, seed=5), seed=5, feature_dim=32)}
    with FeatureStore(out / "features.h5") as store:
        assert len(store) == 120 and store.image_ids.tolist() == list(range(1, 121))
        assert store.label_names == S.category_names()
        assert store.feature_dim == 32 and store.feature_dtype == np.float16
        for image in truth["images"]:
            got = store.get(image["image_id"])
            want = expected[image["image_id"]]
            np.testing.assert_array_equal(got.boxes, np.array([o["box"] for o in image["objects"]], np.float32))
            np.testing.assert_array_equal(got.boxes, want.boxes)
            assert got.labels.tolist() == [o["category_id"] for o in image["objects"]]
            assert (got.width, got.height) == (image["width"], image["height"])
            np.testing.assert_array_equal(got.features, want.features.astype(np.float16).astype(np.float32))


def test_rewriting_replaces_files_without_leftovers(tmp_path):
    S.generate_synthetic(tmp_path, images=12, seed=1, feature_dim=8, progress=False)
    first = (tmp_path / "captions_coco.json").read_bytes()
    S.generate_synthetic(tmp_path, images=15, seed=2, feature_dim=8, progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted(S.FILES.values())
    assert (tmp_path / "captions_coco.json").read_bytes() != first
    assert len(json.loads((tmp_path / "captions_coco.json").read_text())["images"]) == 15


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)                  # every file fails at its rename
    with pytest.raises(OSError, match="disk full"):
        S.generate_synthetic(tmp_path, images=5, feature_dim=8, progress=False)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- arguments and CLI


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 0}, "images must be at least 1, got 0"),
    ({"feature_dim": 4}, "feature_dim must be at least 8, got 4"),
    ({"seed": -1}, "seed must be at least 0, got -1"),
    ({"images": 2.5}, "images must be an int"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        S.generate_synthetic(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_handler(tmp_path, capsys):
    from geocap.cli.synth import add_parser as add_synth_parser

    parser = argparse.ArgumentParser(prog="geocap")
    add_synth_parser(parser.add_subparsers(dest="command", required=True))
    defaults = parser.parse_args(["synth", "x"])
    assert (defaults.images, defaults.seed, defaults.feature_dim) == (6000, 0, S.DEFAULT_FEATURE_DIM)
    args = parser.parse_args(["synth", str(tmp_path), "--images", "20", "--seed", "4", "--feature-dim", "16"])
    assert args.func(args) == 0
    assert "wrote 20 images" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(S.FILES.values())
    bad = parser.parse_args(["synth", str(tmp_path / "bad"), "--images", "0"])
    with pytest.raises(ValueError, match="images must be at least 1"):
        bad.func(bad)


# -- ground_truth.json read one image at a time (geocap.data.synth.truth_file) ------------------


def test_truth_file_reads_each_image_as_json_load_does(tmp_path, monkeypatch):
    """Every image (and the header) equals what json.load gives, also with blocks so small that
    image ids are cut between two reads, and with the file indented instead of compact."""
    import json

    import geocap.data.synth.truth_file as truth_file
    from geocap.data.synth import generate_synthetic

    generate_synthetic(tmp_path, images=12, seed=2, feature_dim=8, progress=False)
    path = tmp_path / "ground_truth.json"
    whole = json.loads(path.read_text())
    indented = tmp_path / "indented.json"
    indented.write_text(json.dumps(whole, indent=2))
    for block in (truth_file.BLOCK, 7, 100):
        monkeypatch.setattr(truth_file, "BLOCK", block)
        for file in (path, indented):
            truth = truth_file.TruthFile(file)
            assert truth.image_ids.tolist() == [im["image_id"] for im in whole["images"]]
            assert truth.header == dict(whole, images=[])
            for im in reversed(whole["images"]):
                assert truth.image(im["image_id"]) == im
            assert 13 not in truth and 12 in truth
            with pytest.raises(ValueError, match=r"ground_truth.json: no ground truth for image 13|"
                                                 r"indented.json: no ground truth for image 13"):
                truth.image(13)


@pytest.mark.parametrize("text, message", [
    ('{"format": "other", "images": []}', "not a geocap synthetic ground-truth file"),
    ('[1, 2]', "not a geocap synthetic ground-truth file"),
    ('{"format": "geocap-synth-ground-truth", "images": [{"image_id": 1, "objects": [', "unreadable ground truth"),
    ('{"format": "geocap-synth-ground-truth", "images": [{"image_id": 1}, {"image_id": 1}]}', "image 1 appears twice"),
])
def test_truth_file_refuses_bad_files_naming_them(tmp_path, text, message):
    from geocap.data.synth.truth_file import TruthFile

    path = tmp_path / "gt.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="gt.json: " + message):
        TruthFile(path)
