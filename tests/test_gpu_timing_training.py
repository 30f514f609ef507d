"""bench/gpu_timing.py's training records, in its dry run (CPU, a small model): every record is
written, both variants are timed at each precision, and the recorded equal-work gradient agreement
is small for the real steps and large for a deliberately wrong gradient (so it can tell)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")


@pytest.fixture(scope="module")
def gpu_timing():
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location("gpu_timing_under_test", os.path.join(BENCH, "gpu_timing.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(BENCH)


def test_training_records_dry_run(gpu_timing, tmp_path):
    out = tmp_path / "timing.json"
    rec = gpu_timing.Recorder(out, deadline_s=300)
    gpu_timing.training_records(rec, torch.device("cpu"), dry_run=True)
    records = json.loads(out.read_text())
    assert not [r for r in records if "error" in r], records
    check = records[0]
    assert check["what"].startswith("equal-work gradient check")
    assert check["loss_geocap"] == pytest.approx(check["loss_ort_style"], rel=1e-5)
    assert check["max_relative_grad_difference"] < 1e-2
    timed = {(r["variant"], r["precision"]) for r in records[1:]}
    assert timed == {(v, p) for v in ("geocap", "ort_style") for p in ("float32, TF32 off", "bf16 autocast")}
    assert all(r["step_ms"] > 0 and r["layers"] == 2 for r in records[1:])


def test_gradient_agreement_sees_a_wrong_gradient(gpu_timing, monkeypatch):
    """A geocap gradient scaled by 0.8 shows as a 20 % difference: the record is not blind."""
    cap = gpu_timing._captioner_bench()
    real = cap._grads_of_step

    def scaled(*args):
        got = real(*args)
        loss, grads = got["geocap"]
        return {**got, "geocap": (loss, [0.8 * g for g in grads])}

    monkeypatch.setattr(cap, "_grads_of_step", scaled)
    from geocap.model import ObjectRelationTransformer, ORTConfig

    torch.manual_seed(0)
    model = ObjectRelationTransformer(ORTConfig(**gpu_timing.DRY_SIZE)).eval()
    images = cap.make_images(2, seed=2)
    captions, lengths = cap.make_captions(2, cap.CAPTIONS_PER_IMAGE, seed=3)
    got = gpu_timing._gradient_agreement(cap, model, images, captions, lengths)
    assert got["max_relative_grad_difference"] == pytest.approx(0.2, rel=1e-2)
