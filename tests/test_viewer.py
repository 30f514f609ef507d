"""``geocap view``: the site builder (no browser) and the pages driven in a real headless Chromium.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``; ``.ci/run`` installs them). Without them they are skipped, unless
``GEOCAP_REQUIRE_BROWSER=1`` (CI), where they fail. The site is served from 127.0.0.1 by
``http.server`` in a thread; one test also opens it from ``file://``.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from geocap.view import build_site
from geocap.cli.view import add_parser as add_view_parser, report_href
from geocap.view.encode import decode_f16, encode_f16, encode_record, label_names_from, word_bucket, words_of
from geocap.view.site import MARKER, image_data_key
from geocap.view.synthetic import synthetic_records

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REQUIRE_BROWSER = os.environ.get("GEOCAP_REQUIRE_BROWSER") == "1"
IDS = [3, 12, 40, 41, 300, 1001, 2048]
LABEL_NAMES = ["person", "dog", "bus", "tree"]
L, H, N, T = 2, 3, 5, 6
PAGE_SIZE = 3
WAIT_S = 10
WINDOW = (1400, 1000)           # the window size the layout is made for


def _records():
    """Three records per image (reference, reference, generated), with chosen captions for the
    search tests, one record without cross-attention, sizes for some images, and image 12's
    generated record last (its records are not adjacent)."""
    recs = list(synthetic_records(IDS, objects=N, tokens=T, layers=L, heads=H, captions=3, labels=4, seed=1))
    by_image = {i: [r for r in recs if r.image_id == i] for i in IDS}
    by_image[40][0].tokens = ["a", "zebra", "and", "a", "giraffe", "<eos>"]
    by_image[41][0].tokens = ["one", "okapi", "near", "a", "giraffe", "<eos>"]
    by_image[41][2].cross = None
    by_image[41][2].cross_entropy = None
    by_image[3][0].extra = {"width": 200, "height": 100}
    by_image[12][0].extra = {"width": 500, "height": 375}
    late = by_image[12][2]
    return [r for r in recs if r is not late] + [late]


def _write_images(folder):
    from PIL import Image

    folder.mkdir()
    x = np.linspace(0, 255, 500, dtype=np.float64)
    y = np.linspace(0, 255, 375, dtype=np.float64)
    pixels = np.stack([np.add.outer(y * 0, x), np.add.outer(y, x * 0), np.add.outer(y, x) / 2], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "COCO_val2014_000000000012.png")
    Image.fromarray(pixels[:100, :100].astype(np.uint8)).save(folder / "000000002048.png")
    (folder / "COCO_val2014_000000001001.jpg").write_bytes(b"not an image at all")


@pytest.fixture(scope="module")
def records():
    return _records()


@pytest.fixture(scope="module")
def site(tmp_path_factory, records):
    root = tmp_path_factory.mktemp("viewer")
    _write_images(root / "images")
    out = root / "site"
    metadata = {"label_names": LABEL_NAMES, "model_config": {"geometry": True, "embedding": "signed"}}
    summary = build_site(records, out, images_dir=root / "images", metadata=metadata,
                         report_href="../report/index.html", progress=False, page_size=PAGE_SIZE)
    return out, summary


@pytest.fixture(scope="module")
def server(site):
    out, _ = site
    handler = functools.partial(_QuietHandler, directory=str(out))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _check_browser(require: bool) -> None:
    """Skip (or, when ``require``, fail) unless Debian's chromium and chromedriver are installed."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        reason = (f"no browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver; "
                  ".ci/run does it)")
        if require:
            pytest.fail(reason + " and GEOCAP_REQUIRE_BROWSER=1")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _check_browser(REQUIRE_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# ---------------------------------------------------------------- helpers

def _wait_ready(driver, ready):
    """Wait until the page has rendered (body data-ready = "index" / "image") or shows an error."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == ready
        or "error" in (d.find_element("id", "status").get_attribute("class") or ""))


def _open(driver, url, ready):
    driver.get("about:blank")
    driver.get(url)
    _wait_ready(driver, ready)
    status = driver.find_element("id", "status")
    assert "error" not in (status.get_attribute("class") or ""), status.text
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def _select(driver, element_id, value):
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_value(str(value))


def _values(driver, css, key):
    """{int(attribute key): float(data-attention)} of the elements matching css that carry a value."""
    out = {}
    for node in driver.find_elements("css selector", css):
        value = node.get_attribute("data-attention")
        if value is not None:
            out[int(node.get_attribute(key))] = float(value)
    return out


def _expected(array, layer, head, row):
    """The row as the page must show it: the stored float16 values, or their mean over heads."""
    values = np.asarray(array, dtype=np.float16).astype(np.float64)[layer]
    return values[:, row].mean(axis=0) if head == "mean" else values[head, row]


def _assert_row(shown: dict, expected):
    assert sorted(shown) == list(range(len(expected))), shown
    got = np.array([shown[i] for i in range(len(expected))])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)


def _page_records(records, image_id):
    """The image's records in the page's order (kind, then caption id)."""
    order = {"reference": 0, "generated": 1, "hypothetical": 2}
    return sorted((r for r in records if r.image_id == image_id), key=lambda r: (order[r.kind], r.caption_id))


def _normalised_entropy(nats, kind, objects):
    """``[L, H]``: the mean over rows of entropy / log(valid keys), rows with fewer than two valid
    keys left out (the analysis report's unit: 1 = uniform); decoder row t sees t + 1 inputs."""
    nats = np.asarray(nats, dtype=np.float64)
    rows = nats.shape[-1]
    valid = np.arange(1, rows + 1) if kind == "decoder_self" else np.full(rows, objects)
    used = valid >= 2
    return (nats[..., used] / np.log(valid[used])).mean(axis=-1)


def _index_ids(driver):
    """The image ids the index lists now (read in one script: the list may be re-rendered meanwhile)."""
    return driver.execute_script("return Array.from(document.querySelectorAll('#results .entry'), "
                                 "e => Number(e.dataset.id));")


# ---------------------------------------------------------------- builder (no browser)

def test_encoding_roundtrip_and_words():
    x = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(decode_f16(encode_f16(x)), x.astype(np.float16))
    assert words_of("A man, riding <unk> BUS_2!") == ["a", "man", "riding", "unk", "bus_2"]
    rec = next(synthetic_records([9], objects=3, tokens=4, layers=1, heads=2, captions=1))
    rec.labels = np.array([-1, 2, 30])
    assert encode_record(rec, label_names_from({"label_names": LABEL_NAMES}))["labels"] == [None, "bus", "#30"]
    rec.labels = np.array([-1, -1, -1])
    assert encode_record(rec, {})["labels"] is None
    buckets = {word_bucket(w, 7) for w in ("a", "dog", "giraffe", "zebra", "okapi", "bus", "tree", "café")}
    assert buckets <= set(range(7)) and len(buckets) > 1


def test_missing_browser_skips_or_fails(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", "/nonexistent/chromedriver")
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/chromedriver missing"):
        _check_browser(require=False)
    with pytest.raises(pytest.fail.Exception, match="GEOCAP_REQUIRE_BROWSER=1"):
        _check_browser(require=True)


def test_site_files_and_grouping(site, records):
    out, summary = site
    assert summary.images == len(IDS) and summary.records == len(records)
    assert summary.images_with_file == 3 and summary.missing == {"encoder_self": 0, "decoder_self": 0, "cross": 1}
    assert json.loads((out / MARKER).read_text())["images"] == len(IDS)
    assert '"box_embedding":"signed"' in (out / "data" / "manifest.js").read_text()
    assert not list(out.parent.glob(".site.*"))                # no temporary folder left
    text = (out / "data" / image_data_key(12)).read_text()
    value = json.loads(text[text.index(",") + 1:text.rindex(");")])
    assert [r["kind"] for r in value["records"]] == ["reference", "reference", "generated"]
    assert len(value["encoders"]) == 1                           # one encoder map shared by the 3 records
    assert value["image"] == "images/12.png" and (value["width"], value["height"]) == (500, 375)
    for path in out.rglob("*"):                                  # every asset local (the SVG namespace aside)
        if path.suffix in (".html", ".js", ".css"):
            assert not re.search(r"(?i)(https?:)?//(?!www\.w3\.org/2000/svg)[a-z0-9.-]+\.[a-z]", path.read_text()), path


def test_rebuild_replaces_site_and_bad_input_leaves_it(tmp_path, records):
    out = tmp_path / "site"
    build_site(records[:3], out, progress=False)
    first = (out / "data" / "manifest.js").read_text()
    build_site(records, out, progress=False, limit=2)
    manifest = (out / "data" / "manifest.js").read_text()
    assert manifest != first and '"images":2' in manifest
    # limit keeps the first two images in record order, with all their records
    assert sorted(int(p.stem) for p in (out / "data" / "img").rglob("*.js")) == [3, 12]
    assert '"records":6' in manifest
    # grouped records: reading stops at the first record of the image after the limit
    def grouped_records():
        yield from (r for r in records if r.image_id in (3, 40))
        raise AssertionError("read past the limit")
    assert build_site(grouped_records(), tmp_path / "grouped", progress=False, limit=1, grouped=True).records == 3
    bad = list(records[:3])
    bad[1] = synthetic_records([77], objects=N, tokens=T, layers=L, heads=H, captions=1).__next__()
    bad[1].cross = bad[1].cross.astype(np.float32)
    bad[1].cross[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image 77.*cross holds NaN"):
        build_site(bad, out, progress=False)
    assert (out / "data" / "manifest.js").read_text() == manifest   # the old site, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grouped", "site"]   # no temporary folder left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a geocap view site"):
        build_site(records, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="no records"):
        build_site([], tmp_path / "empty", progress=False)
    pixel_boxes = synthetic_records([5], objects=N, tokens=T, layers=L, heads=H, captions=1).__next__()
    pixel_boxes.boxes = pixel_boxes.boxes * 640
    with pytest.raises(ValueError, match="image 5.*normalised"):
        build_site([pixel_boxes], tmp_path / "pixels", progress=False)


def test_cli_builds_site_from_dump(tmp_path, records, monkeypatch, capsys):
    import geocap.data.dump_format as dump_format

    class FakeDump(list):
        metadata = {"label_names": LABEL_NAMES}

    opened = []
    monkeypatch.setattr(dump_format, "open_dump",
                        lambda path, progress=True: opened.append((path, progress)) or FakeDump(records))
    parser = argparse.ArgumentParser()
    add_view_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "view"
    # what killed runs left (a dead pid's temporary folder) goes; a live writer's stays
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".view.tmp-{dead.pid}" / "data").mkdir(parents=True)
    (tmp_path / f".view.tmp-{os.getppid()}").mkdir()
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("<h1>report</h1>")
    args = parser.parse_args(["view", str(tmp_path / "dump"), "--out", str(out), "--limit", "2",
                              "--report", str(tmp_path / "report" / "report.md"), "--no-progress"])
    assert args.func(args) == 0
    assert opened == [(str(tmp_path / "dump"), False)]         # --no-progress: no "reading DUMP" bar either
    assert "2 images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".view.tmp-{os.getppid()}", "report", "view"]
    manifest = (out / "data" / "manifest.js").read_text()
    assert '"report_href":"../report/report.html"' in manifest and '"label_names_known":true' in manifest
    assert '"box_embedding":null' in manifest                  # metadata without a model config: not shown
    assert report_href(None, out) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["view", "d", "--out", "o", "--limit", "-1"])


# ---------------------------------------------------------------- in the browser

def test_shading_equals_dump_values(browser, server, records):
    from selenium.webdriver.common.by import By

    recs = _page_records(records, 12)
    _open(browser, server + "image.html#id=12", "image")
    assert browser.find_element(By.ID, "canvas").get_attribute("data-background") == "image"
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert resources and all(r.startswith(server) for r in resources), resources   # nothing from elsewhere
    assert browser.find_element(By.ID, "report-link").get_attribute("href").endswith("/report/index.html")
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#objects .object")]
    assert labels == [f"{i}: {LABEL_NAMES[k]}" for i, k in enumerate(recs[0].labels)]
    # layers and heads are shown 1-based, as the analysis report numbers them (values stay 0-based)
    options = lambda sid: [(o.get_attribute("value"), o.text)  # noqa: E731
                           for o in browser.find_elements(By.CSS_SELECTOR, f"#{sid} option")]
    assert options("layer") == [(str(l), str(l + 1)) for l in range(L)]
    assert options("head") == [("mean", "mean over heads")] + [(str(h), f"head {h + 1}") for h in range(H)]
    ticks = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#entropy-plot text.tick")]
    assert [x for x in ticks if x.startswith("L")] == [f"L{l + 1}" for l in range(L)]
    for layer, head in ((1, 2), (0, "mean")):
        _select(browser, "layer", layer)
        _select(browser, "head", head)
        # an object: every box shaded by the encoder self-attention it receives from object 3
        obj = browser.find_element(By.CSS_SELECTOR, '#objects .object[data-index="3"]')
        obj.click()
        assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "encoder_self"
        shown_head = "mean over heads" if head == "mean" else f"head {head + 1}"
        assert f"layer {layer + 1}, {shown_head}" in browser.find_element(By.ID, "shading-info").text
        _assert_row(_values(browser, "rect.box", "data-index"), _expected(recs[0].encoder_self, layer, head, 3))
        # a token: boxes by cross-attention of step 2, words by decoder self-attention of step 2
        browser.find_element(By.CSS_SELECTOR, '.token[data-step="2"]').click()
        assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "cross"
        _assert_row(_values(browser, "rect.box", "data-index"), _expected(recs[0].cross, layer, head, 2))
        _assert_row(_values(browser, ".token", "data-input"), _expected(recs[0].decoder_self, layer, head, 2))
        browser.find_element(By.ID, "clear-selection").click()
    # the fills: darker for more weight, drawn weakest first (the strongest on top where they overlap)
    shown = _values(browser, "rect.box", "data-index")
    assert shown == {}
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="4"]').click()
    shown = _values(browser, "rect.box", "data-index")
    fills = browser.execute_script("return Array.from(document.querySelectorAll('#fills rect.fill'), "
                                   "f => [Number(f.dataset.index), getComputedStyle(f).fill]);")
    drawn = [shown[i] for i, _ in fills]
    assert drawn == sorted(drawn)
    lightness = [sum(map(int, re.findall(r"\d+", fill))) for _, fill in fills]
    assert lightness == sorted(lightness, reverse=True) and lightness[0] > lightness[-1]
    # another record of the image (the generated one, stored apart): its own maps
    _select(browser, "record", 2)
    _select(browser, "layer", 1)
    _select(browser, "head", 0)
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="5"]').click()
    _assert_row(_values(browser, "rect.box", "data-index"), _expected(recs[2].cross, 1, 0, 5))
    _assert_row(_values(browser, ".token", "data-input"), _expected(recs[2].decoder_self, 1, 0, 5))
    # the entropy plot shows the record's per-layer entropies of head 0
    points = browser.find_elements(By.CSS_SELECTOR, '#entropy-plot circle[data-map="cross"]')
    np.testing.assert_allclose([float(p.get_attribute("data-entropy")) for p in points],
                               _normalised_entropy(recs[2].cross_entropy, "cross", N)[:, 0], rtol=1e-3)
    # the controlled measures of the record: the analyses' own values for its image and caption
    from geocap.analysis.grounding import record_referent_effect
    from geocap.analysis.proximity import image_values
    want = dict(image_values(recs[2]), referent_effect=record_referent_effect(recs[2]))
    assert want["distance"] is not None
    for name, layers in want.items():
        cells = browser.find_elements(By.CSS_SELECTOR, f'#controlled-table tr[data-measure="{name}"] td[data-layer]')
        if layers is None:
            assert not cells, name
            continue
        got = [float(c.get_attribute("data-value")) if c.get_attribute("data-value") else np.nan for c in cells]
        np.testing.assert_allclose(got, [np.nan if v is None else v for v in layers], rtol=1e-3, atol=1e-4)
    # the word bucket and the word rules of the page are those of the builder
    words = ["a", "giraffe", "café", "naïve", "日本", "x_1"]
    assert browser.execute_script("return arguments[0].map(w => Geocap.wordBucket(w, 97));", words) == \
        [word_bucket(w, 97) for w in words]
    text = "Ein Café, NAÏVE <unk> x_1!"
    assert browser.execute_script("return Geocap.words(arguments[0]);", text) == words_of(text)


