"""geocap.evaluate: caption a split with a checkpoint, score it, write COCO results + metrics."""
from __future__ import annotations

import json
import os

import pytest
import torch

import geocap
from geocap.checkpoint import file_sha256, save_checkpoint
from geocap.cli import main as cli_main
from geocap.data.synth import generate_synthetic
from geocap.data.vocab import Vocabulary, load_captions
from geocap.evaluate import evaluate
from geocap.metrics import METRIC_NAMES, java_available
from geocap.model import ObjectRelationTransformer, ORTConfig

ALWAYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def _checkpoint(path, vocab, feature_dim=16, seed=0):
    torch.manual_seed(seed)
    config = ORTConfig(vocab_size=len(vocab), feature_dim=feature_dim, layers=1, d_model=32, heads=2, d_ff=64)
    save_checkpoint(str(path), model=ObjectRelationTransformer(config), config=config, vocab=vocab, rng=False,
                    step=7)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(DIR, checkpoint, test image ids): 40 synthetic images (4 in test), D = 16, and an untrained
    tiny model saved with the captions dir's vocabulary."""
    root = tmp_path_factory.mktemp("evaldata")
    generate_synthetic(root, images=40, seed=0, feature_dim=16, progress=False)
    assert cli_main(["prepro", "captions", "--karpathy", str(root / "dataset_coco.json"), "--out", str(root / "caps"),
                        "--min-count", "1"]) == 0
    caps = load_captions(root / "caps")
    ckpt = _checkpoint(root / "model.pt", caps.vocab)
    test_ids = sorted(set(caps.image_id[caps.rows("test")].tolist()))
    assert len(test_ids) >= 2
    return str(root), ckpt, test_ids


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("beam", [1, 3])
def test_evaluate_writes_results_and_metrics(data, tmp_path, beam):
    root, ckpt, test_ids = data
    out = tmp_path / "results"
    result = evaluate(ckpt, root, "test", beam_size=beam, max_len=12, batch_size=3, out_dir=out, meteor=False,
                      tokenizer="python", progress=False, device="cpu")
    assert sorted(os.listdir(out)) == ["captions_test.json", "metrics_test.json"]  # no temporary files left

    results = _read(out / "captions_test.json")
    assert isinstance(results, list) and all(set(r) == {"image_id", "caption"} for r in results)
    assert [r["image_id"] for r in results] == test_ids        # every test image once, ascending
    assert all(isinstance(r["image_id"], int) and isinstance(r["caption"], str) for r in results)
    assert all(len(r["caption"].split()) <= 12 for r in results)
    assert {r["image_id"]: r["caption"] for r in results} == result.captions

    record = _read(out / "metrics_test.json")
    assert record["format"] == "geocap-evaluation" and record["format_version"] == 1
    assert set(ALWAYS) <= set(record["metrics"])
    assert all(isinstance(v, float) and v >= 0 for v in record["metrics"].values())
    assert set(record["metrics"]) | set(record["skipped"]) == set(METRIC_NAMES)
    assert not set(record["metrics"]) & set(record["skipped"])
    assert record["skipped"]["METEOR"] == "disabled by the caller"
    assert all(isinstance(r, str) and r for r in record["skipped"].values())
    assert record["tokenizer"] == "python" and record["tokenizer_note"]
    assert record["checkpoint"] == os.path.abspath(ckpt) and record["checkpoint_sha256"] == file_sha256(ckpt)
    assert record["checkpoint_step"] == 7
    assert (record["split"], record["beam_size"], record["n_images"]) == ("test", beam, len(test_ids))
    assert record["geocap_version"] == geocap.__version__ and record["results_file"] == "captions_test.json"
    assert result.metrics == record["metrics"] and result.skipped == record["skipped"]


def test_batching_and_beam_change_what_they_should(data, tmp_path):
    root, ckpt, test_ids = data
    kw = dict(max_len=10, meteor=False, spice=False, tokenizer="python", progress=False, device="cpu")
    one = evaluate(ckpt, root, "test", beam_size=1, batch_size=1, out_dir=tmp_path / "a", **kw)
    many = evaluate(ckpt, root, "test", beam_size=1, batch_size=50, out_dir=tmp_path / "b", **kw)
    assert one.captions == many.captions                        # batching and padding do not change captions
    assert one.skipped["SPICE"] == "disabled by the caller"
    # the greedy caption of each image is what the Captioner gives it alone
    from geocap.captioner import Captioner
    from geocap.data.dataset import CaptionDataset
    captioner = Captioner.load(ckpt, device="cpu")
    ds = CaptionDataset(os.path.join(root, "features.h5"), os.path.join(root, "caps"), "test", per_image=True)
    item = ds[0]
    assert captioner.caption(item.features[None], item.boxes[None], beam_size=1, max_len=10) == \
        [one.captions[item.image_id]]


