"""geocap.data.readers: exact round trips through files written in each public format
(tests/data_formats.py), and every kind of bad input named by file and image id."""
from __future__ import annotations

import base64
import csv
import json

import h5py
import numpy as np
import pytest

from data_formats import (PixelImage, b64, random_captions, random_images, sizes_of, tsv_fields,
                          write_coco_captions, write_cocotalk, write_json, write_karpathy,
                          write_m2_h5, write_npz_dir, write_tsv)
from geocap.data.readers import (ReadStats, read_bottom_up_tsv, read_coco_captions, read_cocotalk,
                                 read_image_sizes, read_karpathy, read_m2_hdf5, read_npz_dir)
from geocap.data.items import DataError, ImageFeatures

CSV_DEFAULT_LIMIT = 131072


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def default_csv_limit():
    """The csv module's default field limit, as a fresh process has it (restored afterwards)."""
    old = csv.field_size_limit(CSV_DEFAULT_LIMIT)
    yield
    csv.field_size_limit(old)


def assert_same(got: ImageFeatures, want: PixelImage):
    """Features bitwise, boxes = pixel / size rounded once to float32, in the file's order."""
    assert got.image_id == want.image_id
    assert got.features.dtype == np.float32 and got.boxes.dtype == np.float32
    np.testing.assert_array_equal(got.features.view(np.uint32), want.features.view(np.uint32))
    np.testing.assert_array_equal(got.boxes, want.relative_boxes)
    assert got.boxes.min() >= 0 and got.boxes.max() <= 1


def assert_names(err: pytest.ExceptionInfo, path, image_id):
    message = str(err.value)
    assert str(path) in message, message
    assert f"image {image_id}" in message, message


# --- feature formats, written and opened the same way for the shared bad-input tests ------------

FORMATS = ["tsv", "npz_pixel", "npz_relative", "npz_z", "m2"]