def test_missing_maps_and_canvases(browser, server, records):
    from selenium.webdriver.common.by import By

    _open(browser, server + "image.html#id=41&r=2", "image")
    notices = browser.find_elements(By.CSS_SELECTOR, "#notices .missing")
    assert [n.get_attribute("data-map") for n in notices] == ["cross"]
    assert "no cross-attention" in notices[0].text
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="1"]').click()
    assert _values(browser, "rect.box", "data-index") == {}        # nothing to shade the boxes with
    rec = _page_records(records, 41)[2]
    _assert_row(_values(browser, ".token", "data-input"), _expected(rec.decoder_self, 0, "mean", 1))
    assert "no cross-attention in this record" in browser.find_element(By.ID, "shading-info").text
    # the records that have it show no notice
    _select(browser, "record", 0)
    assert browser.find_elements(By.CSS_SELECTOR, "#notices .missing") == []
    # no image file, size known: blank canvas of the image's shape
    _open(browser, server + "image.html#id=3", "image")
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-background") == "blank" and canvas.get_dom_attribute("viewBox") == "0 0 200 100"
    # no image file, size unknown: a 4:3 blank canvas, and the page says so
    _open(browser, server + "image.html#id=300", "image")
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-background") == "blank" and canvas.get_dom_attribute("viewBox") == "0 0 400 300"
    assert "4:3" in browser.find_element(By.ID, "notices").text
    # an image file that cannot be loaded: blank canvas too
    _open(browser, server + "image.html#id=1001", "image")
    assert browser.find_element(By.ID, "canvas").get_attribute("data-background") == "blank"
    assert "could not be loaded" in browser.find_element(By.ID, "notices").text
    # an image file and no size in the records: the file's own size
    _open(browser, server + "image.html#id=2048", "image")
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-background") == "image" and canvas.get_dom_attribute("viewBox") == "0 0 100 100"
    # an id the site does not hold: a clear error on the page
    browser.get(server + "image.html#id=999")
    _wait_ready(browser, "image")
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("class") == "error" and "image 999 is not in this site" in status.text
    browser.get_log("browser")                                      # the expected 404, read and dropped


