"""geocap.data.synth.render (``geocap synth-images``): the synthetic scenes drawn as images.

The pixels are checked against rules written here independently of the renderer (which pixels a
box covers, what each pattern looks like), from the module docstring's conventions.
"""
import itertools
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from geocap.cli import main
from geocap.data.synth import CATEGORIES, CLUSTERS, generate_synthetic, render_images
from geocap.data.synth.render import (BACKGROUND, OUTLINE, PATTERNS, category_style, drawing_order, pattern_on,
                                      pattern_period)

pycocotools_coco = pytest.importorskip("pycocotools.coco")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, images=30, seed=3, feature_dim=8, progress=False)
    with open(root / "ground_truth.json") as f:
        truth = json.load(f)
    with open(root / "captions_coco.json") as f:
        coco = json.load(f)
    return root, truth, coco


@pytest.fixture(scope="module")
def rendered(data, tmp_path_factory):
    """Every image at its own size, and the training split at longer side 96."""
    root = data[0]
    full, small = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("small")
    return {None: (full, render_images(root, full, progress=False)),
            96: (small, render_images(root, small, split="train", size=96, progress=False))}


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


def span(box, width, height):
    """Pixels whose centres lie in the box: (col0, row0, col1, row1), half-open, >= 1 each way."""
    c0, r0 = half_up(box[0] * width), half_up(box[1] * height)
    return c0, r0, max(half_up(box[2] * width), c0 + 1), max(half_up(box[3] * height), r0 + 1)


