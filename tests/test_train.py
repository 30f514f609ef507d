"""geocap.train: cross-entropy training, checkpoints, exact resume, validation, DDP (gloo)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from geocap.checkpoint import load_checkpoint
from geocap.cli import main as cli_main
from geocap.data.synth import generate_synthetic
from geocap.train import (BEST, LATEST, METRICS, LRSchedule, TrainConfig, epoch_batches, noam_lr, token_loss,
                          train)

TINY = dict(layers=1, d_model=32, heads=2, d_ff=64, batch_size=16, progress=False, log_every=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 synthetic images (32 train, 4 val, 4 test), D = 16, laid out as geocap synth + prepro make it."""
    root = tmp_path_factory.mktemp("traindata")
    generate_synthetic(root, images=40, seed=0, feature_dim=16, progress=False)
    assert cli_main(["prepro", "captions", "--karpathy", str(root / "dataset_coco.json"), "--out", str(root / "caps"),
                        "--min-count", "1"]) == 0
    return str(root)


def _config(data_dir, out, **kw):
    opts = dict(TINY, data=data_dir, out=str(out), optimizer="adamw", lr=3e-3, warmup=5, val_every=0,
                checkpoint_every=0)
    opts.update(kw)
    return TrainConfig(**opts)


def _metrics(out):
    with open(os.path.join(out, METRICS), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_loss_decreases(data_dir, tmp_path):
    result = train(_config(data_dir, tmp_path / "run", steps=30))
    losses = [e["loss"] for e in _metrics(result.out) if e["kind"] == "train"]
    assert len(losses) == 30 and result.step == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    first = _metrics(result.out)[0]
    assert {"step", "loss", "lr", "grad_norm", "time"} <= set(first)


def test_noam_schedule_and_loss():
    assert noam_lr(100, d_model=512, warmup=100) == pytest.approx(512 ** -0.5 * 100 ** -0.5)
    assert noam_lr(50, d_model=512, warmup=100, factor=2.0) == pytest.approx(2 * 512 ** -0.5 * 50 * 100 ** -1.5)
    assert noam_lr(400, d_model=512, warmup=100) == pytest.approx(512 ** -0.5 * 400 ** -0.5)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = LRSchedule(opt, "noam", warmup=10, d_model=64)
    for _ in range(3):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(noam_lr(4, d_model=64, warmup=10))
    other = LRSchedule(opt, "noam", warmup=10, d_model=64)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 3
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    targets = torch.tensor([[4, 5, 2, 0, 0], [6, 2, 0, 0, 0]])
    expected = F.nll_loss(log_probs.reshape(-1, 7), targets.reshape(-1), ignore_index=0)
    assert torch.allclose(token_loss(log_probs, targets), expected)
    assert not torch.allclose(token_loss(log_probs, targets, 0.1), expected)


def test_checkpoints_and_best_by_val_cider(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(_config(data_dir, out, steps=24, val_every=4, checkpoint_every=8))
    names = sorted(os.listdir(out))
    assert names == sorted([BEST, LATEST, METRICS, "train_config.json"])  # no temporary files left
    latest = load_checkpoint(out / LATEST)
    assert latest.step == 24 and latest.optimizer_state and latest.rng is not None
    assert latest.data_position == {"epoch": 2, "batch": 4}            # 10 batches per epoch
    vals = [e for e in _metrics(out) if e["kind"] == "val"]
    assert [v["step"] for v in vals] == [4, 8, 12, 16, 20, 24]
    best = max(vals, key=lambda v: (v["cider_d"], -v["step"]))        # first step of the maximum
    assert (result.best_step, result.best_cider) == (best["step"], best["cider_d"])
    saved = load_checkpoint(out / BEST)
    assert saved.step == best["step"] and saved.metrics["cider_d"] == best["cider_d"]
    assert [v["best"] for v in vals] == [v["cider_d"] > max([-1.0] + [u["cider_d"] for u in vals[:k]])
                                         for k, v in enumerate(vals)]
    assert latest.extra["best"] == {"cider_d": best["cider_d"], "step": best["step"]}


def test_exact_resume_with_dropout(data_dir, tmp_path):
    kw = dict(steps=14, dropout=0.2, val_every=7, checkpoint_every=7, optimizer="noam", warmup=4)
    straight = train(_config(data_dir, tmp_path / "a", **kw))
    half = _config(data_dir, tmp_path / "b", **dict(kw, steps=7))
    train(half)
    resumed = train(_config(data_dir, tmp_path / "b", **kw), resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [(e["step"], e["loss"]) for e in _metrics(tmp_path / "a") if e["kind"] == "train"]
    lb = [(e["step"], e["loss"]) for e in _metrics(tmp_path / "b") if e["kind"] == "train"]
    assert la == lb and len(la) == 14
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_config(data_dir, tmp_path / "c", **kw), resume=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, config_dict, dump_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(TrainConfig(**config_dict))
    torch.save(result.model.state_dict(), os.path.join(dump_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_gloo(data_dir, tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "run"
    config = _config(data_dir, out, steps=6, dropout=0.1, val_every=3, checkpoint_every=3).to_dict()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    latest = load_checkpoint(out / LATEST)
    assert latest.step == 6 and latest.extra["world_size"] == 2 and len(latest.extra["rank_rng"]) == 2
    assert all(torch.equal(latest.model_state[k], s0[k]) for k in s0)
    assert sorted(os.listdir(out)) == sorted([BEST, LATEST, METRICS, "train_config.json"])
    # each rank took its own half of the epoch's batches: 10 batches -> 5 per rank
    from geocap.data.dataset import BucketBatchSampler
    sampler = BucketBatchSampler(list(range(160)), 16, seed=0)
    r0, r1 = epoch_batches(sampler, 0, 0, 2), epoch_batches(sampler, 0, 1, 2)
    assert len(r0) == len(r1) == 5 and not set(sum(r0, [])) & set(sum(r1, []))


def _error(capsys, argv):
    assert cli_main(["train", *argv]) == 2
    return capsys.readouterr().err


def test_cli_runs_and_bad_arguments(data_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--no-progress"]
    assert cli_main(["train", "--data", data_dir, "--out", run, "--steps", "3", "--val-every", "0", *tiny]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert "already holds a training run" in _error(capsys, ["--data", data_dir, "--out", run, *tiny])
    # resume picks the run's options up and extends it
    assert cli_main(["train", "--out", run, "--resume", "--steps", "5"]) == 0
    assert load_checkpoint(os.path.join(run, LATEST)).step == 5
    assert "cannot resume" in _error(capsys, ["--out", run, "--resume", "--steps", "6", "--d-model", "64"])
    assert "train_config.json missing" in _error(capsys, ["--out", str(tmp_path / "x"), "--resume"])
    assert "--data" in _error(capsys, ["--out", str(tmp_path / "y")])
    assert "not a directory" in _error(capsys, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert "optimizer" in _error(capsys, ["--data", data_dir, "--out", str(tmp_path / "y"), "--optimizer", "sgd"])
    assert "divisible" in _error(capsys, ["--data", data_dir, "--out", str(tmp_path / "y"), "--heads", "3"])
    assert "needs a CUDA device" in _error(capsys, ["--data", data_dir, "--out", str(tmp_path / "y"),
                                                    "--precision", "bf16", "--device", "cpu", *tiny])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    assert "unknown train options: stepz" in _error(capsys, ["--config", str(bad), "--data", data_dir])
    with pytest.raises(SystemExit):
        cli_main(["train", "--steps", "many"])
    assert not os.path.exists(tmp_path / "y")