def test_index_search_and_paging(browser, server, site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(ids):
        WebDriverWait(browser, WAIT_S).until(lambda d: _index_ids(d) == ids)

    _open(browser, server + "index.html", "index")
    assert _index_ids(browser) == IDS[:3]
    assert browser.find_element(By.ID, "page-number").text == "page 1 of 3"
    browser.find_element(By.ID, "next-page").click()
    wait_for(IDS[3:6])
    browser.find_element(By.ID, "last-page").click()
    wait_for(IDS[6:])
    assert browser.find_element(By.ID, "report-link").get_attribute("href").endswith("/report/index.html")
    assert browser.find_element(By.ID, "box-embedding").text.startswith("box embedding: signed")
    assert browser.find_element(By.ID, "links").text.startswith("analysis report · box embedding: signed")
    notice = browser.find_element(By.CSS_SELECTOR, '#notices .missing[data-map="cross"]')
    assert "1 of 21 records" in notice.text
    for query, ids in (("zebra", [40]), ("giraffe", [40, 41]), ("Giraffe  OKAPI", [41]), ("1001", [1001]),
                       ("no-such-word", [])):
        box = browser.find_element(By.ID, "query")
        box.clear()
        box.send_keys(query)
        browser.find_element(By.ID, "search-button").click()
        said = f"{len(ids)} image{' matches' if len(ids) == 1 else 's match'} {json.dumps(query.strip())}"
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("textContent") == said,
            message=f"status: {said!r} expected")
        wait_for(ids)
    # search results link to the image page, and the image page back to the index
    browser.get(server + "index.html#q=giraffe")
    wait_for([40, 41])
    browser.find_element(By.CSS_SELECTOR, '.entry[data-id="41"] a.image-link').click()
    _wait_ready(browser, "image")
    assert browser.find_element(By.ID, "title").text == "Image 41"
    browser.find_element(By.ID, "index-link").click()
    _wait_ready(browser, "index")
    # opened from disk (file://): the same data loads without a server
    out, _ = site
    _open(browser, (out / "index.html").as_uri() + "#p=2", "index")
    assert _index_ids(browser) == IDS[3:6]