def accent_here(pattern, col, row, period):
    """The module docstring's patterns at pixels (col, row) (ints or arrays of the same shape)."""
    stripe, half = max(1, period // 3), max(1, period // 2)
    return {"solid": np.zeros_like(col, dtype=bool), "horizontal": row % period < stripe,
            "vertical": col % period < stripe,
            "diagonal": (col + row) % period < stripe,
            "checker": (col // half + row // half) % 2 == 0}[pattern]


def ancestors(objects, i):
    out = set()
    while objects[i]["part_of"] >= 0:
        i = objects[i]["part_of"]
        out.add(i)
    return out


def test_every_category_looks_different_and_unlike_the_background():
    styles = [category_style(k) for k in range(len(CATEGORIES))]
    colours = [s.colour for s in styles]
    assert len(set(colours)) == len(styles) and len({(s.colour, s.pattern) for s in styles}) == len(styles)
    assert min(math.dist(a, b) for a, b in itertools.combinations(colours, 2)) >= 40
    assert min(math.dist(c, BACKGROUND) for c in colours + [s.accent for s in styles]) >= 60
    assert min(math.dist(s.colour, s.accent) for s in styles) >= 40
    assert {s.pattern for s in styles} == set(PATTERNS)
    assert category_style(4) == category_style(4) and category_style(30) != category_style(5)
    cols, rows = np.arange(40)[None, :], np.arange(40)[:, None]
    for pattern in PATTERNS:
        on = pattern_on(pattern, cols, rows, 8)
        assert on.shape == (40, 40)
        assert on.tolist() == [[bool(accent_here(pattern, c, r, 8)) for c in range(40)] for r in range(40)]
        assert on.any() == (pattern != "solid") and not on.all()
    assert pattern_period(640, 480) == 40 and pattern_period(64, 48) == 4 and pattern_period(30, 20) == 4
    with pytest.raises(ValueError, match="category_id must be an int >= 0"):
        category_style(-1)


def test_parts_are_drawn_after_their_wholes_and_larger_boxes_first():
    boxes = [[0.4, 0.4, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.6, 0.6], [0.2, 0.2, 0.3, 0.3]]
    #        small part of 2           biggest                whole of 0 and 3        part of 2
    assert drawing_order(boxes, [2, -1, -1, 2]) == [1, 2, 0, 3]
    # a part larger than an unrelated box is still drawn straight after its whole
    assert drawing_order([[0, 0, 0.9, 0.9], [0, 0, 0.5, 0.5], [0, 0, 0.6, 0.6]], [-1, 0, -1]) == [0, 1, 2]
    with pytest.raises(ValueError, match="part_of forms a cycle"):
        drawing_order(boxes[:2], [1, 0])
    with pytest.raises(ValueError, match="part_of 7 is not an object index"):
        drawing_order(boxes[:2], [7, -1])


@pytest.mark.parametrize("size", [None, 96])
def test_pixels_show_each_objects_category_over_the_background(data, rendered, size):
    _, truth, _ = data
    out, summary = rendered[size]
    images = [im for im in truth["images"] if size is None or im["split"] == "train"]
    assert summary["images"] == len(images) > 0
    checked = parts_checked = outlined = 0
    for image in images:
        pixels = np.asarray(Image.open(out / "images" / f"synth_{image['image_id']:012d}.png"))
        height, width = pixels.shape[:2]
        if size is None:
            assert (width, height) == (image["width"], image["height"])
        else:
            assert max(width, height) == size
            assert (width, height) == (half_up(image["width"] * size / max(image["width"], image["height"])),
                                       half_up(image["height"] * size / max(image["width"], image["height"])))
        period = max(4, half_up(max(width, height) / 16))
        objects = image["objects"]
        spans = [span(o["box"], width, height) for o in objects]
        covered = np.zeros((len(objects), height, width), dtype=bool)
        for i, (c0, r0, c1, r1) in enumerate(spans):
            covered[i, r0:r1, c0:c1] = True
        assert (pixels[~covered.any(0)] == BACKGROUND).all()
        for i, o in enumerate(objects):
            # pixels of i's box under no other box but its wholes' (drawn before it): i's own drawing
            others = [j for j in range(len(objects)) if j != i and j not in ancestors(objects, i)]
            alone = covered[i] & ~covered[others].any(0) if others else covered[i]
            c0, r0, c1, r1 = spans[i]
            border = np.zeros_like(alone)
            if min(c1 - c0, r1 - r0) >= 5:          # boxes of 5 pixels or more each way are outlined
                border[r0:r1, c0:c1] = True
                border[r0 + 1:r1 - 1, c0 + 1:c1 - 1] = False
                outlined += 1
            assert (pixels[alone & border] == OUTLINE).all(), (image["image_id"], i)
            rows, cols = np.nonzero(alone & ~border)
            if len(rows) == 0:
                continue
            style = category_style(o["category_id"])
            expected = np.where(accent_here(style.pattern, cols, rows, period)[:, None], style.accent, style.colour)
            assert (pixels[rows, cols] == expected).all(), (image["image_id"], i)
            checked += 1
            parts_checked += o["part_of"] >= 0
    total = sum(len(im["objects"]) for im in images)
    assert checked >= (0.8 if size is None else 0.6) * total and parts_checked > 0, (checked, total)
    assert 0 < outlined < total if size == 96 else outlined == total


def test_json_files_load_with_pycocotools_and_hold_the_ground_truth(data, rendered):
    root, truth, coco = data
    captions_of = {}
    for ann in coco["annotations"]:
        captions_of.setdefault(ann["image_id"], []).append(ann)
    ids_in_all = {}
    for size, name in ((None, "all"), (96, "train")):
        out, summary = rendered[size]
        assert summary["captions_json"] == os.path.join(out, f"captions_{name}.json")
        instances = pycocotools_coco.COCO(str(out / f"instances_{name}.json"))
        captions = pycocotools_coco.COCO(str(out / f"captions_{name}.json"))
        images = [im for im in truth["images"] if name == "all" or im["split"] == name]
        assert sorted(instances.getImgIds()) == sorted(captions.getImgIds()) == [im["image_id"] for im in images]
        assert instances.loadCats(instances.getCatIds()) == [
            {"id": k, "name": c.name, "supercategory": c.cluster} for k, c in enumerate(CATEGORIES)]
        assert {c.cluster for c in CATEGORIES} == {c.name for c in CLUSTERS}
        for image in images:
            info = instances.loadImgs(image["image_id"])[0]
            assert info == captions.loadImgs(image["image_id"])[0]
            assert info["file_name"] == f"synth_{image['image_id']:012d}.png"
            width, height = info["width"], info["height"]
            assert Image.open(out / "images" / info["file_name"]).size == (width, height)
            anns = instances.loadAnns(instances.getAnnIds(imgIds=image["image_id"]))
            assert [a["category_id"] for a in anns] == [o["category_id"] for o in image["objects"]]
            for a, o in zip(anns, image["objects"]):
                x1, y1, x2, y2 = o["box"]
                assert a["bbox"] == pytest.approx([x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height],
                                                  rel=1e-12, abs=1e-9)
                assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) and a["iscrowd"] == 0
                if name == "all":
                    ids_in_all[a["image_id"], a["bbox"][0] / width] = a["id"]
                else:                       # the same object keeps its id whichever split is rendered
                    assert ids_in_all[a["image_id"], a["bbox"][0] / width] == a["id"]
            assert [a["id"] for a in anns] == sorted(a["id"] for a in anns)
            caps = captions.loadAnns(captions.getAnnIds(imgIds=image["image_id"]))
            assert sorted((c["id"], c["caption"]) for c in caps) == sorted(
                (c["id"], c["caption"]) for c in captions_of[image["image_id"]])
        with open(out / "render.json") as f:
            assert json.load(f)["splits"] == {name: len(images)}
    assert len(set(ids_in_all.values())) == len(ids_in_all) == sum(len(im["objects"]) for im in truth["images"])


def _files(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_same_inputs_give_byte_identical_files(data, rendered, tmp_path):
    out, _ = rendered[96]
    again = tmp_path / "again"
    render_images(data[0], again, split="train", size=96, progress=False)
    first, second = _files(out), _files(again)
    assert first == second and len(first) > 3
    assert not any(".tmp-" in name for name in first)
    # a second split into the same folder adds its files and leaves the first split's alone
    render_images(data[0], again, split="val", size=96, progress=False)
    third = _files(again)
    assert all(third[name] == content for name, content in first.items() if name != "render.json")
    with open(again / "render.json") as f:
        assert set(json.load(f)["splits"]) == {"train", "val"}


def test_bad_input_is_a_value_error_naming_it(data, tmp_path):
    root = data[0]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="ground_truth.json: synthetic ground truth .* missing"):
        render_images(tmp_path / "nowhere", out, progress=False)
    with pytest.raises(ValueError, match="split must be one of train, val, test or None.*'dev'"):
        render_images(root, out, split="dev", progress=False)
    with pytest.raises(ValueError, match="size must be None or an int >= 16"):
        render_images(root, out, size=8, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ground_truth.json").write_bytes((root / "ground_truth.json").read_bytes())
    with pytest.raises(ValueError, match="captions_coco.json: COCO captions file .* missing"):
        render_images(broken, out, progress=False)
    coco = json.loads((root / "captions_coco.json").read_text())
    coco["images"][4]["width"] += 1
    (broken / "captions_coco.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"captions_coco.json: image 5 is \d+x\d+, .*ground_truth.json says"):
        render_images(broken, out, progress=False)
    assert not out.exists()                      # nothing written on bad input
    (broken / "captions_coco.json").write_text("{not json")
    with pytest.raises(ValueError, match="captions_coco.json: not a readable COCO captions file"):
        render_images(broken, out, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no render.json"):
        render_images(root, foreign, split="test", progress=False)
    render_images(root, out, split="test", size=64, progress=False)
    with pytest.raises(ValueError, match="size: .* was rendered with size 64, not 96"):
        render_images(root, out, split="val", size=96, progress=False)


def test_an_interrupted_render_leaves_no_json_and_no_temporary_file(data, tmp_path, monkeypatch):
    from geocap.data.synth import render

    drawn = []

    def failing(width, height, objects):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(1)
        return np.zeros((height, width, 3), np.uint8)

    monkeypatch.setattr(render, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        render_images(data[0], tmp_path / "out", size=32, progress=False)
    assert sorted(_files(tmp_path / "out")) == ["images/synth_000000000001.png", "images/synth_000000000002.png"]


def test_command_line(data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth-images", "--data", str(data[0]), "--out", str(out), "--split", "val", "--size", "48",
                 "--no-progress"]) == 0
    assert "rendered 3 images (val" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["captions_val.json", "images", "instances_val.json", "render.json"]
    assert len(os.listdir(out / "images")) == 3
    assert main(["synth-images", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "ground_truth.json: synthetic ground truth (geocap synth) missing" in capsys.readouterr().err