class Written:
    """Images written in one format: ``open(**kw)`` streams them; ``path`` is what messages name."""

    def __init__(self, fmt, tmp_path, images, dup_of=None):
        self.fmt = fmt
        sizes = sizes_of(images)
        if fmt == "tsv":
            self.path = write_tsv(tmp_path / "feats.tsv", images)
            self.open = lambda **kw: read_bottom_up_tsv(self.path, **kw)
        elif fmt.startswith("npz"):
            relative = fmt == "npz_relative"
            feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box", images, relative=relative,
                                      key="z" if fmt == "npz_z" else "feat")
            self.path = feat
            units = "relative" if relative else "pixel"
            self.open = lambda **kw: read_npz_dir(
                feat, box, box_units=units, **{"sizes": sizes, **kw})
        else:
            self.path = write_m2_h5(tmp_path / "det.hdf5", images)
            self.open = lambda **kw: read_m2_hdf5(self.path, **{"sizes": sizes, **kw})
        if dup_of is not None:
            self._duplicate(dup_of)

    def _duplicate(self, image: PixelImage):
        """Store ``image`` a second time under a second spelling of its id."""
        if self.fmt == "tsv":
            with open(self.path, "a", newline="") as f:
                csv.writer(f, delimiter="\t").writerow(tsv_fields(image))
        elif self.fmt.startswith("npz"):
            key = "z" if self.fmt == "npz_z" else "feat"
            np.savez_compressed(self.path / f"00{image.image_id}.npz", **{key: image.features})
            boxes = image.relative_boxes if self.fmt == "npz_relative" else image.boxes
            np.save(self.path.parent / "box" / f"00{image.image_id}.npy", boxes)
        else:
            with h5py.File(self.path, "a") as f:
                f[f"00{image.image_id}_features"] = image.features
                f[f"00{image.image_id}_boxes"] = image.boxes


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_features_round_trip(fmt, tmp_path, rng):
    images = random_images(rng, 4, dim=16, n_boxes=(10, 100), first_id=7)
    stream = Written(fmt, tmp_path, images).open()
    got = list(stream)
    assert len(got) == 4
    for g, w in zip(got, images):
        assert_same(g, w)
    if fmt != "npz_relative":
        assert [(g.width, g.height) for g in got] == [(w.width, w.height) for w in images]
    assert stream.stats == ReadStats(images=4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_requested_ids_come_in_order(fmt, tmp_path, rng):
    images = random_images(rng, 5, dim=8, n_boxes=3, first_id=10)
    written = Written(fmt, tmp_path, images)
    got = [g.image_id for g in written.open(image_ids=[13, 11])]
    # the TSV is streamed, so it keeps its own order; the others follow the request
    assert got == ([11, 13] if fmt == "tsv" else [13, 11])


def test_tsv_36_boxes_2048_rows_beyond_the_csv_default_limit(tmp_path, rng, default_csv_limit):
    images = random_images(rng, 3, dim=2048, n_boxes=36)
    path = write_tsv(tmp_path / "trainval_36.tsv", images)
    with open(path, "rb") as f:
        lines = f.read().split(b"\r\n")
    assert lines[-1] == b"" and min(len(x) for x in lines[:-1]) > CSV_DEFAULT_LIMIT
    got = list(read_bottom_up_tsv(path))
    for g, w in zip(got, images, strict=True):
        assert_same(g, w)
        assert (g.width, g.height) == (w.width, w.height)


def test_tsv_adaptive_10_to_100_boxes(tmp_path, rng, default_csv_limit):
    images = random_images(rng, 6, dim=2048, n_boxes=(10, 100))
    images[0] = random_images(rng, 1, dim=2048, n_boxes=100)[0]  # ~1.1M characters
    images[1] = random_images(rng, 1, dim=2048, n_boxes=10, first_id=2)[0]
    path = write_tsv(tmp_path / "trainval_adaptive.tsv", images)
    got = list(read_bottom_up_tsv(path, feature_dim=2048))
    assert [len(g.boxes) for g in got] == [len(w.boxes) for w in images]
    for g, w in zip(got, images, strict=True):
        assert_same(g, w)


def test_tsv_keeps_file_order_and_accepts_lf_and_a_header(tmp_path, rng):
    images = random_images(rng, 3, dim=4, n_boxes=5)
    images[0].image_id, images[1].image_id, images[2].image_id = 5, 2, 9
    path = tmp_path / "f.tsv"
    path.write_text("\t".join(["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"])
                    + "\n" + "".join("\t".join(tsv_fields(i)) + "\n" for i in images) + "\n")
    got = list(read_bottom_up_tsv(path))
    assert [g.image_id for g in got] == [5, 2, 9]
    for g, w in zip(got, images):
        assert_same(g, w)


def test_tsv_streams_line_by_line(tmp_path, rng):
    images = random_images(rng, 3, dim=4, n_boxes=5)
    bad = tsv_fields(images[2])
    bad[5] = "!!!!"
    path = write_tsv(tmp_path / "f.tsv", images[:2] + [bad])
    stream = read_bottom_up_tsv(path)
    assert next(stream).image_id == 1 and next(stream).image_id == 2  # before the bad line is read
    with pytest.raises(DataError):
        next(stream)


def test_npz_relative_boxes_are_kept_bitwise(tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=6)
    feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box_rel", images, relative=True)
    got = list(read_npz_dir(feat, box, box_units="relative"))
    for g, w in zip(got, images, strict=True):
        np.testing.assert_array_equal(g.boxes.view(np.uint32), np.load(box / f"{w.image_id}.npy")
                                      .view(np.uint32))
        assert g.width is None and g.height is None


def test_coco_captions_round_trip(tmp_path, rng, capsys):
    captions = random_captions(rng, [3, 1, 2], per_image=5)
    captions[0].text = "  A café,\nWITH stray spaces. "
    path = write_coco_captions(tmp_path / "captions_val2014.json", captions, sizes={4: (640, 480)})
    got = read_coco_captions(path)
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are suppressed
    assert got.splits == {}
    assert [(c.image_id, c.caption_id, c.text, c.tokens) for c in got.captions] == \
        [(c.image_id, c.caption_id, c.text, None) for c in captions]


def test_karpathy_round_trip(tmp_path, rng):
    splits = {10: "train", 11: "restval", 12: "val", 13: "test"}
    captions = random_captions(rng, list(splits), per_image=5)
    path = write_karpathy(tmp_path / "dataset_coco.json", captions, splits)
    got = read_karpathy(path)
    assert got.splits == {10: "train", 11: "train", 12: "val", 13: "test"}
    assert [(c.image_id, c.caption_id, c.text, c.tokens) for c in got.captions] == \
        [(c.image_id, c.caption_id, c.text, c.tokens) for c in captions]


def test_cocotalk_round_trip(tmp_path, rng):
    splits = {21: "restval", 20: "val", 22: "test", 23: "train"}
    captions = random_captions(rng, list(splits), per_image=5, max_words=25)
    assert max(len(c.tokens) for c in captions) > 16
    vocab = write_cocotalk(tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5",
                           captions, splits)
    got, got_vocab = read_cocotalk(tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5")
    assert got_vocab == vocab and "café" in vocab
    assert got.splits == {21: "train", 20: "val", 22: "test", 23: "train"}
    want = [c for i in splits for c in captions if c.image_id == i]  # grouped by image
    assert [(c.image_id, c.caption_id, c.tokens, c.text) for c in got.captions] == \
        [(c.image_id, row, c.tokens[:16], " ".join(c.tokens[:16])) for row, c in enumerate(want)]


def test_image_sizes_from_coco_and_cocotalk(tmp_path, rng):
    sizes = {1: (640, 480), 2: (500, 375)}
    coco = write_coco_captions(tmp_path / "c.json", random_captions(rng, [1, 2]), sizes=sizes)
    assert read_image_sizes(coco) == sizes
    write_cocotalk(tmp_path / "talk.json", tmp_path / "talk.h5", random_captions(rng, [1, 2]),
                   {1: "train", 2: "val"}, sizes={1: (640, 480)})
    assert read_image_sizes(tmp_path / "talk.json") == {1: (640, 480)}
    karpathy = write_karpathy(tmp_path / "k.json", random_captions(rng, [1]), {1: "train"})
    with pytest.raises(DataError, match="no image carries 'width' and 'height'") as err:
        read_image_sizes(karpathy)
    assert str(karpathy) in str(err.value)


# --- bad input: feature files ------------------------------------------------------------------

def with_box(image: PixelImage, row: int, box) -> PixelImage:
    image.boxes[row] = box
    return image


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(fmt, value, tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=4)
    images[1].features[2, 5] = value
    written = Written(fmt, tmp_path, images)
    stream = written.open()
    assert next(stream).image_id == 1
    with pytest.raises(DataError, match="NaN" if np.isnan(value) else "inf") as err:
        next(stream)
    assert_names(err, written.path, 2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("box", [[50, 10, 40, 20], [10, 50, 20, 40]], ids=["x2<x1", "y2<y1"])
def test_inverted_boxes(fmt, box, tmp_path, rng):
    images = random_images(rng, 1, dim=8, n_boxes=4, first_id=3)
    images[0].boxes[1] = box
    written = Written(fmt, tmp_path, images)
    with pytest.raises(DataError, match="box 1 has x2 < x1 or y2 < y1") as err:
        list(written.open())
    assert_names(err, written.path, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_boxes_outside_the_image_are_clipped_and_counted(fmt, tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=5)
    w, h = images[0].width, images[0].height
    images[0].boxes[1] = [-4, 10, w + 9, h + 0.5]    # one box, three sides out
    images[0].boxes[3] = [w - 20, h - 20, w, h]       # on the border: not clipped
    images[1].boxes[0] = [10, -3, 20, 30]
    want = np.clip(images[0].relative_boxes, 0, 1)
    stream = Written(fmt, tmp_path, images).open()
    got = list(stream)
    np.testing.assert_array_equal(got[0].boxes, want)
    assert stream.stats.clipped_boxes == 2 and stream.stats.skipped_images == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_boxes(fmt, tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=3)
    images[0] = PixelImage(1, 100, 100, np.zeros((0, 4), np.float32), np.zeros((0, 8), np.float32))
    written = Written(fmt, tmp_path, images)
    with pytest.raises(DataError, match="zero boxes") as err:
        list(written.open())
    assert_names(err, written.path, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_image_ids(fmt, tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=3)
    written = Written(fmt, tmp_path, images, dup_of=images[1])
    with pytest.raises(DataError, match="duplicate image id") as err:
        list(written.open())
    assert_names(err, written.path, 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_requested_image_missing(fmt, tmp_path, rng):
    written = Written(fmt, tmp_path, random_images(rng, 2, dim=8, n_boxes=3))
    with pytest.raises(DataError) as err:
        list(written.open(image_ids=[1, 99]))
    assert_names(err, written.path, 99)
    stream = written.open(image_ids=[1, 99], on_error="skip")
    assert [g.image_id for g in stream] == [1]
    assert stream.stats.skipped_images == 1 and "image 99" in stream.stats.errors[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_skip_counts_and_goes_on(fmt, tmp_path, rng):
    images = random_images(rng, 7, dim=8, n_boxes=3)
    for i in (1, 2, 4, 5):
        images[i].features[0, 0] = np.nan
    written = Written(fmt, tmp_path, images, dup_of=images[6])
    stats = ReadStats(max_errors=3)
    got = list(written.open(on_error="skip", stats=stats))
    # a TSV has yielded the first image 7 before it meets the second; a folder or HDF5 file
    # holds two for one id with no order between them, so neither is read
    assert [g.image_id for g in got] == ([1, 4, 7] if fmt == "tsv" else [1, 4])
    assert (stats.images, stats.skipped_images, len(stats.errors)) == (len(got), 5, 3)
    assert all(str(written.path) in e for e in stats.errors)
    assert "image 2" in stats.errors[0]


@pytest.mark.parametrize("fmt", ["npz_pixel", "m2"])
def test_pixel_boxes_need_image_sizes(fmt, tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=3)
    written = Written(fmt, tmp_path, images)
    with pytest.raises(DataError, match="size of image 1 is unknown"):
        list(written.open(sizes=None))
    with pytest.raises(DataError, match="size of image 2 is unknown") as err:
        list(written.open(sizes={1: (images[0].width, images[0].height)}))
    assert str(tmp_path) in str(err.value)


def test_relative_reader_refuses_pixel_boxes(tmp_path, rng):
    images = random_images(rng, 1, dim=8, n_boxes=3)
    feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box", images)  # pixels
    with pytest.raises(DataError, match="far outside the image .*pixel boxes read as relative") as e:
        list(read_npz_dir(feat, box, box_units="relative"))
    assert_names(e, feat, 1)


def test_feature_and_box_counts_must_agree(tmp_path, rng):
    images = random_images(rng, 1, dim=8, n_boxes=3)
    feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box", images, relative=True)
    np.save(box / "1.npy", images[0].relative_boxes[:2])
    with pytest.raises(DataError, match=r"boxes have shape \(2, 4\), expected \[3, 4\]") as err:
        list(read_npz_dir(feat, box, box_units="relative"))
    assert_names(err, feat, 1)
    assert str(box / "1.npy") in str(err.value)


def test_npz_without_feat_or_z(tmp_path, rng):
    images = random_images(rng, 1, dim=8, n_boxes=3)
    feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box", images, key="att_feat")
    with pytest.raises(DataError, match="no array named feat or z") as err:
        list(read_npz_dir(feat, box, box_units="pixel", sizes=sizes_of(images)))
    assert_names(err, feat / "1.npz", 1)


def test_npz_missing_box_file(tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=3)
    feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box", images, relative=True)
    (box / "2.npy").unlink()
    with pytest.raises(DataError, match="no box file") as err:
        list(read_npz_dir(feat, box, box_units="relative"))
    assert_names(err, box / "2.npy", 2)


def test_m2_requires_boxes(tmp_path, rng):
    images = random_images(rng, 2, dim=8, n_boxes=3)
    path = write_m2_h5(tmp_path / "det.hdf5", images, boxes=False)
    with pytest.raises(DataError, match="no 1_boxes dataset; boxes are required") as err:
        list(read_m2_hdf5(path, sizes=sizes_of(images)))
    assert_names(err, path, 1)


def test_npz_box_file_without_its_feature_file(tmp_path, rng):
    """A ``<id>.npy`` box file whose ``<id>.npz`` is missing is an error for that image (it was
    dropped silently); with skip, it is counted."""
    images = random_images(rng, 3, dim=8, n_boxes=3)
    feat, box = write_npz_dir(tmp_path / "att", tmp_path / "box", images, relative=True)
    (feat / "2.npz").unlink()
    with pytest.raises(DataError, match="no feature file for this image .*box file") as err:
        list(read_npz_dir(feat, box, box_units="relative"))
    assert_names(err, feat / "2.npz", 2)
    stats = ReadStats()
    assert [r.image_id for r in read_npz_dir(feat, box, box_units="relative", on_error="skip",
                                             stats=stats)] == [1, 3]
    assert stats.skipped_images == 1 and "image 2" in stats.errors[0]


def test_m2_boxes_without_features(tmp_path, rng):
    """``<id>_boxes`` without ``<id>_features`` is an error for that image (it was dropped
    silently); with skip, it is counted."""
    images = random_images(rng, 3, dim=8, n_boxes=3)
    path = write_m2_h5(tmp_path / "det.hdf5", images)
    with h5py.File(path, "a") as f:
        del f["2_features"]
    with pytest.raises(DataError, match="no 2_features dataset .*has its 2_boxes") as err:
        list(read_m2_hdf5(path, sizes=sizes_of(images)))
    assert_names(err, path, 2)
    stats = ReadStats()
    assert [r.image_id for r in read_m2_hdf5(path, sizes=sizes_of(images), on_error="skip",
                                             stats=stats)] == [1, 3]
    assert stats.skipped_images == 1 and "image 2" in stats.errors[0]


def test_m2_reader_refuses_an_hdf5_file_of_another_kind(tmp_path):
    """An HDF5 file without any '<id>_features' dataset (a geocap store, a cocotalk file) is a
    DataError naming it, not an empty stream."""
    import h5py
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        for name in ("features", "boxes", "offsets", "ids", "sizes", "labels"):
            f.create_dataset(name, data=[0])
    with pytest.raises(DataError, match=r"no '<image id>_features' dataset: not a meshed-memory features file "
                                        r"\(top-level keys: boxes, features, ids, labels, offsets, "
                                        r"\.\.\. \(6 in all\)\)"):
        list(read_m2_hdf5(path, sizes={}))
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(DataError, match=r"empty.h5: no '<image id>_features' dataset.*top-level keys: none"):
        list(read_m2_hdf5(tmp_path / "empty.h5", sizes={}))


def _tsv_with(tmp_path, rng, mangle):
    """A 3-image TSV whose second line's fields go through ``mangle``."""
    images = random_images(rng, 3, dim=6, n_boxes=4)
    fields = tsv_fields(images[1])
    return write_tsv(tmp_path / "f.tsv", [images[0], mangle(fields), images[2]])


@pytest.mark.parametrize("mangle, message", [
    (lambda f: f[:4], "4 fields, expected 6"),
    # features: 4 boxes x 6 float32 = 96 bytes = 128 base64 characters, no padding
    (lambda f: f[:5] + [f[5][:-3]], "features field is not valid base64"),
    (lambda f: f[:5] + [f[5][:-4]], "features field holds 93 bytes, not whole float32 values"),
    (lambda f: f[:5] + [f[5][:-16]], r"84 bytes, not a multiple of num_boxes \* 4 = 16"),
    (lambda f: f[:5] + [f[5][:-64]], "48 bytes = 4 boxes x 3 float32, expected D = 6"),
    # boxes: 64 bytes = 88 characters, the last group "X==" holding one byte
    (lambda f: f[:4] + [f[4][:-4]] + f[5:], "boxes field holds 63 bytes, not whole float32"),
    (lambda f: f[:4] + [f[4][:-8]] + f[5:], r"boxes field holds 60 bytes, expected num_boxes \* 16"),
    (lambda f: f[:3] + ["5"] + f[4:], r"expected num_boxes \* 16 = 80"),
    (lambda f: f[:4] + ["AAAA!AAA"] + f[5:], "boxes field is not valid base64"),
    (lambda f: f[:5] + [f"b'{f[5]}'"], "looks like a Python bytes repr"),
    (lambda f: f[:1] + ["640.5"] + f[2:], "image_w '640.5' is not an integer"),
    (lambda f: f[:3] + ["0", "", ""], "zero boxes"),
], ids=["fields", "features-bad-padding", "features-part-float", "features-part-row",
        "features-whole-rows", "boxes-part-float", "boxes-cut", "num_boxes", "base64", "bytes-repr", "image_w",
        "num_boxes=0"])
def test_tsv_bad_lines(mangle, message, tmp_path, rng):
    path = _tsv_with(tmp_path, rng, mangle)
    with pytest.raises(DataError, match=message) as err:
        list(read_bottom_up_tsv(path))
    assert_names(err, path, 2)
    assert "line 2" in str(err.value)
    stream = read_bottom_up_tsv(path, on_error="skip")
    assert [g.image_id for g in stream] == [1, 3]
    assert stream.stats.skipped_images == 1


def test_tsv_truncated_file(tmp_path, rng):
    images = random_images(rng, 3, dim=64, n_boxes=10)
    path = write_tsv(tmp_path / "f.tsv", images)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1001)
    with pytest.raises(DataError, match="line 3: image 3: features field") as err:
        list(read_bottom_up_tsv(path))
    assert str(path) in str(err.value)


def test_tsv_dimension_must_stay_the_same(tmp_path, rng):
    path = write_tsv(tmp_path / "f.tsv", random_images(rng, 1, dim=8, n_boxes=4)
                     + random_images(rng, 1, dim=4, n_boxes=8, first_id=2))
    with pytest.raises(DataError, match="expected D = 8") as err:
        list(read_bottom_up_tsv(path))
    assert_names(err, path, 2)


def test_tsv_bad_image_id_and_non_ascii(tmp_path, rng):
    images = random_images(rng, 2, dim=4, n_boxes=2)
    fields = tsv_fields(images[1])
    path = tmp_path / "f.tsv"
    path.write_bytes(("\t".join(["x1"] + fields[1:]) + "\r\n").encode()
                     + ("\t".join(fields[:5]) + "\t\xe9" + fields[5] + "\r\n").encode("latin-1"))
    stream = read_bottom_up_tsv(path, on_error="skip")
    assert list(stream) == []
    assert "line 1: image ?: image id 'x1' is not an integer" in stream.stats.errors[0]
    assert "line 2: image 2: features field is not valid base64" in stream.stats.errors[1]


def test_on_error_must_be_known(tmp_path, rng):
    path = write_tsv(tmp_path / "f.tsv", random_images(rng, 1, dim=4, n_boxes=2))
    with pytest.raises(ValueError, match="on_error"):
        read_bottom_up_tsv(path, on_error="ignore")
    with pytest.raises(ValueError, match="more than once"):
        read_bottom_up_tsv(path, image_ids=[1, 1])


# --- bad input: caption files ------------------------------------------------------------------

def _edit_json(path, edit):
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    write_json(path, data)


@pytest.mark.parametrize("edit, image_id, message", [
    (lambda d: d["annotations"][3].update(image_id=42), 42, "missing from 'images'"),
    (lambda d: d["images"].append(dict(d["images"][1])), 2, "duplicate image id"),
    (lambda d: d["annotations"][4].update(id=d["annotations"][0]["id"]), 1,
     "duplicate annotation id"),
    (lambda d: d["annotations"][5].pop("caption"), 2, "has no caption"),
])
def test_coco_bad_input(edit, image_id, message, tmp_path, rng):
    path = write_coco_captions(tmp_path / "c.json", random_captions(rng, [1, 2, 3]))
    _edit_json(path, edit)
    with pytest.raises(DataError, match=message) as err:
        read_coco_captions(path)
    assert_names(err, path, image_id)


def test_coco_not_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not a readable COCO captions file") as err:
        read_coco_captions(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("edit, image_id, message", [
    (lambda d: d["images"][2].update(cocoid=d["images"][0]["cocoid"]), 1, "duplicate image id"),
    (lambda d: d["images"][1].update(split="dev"), 2, "unknown split 'dev'"),
    (lambda d: d["images"][2]["sentences"][0].update(sentid=1000), 3, "duplicate sentid 1000"),
    (lambda d: d["images"][1]["sentences"][0].pop("tokens"), 2, "no 'tokens'"),
])
def test_karpathy_bad_input(edit, image_id, message, tmp_path, rng):
    splits = {1: "train", 2: "val", 3: "test"}
    path = write_karpathy(tmp_path / "k.json", random_captions(rng, list(splits)), splits)
    _edit_json(path, edit)
    with pytest.raises(DataError, match=message) as err:
        read_karpathy(path)
    assert_names(err, path, image_id)


def _edit_h5(path, name, edit):
    with h5py.File(path, "a") as f:
        data = f[name][()]
        edit(data)
        del f[name]
        f[name] = data


@pytest.mark.parametrize("target, edit, image_id, message", [
    ("labels", lambda a: a.__setitem__((7, 0), 999), 2, "word index outside"),
    ("label_end_ix", lambda a: a.__setitem__(2, a[2] - 5), 3, "are empty or outside"),
    ("label_start_ix", lambda a: a.__setitem__(0, 0), 1, "are empty or outside"),
    ("json", lambda d: d["images"][2].update(id=1), 1, "duplicate image id"),
    ("json", lambda d: d["images"][1].update(split="dev"), 2, "unknown split"),
])
def test_cocotalk_bad_input(target, edit, image_id, message, tmp_path, rng):
    splits = {1: "train", 2: "val", 3: "test"}
    js, lab = tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5"
    write_cocotalk(js, lab, random_captions(rng, list(splits)), splits)
    if target == "json":
        _edit_json(js, edit)
    else:
        _edit_h5(lab, target, edit)
    with pytest.raises(DataError, match=message) as err:
        read_cocotalk(js, lab)
    assert_names(err, js if target == "json" else lab, image_id)


def test_cocotalk_vocabulary_and_counts(tmp_path, rng):
    splits = {1: "train", 2: "val"}
    js, lab = tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5"
    write_cocotalk(js, lab, random_captions(rng, list(splits)), splits)
    _edit_json(js, lambda d: d["ix_to_word"].pop("3"))
    with pytest.raises(DataError, match="ix_to_word keys are not 1.."):
        read_cocotalk(js, lab)
    write_cocotalk(js, lab, random_captions(rng, list(splits)), splits)
    _edit_json(js, lambda d: d["images"].pop())
    with pytest.raises(DataError, match="2 label_start_ix .* for 1 images"):
        read_cocotalk(js, lab)


def test_b64_helper_matches_bottom_up_encoding():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.frombuffer(base64.b64decode(b64(a)), "<f4").tolist() == list(range(6))


def _coco_callers():
    """Every module that reads a COCO captions file, as ``(name, call(path, folder))``."""
    from geocap.hf.images import load_image_set
    from geocap.hf.tiny import load_captioned_images
    return [("read_coco_captions", lambda path, folder: read_coco_captions(path)),
            ("hf.images", lambda path, folder: load_image_set(folder, captions=path)),
            ("hf.tiny", lambda path, folder: load_captioned_images(folder, path, None, progress=False))]


@pytest.mark.parametrize("edit, image_id, message", [
    (lambda d: d["images"].append(dict(d["images"][1])), 2, "duplicate image id"),
    (lambda d: d["annotations"][4].update(id=d["annotations"][0]["id"]), 1, "duplicate annotation id"),
    (lambda d: d["annotations"][3].update(image_id=42), 42, "missing from 'images'"),
    (lambda d: d["annotations"][5].update(caption=None), 2, "has no caption"),
])
def test_every_coco_reader_gives_one_error(edit, image_id, message, tmp_path, rng):
    """prepro's reader, the HF image set and the tiny HF trainer parse COCO captions through one
    reader: the same bad file gives each the same DataError naming the file and the image id."""
    path = write_coco_captions(tmp_path / "c.json", random_captions(rng, [1, 2, 3]))
    _edit_json(path, edit)
    for name, call in _coco_callers():
        with pytest.raises(DataError, match=message) as err:
            call(path, tmp_path)
        assert_names(err, path, image_id)


def test_hdf5_files_that_are_not_hdf5_name_the_file(tmp_path, rng):
    """The HDF5 readers open their files through hdf5_errors.open_hdf5: one DataError naming the file
    (the captions file and the feature store: test_vocab, test_store)."""
    bad = tmp_path / "not.h5"
    bad.write_bytes(b"plain text, not HDF5\n" * 10)
    with pytest.raises(DataError, match=r"not\.h5: not a readable HDF5 file: "):
        list(read_m2_hdf5(bad))
    caps = random_captions(rng, [1, 2])
    write_cocotalk(tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5", caps, {1: "train", 2: "val"})
    (tmp_path / "cocotalk_label.h5").write_bytes(bad.read_bytes())
    with pytest.raises(DataError, match=r"cocotalk_label\.h5: not a readable cocotalk label file: "):
        read_cocotalk(tmp_path / "cocotalk.json", tmp_path / "cocotalk_label.h5")