def test_screenshot_is_not_blank(browser, server):
    from PIL import Image
    from selenium.webdriver.common.by import By

    _open(browser, server + "image.html#id=12", "image")
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="1"]').click()
    image = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L"), dtype=np.float64)
    assert image.std() > 20, image.std()
    stage = browser.find_element(By.ID, "canvas").rect
    scale = image.shape[1] / browser.execute_script("return window.innerWidth;")
    top, left = int(stage["y"] * scale), int(stage["x"] * scale)
    crop = image[top:top + int(stage["height"] * scale), left:left + int(stage["width"] * scale)]
    assert crop.size and crop.std() > 20, crop.std()                # the image and the shaded boxes


# ---------------------------------------------------------------- the viewer must not mislead

OVERLAP_ID, PORTRAIT_ID = 5, 6


def _crafted_records():
    """Image 5: three boxes on a 400 x 300 canvas, A and B overlapping, C apart, with the first
    step's cross-attention 0.3, 0.3 and 0.4 (every head alike); no labels. Image 6: a portrait
    image (375 x 500) with 36 objects and 16 tokens, as a real dump has."""
    rec = next(synthetic_records([OVERLAP_ID], objects=3, tokens=4, layers=1, heads=2, captions=1, seed=2))
    rec.boxes = np.array([[0.05, 0.1, 0.45, 0.6], [0.30, 0.1, 0.70, 0.6], [0.75, 0.1, 0.95, 0.6]], dtype=np.float32)
    rec.cross = rec.cross.astype(np.float32)
    rec.cross[0, :, 0] = [0.3, 0.3, 0.4]
    rec.labels = None
    rec.extra = {"width": 400, "height": 300}
    tall = next(synthetic_records([PORTRAIT_ID], objects=36, tokens=16, layers=2, heads=2, captions=1, seed=3))
    tall.extra = {"width": 375, "height": 500}
    return [rec, tall]


