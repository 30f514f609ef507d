"""geocap.data.store: exact round trips, the file's layout, lazy per-process handles, atomic
writes, and every bad input named by image id or file."""
from __future__ import annotations

import multiprocessing
import os
import pickle

import h5py
import numpy as np
import pytest

from geocap.data import store as store_mod
from geocap.data.items import DataError, ImageFeatures
from geocap.data.store import FORMAT, FeatureStore, feature_chunk_rows, write_store

LABELS = [f"class{k}" for k in range(12)]


def make_records(n=20, d=32, *, seed=0, first_id=100, labels=True, min_boxes=1, max_boxes=40):
    """Random valid records: ids first_id, first_id+3, ...; every third image of unknown size."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(min_boxes, max_boxes + 1))
        xy = rng.random((k, 2), dtype=np.float32)
        wh = rng.random((k, 2), dtype=np.float32) * (1 - xy)
        boxes = np.concatenate([xy, np.minimum(xy + wh, 1)], axis=1)
        known = i % 3 != 0
        out.append(ImageFeatures(
            image_id=first_id + 3 * i, features=(rng.standard_normal((k, d)) * 4).astype(np.float32), boxes=boxes,
            width=int(rng.integers(100, 1000)) if known else None,
            height=int(rng.integers(100, 1000)) if known else None,
            labels=rng.integers(0, len(LABELS), k) if labels else None))
    return out


def assert_same_record(got: ImageFeatures, want: ImageFeatures, *, float16=False):
    assert got.image_id == want.image_id
    assert got.features.dtype == np.float32 and got.boxes.dtype == np.float32
    expected = want.features.astype(np.float16).astype(np.float32) if float16 else want.features
    np.testing.assert_array_equal(got.features.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(got.boxes.view(np.uint32), want.boxes.view(np.uint32))
    assert (got.width, got.height) == (want.width, want.height)
    if want.labels is None:
        assert got.labels is None
    else:
        assert got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.labels, want.labels)


def leftovers(directory):
    return [name for name in os.listdir(directory) if ".tmp-" in name]


@pytest.fixture
def records():
    return make_records()


@pytest.fixture
def store_path(tmp_path, records):
    path = tmp_path / "features.h5"
    write_store(path, iter(records), label_names=LABELS, progress=False)
    return path


# ---------------------------------------------------------------------------- round trips


def test_float32_round_trip_is_bitwise(tmp_path, records):
    path = tmp_path / "f32.h5"
    stats = write_store(path, (r for r in records), feature_dtype="float32", label_names=LABELS, progress=False)
    assert (stats.n_images, stats.n_boxes, stats.feature_dim, stats.n_skipped) == (
        len(records), sum(len(r.boxes) for r in records), 32, 0)
    assert stats.has_labels and stats.file_bytes == os.path.getsize(path)
    with FeatureStore(path) as store:
        assert len(store) == len(records) and store.feature_dim == 32 and store.feature_dtype == np.float32
        assert store.label_names == LABELS and store.has_labels
        np.testing.assert_array_equal(store.image_ids, [r.image_id for r in records])
        for i, want in enumerate(records):
            assert_same_record(store[i], want)
            assert_same_record(store.get(want.image_id), want)
            assert store.index_of(np.int64(want.image_id)) == i
        assert_same_record(store[-1], records[-1])
        assert [r.image_id for r in store] == [r.image_id for r in records]
        for got, want in zip(store, records):
            assert_same_record(got, want)


def test_float16_round_trip_rounds_once(store_path, records):
    with FeatureStore(store_path) as store:
        assert store.feature_dtype == np.float16
        for want in records:
            got = store.get(want.image_id)
            assert_same_record(got, want, float16=True)
            # round to nearest: within half an fp16 ulp (relative 2^-11) of the float32 value
            assert np.all(np.abs(got.features - want.features) <= np.abs(want.features) * 2.0 ** -11 + 2.0 ** -25)
        raw, boxes = store.read(0, float32=False)
        assert raw.dtype == np.float16 and boxes.dtype == np.float32


def test_layout_attributes_and_chunks(store_path, records):
    total = sum(len(r.boxes) for r in records)
    with h5py.File(store_path, "r") as h5:
        attrs = dict(h5.attrs)
        assert attrs["format"] == FORMAT and attrs["format_version"] == 1
        assert (attrs["feature_dim"], attrs["feature_dtype"], attrs["n_images"], attrs["n_boxes"]) == (
            32, "float16", len(records), total)
        assert h5["features"].shape == (total, 32) and h5["features"].dtype == np.float16
        assert h5["features"].chunks == (feature_chunk_rows(32, 2), 32)
        assert h5["features"].maxshape == (None, 32) and h5["features"].compression is None
        assert h5["boxes"].dtype == np.float32 and h5["boxes"].chunks[1] == 4
        np.testing.assert_array_equal(h5["offsets"][()], np.cumsum([0] + [len(r.boxes) for r in records]))
        assert h5["offsets"].dtype == np.int64 and h5["image_ids"].dtype == np.int64
        sizes = h5["image_sizes"][()]
        assert sizes.dtype == np.int32 and sizes.shape == (len(records), 2)
        assert (sizes[0] == -1).all() and (sizes[1] > 0).all()
        assert h5["labels"].shape == (total,)
        assert [n.decode() for n in h5["label_names"][()]] == LABELS
    assert feature_chunk_rows(2048, 2) == 256 and feature_chunk_rows(2048, 4) == 128
    assert feature_chunk_rows(4, 2) == 8192 and feature_chunk_rows(10 ** 6, 4) == 32


def test_streaming_writes_in_blocks(tmp_path, records, monkeypatch):
    # a tiny flush threshold: many resize-and-append blocks, same file content
    monkeypatch.setattr(store_mod, "FLUSH_BYTES", 64 * 32 * 2)
    consumed = []

    def stream():
        for r in records:
            consumed.append(r.image_id)
            yield r

    write_store(tmp_path / "s.h5", stream(), progress=False)
    assert len(consumed) == len(records)
    with FeatureStore(tmp_path / "s.h5") as store:
        for want in records:
            assert_same_record(store.get(want.image_id), want, float16=True)


def test_labels_known_for_some_images_only(tmp_path):
    recs = make_records(6, labels=False)
    recs[2].labels = np.arange(len(recs[2].boxes)) % len(LABELS)
    stats = write_store(tmp_path / "l.h5", recs, progress=False)
    assert stats.has_labels
    with FeatureStore(tmp_path / "l.h5") as store:
        assert store.label_names is None
        for want in recs:
            assert_same_record(store.get(want.image_id), want, float16=True)
    stats = write_store(tmp_path / "n.h5", make_records(3, labels=False), progress=False)
    assert not stats.has_labels and not FeatureStore(tmp_path / "n.h5").has_labels


def test_boxes_just_outside_the_unit_square_are_clipped(tmp_path):
    rec = make_records(1)[0]
    rec.boxes[0] = [-5e-5, 0.0, 1.00005, 1.0]
    write_store(tmp_path / "c.h5", [rec], progress=False)
    np.testing.assert_array_equal(FeatureStore(tmp_path / "c.h5")[0].boxes[0], [0, 0, 1, 1])


def test_progress_bar_and_conversions(tmp_path, records):
    # progress=True must work (geocap.progress: lines in a log); float64 / list inputs convert
    rec = ImageFeatures(image_id=np.int32(5), features=records[0].features.astype(np.float64).tolist(),
                        boxes=records[0].boxes.astype(np.float64), width=np.int64(640), height=480)
    stats = write_store(tmp_path / "p.h5", [rec], feature_dtype="float32", n_images=1, progress=True)
    got = FeatureStore(tmp_path / "p.h5").get(5)
    np.testing.assert_array_equal(got.features, records[0].features)
    assert (got.width, got.height) == (640, 480) and stats.n_images == 1


# ---------------------------------------------------------------------------- lazy handles


def test_open_is_lazy_and_pickles_as_its_path(tmp_path, store_path):
    missing = FeatureStore(tmp_path / "nothing-yet.h5")  # no error before first use
    with pytest.raises(DataError, match="nothing-yet.h5"):
        len(missing)
    store = FeatureStore(store_path)
    assert store._state is None
    assert len(store) == 20 and store._state is not None
    blob = pickle.dumps(store)
    assert len(blob) < 300 and b"h5py" not in blob
    clone = pickle.loads(blob)
    assert clone.path == store.path and clone._state is None
    assert_same_record(clone[3], store[3])
    store.close()
    assert store._state is None
    assert len(store) == 20  # reopens


def _read_in_child(store, queue):
    handle_before = store._state
    rec = store[1]
    queue.put((os.getpid(), store._pid, store._state is handle_before, rec.image_id, rec.features))


def test_a_forked_child_reopens_the_file(store_path):
    store = FeatureStore(store_path)
    parent_rec = store[1]  # the parent's handle is open at fork time
    parent_handle = store._state
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, queue))
    child.start()
    pid, handle_pid, same_handle, image_id, features = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert pid == handle_pid != os.getpid() and not same_handle
    assert image_id == parent_rec.image_id
    np.testing.assert_array_equal(features, parent_rec.features)
    assert store._state is parent_handle and store._state.h5.id.valid  # the parent's handle still works
    assert_same_record(store[1], parent_rec)


# ---------------------------------------------------------------------------- atomic writes


def test_an_interrupted_write_leaves_the_old_file(tmp_path, store_path, records):
    before = store_path.read_bytes()

    def failing():
        yield from make_records(5, seed=9)
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        write_store(store_path, failing(), progress=False)
    assert store_path.read_bytes() == before and not leftovers(tmp_path)

    def interrupted():
        yield from make_records(5, seed=9)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_store(store_path, interrupted(), progress=False)
    assert store_path.read_bytes() == before and not leftovers(tmp_path)
    assert_same_record(FeatureStore(store_path).get(records[4].image_id), records[4], float16=True)

    fresh = tmp_path / "fresh.h5"
    with pytest.raises(RuntimeError):
        write_store(fresh, failing(), progress=False)
    assert not fresh.exists() and not leftovers(tmp_path)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_write_removes_the_stale_temporaries_of_its_target(tmp_path, records):
    """What a killed writer left (``<path>.tmp-<dead pid>``) goes at the next write of the same
    path; a live writer's temporary, other targets' and other files stay."""
    import subprocess
    import sys
    path = tmp_path / "features.h5"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        stale = [f"features.h5.tmp-{dead}"]
        kept = [f"features.h5.tmp-{live.pid}", f"other.h5.tmp-{dead}", f"features.h5.tmp-{dead}x",
                f"xfeatures.h5.tmp-{dead}", "features.h5.tmp-abc"]
        for name in stale + kept:
            (tmp_path / name).write_text("partial")
        write_store(path, iter(records), progress=False)
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["features.h5"])
    finally:
        live.kill()
        live.wait()


def test_rewriting_a_store_from_itself(store_path, records):
    # the reader keeps the old file open while the new one replaces it
    write_store(store_path, FeatureStore(store_path), feature_dtype="float32", progress=False)
    with FeatureStore(store_path) as store:
        assert store.feature_dtype == np.float32 and store.label_names is None
        for want in records:
            assert_same_record(store.get(want.image_id), want, float16=True)


# ---------------------------------------------------------------------------- bad records


def _bad(kind):
    """A record of image 42 with one defect, or (for the duplicate / D cases) a preceding one."""
    rec = make_records(1, first_id=42, seed=3)[0]
    if kind == "nan":
        rec.features[1, 3] = np.nan
    elif kind == "inf":
        rec.features[0, 0] = -np.inf
    elif kind == "pixel boxes":
        rec.boxes = rec.boxes * 640
    elif kind == "negative box":
        rec.boxes[0, 0] = -0.2
    elif kind == "x2 < x1":
        rec.boxes[0] = [0.6, 0.1, 0.4, 0.5]
    elif kind == "y2 < y1":
        rec.boxes[0] = [0.1, 0.6, 0.4, 0.5]
    elif kind == "nan box":
        rec.boxes[0, 1] = np.nan
    elif kind == "zero boxes":
        rec.features, rec.boxes, rec.labels = rec.features[:0], rec.boxes[:0], None
    elif kind == "boxes vs features":
        rec.boxes = rec.boxes[:-1]
    elif kind == "1-d features":
        rec.features = rec.features[0]
    elif kind == "float16 overflow":
        rec.features[0, 0] = 1e6
    elif kind == "label range":
        rec.labels[0] = len(LABELS)
    elif kind == "label dtype":
        rec.labels = rec.labels.astype(np.float32)
    elif kind == "bad width":
        rec.width = 0
    elif kind == "duplicate id":
        return [make_records(1, first_id=42, seed=4)[0], rec]
    elif kind == "other D":
        return [make_records(1, first_id=41, seed=4, d=16)[0], rec]
    return [rec]


BAD_KINDS = ["nan", "inf", "pixel boxes", "negative box", "x2 < x1", "y2 < y1", "nan box", "zero boxes",
             "boxes vs features", "1-d features", "float16 overflow", "label range", "label dtype", "bad width",
             "duplicate id", "other D"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_records_name_the_image_and_file(tmp_path, kind):
    out = tmp_path / "bad.h5"
    with pytest.raises(DataError) as err:
        write_store(out, _bad(kind), label_names=LABELS, progress=False)
    assert "image 42" in str(err.value) and str(out) in str(err.value), str(err.value)
    assert not out.exists() and not leftovers(tmp_path)


def test_skip_mode_counts_and_keeps_the_good(tmp_path):
    good = make_records(10, seed=5, first_id=1000)
    stream = list(good[:5])
    for kind in BAD_KINDS:
        stream += [r for r in _bad(kind) if r.image_id == 42][-1:]  # the defective record only
    stream += good[5:] + [good[0], ImageFeatures(image_id="x", features=good[1].features, boxes=good[1].boxes)]
    stats = write_store(tmp_path / "skip.h5", stream, label_names=LABELS, on_error="skip", progress=False)
    # the first image 42 seen is bad unless it is the "duplicate id" / "other D" one, which are fine alone
    bad_42 = [kind for kind in BAD_KINDS if kind not in ("duplicate id", "other D")]
    assert stats.n_images == 11 and stats.n_skipped == len(bad_42) + 1 + 1 + 1
    assert [i for i, _ in stats.skipped].count(42) == len(bad_42) + 1 and (None, ) == stats.skipped[-1][:1]
    assert "appears twice" in stats.skipped[-2][1] and "image 1000" in stats.skipped[-2][1]
    with FeatureStore(tmp_path / "skip.h5") as store:
        assert 42 in store and len(store) == 11
        for want in good:
            assert_same_record(store.get(want.image_id), want, float16=True)


def test_nothing_to_write(tmp_path):
    with pytest.raises(DataError, match="no records"):
        write_store(tmp_path / "e.h5", [], progress=False)
    with pytest.raises(DataError, match="all 1 records were skipped"):
        write_store(tmp_path / "e.h5", _bad("nan"), on_error="skip", progress=False)
    assert not (tmp_path / "e.h5").exists() and not leftovers(tmp_path)
    with pytest.raises(ValueError, match="feature_dtype"):
        write_store(tmp_path / "e.h5", [], feature_dtype="bfloat16")
    with pytest.raises(ValueError, match="on_error"):
        write_store(tmp_path / "e.h5", [], on_error="ignore")


# ---------------------------------------------------------------------------- bad files


def test_unknown_image_id_names_id_and_file(store_path):
    store = FeatureStore(store_path)
    with pytest.raises(DataError) as err:
        store.get(7)
    assert "image 7" in str(err.value) and str(store_path) in str(err.value)
    with pytest.raises(IndexError):
        store[len(store)]
    assert 7 not in store and "x" not in store


def _tamper(path, how):
    with h5py.File(path, "a") as h5:
        if how == "format":
            h5.attrs["format"] = "something-else"
        elif how == "version":
            h5.attrs["format_version"] = 99
        elif how == "missing":
            del h5["image_sizes"]
        elif how == "offsets":
            h5["offsets"][-1] = 3
        elif how == "duplicate ids":
            ids = h5["image_ids"][()]
            ids[1] = ids[0]
            h5["image_ids"][...] = ids


@pytest.mark.parametrize("how,message", [
    ("missing file", "no such feature store"), ("text", "not a readable HDF5"),
    ("foreign", "not a geocap feature store"), ("format", "not a geocap feature store"),
    ("version", "version 99"), ("missing", "missing image_sizes"),
    ("offsets", "inconsistent"), ("duplicate ids", "twice"), ("truncated", "not a readable HDF5"),
])
def test_bad_files_name_the_file(tmp_path, store_path, how, message):
    path = tmp_path / "target.h5"
    if how == "text":
        path.write_text("image_id,features\n1,2\n")
    elif how == "foreign":
        with h5py.File(path, "w") as h5:
            h5["features"] = np.zeros((3, 4))
    elif how == "truncated":
        data = store_path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how != "missing file":
        path.write_bytes(store_path.read_bytes())
        _tamper(path, how)
    with pytest.raises(DataError) as err:
        FeatureStore(path).image_ids
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


# ---------------------------------------------------------------------------- geocap prepro features


def run_prepro(argv):
    import argparse

    from geocap.cli.prepro import add_parser as add_prepro_parser
    parser = argparse.ArgumentParser(prog="geocap")
    add_prepro_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepro", "features", "--no-progress", *map(str, argv)])
    return args.func(args)


def test_prepro_from_store_copies_merges_and_converts(tmp_path, store_path, records, capsys):
    other = tmp_path / "other.h5"
    more = make_records(4, seed=11, first_id=5000)
    write_store(other, more, feature_dtype="float32", label_names=LABELS, progress=False)
    out = tmp_path / "merged.h5"
    assert run_prepro(["--from", "store", store_path, other, "--out", out, "--dtype", "float32"]) == 0
    assert "wrote 24 images" in capsys.readouterr().out
    with FeatureStore(out) as merged:
        assert merged.feature_dtype == np.float32 and merged.label_names == LABELS
        for want in records:
            assert_same_record(merged.get(want.image_id), want, float16=True)  # float16 -> float32 is exact
        for want in more:
            assert_same_record(merged.get(want.image_id), want)
    # converting in place: the atomic rename keeps the input readable until the new file is complete
    assert run_prepro(["--from", "store", out, "--out", out, "--dtype", "float16"]) == 0
    assert FeatureStore(out).feature_dtype == np.float16 and not leftovers(tmp_path)
    with pytest.raises(DataError, match="appears twice"):
        run_prepro(["--from", "store", store_path, store_path, "--out", tmp_path / "dup.h5"])
    assert run_prepro(["--from", "store", store_path, store_path, "--out", tmp_path / "dup.h5",
                       "--on-error", "skip"]) == 0
    assert "skipped 20 images" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such feature store"):
        run_prepro(["--from", "store", tmp_path / "nope.h5", "--out", tmp_path / "x.h5"])


def test_prepro_from_public_formats(tmp_path, capsys):
    from data_formats import random_images, sizes_of, write_json, write_m2_h5, write_npz_dir, write_tsv

    rng = np.random.default_rng(5)
    images = random_images(rng, 6, 24, n_boxes=(3, 12))
    sizes = write_json(tmp_path / "sizes.json", {"images": [
        {"id": i, "width": w, "height": h} for i, (w, h) in sizes_of(images).items()]})
    write_tsv(tmp_path / "a.tsv", images[:4])
    write_tsv(tmp_path / "b.tsv", images[4:] + [["77", "10", "10", "1", "bad", "bad"]])
    write_npz_dir(tmp_path / "att", tmp_path / "box", images)
    write_m2_h5(tmp_path / "m2.h5", images)
    runs = {
        "tsv": ["--from", "tsv", tmp_path / "a.tsv", tmp_path / "b.tsv", "--on-error", "skip"],
        "npz": ["--from", "npz-dir", tmp_path / "att", tmp_path / "box", "--box-units", "pixel", "--sizes", sizes],
        "m2": ["--from", "m2-h5", tmp_path / "m2.h5", "--sizes", sizes],
    }
    for name, argv in runs.items():
        out = tmp_path / f"from-{name}.h5"
        assert run_prepro([*argv, "--out", out, "--dtype", "float32"]) == 0, name
        with FeatureStore(out) as store:
            assert store.image_ids.tolist() == [im.image_id for im in images], name
            for im in images:
                got = store.get(im.image_id)
                np.testing.assert_array_equal(got.features, im.features)
                np.testing.assert_allclose(got.boxes, im.relative_boxes, rtol=1e-6, atol=1e-7)
                assert (got.width, got.height) == (im.width, im.height)
    assert "skipped 1 images" in capsys.readouterr().err
    with pytest.raises(DataError, match="--sizes"):
        run_prepro(["--from", "m2-h5", tmp_path / "m2.h5", "--out", tmp_path / "x.h5"])
    with pytest.raises(DataError, match="--box-units"):
        run_prepro(["--from", "npz-dir", tmp_path / "att", "--out", tmp_path / "x.h5"])
    with pytest.raises(DataError, match="missing.tsv"):
        run_prepro(["--from", "tsv", tmp_path / "missing.tsv", "--out", tmp_path / "x.h5"])
    names = tmp_path / "names.txt"
    names.write_text("\n".join(LABELS) + "\n")
    assert run_prepro([*runs["m2"], "--out", tmp_path / "named.h5", "--label-names", names]) == 0
    assert FeatureStore(tmp_path / "named.h5").label_names == LABELS


# ---------------------------------------------------------------------------- corrupt HDF5 metadata


@pytest.mark.parametrize("source", ["store", "m2-h5"])
@pytest.mark.parametrize("damage", ["HEAP", "SNOD", "TREE", "random"])
def test_corrupt_hdf5_metadata_is_one_line_naming_the_file(tmp_path, capsys, source, damage):
    """Damaged HDF5 metadata in a feature store or an M2 file: `geocap prepro features` exits 2 with
    one line `geocap: error: ...` naming the file (h5py raises RuntimeError, KeyError or OSError
    there, depending on the structure hit)."""
    from data_formats import corrupt_header_bytes, corrupt_signature, random_images, sizes_of, write_json, write_m2_h5

    from geocap.cli import main
    bad = tmp_path / "bad.h5"
    extra = []
    if source == "store":
        write_store(bad, make_records(6, d=8), label_names=LABELS, progress=False)
    else:
        images = random_images(np.random.default_rng(1), 6, 8, n_boxes=(2, 4))
        write_m2_h5(bad, images)
        extra = ["--sizes", str(write_json(tmp_path / "sizes.json", {"images": [
            {"id": i, "width": w, "height": h} for i, (w, h) in sizes_of(images).items()]}))]
    pristine = bad.read_bytes()
    seeds = range(30) if damage == "random" else [None]
    failures = 0
    for seed in seeds:
        bad.write_bytes(pristine)
        if seed is None:
            corrupt_signature(bad, damage.encode())
        else:
            corrupt_header_bytes(bad, seed)
        out = tmp_path / "out.h5"
        code = main(["prepro", "features", "--from", source, str(bad), "--out", str(out), "--no-progress", *extra])
        err = capsys.readouterr().err
        if code == 0:      # random bytes may hit nothing that is read
            continue
        failures += 1
        assert code == 2, (seed, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("geocap: error: ") and str(bad) in lines[0], (seed, err)
        assert leftovers(tmp_path) == []
    assert failures