def test_limit_and_default_out_dir(data, tmp_path):
    root, _, test_ids = data
    caps = load_captions(os.path.join(root, "caps"))
    (tmp_path / "run").mkdir()
    ckpt = _checkpoint(tmp_path / "run" / "ckpt.pt", caps.vocab)
    result = evaluate(ckpt, root, "val", limit=2, beam_size=2, meteor=False, tokenizer="python", progress=False)
    assert result.metrics_path == tmp_path / "run" / "metrics_val.json"
    assert [r["image_id"] for r in _read(tmp_path / "run" / "captions_val.json")] == sorted(result.captions)
    assert result.n_images == 2 and _read(result.metrics_path)["limit"] == 2


def test_options_object_equals_keywords(data, tmp_path):
    """An EvaluationOptions gives what the same keywords give; split and keywords replace its fields."""
    from geocap.evaluate import EvaluationOptions
    root, ckpt, _ = data
    options = EvaluationOptions(split="val", limit=2, beam_size=1, max_len=8, meteor=False, spice=False,
                                tokenizer="python", progress=False, device="cpu", out_dir=tmp_path / "a")
    a = evaluate(ckpt, root, options=options)
    b = evaluate(ckpt, root, "val", limit=2, beam_size=1, max_len=8, meteor=False, spice=False, tokenizer="python",
                 progress=False, device="cpu", out_dir=tmp_path / "b")
    assert a.split == "val" and a.n_images == 2 and a.captions == b.captions and a.metrics == b.metrics
    c = evaluate(ckpt, root, "test", options=options, limit=1, out_dir=tmp_path / "c")
    assert c.split == "test" and c.n_images == 1 and options.split == "val" and options.limit == 2
    with pytest.raises(TypeError, match="beam"):
        evaluate(ckpt, root, "test", options=options, beams=2)             # a misspelt field is not ignored
    with pytest.raises(ValueError, match="beam_size must be an int >= 1"):
        evaluate(ckpt, root, options=EvaluationOptions(beam_size=0))


def test_references_are_the_untruncated_strings(data, tmp_path, monkeypatch):
    root, ckpt, test_ids = data
    import geocap.metrics as metrics
    seen = {}

    def fake(gts, res, **kw):
        seen.update(gts=gts, res=res, kw=kw)
        return {"CIDEr": 0.5}, {"METEOR": "test", "tokenizer": "note"}

    monkeypatch.setattr(metrics, "caption_metrics", fake)
    result = evaluate(ckpt, root, "test", beam_size=1, out_dir=tmp_path, meteor=False, progress=False)
    caps = load_captions(os.path.join(root, "caps"))
    assert seen["gts"] == {i: caps.references(i) for i in test_ids}
    decoded = [caps.vocab.decode(caps.tokens[r]) for r in caps.rows("test")]
    assert decoded != [caps.reference[r] for r in caps.rows("test")]   # <unk>s: the check above tells them apart
    assert set(seen["res"]) == set(test_ids) and seen["kw"]["meteor"] is False
    assert result.tokenizer == "python" and result.skipped == {"METEOR": "test"}