@pytest.fixture(scope="module")
def crafted_site(tmp_path_factory):
    """The crafted records' site, opened from disk, with a rendered analysis report beside it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("crafted")
    report = root / "report"
    report.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(report / "entropy.png")
    (report / "report.md").write_text("# Attention analysis\n\n![entropy](entropy.png)\n")
    (report / "report.html").write_text('<!doctype html><title>Attention analysis</title><h1>Attention analysis</h1>'
                                        '<img id="figure" src="entropy.png" alt="entropy">')
    out = root / "view"
    build_site(_crafted_records(), out, progress=False, report_href=report_href(report / "report.md", out))
    return out


def _hover(driver, element):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(element).perform()
    return driver.find_element("id", "tooltip").text


def _number(text):
    """The last number in a text (as the page formats it: 0.1234 or 1.23e-4)."""
    return float(re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)[-1])


def test_hovering_a_box_keeps_the_selected_word(browser, server, records):
    from selenium.webdriver.common.by import By

    rec = _page_records(records, 12)[0]
    _open(browser, server + "image.html#id=12", "image")
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="2"]').click()
    expected = _expected(rec.cross, 0, "mean", 2)
    for index in (3, 0):
        text = _hover(browser, browser.find_element(By.CSS_SELECTOR, f'#objects .object[data-index="{index}"]'))
        assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "cross"
        _assert_row(_values(browser, "rect.box", "data-index"), expected)      # still the word's view
        assert browser.find_elements(By.CSS_SELECTOR, '.token.selected[data-step="2"]')
        assert f"object {index}" in text and "cross-attention weight of step 2" in text, text
        assert _number(text) == pytest.approx(expected[index], rel=1e-3, abs=6e-5)
    # on the stage too: the hovered box (whichever is on top at its centre) tells its own weight
    box = browser.find_element(By.CSS_SELECTOR, 'rect.box[data-index="1"]')
    text = _hover(browser, box)
    hovered = int(re.search(r"object (\d+)", text).group(1))
    assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "cross"
    assert _number(text) == pytest.approx(expected[hovered], rel=1e-3, abs=6e-5)
    # with nothing selected, hovering an object previews its encoder self-attention
    browser.find_element(By.ID, "clear-selection").click()
    _hover(browser, browser.find_element(By.CSS_SELECTOR, '#objects .object[data-index="3"]'))
    assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "encoder_self"
    _assert_row(_values(browser, "rect.box", "data-index"), _expected(rec.encoder_self, 0, "mean", 3))


def test_word_tooltips_say_what_the_number_is(browser, server, records):
    from selenium.webdriver.common.by import By

    rec = _page_records(records, 12)[0]
    _open(browser, server + "image.html#id=12", "image")
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="2"]').click()
    own = _hover(browser, browser.find_element(By.CSS_SELECTOR, '.token[data-step="2"]'))
    assert "attention 0" not in own and "not one of that step's inputs" in own, own
    later = _hover(browser, browser.find_element(By.CSS_SELECTOR, '.token[data-input="4"]'))
    assert "not one of its inputs" in later, later
    earlier = _hover(browser, browser.find_element(By.CSS_SELECTOR, '.token[data-input="1"]'))
    assert "decoder self-attention weight of step 2" in earlier, earlier
    assert _number(earlier) == pytest.approx(_expected(rec.decoder_self, 0, "mean", 2)[1], rel=1e-3, abs=6e-5)


def test_overlapping_boxes_do_not_add_up(browser, crafted_site):
    from PIL import Image
    from selenium.webdriver.common.by import By

    _open(browser, (crafted_site / "image.html").as_uri() + f"#id={OVERLAP_ID}&w=0", "image")
    assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "cross"
    ratio = browser.execute_script("return window.devicePixelRatio;")
    points = {"a only": (0.17, 0.35), "a and b": (0.375, 0.35), "c": (0.85, 0.35), "none": (0.5, 0.85)}
    where = browser.execute_script(
        "const svg = document.getElementById('canvas'), m = svg.getScreenCTM(), out = {};"
        "for (const [k, [x, y]] of Object.entries(arguments[0])) {"
        "  const p = svg.createSVGPoint(); p.x = x * 400; p.y = y * 300; const q = p.matrixTransform(m);"
        "  out[k] = [q.x, q.y]; } return out;", points)
    image = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L"), dtype=np.float64)
    grey = {k: image[int(y * ratio), int(x * ratio)] for k, (x, y) in where.items()}
    assert grey["none"] - grey["a only"] > 20, grey                     # a weight of 0.3 shows
    assert abs(grey["a and b"] - grey["a only"]) <= 2, grey              # two 0.3 boxes are still 0.3
    assert grey["a and b"] - grey["c"] > 10, grey                        # ... and lighter than 0.4
    numbers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#objects .object-value")]
    assert [float(x) for x in numbers] == pytest.approx([0.3, 0.3, 0.4], abs=1e-3)   # the numbers beside


def test_words_and_boxes_on_one_screen(browser, server, crafted_site):
    from selenium.webdriver.common.by import By

    assert browser.get_window_size() == {"width": WINDOW[0], "height": WINDOW[1]}
    for url in (server + "image.html#id=12", (crafted_site / "image.html").as_uri() + f"#id={PORTRAIT_ID}"):
        _open(browser, url, "image")
        view = browser.execute_script("return [innerWidth, innerHeight];")
        rects = browser.execute_script(
            "return Array.from(document.querySelectorAll('#canvas, .token'), e => e.getBoundingClientRect().toJSON());")
        canvas, chips = rects[0], rects[1:]
        assert canvas["height"] >= 0.5 * view[1] and canvas["width"] >= 300, canvas     # not shrunk away
        for r in rects:
            assert r["top"] >= 0 and r["bottom"] <= view[1] and r["right"] <= view[0], (url, r, view)
        assert len(chips) == len(browser.find_elements(By.CSS_SELECTOR, ".token")) > 5


def test_previous_next_image_and_back_to_its_index_page(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server + "image.html#id=40&l=1&h=2", "image")       # the last image of index page 1
    assert browser.find_element(By.ID, "prev-image").get_attribute("href").endswith("#id=12&l=1&h=2")
    assert browser.find_element(By.ID, "index-link").get_attribute("href").endswith("index.html#p=1")
    browser.find_element(By.ID, "next-image").click()
    _wait_ready(browser, "image")
    assert browser.find_element(By.ID, "title").text == "Image 41"
    assert (browser.find_element(By.ID, "layer").get_attribute("value"),
            browser.find_element(By.ID, "head").get_attribute("value")) == ("1", "2")
    assert browser.find_element(By.ID, "index-link").get_attribute("href").endswith("index.html#p=2")
    _open(browser, server + f"image.html#id={IDS[-1]}", "image")
    assert browser.find_element(By.ID, "next-image").tag_name == "span"      # no next image: not a link
    assert browser.find_element(By.ID, "prev-image").get_attribute("href").endswith(f"#id={IDS[-2]}&l=0&h=mean")
    _open(browser, server + f"image.html#id={IDS[0]}", "image")
    assert browser.find_element(By.ID, "prev-image").tag_name == "span"


def test_paging_shows_the_new_page_from_the_top(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(WINDOW[0], 420)
    try:
        _open(browser, server + "index.html", "index")
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight);")
        assert browser.execute_script("return window.scrollY;") > 50            # the pager is below the fold
        browser.find_element(By.ID, "next-page").click()
        WebDriverWait(browser, WAIT_S).until(lambda d: _index_ids(d) == IDS[3:6])
        assert browser.execute_script("return window.scrollY;") == 0
    finally:
        browser.set_window_size(*WINDOW)


def test_view_state_in_the_address(browser, server, records):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    recs = _page_records(records, 12)
    _open(browser, server + "image.html#id=12&r=1&l=1&h=2&w=3", "image")
    shown = [browser.find_element(By.ID, k).get_attribute("value") for k in ("record", "layer", "head")]
    assert shown == ["1", "1", "2"]
    assert browser.find_elements(By.CSS_SELECTOR, '.token.selected[data-step="3"]')
    _assert_row(_values(browser, "rect.box", "data-index"), _expected(recs[1].cross, 1, 2, 3))
    assert not browser.find_elements(By.ID, "address-notice")
    # an edit of the address is followed
    browser.execute_script("location.hash = 'id=12&r=0&l=0&h=mean&o=2';")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.ID, "stage").get_attribute("data-shading") == "encoder_self")
    _assert_row(_values(browser, "rect.box", "data-index"), _expected(recs[0].encoder_self, 0, "mean", 2))
    assert browser.find_elements(By.CSS_SELECTOR, '#objects .object.selected[data-index="2"]')
    # every choice on the page is written back
    browser.find_element(By.CSS_SELECTOR, '.token[data-step="4"]').click()
    _select(browser, "head", 1)
    assert browser.execute_script("return location.hash;") == "#id=12&r=0&l=0&h=1&w=4"
    browser.find_element(By.CSS_SELECTOR, '#objects .object[data-index="1"]').click()
    assert browser.execute_script("return location.hash;") == "#id=12&r=0&l=0&h=1&o=1"
    # heads, layers, words and objects the record does not have: a message, and the defaults
    for bad, said in (("h=-1", "head h=-1"), ("h=3", "head h=3"), ("h=x", "head h=x"), ("l=2", "layer l=2"),
                      ("w=99", "word w=99"), ("o=-2", "object o=-2"), ("r=7", "caption r=7")):
        _open(browser, server + "image.html#id=12&" + bad, "image")
        notice = browser.find_element(By.ID, "address-notice").text
        assert said in notice, notice
        assert browser.find_element(By.ID, "head").get_attribute("value") in ("mean", "0", "1", "2")
        assert browser.find_element(By.CSS_SELECTOR, "#entropy-plot circle")           # the page still works
    browser.execute_script("location.hash = 'id=12&h=-5';")
    WebDriverWait(browser, WAIT_S).until(lambda d: "h=-5" in d.find_element(By.ID, "address-notice").text)
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_entropy_normalised_as_the_report_with_grid_and_colours(browser, server, records):
    import matplotlib
    import matplotlib.colors
    from selenium.webdriver.common.by import By

    rec = _page_records(records, 12)[0]
    _open(browser, server + "image.html#id=12", "image")
    for kind, nats in (("encoder_self", rec.encoder_entropy), ("decoder_self", rec.decoder_entropy),
                       ("cross", rec.cross_entropy)):
        expected = _normalised_entropy(nats, kind, N)
        points = browser.find_elements(By.CSS_SELECTOR, f'#entropy-plot circle[data-map="{kind}"]')
        np.testing.assert_allclose([float(p.get_attribute("data-entropy")) for p in points], expected.mean(axis=1),
                                   rtol=1e-3)
        cells = browser.find_elements(By.CSS_SELECTOR, f'.entropy-grid[data-map="{kind}"] td')
        grid = {(int(c.get_attribute("data-layer")), c.get_attribute("data-head")):
                float(c.get_attribute("data-entropy")) for c in cells}
        assert sorted(grid) == sorted([(l, h) for l in range(L) for h in [str(h) for h in range(H)] + ["mean"]])
        np.testing.assert_allclose([[grid[l, str(h)] for h in range(H)] for l in range(L)], expected, rtol=1e-3)
    assert browser.find_element(By.ID, "uniform-line").get_attribute("data-entropy") == "1"
    # the report's colours: plot_entropy draws encoder, decoder, cross with matplotlib's first three
    report = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][:3]
    for kind, colour in zip(("encoder_self", "decoder_self", "cross"), report):
        rgb = "rgb({}, {}, {})".format(*(round(255 * c) for c in matplotlib.colors.to_rgb(colour)))
        line = browser.find_element(By.CSS_SELECTOR, f"#entropy-plot polyline.series-{kind}")
        assert browser.execute_script("return getComputedStyle(arguments[0]).stroke;", line) == rgb, kind
    # a click on a cell picks its layer and head
    browser.find_element(By.CSS_SELECTOR, '.entropy-grid[data-map="cross"] td[data-layer="1"][data-head="2"]').click()
    assert browser.execute_script("return location.hash;").endswith("&l=1&h=2")


def test_encoded_entropy_is_the_reports_unit():
    from geocap.analysis.entropy import entropy

    rec = next(synthetic_records([9], objects=4, tokens=5, layers=2, heads=3, captions=1, seed=4))
    encoded = encode_record(rec, {})["entropy"]
    report = entropy([rec]).per_head
    for kind, nats in (("encoder_self", rec.encoder_entropy), ("decoder_self", rec.decoder_entropy),
                       ("cross", rec.cross_entropy)):
        np.testing.assert_allclose(encoded[kind], _normalised_entropy(nats, kind, 4), rtol=1e-3)
        np.testing.assert_allclose(encoded[kind], report[kind], rtol=1e-3)
    rec.cross_entropy = None                       # no stored entropies: from the map, as the report does
    np.testing.assert_allclose(encode_record(rec, {})["entropy"]["cross"], report["cross"], rtol=2e-3)
    one = next(synthetic_records([9], objects=1, tokens=5, layers=1, heads=1, captions=1))
    assert encode_record(one, {})["entropy"]["encoder_self"] is None       # one object: no row qualifies


def test_report_link_is_the_rendered_report(tmp_path, browser, crafted_site, capsys):
    from selenium.webdriver.common.by import By

    from geocap.cli import main

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    with pytest.raises(ValueError, match=r"--report: no HTML report at .*report\.html"):
        report_href(report / "report.md", tmp_path / "view")
    assert main(["view", str(tmp_path / "no-dump"), "--out", str(tmp_path / "view"),
                 "--report", str(report / "report.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geocap: error: --report: no HTML report") and err.count("\n") == 1, err
    assert not (tmp_path / "view").exists()
    (report / "report.html").write_text("<h1>report</h1>")
    for given in (report / "report.md", report / "report.html", report):
        assert report_href(given, tmp_path / "view") == "../report/report.html"
    # in the browser: the link opens the HTML report, with its figure
    _open(browser, (crafted_site / "index.html").as_uri(), "index")
    browser.find_element(By.ID, "report-link").click()
    assert browser.find_element(By.TAG_NAME, "h1").text == "Attention analysis"
    assert browser.execute_script("return document.getElementById('figure').naturalWidth;") == 30


# ---------------------------------------------------------------- a patch encoder's image tokens

PATCH_ID, BOXES_ID = 77, 78
ROWS, COLS, PREFIX = 3, 4, 2                 # not square: rows and columns swapped would show
PATCH_STEP, PATCH_TOP, CLS_WEIGHT = 2, 6, 0.5   # step 2 attends most to patch 6 = cell (1, 2); [CLS] more
GREY = 128


def _patch_grid():
    from geocap.hf.patches import PatchGrid

    return PatchGrid(rows=ROWS, cols=COLS, prefix=PREFIX)


def _patch_records():
    """Image 77: two records of a 3 x 4 patch grid after two special tokens; step 2's
    cross-attention gives [CLS] 0.5 (more than any patch), patch 6 (object 8) about 0.3 and the
    other patches a little each, differently per head. Image 78: an ORT-like record (boxes, labels)."""
    grid = _patch_grid()
    recs = list(synthetic_records([PATCH_ID], tokens=5, layers=2, heads=3, captions=2, seed=5, patches=grid))
    rng = np.random.default_rng(6)
    cross = recs[0].cross.astype(np.float32)
    patches = rng.random((2, 3, ROWS * COLS)) * 0.02
    patches[..., PATCH_TOP] = 0.3
    cross[:, :, PATCH_STEP, 0] = CLS_WEIGHT
    cross[:, :, PATCH_STEP, 1] = 0.01
    cross[:, :, PATCH_STEP, PREFIX:] = patches / patches.sum(axis=-1, keepdims=True) * (1 - CLS_WEIGHT - 0.01)
    recs[0].cross = cross
    boxes = next(synthetic_records([BOXES_ID], objects=N, tokens=T, layers=L, heads=H, captions=1, labels=4, seed=7))
    return recs + [boxes]


@pytest.fixture(scope="module")
def patch_site(tmp_path_factory):
    """The patch records' site, with a uniform grey 240 x 180 image file for image 77."""
    from PIL import Image

    root = tmp_path_factory.mktemp("patches")
    (root / "images").mkdir()
    Image.fromarray(np.full((180, 240, 3), GREY, dtype=np.uint8)).save(root / "images" / f"{PATCH_ID:012d}.png")
    out = root / "view"
    build_site(_patch_records(), out, images_dir=root / "images", progress=False,
               metadata={"label_names": LABEL_NAMES})
    return out


