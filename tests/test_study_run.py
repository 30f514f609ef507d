"""``geocap study``'s settings, runner and command on a tiny study (2 variants x 1 seed, 40
images, a 1-layer model, 6 steps): the layout end to end, rerun skipping finished models, a
model whose done.json is gone or whose checkpoint is corrupt made again (and equal to the first
one), other settings refused without touching the folder, and a SIGKILLed study resuming to the
same models as an uninterrupted one. The aggregation there is a recording stand-in; one tiny study of
all three variants runs the real geocap.study.summary end to end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import geocap.train
from geocap.checkpoint import load_checkpoint
from geocap.cli import main as cli_main
from geocap.data.file_digest import file_sha256
from geocap.study.run import DONE_FILE, STUDY_FILE, finished_models, model_dir, run_study
from geocap.study.settings import SETTINGS_FILE, VARIANTS, StudySettings

TINY = dict(variants=["ort", "none"], seeds=1, images=40, feature_dim=16, min_count=1, layers=1, d_model=32, heads=2,
            d_ff=64, steps=6, batch_size=4, warmup=2, val_every=3, val_loss_images=4, beam_size=2, tokenizer="python")
MODEL_FIELDS = {"variant", "seed", "references", "captions", "ground_truth", "analysis", "metrics", "val_curve",
                "steps", "untrained_analysis", "schedule_check"}
FINAL = os.path.join("run", "checkpoint-latest.pt")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TIMEOUT = 120


def config_of(folder: str) -> dict:
    return json.loads(open(os.path.join(folder, "run", "train_config.json")).read())


def tiny(**changes) -> StudySettings:
    return StudySettings.from_dict({**TINY, **changes})


class Recorder:
    """A stand-in aggregation: records each call's model results and returns a small summary."""

    def __init__(self):
        self.calls = []

    def __call__(self, results, out_dir, settings):
        self.calls.append(results)
        return {"models": [f"{r['variant']}-seed{r['seed']}" for r in results]}


class Lines(list):
    def __call__(self, line):
        self.append(line)