def test_cli(data, tmp_path, capsys):
    root, ckpt, test_ids = data
    out = tmp_path / "cli"
    assert cli_main(["evaluate", "--checkpoint", ckpt, "--data", root, "--split", "test", "--beam-size", "1",
                     "--out", str(out), "--no-meteor", "--tokenizer", "python", "--no-progress",
                     "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "CIDEr" in text and "Bleu_4" in text and "skipped METEOR: disabled by the caller" in text
    assert len(_read(out / "captions_test.json")) == len(test_ids)


@pytest.mark.skipif(not java_available(), reason="needs Java for METEOR and PTBTokenizer")
def test_meteor_and_java_tokenizer(data, tmp_path):
    root, ckpt, test_ids = data
    result = evaluate(ckpt, root, "test", beam_size=1, max_len=8, out_dir=tmp_path, progress=False,
                      tokenizer="auto", spice=False)
    assert result.tokenizer == "java" and result.tokenizer_note is None
    assert "METEOR" in result.metrics and 0.0 <= result.metrics["METEOR"] <= 1.0
    assert _read(result.metrics_path)["tokenizer"] == "java"


def _error(capsys, argv):
    assert cli_main(["evaluate", *argv]) == 2
    return capsys.readouterr().err


def test_errors(data, tmp_path, capsys):
    root, ckpt, _ = data
    base = ["--data", root, "--no-meteor", "--out", str(tmp_path / "o"), "--no-progress"]
    err = _error(capsys, ["--checkpoint", str(tmp_path / "nope.pt"), *base])
    assert "checkpoint" in err and "nope.pt" in err
    err = _error(capsys, ["--checkpoint", ckpt, "--split", "tset", *base])
    assert "split 'tset'" in err and "test" in err
    assert "beam_size" in _error(capsys, ["--checkpoint", ckpt, "--beam-size", "0", *base])
    assert "data" in _error(capsys, ["--checkpoint", ckpt, "--data", str(tmp_path / "nodata"), "--no-progress"])
    assert "features" in _error(capsys, ["--checkpoint", ckpt, *base, "--features", "other.h5"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.pt" in _error(capsys, ["--checkpoint", str(bad), *base])

    # another vocabulary: same size, one word changed
    words = list(load_captions(os.path.join(root, "caps")).vocab.words)
    words[-1] = words[-1] + "x"
    other = _checkpoint(tmp_path / "other.pt", Vocabulary(words))
    err = _error(capsys, ["--checkpoint", other, *base])
    assert "different vocabularies" in err and "sha1" in err and repr(words[-1]) in err
    # another feature dimension
    wide = _checkpoint(tmp_path / "wide.pt", load_captions(os.path.join(root, "caps")).vocab, feature_dim=8)
    assert "8-dimensional" in _error(capsys, ["--checkpoint", wide, *base])

    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(ckpt, root, "test", tokenizer="perl")
    with pytest.raises(ValueError, match="limit"):
        evaluate(ckpt, root, "test", limit=-1)
    assert not os.path.exists(tmp_path / "o")                  # nothing written on any error


def test_relation_accuracy_in_metrics_file(data, tmp_path, capsys):
    from geocap.metrics import load_relation_truth, relation_accuracy
    root, ckpt, test_ids = data
    kw = dict(beam_size=1, max_len=10, meteor=False, spice=False, tokenizer="python", progress=False, device="cpu")
    result = evaluate(ckpt, root, "test", out_dir=tmp_path / "with", **kw)
    record = _read(result.metrics_path)
    truth_path = os.path.join(root, "ground_truth.json")
    expected = relation_accuracy(result.captions, load_relation_truth(truth_path)).as_dict()
    assert record["relation_counts"] == {**expected, "ground_truth": truth_path}
    assert record["relation_accuracy"] == expected["relation_accuracy"]
    assert record["relation_counts"]["captions"] == len(test_ids)
    assert (record["relation_note"] is None) == (expected["uses"] > 0)
    assert "relation_accuracy" not in record["metrics"] and "relation_accuracy" not in record["skipped"]

    # the references as "generated" captions: every relation use is right
    import geocap.captioner as captioner_module
    caps = load_captions(os.path.join(root, "caps"))
    order = iter([caps.references(i)[k] for k in range(5) for i in test_ids])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(captioner_module.Captioner, "caption", lambda self, f, *a, **k: [next(order) for _ in f])
        scores = [evaluate(ckpt, root, "test", out_dir=tmp_path / f"refs{k}", **kw).relations for k in range(5)]
    assert all(r.accuracy in (None, 1.0) and r.unresolved == 0 for r in scores)
    assert sum(r.uses for r in scores) > 0
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", ckpt, "--data", root, "--beam-size", "1", "--out", str(tmp_path / "c"),
                     "--no-meteor", "--tokenizer", "python", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "relation-word accuracy" in out

    # no ground truth file: skipped, with the reason
    skipped = evaluate(ckpt, root, "test", out_dir=tmp_path / "without", ground_truth="absent.json", **kw)
    record = _read(skipped.metrics_path)
    assert record["relation_accuracy"] is None and record["relation_counts"] is None
    assert "absent.json" in record["relation_note"] and skipped.relations is None
    # a malformed one: a clear error before anything is written
    bad = tmp_path / "bad_gt"
    bad.mkdir()
    (bad / "ground_truth.json").write_text("{}")
    for name in ("features.h5", "caps"):
        os.symlink(os.path.join(root, name), bad / name)
    with pytest.raises(ValueError, match="ground_truth.json"):
        evaluate(ckpt, bad, "test", out_dir=tmp_path / "never", **kw)
    assert not os.path.exists(tmp_path / "never")


def test_demo_table_side_by_side(data, tmp_path, capsys):
    def table_main(argv):
        return cli_main(["demo-table", *argv])
    root, ckpt, test_ids = data
    caps = load_captions(os.path.join(root, "caps"))
    other = _checkpoint(tmp_path / "other.pt", caps.vocab, seed=1)
    kw = dict(beam_size=1, max_len=8, meteor=False, spice=False, tokenizer="python", progress=False, device="cpu")
    a = evaluate(ckpt, root, "test", out_dir=tmp_path / "a", **kw)
    b = evaluate(other, root, "test", out_dir=tmp_path / "b", ground_truth="absent.json", **kw)
    assert table_main(["--captions", os.path.join(root, "caps"), "--samples", "2",
                       f"geometry={a.metrics_path}", f"no-geometry={b.metrics_path}"]) == 0
    out = capsys.readouterr().out
    header, rule, row_a, row_b = out.splitlines()[1:5]
    assert header.split()[:3] == ["model", "CIDEr-D", "BLEU-4"] and "relation acc" in header
    assert row_a.split()[:3] == ["geometry", f"{a.metrics['CIDEr']:.3f}", f"{a.metrics['Bleu_4']:.3f}"]
    if a.relations.uses:
        assert f"{a.relations.accuracy:.3f} ({a.relations.correct}/{a.relations.uses} uses" in row_a
    assert row_b.split()[0] == "no-geometry" and "n/a (no absent.json" in row_b
    first = test_ids[0]
    assert f"image {first}" in out and a.captions[first] in out and caps.references(first)[0] in out
    assert str(a.metrics_path) in out and str(b.results_path) in out
    # a file that is not an evaluation, or models evaluated on other images: exit status 2, named
    assert table_main([f"x={tmp_path / 'nope.json'}"]) == 2
    assert "nope.json" in capsys.readouterr().err
    c = evaluate(ckpt, root, "test", out_dir=tmp_path / "c", limit=1, **kw)
    assert table_main([f"a={a.metrics_path}", f"c={c.metrics_path}"]) == 2
    assert "other images" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_name_the_image_id_in_evaluate_and_train(data, tmp_path, capsys, value):
    """A store holding NaN or inf (written by something else than write_store, or damaged):
    evaluate and train stop with one line naming the store, the image *id* (not its position in
    a batch) and the box."""
    import shutil

    import h5py
    import numpy as np

    root, ckpt, test_ids = data
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    with h5py.File(copy / "features.h5", "r+") as h5:
        ids = h5["image_ids"][()].tolist()
        image = test_ids[-1]                                    # not the first of its batch
        position = ids.index(image)
        start = int(h5["offsets"][position])
        h5["features"][start + 1, 3] = value
    kind = "NaN" if np.isnan(value) else "inf"
    expected = f"{copy / 'features.h5'}: image {image}: features hold {kind} values (box 1"
    err = _error(capsys, ["--checkpoint", ckpt, "--data", str(copy), "--split", "test", "--no-meteor",
                          "--tokenizer", "python", "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    assert err.count("\n") == 1 and expected in err, err
    # the same image in training (the test split trained on, so that the image is read)
    assert cli_main(["train", "--data", str(copy), "--out", str(tmp_path / "run"), "--train-split", "test",
                     "--steps", "2", "--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64",
                     "--val-every", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_without_pycocoevalcap_evaluate_and_study_say_how_to_install_it(data, tmp_path, capsys, monkeypatch):
    """pycocoevalcap is the extra geocap[eval]: without it, evaluate and study stop at once with
    one line naming the install command (not a ModuleNotFoundError after minutes of work)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycocoevalcap" else find_spec(name, *a))
    root, ckpt, _ = data
    err = _error(capsys, ["--checkpoint", ckpt, "--data", root, "--out", str(tmp_path / "o"), "--no-progress"])
    assert err.count("\n") == 1 and "pip install 'geocap[eval]'" in err
    assert cli_main(["study", "--out", str(tmp_path / "s"), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "geocap study's evaluations need pycocoevalcap" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