def _cell(index):
    """The grid cell (row, col) of object ``index`` (a patch: the objects after the special tokens)."""
    return divmod(index - PREFIX, COLS)


def test_patch_fields_are_carried_and_checked(patch_site):
    grid = _patch_grid()
    rec = next(synthetic_records([PATCH_ID], tokens=4, layers=1, heads=1, captions=1, patches=grid))
    encoded = encode_record(rec, {})
    assert encoded["special_objects"] == [0, 1] and encoded["patch_grid"] == [ROWS, COLS]
    assert encoded["labels"] is None and encoded["referents"] is None
    rec.extra = {"special_objects": np.array([1, 0]), "patch_grid": np.array([ROWS, COLS])}   # as read from HDF5
    assert (encode_record(rec, {})["special_objects"], encode_record(rec, {})["patch_grid"]) == ([0, 1], [ROWS, COLS])
    plain = next(synthetic_records([BOXES_ID], objects=N, tokens=T, layers=1, heads=1, captions=1))
    assert not {"special_objects", "patch_grid"} & set(encode_record(plain, {}))     # ORT records: as before
    grid_rule = r"patch_grid'\] must be \[rows, cols\], ints with rows \* cols"
    for extra, said in (({"special_objects": [0, 1], "patch_grid": [4, 4]}, grid_rule),
                        ({"patch_grid": [ROWS, COLS]}, grid_rule + r" \+ 0 special objects = N = 14"),
                        ({"special_objects": [0, 14]}, r"objects'\] must be distinct object indices in \[0, 14"),
                        ({"special_objects": [0, 0]}, "must be distinct"),
                        ({"special_objects": [0, 1], "patch_grid": [3.0, 4]}, grid_rule),
                        ({"special_objects": 0}, "must be distinct object indices"),
                        ({"special_objects": [0, 1], "patch_grid": [12]}, grid_rule)):
        rec.extra = extra
        with pytest.raises(ValueError, match=f"image {PATCH_ID} .*{said}"):
            encode_record(rec, {})
    text = (patch_site / "data" / image_data_key(PATCH_ID)).read_text()
    value = json.loads(text[text.index(",") + 1:text.rindex(");")])
    assert [(r["special_objects"], r["patch_grid"]) for r in value["records"]] == [([0, 1], [ROWS, COLS])] * 2
    text = (patch_site / "data" / image_data_key(BOXES_ID)).read_text()
    assert "special_objects" not in text and "patch_grid" not in text


