"""The viewer on a Hugging Face captioner's dump (a tiny ViT + GPT-2 saved here with a byte-level BPE
tokenizer, 2 encoder and 3 decoder layers), driven in headless Chromium: words rather than BPE
pieces (shown grouped, searchable), the referent's region of patches outlined, "patches" wording,
encoder and decoder layer pickers apart, an absolute shading scale, patches listed by weight."""
import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")

from hf_tokenizers import byte_level_bpe  # noqa: E402
from test_hf_dump import save_tiny_model  # noqa: E402
from test_viewer import _expected, _open, _select, _values, browser  # noqa: E402,F401  (its fixture)

from geocap.data.dump_format import open_dump  # noqa: E402
from geocap.hf.dump import dump_hf  # noqa: E402
from geocap.hf.models import import_transformers  # noqa: E402
from geocap.view import build_site  # noqa: E402
from geocap.view.site import image_data_key  # noqa: E402

transformers = import_transformers()
IMAGE = 5
CAPTIONS = ["two refrigerators and a bowl", "a cup on the table"]
CATEGORIES = [{"id": 1, "name": "refrigerator"}, {"id": 2, "name": "bowl"}, {"id": 3, "name": "cup"}]
BOXES = [(1, [0, 0, 24, 32]), (2, [30, 20, 10, 10]), (3, [40, 0, 8, 8])]      # pixels of a 48 x 32 image


