"""geocap.dump.export: a dump's records as CSV tables / pandas DataFrames for notebooks; every
value checked against the records it came from."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from geocap.data.attention_record import regular_objects
from geocap.dump.export import tables, to_pandas, write_csv
from geocap.view.synthetic import synthetic_records


def _records():
    recs = list(synthetic_records([4, 9], objects=5, tokens=4, layers=2, heads=3, captions=2, labels=3, seed=2))
    recs[0].tokens = ["\u0120c", "up", "\u0120a", "<eos>"]          # byte-level pieces: "cup a"
    recs[0].referents = np.array([1, -1, -1, -1])
    recs[0].extra = {"special_objects": [0], "file_name": "x.png", "width": 40, "height": 30}
    recs[0].cross = recs[0].cross.astype(np.float32)
    recs[0].cross[..., 0] = 0.9                                        # the special token weighs most
    recs[1].extra = dict(recs[0].extra)
    return recs


def test_tables_hold_the_records_values():
    recs = _records()
    got = tables(iter(recs))
    assert [(r["image_id"], r["caption_id"]) for r in got["records"]] == [(r.image_id, r.caption_id) for r in recs]
    first = got["records"][0]
    assert first["caption"] == "cup a" and first["file_name"] == "x.png"
    assert (first["width"], first["height"]) == (40, 30)
    rows = [t for t in got["tokens"] if t["image_id"] == recs[0].image_id and t["caption_id"] == recs[0].caption_id]
    assert [t["token"] for t in rows] == recs[0].tokens and [t["word"] for t in rows] == [0, 0, 1, 2]
    assert [t["referent"] for t in rows] == [1, -1, -1, -1]
    for t, row in enumerate(rows):
        for layer in range(2):
            assert row[f"cross_entropy_l{layer + 1}"] == pytest.approx(recs[0].cross_entropy[layer, :, t].mean())
            assert row[f"decoder_entropy_l{layer + 1}"] == pytest.approx(recs[0].decoder_entropy[layer, :, t].mean())
            mean = recs[0].cross[layer, :, t].astype(np.float64).mean(axis=0)
            mean[~regular_objects(recs[0])] = -1                       # the special token is never the top
            assert row[f"cross_top_l{layer + 1}"] == int(np.argmax(mean)) != 0
    objects = [o for o in got["objects"] if o["image_id"] == recs[0].image_id]
    assert len(objects) == 5 and [o["special"] for o in objects] == [1, 0, 0, 0, 0]      # once per image
    assert len(got["objects"]) == 10
    assert objects[3]["x1"] == pytest.approx(recs[0].boxes[3, 0]) and objects[3]["label"] == recs[0].labels[3]
    assert objects[2]["encoder_entropy_l2"] == pytest.approx(recs[0].encoder_entropy[1, :, 2].mean())
    recs[1].cross_entropy = recs[1].cross_entropy[:1]
    recs[1].cross = recs[1].cross[:1]
    recs[1].decoder_entropy, recs[1].decoder_self = recs[1].decoder_entropy[:1], recs[1].decoder_self[:1]
    with pytest.raises(ValueError, match="record of image 4 .* other layer counts"):
        tables(recs)


def test_csv_and_pandas_agree(tmp_path):
    recs = _records()
    paths = write_csv(recs, tmp_path / "csv")
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["objects.csv", "records.csv", "tokens.csv"]
    with open(paths["tokens"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = tables(recs)["tokens"]
    assert len(rows) == len(expected) and rows[0]["token"] == "\u0120c"
    assert float(rows[5]["cross_entropy_l2"]) == pytest.approx(expected[5]["cross_entropy_l2"])
    pandas = pytest.importorskip("pandas")
    frames = to_pandas(recs)
    assert isinstance(frames["tokens"], pandas.DataFrame) and len(frames["tokens"]) == len(expected)
    np.testing.assert_allclose(frames["tokens"]["cross_entropy_l1"], [r["cross_entropy_l1"] for r in expected])


def test_command_line_on_a_dump(tmp_path):
    from geocap.data.dump_format import open_dump
    pytest.importorskip("transformers")
    from test_hf_dump import save_tiny_model, write_coco, write_images
    from geocap.hf.dump import dump_hf
    save_tiny_model(tmp_path / "model")
    write_images(tmp_path / "images")
    captions, instances = write_coco(tmp_path)
    dump_hf(tmp_path / "model", tmp_path / "images", tmp_path / "dump", captions=captions, instances=instances,
            writer="inline", progress=False)
    from geocap.cli import main
    assert main(["analyze", str(tmp_path / "dump"), "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    out = subprocess.run([sys.executable, "-m", "geocap", "export", str(tmp_path / "dump"), "--csv",
                          str(tmp_path / "csv"), "--analysis", str(tmp_path / "report")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "csv" / "tokens.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    records = list(open_dump(tmp_path / "dump", progress=False))
    assert len(rows) == sum(r.num_tokens for r in records)
    assert [int(r["referent"]) for r in rows[:9]] == records[0].referents.tolist()
    assert {"cross_top_l3", "decoder_entropy_l3"} <= set(rows[0])            # the decoder's 3 layers
    with open(tmp_path / "csv" / "analysis.csv", newline="") as fh:
        analysis = {(r["key"], r["index"]): float(r["value"]) for r in csv.DictReader(fh)}
    report = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert analysis[("grounding.tokens", "")] == report["grounding"]["tokens"] == 5
    for layer, value in enumerate(report["grounding"]["accuracy"]):
        assert analysis[("grounding.accuracy", str(layer))] == pytest.approx(value)