def _svg_to_screen(driver, points):
    """Screenshot pixel (x, y) of each canvas point {name: (x, y)} given in the SVG's units."""
    ratio = driver.execute_script("return window.devicePixelRatio;")
    where = driver.execute_script(
        "const svg = document.getElementById('canvas'), m = svg.getScreenCTM(), out = {};"
        "for (const [k, [x, y]] of Object.entries(arguments[0])) {"
        "  const p = svg.createSVGPoint(); p.x = x; p.y = y; const q = p.matrixTransform(m);"
        "  out[k] = [q.x, q.y]; } return out;", points)
    return {k: (int(x * ratio), int(y * ratio)) for k, (x, y) in where.items()}


def test_patch_grid_and_heat_map(browser, patch_site):
    from PIL import Image
    from selenium.webdriver.common.by import By

    rec = _patch_records()[0]
    url = (patch_site / "image.html").as_uri()                 # from disk: file:// works as from a server
    _open(browser, url + f"#id={PATCH_ID}&l=1&w={PATCH_STEP}", "image")
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-background") == "image" and canvas.get_dom_attribute("viewBox") == "0 0 240 180"
    # the grid's lines (borders included), not labelled boxes; no box for the special tokens
    lines = browser.execute_script("return Array.from(document.querySelectorAll('#patch-grid line.grid-line'), "
                                   "l => [l.dataset.axis, l.y1.baseVal.value, l.x1.baseVal.value]);")
    across = sorted(y for axis, y, _ in lines if axis == "row")
    down = sorted(x for axis, _, x in lines if axis == "col")
    assert across == pytest.approx([r * 180 / ROWS for r in range(ROWS + 1)])
    assert down == pytest.approx([c * 240 / COLS for c in range(COLS + 1)])
    cells = browser.execute_script("return Array.from(document.querySelectorAll('#canvas rect.box'), "
                                   "b => [Number(b.dataset.index), b.x.baseVal.value, b.y.baseVal.value, "
                                   "b.width.baseVal.value, getComputedStyle(b).stroke]);")
    assert sorted(i for i, *_ in cells) == list(range(PREFIX, PREFIX + ROWS * COLS))
    for i, x, y, width, stroke in cells:
        # boxes are stored to 4 decimals: within 0.05 px of the cell (r, c) on a 240 x 180 canvas
        assert (round(y / 60), round(x / 60)) == _cell(i) and abs(y - 60 * _cell(i)[0]) < 0.05, (i, x, y)
        assert width == pytest.approx(60, abs=0.05) and stroke == "none", (i, width, stroke)
    assert not browser.find_elements(By.CSS_SELECTOR, "#canvas .box-label")
    # the selected word's cross-attention over the patches: the dump's values, the layer and row asked for
    for head in ("mean", 1):
        _select(browser, "head", head)
        expected = _expected(rec.cross, 1, head, PATCH_STEP)
        shown = _values(browser, "rect.box", "data-index")
        np.testing.assert_allclose([shown[i] for i in range(PREFIX, len(expected))], expected[PREFIX:], rtol=1e-3)
        specials = {int(b.get_attribute("data-index")): b
                    for b in browser.find_elements(By.CSS_SELECTOR, ".special-weight")}
        assert sorted(specials) == [0, 1]
        assert specials[0].text == f"[CLS]: {expected[0]:.4f}" and specials[1].text == f"[special 1]: {expected[1]:.4f}"
        assert float(specials[0].get_attribute("data-attention")) == pytest.approx(CLS_WEIGHT, rel=1e-3)
        # the shades are fractions of the largest patch weight, not of [CLS]'s larger one
        paint = browser.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#fills rect.fill'), "
            "f => [f.dataset.index, Number(getComputedStyle(f).fillOpacity)]));")
        opacity = np.array([paint[str(i)] for i in range(PREFIX, len(expected))])
        assert opacity.argmax() == PATCH_TOP and opacity.max() == pytest.approx(0.7)
        np.testing.assert_allclose(opacity, 0.7 * expected[PREFIX:] / expected[PREFIX:].max(), atol=2e-3)
        swatches = browser.find_elements(By.CSS_SELECTOR, "#heat-scale .scale-swatch")
        assert float(swatches[-1].get_attribute("data-attention")) == pytest.approx(expected[PREFIX:].max(), rel=1e-3)
        assert browser.find_element(By.ID, "heat-scale").is_displayed()
    # on screen: over a uniform grey image, the strongest patch's cell is the most tinted
    centres = {i: ((c + 0.5) * 60, (r + 0.5) * 60) for i in range(PREFIX, PREFIX + ROWS * COLS) for r, c in [_cell(i)]}
    where = _svg_to_screen(browser, {str(i): p for i, p in centres.items()})
    image = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"), dtype=np.float64)
    tint = {int(i): np.abs(image[y, x] - GREY).sum() for i, (x, y) in where.items()}
    assert max(tint, key=tint.get) == PREFIX + PATCH_TOP and _cell(PREFIX + PATCH_TOP) == (1, 2), tint
    assert tint[PREFIX + PATCH_TOP] > 100 and sorted(tint.values())[-2] < 40, tint
    # a patch selected: its encoder self-attention, over the patches and beside the image
    _select(browser, "head", "mean")
    browser.find_element(By.CSS_SELECTOR, 'rect.box[data-index="5"]').click()
    assert browser.find_element(By.ID, "stage").get_attribute("data-shading") == "encoder_self"
    for index in (5, 0):
        if index == 0:                                          # then [CLS] selected: its own row
            browser.find_element(By.CSS_SELECTOR, '.special-weight[data-index="0"]').click()
        expected = _expected(rec.encoder_self, 1, "mean", index)
        shown = _values(browser, "rect.box", "data-index")
        np.testing.assert_allclose([shown[i] for i in range(PREFIX, len(expected))], expected[PREFIX:], rtol=1e-3)
        assert _number(browser.find_element(By.CSS_SELECTOR, '.special-weight[data-index="0"]').text) == \
            pytest.approx(expected[0], rel=1e-3, abs=6e-5)
    assert browser.execute_script("return location.hash;") == f"#id={PATCH_ID}&r=0&l=1&h=mean&o=0"
    info = browser.find_element(By.ID, "shading-info").text
    assert info.startswith("Patches: encoder self-attention from [CLS] (token 0) to every patch, layer 2"), info
    assert browser.find_elements(By.CSS_SELECTOR, '.special-weight.selected[data-index="0"]')
    # the list of image tokens, by weight while shaded (the top patches first), by index when not
    assert browser.find_element(By.ID, "objects").get_attribute("data-order") == "weight"
    assert browser.find_element(By.ID, "objects-title").text == "Patches, by weight"
    listed = [int(e.get_attribute("data-index")) for e in browser.find_elements(By.CSS_SELECTOR, "#objects .object")]
    assert listed == sorted(range(len(expected)), key=lambda i: (-expected[i], i))
    browser.find_element(By.ID, "clear-selection").click()
    assert browser.find_element(By.ID, "objects").get_attribute("data-order") == "index"
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#objects .object")]
    assert labels[:3] == ["0: [CLS]", "1: [special 1]", "2: patch (0, 0)"] and labels[-1] == "13: patch (2, 3)"