@pytest.fixture(scope="module")
def hf_site(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("hfview")
    save_tiny_model(root / "model", byte_level_bpe(transformers))
    (root / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"img_{IMAGE:04d}.png")
    images = [{"id": IMAGE, "file_name": f"img_{IMAGE:04d}.png", "width": 48, "height": 32}]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": k, "image_id": IMAGE, "caption": c} for k, c in enumerate(CAPTIONS)]}))
    (root / "instances.json").write_text(json.dumps({"images": images, "categories": CATEGORIES, "annotations": [
        {"id": k, "image_id": IMAGE, "category_id": c, "bbox": b, "iscrowd": 0} for k, (c, b) in enumerate(BOXES)]}))
    dump_hf(root / "model", root / "images", root / "dump", captions=root / "captions.json",
            instances=root / "instances.json", writer="inline", progress=False)
    dump = open_dump(root / "dump", progress=False)
    build_site(dump, root / "site", images_dir=root / "images", progress=False)
    build_site(open_dump(root / "dump", progress=False), root / "top3", images_dir=root / "images", progress=False,
               encoder_top_k=3)
    return root / "site", list(dump)


def test_pieces_are_grouped_into_words_and_searched_as_words(browser, hf_site):
    from selenium.webdriver.common.by import By
    site, records = hf_site
    assert records[0].tokens[:3] == ["two", "\u0120", "refrigerators"] and records[1].tokens[0] == "a"
    _open(browser, (site / "index.html").as_uri() + "#q=refrigerators", "index")
    assert browser.find_element(By.ID, "status").text == '1 image matches "refrigerators"'
    meta = browser.find_element(By.CSS_SELECTOR, "#results .entry .meta").text
    assert "16 patches + 1 special token" in meta and "objects" not in meta
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .caption")]
    assert captions[0].endswith("two refrigerators and a bowl"), captions
    header = browser.find_element(By.ID, "box-embedding").text
    assert header == "image tokens: the patches of VisionEncoderDecoderModel (a patch encoder: no box geometry)"
    _open(browser, (site / "image.html").as_uri() + f"#id={IMAGE}", "image")
    option = browser.find_element(By.CSS_SELECTOR, "#record option").text
    assert option == "reference #0: two refrigerators and a bowl"
    words = browser.execute_script(
        "return Array.from(document.querySelectorAll('#tokens .word'), "
        "w => Array.from(w.querySelectorAll('.token'), c => c.textContent));")
    assert words == [["two"], ["\u2423"], ["refrigerators"], ["and"], ["a"], ["bowl"], ["<eos>"]]
    assert browser.find_element(By.ID, "objects-title").text == "Patches"
    assert "17 image tokens" in browser.find_element(By.ID, "status").text


def test_the_referent_region_is_outlined(browser, hf_site):
    from selenium.webdriver.common.by import By
    site, records = hf_site
    rec = records[0]
    step = rec.tokens.index("refrigerators")
    assert rec.referents[step] >= 0 and rec.referents[step - 1] == -1        # on the word, not on the space
    region = rec.extra["referent_objects"][int(rec.referents[step])]
    assert len(region) > 1
    _open(browser, (site / "image.html").as_uri() + f"#id={IMAGE}&w={step}", "image")
    outlined = browser.execute_script("return Array.from(document.querySelectorAll('#canvas rect.box.referent'), "
                                      "b => Number(b.dataset.index)).sort((a, b) => a - b);")
    assert outlined == sorted(region)
    info = browser.find_element(By.ID, "shading-info").text
    assert f"the word names a region of {len(region)} patches (outlined)" in info
    assert 'predicting \u201crefrigerators\u201d, input \u201c\u2423\u201d' in info


def test_encoder_and_decoder_layers_apart_and_the_absolute_scale(browser, hf_site):
    from selenium.webdriver.common.by import By
    site, records = hf_site
    rec = records[0]
    step = rec.tokens.index("bowl") if "bowl" in rec.tokens else 5
    _open(browser, (site / "image.html").as_uri() + f"#id={IMAGE}&w={step}&dl=2", "image")
    assert browser.find_element(By.ID, "dlayer-label").is_displayed()
    assert browser.find_element(By.ID, "layer-name").text == "encoder layer"
    assert [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#layer option")] == ["0", "1"]
    assert [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#dlayer option")] == \
        ["0", "1", "2"]
    expected = _expected(rec.cross, 2, "mean", step)            # decoder layer 3: the one the hash asked for
    shown = _values(browser, "rect.box", "data-index")
    np.testing.assert_allclose([shown[i] for i in range(1, 17)], expected[1:], rtol=1e-3)
    assert "decoder layer 3, mean over heads" in browser.find_element(By.ID, "shading-info").text
    _select(browser, "layer", 1)                                # the encoder layer leaves the cross map alone
    assert browser.execute_script("return location.hash;") == f"#id={IMAGE}&r=0&l=1&h=mean&dl=2&w={step}"
    shown = _values(browser, "rect.box", "data-index")
    np.testing.assert_allclose([shown[i] for i in range(1, 17)], expected[1:], rtol=1e-3)

    def opacities():
        return browser.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#fills rect.fill'), "
            "f => [f.dataset.index, Number(getComputedStyle(f).fillOpacity)]));")
    relative = opacities()
    assert max(relative.values()) == pytest.approx(0.7)
    browser.find_element(By.ID, "absolute").click()
    assert "s=abs" in browser.execute_script("return location.hash;")
    absolute = opacities()
    np.testing.assert_allclose([absolute[str(i)] for i in range(1, 17)], 0.7 * expected[1:], atol=2e-3)
    assert max(absolute.values()) < 0.7 * expected[1:].max() + 2e-3 < 0.7
    # the encoder picker drives a patch's encoder self-attention
    browser.find_element(By.CSS_SELECTOR, 'rect.box[data-index="6"]').click()
    shown = _values(browser, "rect.box", "data-index")
    np.testing.assert_allclose([shown[i] for i in range(1, 17)], _expected(rec.encoder_self, 1, "mean", 6)[1:],
                               rtol=1e-3)
    assert "encoder layer 2, mean over heads" in browser.find_element(By.ID, "shading-info").text


def test_encoder_maps_kept_as_top_k_with_the_error_stated(browser, hf_site):
    from selenium.webdriver.common.by import By

    from geocap.view.encode import encode_top_k
    site, records = hf_site
    top3 = site.parent / "top3"
    def encoder(folder):
        text = (folder / "data" / image_data_key(IMAGE)).read_text()
        return json.loads(text[text.index(",") + 1:text.rindex(");")])["encoders"][0]
    full, kept = encoder(site), encoder(top3)
    assert "k" not in full and kept["k"] == 3
    # 3 of 17 weights per row, 2 bytes each and 2 for its column: 12 / 34 of the bytes
    assert len(kept["f16"]) + len(kept["idx"]) < 0.4 * len(full["f16"])
    enc = records[0].encoder_self
    stated = encode_top_k(enc, 3)
    kept = np.sort(enc.astype(np.float32), axis=-1)[..., ::-1]
    assert stated["max_missing"] == pytest.approx(float((1 - kept[..., :3].astype(np.float64).sum(-1)).max()),
                                                  rel=1e-3)
    assert stated["max_dropped"] == pytest.approx(float(kept[..., 3].max()), rel=1e-3)
    _open(browser, (top3 / "image.html").as_uri() + f"#id={IMAGE}&l=1&o=6", "image")
    notice = browser.find_element(By.ID, "top-k-notice").text
    assert notice.startswith("Encoder self-attention kept as the 3 largest weights of each row")
    assert f"misses at most {stated['max_missing']:.4f}" in notice
    shown = _values(browser, "rect.box", "data-index")
    row = enc[1, :, 6].astype(np.float64)                 # [H, N]: per head, its top 3 kept, the rest 0
    top = np.argsort(-enc[1, :, 6].astype(np.float32), axis=-1, kind="stable")[:, :3]
    expected = np.zeros_like(row)
    np.put_along_axis(expected, top, np.take_along_axis(row, top, axis=-1), axis=-1)
    np.testing.assert_allclose([shown[i] for i in range(1, 17)], expected.mean(axis=0)[1:], rtol=1e-3, atol=1e-7)
    assert sum(v == 0 for v in shown.values()) > 0
    _open(browser, (site / "image.html").as_uri() + f"#id={IMAGE}&l=1&o=6", "image")
    assert not browser.find_elements(By.ID, "top-k-notice")


def test_crop_window_and_exif_orientation_in_the_page(browser, hf_site, tmp_path):
    """A DeiT-style processor (resize 40, crop 32) on an EXIF-rotated JPEG: the page draws the image
    upright as the model read it, the grid over the window the crop kept, the rest dimmed."""
    import io
    import shutil

    from PIL import Image
    from selenium.webdriver.common.by import By
    site, _ = hf_site
    root = site.parent
    shutil.copytree(root / "model", tmp_path / "model")
    transformers.DeiTImageProcessor(size={"height": 40, "width": 40},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    raw = np.zeros((40, 80, 3), np.uint8)
    raw[:, :40] = (255, 0, 0)                   # stored 80 wide: red left, blue right
    raw[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                            # shown turned clockwise: 40 wide, 80 high, red on top
    Image.fromarray(raw).save(tmp_path / "images" / "img_0008.jpg", exif=exif, quality=95)
    dump_hf(tmp_path / "model", tmp_path / "images", tmp_path / "dump", writer="inline", progress=False, max_len=2)
    build_site(open_dump(tmp_path / "dump", progress=False), tmp_path / "site", images_dir=tmp_path / "images",
               progress=False)
    _open(browser, (tmp_path / "site" / "image.html").as_uri() + "#id=8", "image")
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_dom_attribute("viewBox") == "0 0 40 80"
    grid = browser.find_element(By.ID, "patch-grid")
    assert [float(v) for v in grid.get_attribute("data-window").split()] == pytest.approx([0.1, 0.1, 0.9, 0.9],
                                                                                         abs=1e-4)
    lines = browser.execute_script("return Array.from(document.querySelectorAll('#patch-grid line.grid-line'), "
                                   "l => [l.dataset.axis, l.x1.baseVal.value, l.y1.baseVal.value]);")
    assert sorted(y for a, _, y in lines if a == "row") == pytest.approx([8 + 16 * r for r in range(5)], abs=0.01)
    assert sorted(x for a, x, _ in lines if a == "col") == pytest.approx([4 + 8 * c for c in range(5)], abs=0.01)
    assert browser.find_elements(By.ID, "outside-window")
    # on screen, the image is upright: red at the top, blue at the bottom (as the model read it)
    ratio = browser.execute_script("return window.devicePixelRatio;")
    where = browser.execute_script(
        "const svg = document.getElementById('canvas'), m = svg.getScreenCTM(), out = [];"
        "for (const [x, y] of [[20, 20], [20, 60]]) { const p = svg.createSVGPoint(); p.x = x; p.y = y;"
        "  const q = p.matrixTransform(m); out.push([q.x, q.y]); } return out;")
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"), dtype=np.int64)
    top, bottom = (shot[int(y * ratio), int(x * ratio)] for x, y in where)
    assert top[0] > top[2] + 60 and bottom[2] > bottom[0] + 60, (top, bottom)


def test_view_command_takes_encoder_top_k(hf_site, tmp_path, capsys):
    from geocap.cli import main
    site, _ = hf_site
    assert main(["view", str(site.parent / "dump"), "--out", str(tmp_path / "v"), "--encoder-top-k", "4",
                 "--no-progress"]) == 0
    text = (tmp_path / "v" / "data" / image_data_key(IMAGE)).read_text()
    assert json.loads(text[text.index(",") + 1:text.rindex(");")])["encoders"][0]["k"] == 4
    with pytest.raises(SystemExit):
        main(["view", str(site.parent / "dump"), "--out", str(tmp_path / "w"), "--encoder-top-k", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
