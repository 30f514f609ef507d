"""geocap.train: cross-entropy training on per-image batches, checkpoints, exact resume, validation, DDP
(gloo), vocabularies with ORT's ids, stale temporary files."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from geocap.checkpoint import load_checkpoint
from geocap.cli import main as cli_main
from helpers import ddp_train_worker, free_port, synth_data_dir

from geocap.train import (BEST, LATEST, METRICS, LRSchedule, TrainConfig, epoch_batches, noam_lr, token_loss,
                          train)

TINY = dict(layers=1, d_model=32, heads=2, d_ff=64, batch_size=4, progress=False, log_every=1)  # 4 images x 5 captions


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 synthetic images (32 train, 4 val, 4 test), D = 16."""
    return synth_data_dir(tmp_path_factory.mktemp("traindata"))


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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(data_dir, tmp_path, precision):
    """The autocast path (and fp16's GradScaler, whose state is checkpointed) on the CPU: the loss
    falls, and a resumed run equals an uninterrupted one."""
    straight = train(_config(data_dir, tmp_path / "a", steps=12, precision=precision, checkpoint_every=6))
    losses = [e["loss"] for e in _metrics(straight.out) if e["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) < sum(losses[:3])
    train(_config(data_dir, tmp_path / "b", steps=6, precision=precision, checkpoint_every=6))
    resumed = train(_config(data_dir, tmp_path / "b", steps=12, precision=precision, checkpoint_every=6), resume=True)
    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    scaler = load_checkpoint(os.path.join(straight.out, LATEST)).extra.get("scaler")
    assert (scaler is not None) == (precision == "fp16")


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
    assert latest.data_position == {"epoch": 2, "batch": 8}  # 32 images: 8 batches of 4 per epoch
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


def test_ddp_two_processes_gloo(data_dir, tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "run"
    config = _config(data_dir, out, steps=6, dropout=0.1, val_every=3, checkpoint_every=3).to_dict()
    mp.start_processes(ddp_train_worker, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True,
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
    assert "precision must be" in _error(capsys, ["--data", data_dir, "--out", str(tmp_path / "y"),
                                                  "--precision", "tf32", *tiny])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    assert "unknown train options: stepz" in _error(capsys, ["--config", str(bad), "--data", data_dir])
    with pytest.raises(SystemExit):
        cli_main(["train", "--steps", "many"])
    assert not os.path.exists(tmp_path / "y")


def test_cli_embedding_signed_trains_saves_and_resumes_with_it(data_dir, tmp_path, capsys):
    """``geocap train --embedding signed``: the checkpoint's model uses the signed box embedding, a
    resume keeps it and refuses to change it; an unknown embedding is a one-line error."""
    run = str(tmp_path / "run")
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--no-progress", "--val-every", "0"]
    assert cli_main(["train", "--data", data_dir, "--out", run, "--steps", "2", "--embedding", "signed", *tiny]) == 0
    assert load_checkpoint(os.path.join(run, LATEST)).config.embedding == "signed"
    assert cli_main(["train", "--out", run, "--resume", "--steps", "3"]) == 0
    ckpt = load_checkpoint(os.path.join(run, LATEST))
    assert ckpt.step == 3 and ckpt.config.embedding == "signed"
    assert ckpt.build_model().encoder.layers[0].self_attn.embedding == "signed"
    assert "cannot resume" in _error(capsys, ["--out", run, "--resume", "--steps", "4", "--embedding", "ort"])
    assert "train option embedding must be one of 'ort', 'signed', got 'left'" in _error(
        capsys, ["--data", data_dir, "--out", str(tmp_path / "y"), "--embedding", "left", *tiny])
    assert not os.path.exists(tmp_path / "y")
    assert TrainConfig().embedding == "ort"


# -- per-image batches, vocabulary ids, stale temporaries -----------------------------------------
def _tiny_model(ds, dropout=0.0):
    from geocap.model import ObjectRelationTransformer, ORTConfig
    torch.manual_seed(0)
    v = ds.vocab
    return ObjectRelationTransformer(ORTConfig(vocab_size=len(v), feature_dim=ds.store.feature_dim, layers=1,
                                               d_model=32, heads=2, d_ff=64, dropout=dropout, pad_id=v.pad_id,
                                               bos_id=v.bos_id, eos_id=v.eos_id))


def _train_images(data_dir, captions="caps", **kw):
    from geocap.data.dataset import CaptionDataset
    return CaptionDataset(os.path.join(data_dir, "features.h5"), os.path.join(data_dir, captions), "train",
                          per_image=True, **kw)


def test_per_image_batches_encode_each_image_once(data_dir):
    """The cross-entropy objective on a per-image batch: one encoder pass over the B images, and
    (eval mode) the loss and gradients of encoding a copy of each image per caption."""
    from geocap.train import CrossEntropyObjective, PolicyModule, caption_rows
    ds = _train_images(data_dir)
    batch = ds.collate([ds[i] for i in range(6)])
    model = _tiny_model(ds).eval()
    calls = []
    model.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    objective = CrossEntropyObjective.for_vocab(ds.vocab)
    loss, tokens = objective(PolicyModule(model), batch)
    assert calls == [6]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    rows = caption_rows(batch)
    assert rows.image_index.tolist() == sum(([i] * int(n) for i, n in enumerate(ds.n_captions[:6])), [])
    assert tokens == int((rows.lengths - 1).sum())
    idx = rows.image_index
    copies = model(batch.features[idx], batch.boxes[idx], batch.attention_mask[idx], rows.captions[:, :-1])
    expected = token_loss(copies, rows.captions[:, 1:])  # geocap's ids: <eos> is not <pad>
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # at most k captions per image: the first k
    first2 = caption_rows(batch, 2)
    assert first2.image_index.tolist() == sum(([i] * min(2, int(n)) for i, n in enumerate(ds.n_captions[:6])), [])
    assert torch.equal(first2.captions[:2], rows.captions[:2, :first2.captions.shape[1]])
    with pytest.raises(ValueError, match="per image"):
        caption_rows(dataclasses.replace(batch, captions=batch.captions[:, 0]))
    with pytest.raises(ValueError, match="memory has 6"):
        model.teacher_force(model.encode(batch.features, batch.boxes, batch.attention_mask), rows.captions[:, :-1])
    with pytest.raises(ValueError, match="captions_per_image must be None"):
        CrossEntropyObjective(pad_id=0, eos_id=2, captions_per_image=0)


def test_packed_objective_equals_the_unpacked_loss_with_smoothing(data_dir):
    """The objective runs the output layer only at the targets in the loss; with label smoothing
    its loss and gradients equal token_loss over the full [R, T, V] log-probabilities."""
    from geocap.train import CrossEntropyObjective, PolicyModule, caption_rows, target_mask
    ds = _train_images(data_dir)
    batch = ds.collate([ds[i] for i in range(5)])
    model = _tiny_model(ds).eval()
    objective = CrossEntropyObjective.for_vocab(ds.vocab, smoothing=0.1)
    loss, tokens = objective(PolicyModule(model), batch)
    rows = caption_rows(batch)
    memory = model.encode(batch.features, batch.boxes, batch.attention_mask).index_select(rows.image_index)
    targets = rows.captions[:, 1:]
    mask = target_mask(rows.lengths, targets.shape[1])
    assert bool((~mask).any())                          # the batch has padding to skip
    expected = token_loss(model.teacher_force(memory, rows.captions[:, :-1]), targets, 0.1, ds.vocab.pad_id, mask=mask)
    assert tokens == int(mask.sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    for g, e in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_make_optimizer_is_fused_on_cpu_and_updates_like_the_loop(data_dir):
    from geocap.train import make_optimizer
    ds = _train_images(data_dir)
    for kind, reference in (("noam", lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-9)),
                            ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01))):
        a, b = _tiny_model(ds), _tiny_model(ds)
        b.load_state_dict(a.state_dict())
        opt_a = make_optimizer(list(a.parameters()), kind, lr=1e-3, weight_decay=0.01)
        assert opt_a.defaults.get("fused") is True
        opt_b = reference(list(b.parameters()))
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.grad = torch.randn(pa.shape, generator=g)
                pb.grad = pa.grad.clone()
            opt_a.step()
            opt_b.step()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{kind} {name}: {m}")
    with pytest.raises(ValueError, match="optimizer must be 'noam' or 'adamw'"):
        make_optimizer(list(a.parameters()), "sgd")


def test_captions_per_image_k_trains_on_the_first_k(data_dir, tmp_path):
    from geocap.data.dataset import BucketBatchSampler
    result = train(_config(data_dir, tmp_path / "run", steps=3, captions_per_image=2))
    ds = _train_images(data_dir)
    batches = epoch_batches(BucketBatchSampler(ds.box_counts, 4, seed=0), 0)
    expected = [sum(int(ds.captions.length[int(ds.first_row[i]) + j]) + 1 for i in items
                    for j in range(min(2, int(ds.n_captions[i])))) for items in batches[:3]]
    assert [e["tokens"] for e in _metrics(result.out) if e["kind"] == "train"] == expected


@pytest.fixture(scope="module")
def ort_data_dir(data_dir, tmp_path_factory):
    """The training data with its captions encoded in ORT's layout too (DIR/ortcaps): id 0 is
    <pad>, <bos> and <eos> at once, no <unk>."""
    from geocap.data.readers import read_karpathy
    from geocap.data.vocab import Vocabulary, build_vocab, encode_captions, write_captions
    captions = read_karpathy(os.path.join(data_dir, "dataset_coco.json"))
    words = build_vocab(captions, min_count=1).words[4:]
    vocab = Vocabulary(["<eos>"] + words, pad_id=0, bos_id=0, eos_id=0, unk_id=None)
    write_captions(os.path.join(data_dir, "ortcaps"), encode_captions(captions, vocab))
    return data_dir


def test_ort_vocabulary_keeps_the_end_token_in_the_loss(ort_data_dir, tmp_path):
    from geocap.data.dataset import BucketBatchSampler
    from geocap.train import CrossEntropyObjective, PolicyModule, caption_rows, target_mask
    ds = _train_images(ort_data_dir, "ortcaps")
    batch = ds.collate([ds[i] for i in range(4)])
    rows = caption_rows(batch)
    targets = rows.captions[:, 1:]
    mask = target_mask(rows.lengths, targets.shape[1])
    # each caption's last target is its <eos>, id 0 = <pad>: in the mask, which counts L + 1
    assert (mask.sum(1) == rows.lengths - 1).all()
    assert (targets[mask.nonzero()[:, 0], mask.nonzero()[:, 1]] == 0).sum() == len(rows.lengths)
    assert int((targets != 0).sum()) == int((rows.lengths - 2).sum())  # what `!= pad` would have kept
    # the objective's loss is the mean over the L words and the <eos> of every caption
    model = _tiny_model(ds).eval()
    loss, tokens = CrossEntropyObjective.for_vocab(ds.vocab)(PolicyModule(model), batch)
    with torch.no_grad():
        memory = model.encode(batch.features, batch.boxes, batch.attention_mask).index_select(rows.image_index)
        log_probs = model.teacher_force(memory, rows.captions[:, :-1])
    picked = [-float(log_probs[r, j, targets[r, j]]) for r in range(len(rows.lengths))
              for j in range(int(rows.lengths[r]) - 1)]
    assert tokens == len(picked) == int((rows.lengths - 1).sum())
    assert float(loss.detach()) == pytest.approx(sum(picked) / len(picked), rel=1e-5)
    # a few steps of training on it: the model takes the vocabulary's ids, every target is counted
    result = train(_config(ort_data_dir, tmp_path / "run", captions="ortcaps", steps=6, val_every=3, max_decode_len=8,
                           checkpoint_every=3))
    ckpt = load_checkpoint(tmp_path / "run" / LATEST)
    assert (ckpt.config.pad_id, ckpt.config.bos_id, ckpt.config.eos_id) == (0, 0, 0) and ckpt.vocab == ds.vocab
    sampler = BucketBatchSampler(ds.box_counts, 4, seed=0)
    batches = epoch_batches(sampler, 0)
    expected = []  # 8 batches of 4 images per epoch: the 6 steps are epoch 0's first 6
    for items in batches[:6]:
        expected.append(sum(int(ds.captions.length[r]) + 1 for i in items  # L words + <eos> per caption
                            for r in range(int(ds.first_row[i]), int(ds.first_row[i]) + int(ds.n_captions[i]))))
    entries = [e for e in _metrics(result.out) if e["kind"] == "train"]
    assert [e["tokens"] for e in entries] == expected and all(math.isfinite(e["loss"]) for e in entries)
    assert [e["step"] for e in _metrics(result.out) if e["kind"] == "val"] == [3, 6]
    # with ORT's ids the smoothing spreads over every id (id 0 is a real target, <eos>)
    log_probs = torch.log_softmax(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    tgt, m = torch.tensor([[4, 0, 0], [3, 1, 0]]), torch.tensor([[True, True, False], [True, True, True]])
    smoothed = token_loss(log_probs, tgt, 0.1, None, mask=m)
    nll = -log_probs.gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(smoothed, ((0.9 * nll - 0.1 * log_probs.mean(-1)) * m).sum() / 5)
    with pytest.raises(ValueError, match="needs a mask"):
        token_loss(log_probs, tgt, 0.0, None)


def test_start_deletes_stale_temporaries_of_the_run_files(data_dir, tmp_path):
    """A (re)start removes the temporaries that dead writers left of the run's files, and only
    those (a live process's stays)."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        stale = [f"{LATEST}.tmp-{dead}", f"{METRICS}.tmp-{dead}", f"train_config.json.tmp-{dead}",
                 f"{BEST}.tmp-{dead}"]
        kept = [f"{BEST}.tmp-{live.pid}", f"{LATEST}.tmp-abc", f"notes.txt.tmp-{dead}", f"x{LATEST}.tmp-{dead}"]
        for name in stale + kept:
            (out / name).write_text("x")
        train(_config(data_dir, out, steps=1))
        assert sorted(os.listdir(out)) == sorted(kept + [LATEST, METRICS, "train_config.json"])
    finally:
        live.kill()
        live.wait()


def test_resume_refuses_a_checkpoint_of_per_caption_batches(data_dir, tmp_path):
    out = tmp_path / "run"
    train(_config(data_dir, out, steps=2))
    path = out / LATEST
    payload = torch.load(path, weights_only=True)
    assert payload["extra"].pop("xe_batches") == "images"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="held --batch-size captions"):
        train(_config(data_dir, out, steps=4), resume=True)
    assert train(_config(data_dir, out, steps=3, scst_from_step=2, scst_samples=2), resume=True).step == 3


def test_run_records_the_data_path_absolute_and_resumes_from_elsewhere(data_dir, tmp_path, monkeypatch):
    root = os.path.dirname(data_dir)
    monkeypatch.chdir(root)
    relative = os.path.basename(data_dir)
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--batch-size", "4",
            "--val-every", "0", "--no-progress"]
    run = str(tmp_path / "run")
    assert cli_main(["train", "--data", relative, "--out", run, "--steps", "2", *tiny]) == 0
    with open(os.path.join(run, "train_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["data"] == os.path.abspath(data_dir)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--out", run, "--resume", "--steps", "3"]) == 0
    assert load_checkpoint(os.path.join(run, LATEST)).step == 3


def test_a_refused_resume_writes_nothing(data_dir, tmp_path, capsys):
    """Options that do not fit the checkpoint or the data are refused before anything in RUN is
    written: the next plain --resume still reads the run's own options."""
    run = tmp_path / "run"
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--batch-size", "4",
            "--val-every", "0", "--no-progress"]
    assert cli_main(["train", "--data", data_dir, "--out", str(run), "--steps", "2", *tiny]) == 0
    other = synth_data_dir(tmp_path / "other", images=12, seed=3, feature_dim=16)  # another vocabulary
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    refusals = {
        "another vocabulary": ["--data", other],
        "no val": ["--val-split", "nope", "--val-every", "1"],
        "heads": ["--heads", "4"],
    }
    for name, argv in refusals.items():
        assert cli_main(["train", "--out", str(run), "--resume", "--steps", "4", *argv]) == 2, name
        assert "geocap: error:" in capsys.readouterr().err, name
        assert {n: (run / n).read_bytes() for n in os.listdir(run)} == before, name
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    assert load_checkpoint(run / LATEST).step == 3


def _children(pid: int) -> list:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_torchrun_ranks_die_with_a_killed_launcher(data_dir, tmp_path):
    """torchrun starts each rank in a session of its own: SIGKILL the launcher alone and the two
    gloo ranks of a long training run must be gone within a few seconds, not train on."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "geocap", "train", "--data", data_dir, "--out", str(out),
           "--steps", "100000", "--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64",
           "--batch-size", "2", "--val-every", "0", "--checkpoint-every", "0", "--log-every", "1",
           "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while not (out / METRICS).exists() or out.joinpath(METRICS).stat().st_size == 0:   # both ranks train
            assert launcher.poll() is None, "torchrun ended before training"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2 and all(_running(p) for p in ranks)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(_running(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in ranks if _running(p)], "ranks still running after the launcher died"
    finally:
        for pid in ranks:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_decaying_schedules_fall_to_zero_at_the_end():
    from geocap.train import decayed_lr

    kw = dict(lr=1.0, warmup=10, total=110)
    for decay in ("none", "cosine", "linear"):
        assert decayed_lr(5, decay=decay, **kw) == pytest.approx(0.5)          # the warm-up is shared
        assert decayed_lr(10, decay=decay, **kw) == pytest.approx(1.0)
    assert decayed_lr(60, decay="cosine", **kw) == pytest.approx(0.5)           # half-way: (1 + cos(pi/2)) / 2
    assert decayed_lr(35, decay="cosine", **kw) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert decayed_lr(35, decay="linear", **kw) == pytest.approx(0.75)
    for decay in ("cosine", "linear"):
        assert decayed_lr(110, decay=decay, **kw) == pytest.approx(0.0, abs=1e-12)
        assert decayed_lr(500, decay=decay, **kw) == pytest.approx(0.0, abs=1e-12)
    assert decayed_lr(500, decay="none", **kw) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = LRSchedule(opt, "warmup", warmup=10, lr=1.0, decay="cosine", total=110)
    for _ in range(59):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    other = LRSchedule(opt, "warmup", warmup=10, lr=1.0, decay="cosine", total=110)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 59
    constant = LRSchedule(opt, "warmup", warmup=10, lr=1.0)
    constant.load_state_dict({"kind": "warmup", "last_step": 3})        # a state saved before decays existed
    with pytest.raises(ValueError, match="decays 'none', this run 'cosine'"):
        other.load_state_dict({"kind": "warmup", "last_step": 3})
    with pytest.raises(ValueError, match="noam"):
        LRSchedule(opt, "noam", warmup=10, decay="cosine", total=100)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(optimizer="noam", decay="cosine")
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(optimizer="adamw", decay="cosine", steps=10, warmup=10)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(optimizer="adamw", decay="exponential")


def test_cosine_run_logs_its_rates_and_the_teacher_forced_validation_loss(data_dir, tmp_path):
    from geocap.data.dataset import CaptionDataset
    from geocap.train import CrossEntropyObjective, decayed_lr, validation_loss
    from geocap.train.scst import PolicyModule

    out = tmp_path / "run"
    result = train(_config(data_dir, out, steps=12, warmup=2, decay="cosine", val_every=6, val_cider=False,
                           val_loss_images=4, dropout=0.1))
    entries = _metrics(out)
    rates = {e["step"]: e["lr"] for e in entries if e["kind"] == "train"}
    assert rates == {k: pytest.approx(decayed_lr(k, lr=3e-3, warmup=2, total=12, decay="cosine"), abs=1e-15)
                     for k in range(1, 13)}
    assert rates[12] == pytest.approx(0.0, abs=1e-15)
    vals = [e for e in entries if e["kind"] == "val"]
    assert [v["step"] for v in vals] == [6, 12]
    assert all("cider_d" not in v and v["loss_images"] == 4 and v["loss_se"] > 0 for v in vals)
    assert not os.path.exists(out / BEST) and result.best_cider is None
    # the logged loss is the objective's mean over the 4 val images' tokens, without dropout
    ds = CaptionDataset(os.path.join(data_dir, "features.h5"), os.path.join(data_dir, "caps"), "val",
                        per_image=True)
    batch = ds.collate([ds[i] for i in range(4)])
    result.model.eval()
    with torch.no_grad():
        expected, tokens = CrossEntropyObjective.for_vocab(ds.vocab)(PolicyModule(result.model), batch)
    got = validation_loss(result.model.train(), ds, images=4, batch_size=3)
    assert got["loss"] == pytest.approx(float(expected), rel=1e-5) and got["tokens"] == tokens
    assert vals[-1]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result.model.training                                              # its mode is left as it was


def test_initial_checkpoint_holds_the_weights_training_starts_from(data_dir, tmp_path):
    from geocap.train import initial_checkpoint

    config = _config(data_dir, tmp_path / "run", steps=1, lr=1e-12, warmup=0, weight_decay=0.0, seed=3)
    initial_checkpoint(config, tmp_path / "init.pt")
    state = torch.get_rng_state()
    initial_checkpoint(dataclasses.replace(config, seed=4), tmp_path / "other.pt")
    assert torch.equal(torch.get_rng_state(), state)                         # the global generator is untouched
    init, other = load_checkpoint(tmp_path / "init.pt"), load_checkpoint(tmp_path / "other.pt")
    assert init.step == 0 and init.extra["untrained"] is True
    trained = train(config).model.state_dict()                               # one update at lr 1e-12
    for name, p in init.model_state.items():
        assert torch.allclose(p, trained[name], atol=1e-9), name
    assert max((p - other.model_state[n]).abs().max() for n, p in init.model_state.items()) > 1e-2


def test_resume_refuses_other_data_of_the_same_shape_and_fewer_steps(data_dir, tmp_path, capsys):
    """The checkpoint records the SHA-256 of the data: features of another synthetic seed copied
    over the run's (same images, shapes and vocabulary) are refused, naming the file; so is
    --steps below the step reached. Neither writes anything in RUN."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    run = tmp_path / "run"
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--val-every", "0", "--no-progress"]
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--steps", "4", *tiny]) == 0
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    err = _error(capsys, ["--out", str(run), "--resume", "--steps", "2"])
    assert "--steps 2 is below the step" in err and "(4)" in err
    other = synth_data_dir(tmp_path / "other", seed=1)
    shutil.copyfile(os.path.join(other, "features.h5"), data / "features.h5")
    err = _error(capsys, ["--out", str(run), "--resume", "--steps", "6"])
    assert "the data are not those the run started with" in err and str(data / "features.h5") in err
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == before
    shutil.copyfile(os.path.join(data_dir, "features.h5"), data / "features.h5")   # the same bytes again
    assert cli_main(["train", "--out", str(run), "--resume", "--steps", "6"]) == 0
    assert load_checkpoint(run / LATEST).step == 6


def test_a_stop_request_lost_as_an_exception_stops_training_before_its_checkpoint(data_dir, tmp_path, monkeypatch):
    """The stop flag set during step 1 with its exception lost: training stops before step 2
    and writes no checkpoint (it would have written one at its last step)."""
    from geocap import stop
    from geocap.train import loop

    update = loop.optimizer_update

    def update_and_request(*args, **kwargs):
        stop.request_stop()
        return update(*args, **kwargs)
    monkeypatch.setattr(loop, "optimizer_update", update_and_request)
    out = tmp_path / "run"
    with stop.stop_signals():
        with pytest.raises(stop.Interrupted):
            train(_config(data_dir, out, steps=3))
    assert not (out / LATEST).exists()
    assert _metrics(out) == [] or [e["step"] for e in _metrics(out)] == [1]