def test_records_without_patches_unchanged(browser, patch_site):
    from selenium.webdriver.common.by import By

    _open(browser, (patch_site / "image.html").as_uri() + f"#id={BOXES_ID}&w=1", "image")
    assert not browser.find_elements(By.CSS_SELECTOR, "#patch-grid, .grid-line, .special-weight")
    assert not browser.find_element(By.ID, "special-weights").is_displayed()
    assert not browser.find_element(By.ID, "heat-scale").is_displayed()
    boxes = browser.find_elements(By.CSS_SELECTOR, "#canvas rect.box")
    assert len(boxes) == N and len(browser.find_elements(By.CSS_SELECTOR, "#canvas .box-label")) == N
    assert browser.find_element(By.ID, "fills").get_attribute("opacity") == "0.7"
    widths = {float(b.value_of_css_property("stroke-width").rstrip("px")) for b in boxes}
    assert max(widths) == pytest.approx(4.0) and len(widths) > 1                 # outlines grow with the weight
    assert browser.find_element(By.ID, "shading-info").text.startswith("Step 1 ") and \
        "boxes: cross-attention" in browser.find_element(By.ID, "shading-info").text


def test_sub_word_pieces_are_shown_and_searched_as_words():
    from geocap.view.encode import caption_text
    from geocap.data.token_words import caption_words, token_words

    byte_level = ["two", "\u0120", "refrigerators", "\u0120c", "up", "\u0120caf\u00c3", "\u00a9", "<eos>"]
    assert token_words(byte_level) == (["two", "\u2423", "refrigerators", "c", "up", "caf\ufffd", "\ufffd", "<eos>"],
                                       [0, -1, 1, 2, 2, 3, 3, 4])       # a character split over two pieces
    assert caption_words(byte_level) == ["two", "refrigerators", "cup", "caf\u00e9", "<eos>"]   # UTF-8 over pieces
    assert caption_text(byte_level) == "two refrigerators cup caf\u00e9"
    assert caption_words(["\u2581two", "\u2581", "refrigerators", "\u2581a", "<eos>"]) == \
        ["two", "refrigerators", "a", "<eos>"]
    assert token_words(["two", "refrigerator", "##s", "[SEP]"]) == (["two", "refrigerator", "s", "[SEP]"],
                                                                    [0, 1, 1, 2])
    words = ["a", "dog", "on", "the", "left", "<eos>"]                 # whole words: unchanged
    assert token_words(words) == (words, list(range(6))) and caption_text(words) == "a dog on the left"
    rec = next(synthetic_records([1], objects=3, tokens=4, layers=1, heads=1, captions=1))
    assert not {"pieces", "word_of", "words"} & set(encode_record(rec, {}))
    rec.tokens = ["\u0120c", "up", "<eos>"] + rec.tokens[3:]
    encoded = encode_record(rec, {})
    assert encoded["pieces"][:2] == ["c", "up"] and encoded["words"][0] == "cup" and encoded["word_of"][:2] == [0, 0]


def test_a_stop_request_lost_as_an_exception_stops_the_site_at_the_next_record(tmp_path, records):
    """The stop flag set while the first record is read, its exception lost: the site stops at
    the next record; no site, no temporary folder."""
    from geocap import stop

    def requesting(records):
        for k, record in enumerate(records):
            if k == 1:
                stop.request_stop()
            yield record
    seen = []

    def counted(records):
        for record in records:
            seen.append(record)
            yield record
    with stop.stop_signals():
        with pytest.raises(stop.Interrupted):
            build_site(counted(requesting(records)), tmp_path / "site", progress=False)
    assert len(seen) == 2 and list(tmp_path.iterdir()) == []


def test_word_index_and_pages_are_the_same_however_few_pairs_fit_in_memory(tmp_path, records, monkeypatch):
    """The index pages and word buckets come from spool files on disk; grouping the word pairs a
    few buckets at a time (here at most 3 pairs held) writes the same files as all at once, and
    every word lists exactly the images whose captions hold it."""
    import geocap.view.site as site
    from geocap.view.encode import caption_text, words_of

    def data_files(path):
        return {p.relative_to(path).as_posix(): p.read_text() for p in sorted((path / "data").rglob("*.js"))
                if not p.relative_to(path / "data").as_posix().startswith("img/")}
    build_site(records, tmp_path / "all", progress=False, page_size=4)
    monkeypatch.setattr(site, "WORD_PAIRS_IN_MEMORY", 3)
    build_site(records, tmp_path / "few", progress=False, page_size=4)
    assert data_files(tmp_path / "all") == data_files(tmp_path / "few")
    expected = {}
    for record in records:
        for word in words_of(caption_text(record.tokens)):
            expected.setdefault(word, set()).add(int(record.image_id))
    found = {}
    for name, text in data_files(tmp_path / "few").items():
        if name.startswith("data/words/"):
            for word, deltas in json.loads(text[text.index(",") + 1:text.rindex(");")]).items():
                found[word] = set(np.cumsum(deltas).tolist())
    assert found == expected and sorted(p.name for p in tmp_path.iterdir()) == ["all", "few"]