@pytest.fixture
def trained(monkeypatch):
    """Records the models geocap.train.train is called for (their run folder's parent's name;
    ``<model>/short`` for a schedule check's short run)."""
    names, real = [], geocap.train.train

    def counting(config, **kwargs):
        parent = os.path.dirname(config.out)
        name = os.path.basename(parent)
        names.append(f"{os.path.basename(os.path.dirname(parent))}/{name}" if name == "short" else name)
        return real(config, **kwargs)

    monkeypatch.setattr(geocap.train, "train", counting)
    return names


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run once, uninterrupted: (folder, recorder, log lines)."""
    out = str(tmp_path_factory.mktemp("study") / "s")
    recorder, log = Recorder(), Lines()
    path = run_study(out, tiny(), aggregate=recorder, progress=False, log=log)
    assert path == os.path.join(out, STUDY_FILE)
    return out, recorder, log


def copy_of(study, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(study[0], out)
    return out


def weights(out, variant, seed) -> dict:
    return load_checkpoint(os.path.join(model_dir(out, variant, seed), FINAL)).model_state


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def snapshot(folder) -> dict:
    """Every path under ``folder`` with its size and modification time (ns)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            found[os.path.relpath(path, folder)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return found


# ---------------------------------------------------------------------------- settings


def test_settings_round_trip_differences_and_variants(tmp_path):
    settings = tiny()
    path = tmp_path / SETTINGS_FILE
    settings.save(path)
    assert StudySettings.load(path) == settings
    assert StudySettings.from_dict(json.loads(path.read_text())) == settings
    assert settings.differences(settings) == []
    other = tiny(seeds=2, lr=3e-3)
    assert other.differences(settings) == ["seeds (1 there, 2 now)", "lr (0.001 there, 0.003 now)"]

    quick = StudySettings.for_quick()
    assert quick.quick and quick.seeds == 2 and quick.variants == ("ort", "none", "directional", "absolute")
    full = StudySettings.full()
    assert quick.layers <= 2 and full.layers >= 4 and full.seeds >= 5 and full.val_loss_images >= 1000
    assert full.images // 10 >= full.val_loss_images                 # the val split holds them
    assert quick.models()[:4] == [("ort", 0), ("none", 0), ("directional", 0), ("absolute", 0)]
    # the variants differ in their geometry options only
    options = {v: full.train_options(v, 1) for v in VARIANTS}
    assert options["ort"]["geometry"] is True and "embedding" not in options["ort"]
    assert options["none"]["geometry"] is False and "box_features" not in options["none"]
    assert options["directional"]["geometry"] is True and options["directional"]["embedding"] == "signed"
    assert options["absolute"]["geometry"] is False and options["absolute"]["box_features"] is True
    assert options["ort"]["decay"] == "cosine" and options["ort"]["val_cider"] is False
    shared = {k: v for k, v in options["ort"].items() if k not in ("geometry", "embedding", "box_features")}
    for variant in VARIANTS:
        assert {k: v for k, v in options[variant].items() if k in shared} == shared
        assert options[variant]["seed"] == 1


@pytest.mark.parametrize("changes, named", [
    ({"variants": ["ort", "left-right"]}, "variants"), ({"variants": ["ort", "ort"]}, "variants"),
    ({"seeds": 0}, "seeds"), ({"steps": "10"}, "steps"), ({"quick": 1}, "quick"), ({"heads": 5}, "heads"),
    ({"tokenizer": "perl"}, "tokenizer"), ({"colour": 1}, "colour"), ({"images": 5}, "images"),
])
def test_bad_settings_name_the_setting(changes, named):
    with pytest.raises(ValueError, match=named):
        tiny(**changes)


def test_settings_file_missing_a_field_is_refused(tmp_path):
    data = tiny().to_dict()
    del data["steps"]
    path = tmp_path / SETTINGS_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{SETTINGS_FILE}.*steps"):
        StudySettings.load(path)


# ---------------------------------------------------------------------------- the runner


def test_study_end_to_end(study):
    out, recorder, log = study
    assert len(recorder.calls) == 1
    results = recorder.calls[0]
    assert [(r["variant"], r["seed"]) for r in results] == [("ort", 0), ("none", 0)]
    saved = json.loads(open(os.path.join(out, STUDY_FILE)).read())
    assert saved["models"] == ["ort-seed0", "none-seed0"]
    assert saved["settings"] == tiny().to_dict()
    assert json.loads(open(os.path.join(out, SETTINGS_FILE)).read()) == tiny().to_dict()
    assert finished_models(out, tiny()) == [("ort", 0), ("none", 0)]
    for result in results:
        assert set(result) == MODEL_FIELDS
        folder = model_dir(out, result["variant"], result["seed"])
        done = json.loads(open(os.path.join(folder, DONE_FILE)).read())
        assert done["files"]["run/checkpoint-latest.pt"] == file_sha256(os.path.join(folder, FINAL))
        for rel in ("eval/metrics_test.json", "eval/captions_test.json", "analysis/analysis.json",
                    "dump/manifest.json", "untrained/checkpoint.pt", "untrained/dump/manifest.json",
                    "untrained/analysis/analysis.json"):
            assert rel in done["files"]
        assert not os.path.exists(os.path.join(folder, "run", "checkpoint-best.pt"))   # no CIDEr validation
        # the schedule check (seed 0): a half-length run of the same options, scored on the same images
        assert "short/schedule_check.json" in done["files"] and "short/run/checkpoint-latest.pt" in done["files"]
        assert load_checkpoint(os.path.join(folder, "short", FINAL)).step == 3
        short_config = json.loads(open(os.path.join(folder, "short", "run", "train_config.json")).read())
        assert short_config == {**config_of(folder), "steps": 3, "checkpoint_every": 3, "out": short_config["out"]}
        check = result["schedule_check"]
        assert check["short_steps"] == 3 and check["steps"] == 6 and check["images"] == 4
        assert len(check["sums"]) == len(check["short_sums"]) == len(check["tokens"]) == 4
        assert check["sums"] != check["short_sums"]
        assert [p[0] for p in check["short_curve"]] == [3]
        # its full-model sums are the run's own last validation loss, recomputed
        assert sum(check["sums"]) / sum(check["tokens"]) == pytest.approx(result["val_curve"][-1][1], rel=1e-6)
        # the evaluated model is the final one; the untrained control is its initialisation
        assert load_checkpoint(os.path.join(folder, FINAL)).step == 6
        metrics = json.loads(open(os.path.join(folder, "eval", "metrics_test.json")).read())
        assert metrics["checkpoint_step"] == 6 and metrics["checkpoint"].endswith(FINAL)
        assert load_checkpoint(os.path.join(folder, "untrained", "checkpoint.pt")).step == 0
        assert result["untrained_analysis"]["records"] == result["analysis"]["records"]
        assert result["untrained_analysis"] != result["analysis"] and result["steps"] == 6
        config = json.loads(open(os.path.join(folder, "run", "train_config.json")).read())
        assert config["geometry"] is (result["variant"] == "ort") and config["seed"] == result["seed"]
        generated = json.loads(open(os.path.join(folder, "eval", "captions_test.json")).read())
        assert result["captions"] == {g["image_id"]: g["caption"] for g in generated}
        assert result["references"].keys() == result["captions"].keys() and len(result["captions"]) == 4
        assert all(len(refs) == 5 and all(isinstance(r, str) for r in refs) for refs in result["references"].values())
        assert result["metrics"]["n_images"] == 4 and "CIDEr" in result["metrics"]["metrics"]
        assert result["metrics"]["beam_size"] == 2 and result["metrics"]["relation_counts"] is not None
        assert [step for step, _, _ in result["val_curve"]] == [3, 6]
        assert all(loss > 0 and se > 0 for _, loss, se in result["val_curve"])
        assert os.path.isfile(result["ground_truth"])
        assert result["analysis"]["records"] > 0 and "entropy" in result["analysis"]
        # the dump holds hypothetical captions and the objects' features, as the demo's
        manifest = json.loads(open(os.path.join(folder, "dump", "manifest.json")).read())
        assert manifest["metadata"]["split"] == "test"
    assert any("2 of 2 models done" in line and "s left" in line for line in log)


def test_model_results_fit_model_result():
    """The runner's dicts are exactly ModelResult's fields."""
    from dataclasses import fields

    from geocap.study.summary import ModelResult

    assert {f.name for f in fields(ModelResult)} == MODEL_FIELDS


def test_a_tiny_study_of_every_variant_with_the_real_summary(study, tmp_path):
    """The whole path the command takes: every variant (directional trains with the signed box
    embedding, absolute with box features), the real summarize and write_report, study.json with
    exactly its seven top-level keys; made two models at a time (--jobs 2, each in a spawned process), its
    ort and none models equal those of the one-at-a-time study of the same settings."""
    from geocap.data.dump_format import box_embedding, read_manifest
    from geocap.study.findings import VERDICTS

    out = str(tmp_path / "s")
    variants = ["ort", "none", "directional", "absolute"]
    settings = tiny(variants=variants)
    log = Lines()
    path = run_study(out, settings, progress=False, jobs=2, log=log)
    for variant in ("ort", "none"):
        assert_same_weights(weights(out, variant, 0), weights(study[0], variant, 0))
    assert any("4 of 4 models done" in line for line in log)
    with pytest.raises(ValueError, match="--jobs"):
        run_study(out, settings, progress=False, jobs=0)
    study = json.loads(open(path).read())
    assert set(study) == {"settings", "variants", "comparisons", "findings", "data_checks", "verdicts", "controls"}
    assert set(study["variants"]) == set(variants)
    for name, variant in study["variants"].items():
        assert set(variant) >= {"seeds", "mean", "ci95"} and [s["seed"] for s in variant["seeds"]] == [0]
        assert variant["seeds"][0]["convergence"]["converged"] is None     # 2 validations: undecided
        check = variant["seeds"][0]["schedule_convergence"]
        assert check["criterion"] == "schedule" and (check["short_steps"], check["steps"], check["images"]) == (3, 6, 4)
        assert check["loss"] == pytest.approx(variant["seeds"][0]["val_curve"][-1][1], rel=1e-6)
        assert check["gain_ci95"][0] <= check["gain"] <= check["gain_ci95"][1]
        assert [p[0] for p in check["short_curve"]] == [3]
    assert study["findings"] and all(f["verdict"] in VERDICTS for f in study["findings"])
    assert all({"name", "seed_claim", "measured", "verdict", "variants", "control"} <= set(f)
               for f in study["findings"])
    assert study["verdicts"]["tested"] == len(study["findings"])
    assert set(study["controls"]) == {"blind", "blind left/right", "blind above/below"}
    report = open(os.path.join(out, "study.md")).read()
    assert "**Schedule check**" in report and "3 -> 6" in report
    absolute = json.loads(open(os.path.join(model_dir(out, "absolute", 0), "run", "train_config.json")).read())
    assert absolute["box_features"] is True and absolute["geometry"] is False
    assert load_checkpoint(os.path.join(model_dir(out, "absolute", 0), FINAL)).config.box_features is True
    embeddings = {}
    for variant in ("ort", "none", "directional"):
        folder = model_dir(out, variant, 0)
        config = json.loads(open(os.path.join(folder, "run", "train_config.json")).read())
        embeddings[variant] = (config["geometry"], config.get("embedding"),
                               box_embedding(read_manifest(os.path.join(folder, "dump"))["metadata"]))
    assert embeddings["ort"] == (True, "ort", "ort")
    assert embeddings["directional"] == (True, "signed", "signed")
    assert embeddings["none"][0] is False and embeddings["none"][2] == "none"


def test_rerun_skips_finished_models(study, tmp_path, trained):
    out = copy_of(study, tmp_path)
    before = snapshot(os.path.join(out, "models"))
    recorder, log = Recorder(), Lines()
    run_study(out, tiny(), aggregate=recorder, progress=False, log=log)
    assert trained == []
    assert snapshot(os.path.join(out, "models")) == before
    assert len(recorder.calls) == 1 and [r["variant"] for r in recorder.calls[0]] == ["ort", "none"]
    assert sum("finished earlier" in line for line in log) == 2


@pytest.mark.parametrize("damage", ["done.json deleted", "checkpoint corrupt", "killed mid-way"])
def test_unfinished_or_damaged_model_is_made_again(study, tmp_path, trained, damage):
    out = copy_of(study, tmp_path)
    victim = "none" if damage == "checkpoint corrupt" else "ort"
    folder = model_dir(out, victim, 0)
    other = "ort" if victim == "none" else "none"
    kept_before = snapshot(model_dir(out, other, 0))
    if damage == "done.json deleted":
        os.remove(os.path.join(folder, DONE_FILE))
    elif damage == "checkpoint corrupt":
        ckpt = os.path.join(folder, FINAL)
        data = bytearray(open(ckpt, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(ckpt, "wb").write(bytes(data))
    else:  # a study killed while training: the model's folder holds a run and nothing else
        for name in ("eval", "dump", "analysis", "untrained", DONE_FILE):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    log = Lines()
    run_study(out, tiny(), aggregate=Recorder(), progress=False, log=log)
    assert trained == [f"{victim}-seed0", f"{victim}-seed0/short"]
    assert any(f"{victim}-seed0" in line and "making it again" in line for line in log)
    assert snapshot(model_dir(out, other, 0)) == kept_before
    assert finished_models(out, tiny()) == [("ort", 0), ("none", 0)]
    # the same seed gives the same model
    assert_same_weights(weights(out, victim, 0), weights(study[0], victim, 0))


def test_other_settings_are_refused_and_nothing_changes(study, tmp_path, capsys):
    out = copy_of(study, tmp_path)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"other settings: seeds \(1 there, 2 now\); steps \(6 there, 9 now\)"):
        run_study(out, tiny(seeds=2, steps=9), aggregate=Recorder(), progress=False)
    assert snapshot(out) == before
    # the command line: one line, naming the setting, exit status 2
    settings_file = tmp_path / "tiny.json"
    settings_file.write_text(json.dumps(TINY))
    assert cli_main(["study", "--out", out, "--settings", str(settings_file), "--seeds", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geocap: error: ") and err.count("\n") == 1 and "seeds (1 there, 3 now)" in err
    assert snapshot(out) == before


def test_a_folder_that_is_not_a_study_is_refused(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not a geocap study"):
        run_study(out, tiny(), aggregate=Recorder(), progress=False)
    assert os.listdir(out) == ["thesis.tex"]


@pytest.mark.parametrize("argv, named", [
    (["--variants", "ort,sideways"], "sideways"), (["--seeds", "0"], "--seeds"),
    (["--settings", "MISSING.json"], "MISSING.json"), (["--jobs", "0"], "--jobs"),
])
def test_command_line_bad_options(tmp_path, capsys, argv, named):
    assert cli_main(["study", "--out", str(tmp_path / "s"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geocap: error: ") and err.count("\n") == 1 and named in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_study_resumes_to_the_same_models(study, tmp_path, signum):
    """SIGKILL (or SIGINT) a real ``geocap study`` once its first model is finished (during the
    second); rerunning goes on: the first model is kept as it was, the second made again from the
    start, and both equal the uninterrupted study's."""
    out = str(tmp_path / "killed")
    settings_file = tmp_path / "tiny.json"
    settings_file.write_text(json.dumps(TINY))
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "geocap", "study", "--out", out, "--settings", str(settings_file),
                             "--no-progress", "--jobs", "1"], env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    first_done = os.path.join(model_dir(out, "ort", 0), DONE_FILE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not os.path.exists(first_done):
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "the first model took too long"
            time.sleep(0.02)
        proc.send_signal(signum)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    output = log.read()
    assert "none-seed0: done" not in output
    if signum == signal.SIGINT:  # stopped through the command's clean-up
        assert proc.returncode == 130 and "geocap: interrupted by SIGINT" in output, output
    else:
        assert proc.returncode == -signal.SIGKILL
    assert finished_models(out, tiny()) == [("ort", 0)]
    first_sha = file_sha256(os.path.join(model_dir(out, "ort", 0), FINAL))

    lines = Lines()
    recorder = Recorder()
    run_study(out, tiny(), aggregate=recorder, progress=False, log=lines)
    assert finished_models(out, tiny()) == [("ort", 0), ("none", 0)]
    assert file_sha256(os.path.join(model_dir(out, "ort", 0), FINAL)) == first_sha
    assert any("ort-seed0: finished earlier" in line for line in lines)
    assert [r["variant"] for r in recorder.calls[0]] == ["ort", "none"]
    for variant in ("ort", "none"):
        assert_same_weights(weights(out, variant, 0), weights(study[0], variant, 0))
    expected = study[1].calls[0]
    for got, want in zip(recorder.calls[0], expected):
        assert got["captions"] == want["captions"] and got["metrics"]["metrics"] == want["metrics"]["metrics"]



def test_schedule_ladder_scores_runs_as_the_study_does(study, tmp_path):
    """bench/schedule_ladder.py on the tiny study's short and full runs of ort seed 0 gives the
    study's own schedule check; runs out of step order or trained on other data are refused."""
    import importlib.util

    from geocap.study.schedule import schedule_gain

    spec = importlib.util.spec_from_file_location("schedule_ladder", os.path.join(
        os.path.dirname(__file__), os.pardir, "bench", "schedule_ladder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, _, _ = study
    folder, data = model_dir(out, "ort", 0), os.path.join(out, "data")
    runs = [os.path.join(folder, "short", "run"), os.path.join(folder, "run")]
    got = module.ladder(data, runs, images=4)
    check = json.loads(open(os.path.join(folder, "short", "schedule_check.json")).read())
    assert got["checks"] == [schedule_gain(check)]
    assert [r["steps"] for r in got["runs"]] == [3, 6]
    assert got["runs"][1]["final_val_loss"] == pytest.approx(got["checks"][0]["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="more steps"):
        module.ladder(data, runs[::-1], images=4)
    other = str(tmp_path / "data")
    shutil.copytree(data, other)
    with open(os.path.join(other, "caps", "vocab.json"), "a", encoding="utf-8") as fh:
        fh.write("\n")
    with pytest.raises(ValueError, match="other data"):
        module.ladder(other, runs, images=4)
