"""geocap.train.scst: self-critical sequence training (CIDEr-D reward, greedy or mean baseline)
and its integration in the trainer (phase switch, exact resume, DDP, options)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from geocap.checkpoint import load_checkpoint
from geocap.cli import main as cli_main
from geocap.data.dataset import CaptionDataset, collate
from geocap.decoding import greedy_decode, sample
from geocap.metrics import cider_d
from geocap.model import ObjectRelationTransformer, ORTConfig
from geocap.train import LATEST, METRICS, SCSTObjective, TrainConfig, mean_baseline, reward_scorer, scst_loss, train
from geocap.train.scst import PolicyModule
from helpers import ddp_train_worker, free_port, synth_data_dir

TINY = dict(layers=1, d_model=32, heads=2, d_ff=64, batch_size=16, progress=False, log_every=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 synthetic images (32 train, 4 val, 4 test), D = 16."""
    return synth_data_dir(tmp_path_factory.mktemp("scstdata"))


@pytest.fixture(scope="module")
def train_images(data_dir):
    """The per-image training split and every one of its images as one batch."""
    ds = CaptionDataset(os.path.join(data_dir, "features.h5"), os.path.join(data_dir, "caps"), "train",
                        per_image=True, captions_per_image=1)
    return ds, collate([ds[i] for i in range(len(ds))])


def _model(ds, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = ORTConfig(vocab_size=len(ds.vocab), feature_dim=ds.store.feature_dim, layers=1, d_model=32, heads=2,
                       d_ff=64, dropout=dropout)
    return ObjectRelationTransformer(config)


def _config(data_dir, out, **kw):
    opts = dict(TINY, data=data_dir, out=str(out), optimizer="adamw", lr=3e-3, warmup=5, val_every=0,
                checkpoint_every=0, max_decode_len=12)
    opts.update(kw)
    return TrainConfig(**opts)


def _metrics(out):
    with open(os.path.join(out, METRICS), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _pycoco_scores(ds, image_ids, captions):
    pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
    gts = {i: list(ds.references(i)) for i in image_ids}
    _, scores = pycoco_cider.Cider().compute_score(gts, {i: [c] for i, c in zip(image_ids, captions)})
    return torch.as_tensor(scores, dtype=torch.float64)


# -- the objective -------------------------------------------------------------------------------
def test_rewards_are_cider_d_of_the_sampled_words_and_greedy_baseline(train_images):
    ds, batch = train_images
    model = _model(ds)
    scorer = reward_scorer(ds)
    assert scorer.num_images == len(ds) == 32  # document frequencies of the whole training split
    k = 3
    objective = SCSTObjective(scorer, ds.vocab, samples=k, baseline="greedy", max_len=12)
    model.train()
    torch.manual_seed(5)
    loss, stats = objective(PolicyModule(model), model, batch)
    assert model.training  # the greedy baseline ran in eval mode; the mode is restored
    # the same draw again, decoded to words another way
    torch.manual_seed(5)
    again = sample(model, model.encode(batch.features, batch.boxes, batch.attention_mask), n=k, max_len=12)
    words = [" ".join(ds.vocab.words[i] for i in row) for row in again.to_lists()]
    assert stats.captions == words and len(set(words)) > 20
    assert stats.tokens == int(again.lengths.sum())
    assert stats.sample_length == pytest.approx(float(again.lengths.float().mean()))
    ids = batch.image_ids.tolist()
    # the batch holds every training image, so pycocoevalcap's per-call document frequencies are
    # the training split's: each sample's reward is its Cider score
    for j in range(k):
        expected = _pycoco_scores(ds, ids, words[j::k])
        torch.testing.assert_close(stats.rewards[:, j], expected, rtol=1e-9, atol=1e-12)
    assert float(stats.rewards.std()) > 0
    # ... and not the per-call score of a smaller batch, whose document frequencies would differ
    few = ids[:4]
    _, per_call = cider_d({i: list(ds.references(i)) for i in few}, {i: words[n * k] for n, i in enumerate(few)})
    assert not torch.allclose(stats.rewards[:4, 0], torch.as_tensor(per_call))
    model.eval()
    with torch.no_grad():
        greedy = greedy_decode(model, model.encode(batch.features, batch.boxes, batch.attention_mask), max_len=12)
    greedy_words = [" ".join(ds.vocab.words[i] for i in row) for row in greedy.to_lists()]
    assert stats.greedy_captions == greedy_words
    torch.testing.assert_close(stats.baselines, _pycoco_scores(ds, ids, greedy_words)[:, None].expand(-1, k),
                               rtol=1e-9, atol=1e-12)
    assert stats.reward == pytest.approx(float(stats.rewards.mean()))
    assert stats.baseline == pytest.approx(float(stats.baselines.mean()))
    # loss = -mean((reward - baseline) * summed log-prob of the sample)
    advantage = (stats.rewards - stats.baselines).reshape(-1).float()
    torch.testing.assert_close(loss, -(advantage * again.scores).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_one_sgd_step_raises_positive_advantage_samples_and_lowers_negative():
    # three samples with their own logits (no shared parameter), vocabulary of 5, eos = 2
    logits = torch.nn.Parameter(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)))
    tokens = torch.tensor([[4, 3, 2, 0], [3, 2, 0, 0], [4, 4, 4, 2]])
    lengths = torch.tensor([3, 2, 4])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    advantages = torch.tensor([0.7, -0.4, 0.0])

    def token_log_probs():  # not zeroed after <eos>: the loss must ignore those positions itself
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)

    before = (token_log_probs() * mask).sum(1).detach()
    loss = scst_loss(token_log_probs(), mask, advantages)
    assert float(loss.detach()) == pytest.approx(float(-(advantages * before).mean()), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, 3]) == 0 and torch.count_nonzero(logits.grad[1, 2:]) == 0
    assert torch.count_nonzero(logits.grad[2]) == 0  # zero advantage: no gradient
    torch.optim.SGD([logits], lr=0.5).step()
    after = (token_log_probs() * mask).sum(1).detach()
    assert after[0] > before[0] + 1e-3       # positive advantage: more likely
    assert after[1] < before[1] - 1e-3       # negative advantage: less likely
    assert after[2] == before[2]
    with pytest.raises(ValueError, match="advantages"):
        scst_loss(token_log_probs(), mask, advantages[:2])


def test_mean_baseline_leaves_the_sample_out(train_images):
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 3.0]], dtype=torch.float64)
    expected = torch.tensor([[3.0, 2.5, 1.5], [3.0, 1.5, 1.5]], dtype=torch.float64)  # (others' sum) / 2
    torch.testing.assert_close(mean_baseline(rewards), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_baseline(torch.ones(2, 1))
    ds, batch = train_images
    model = _model(ds)
    objective = SCSTObjective(reward_scorer(ds), ds.vocab, samples=4, baseline="mean", max_len=12)
    torch.manual_seed(1)
    _, stats = objective(PolicyModule(model), model, batch)
    r, b = stats.rewards, stats.baselines
    assert stats.greedy_captions is None
    for i in range(r.shape[0]):
        for j in range(4):
            assert float(b[i, j]) == pytest.approx(sum(float(r[i, m]) for m in range(4) if m != j) / 3, abs=1e-12)


# -- the trainer ---------------------------------------------------------------------------------
def _train_cider(model, train_images, samples=0):
    """Mean CIDEr-D (training document frequencies) over the training images of the greedy
    captions (``samples=0``) or of ``samples`` sampled captions each (fixed seed), in eval mode."""
    ds, batch = train_images
    was = model.training
    model.eval()
    ids = batch.image_ids.tolist()
    with torch.no_grad():
        memory = model.encode(batch.features, batch.boxes, batch.attention_mask)
        if samples:
            torch.manual_seed(123)
            decoded = sample(model, memory, n=samples, max_len=12)
            ids = [i for i in ids for _ in range(samples)]
        else:
            decoded = greedy_decode(model, memory, max_len=12)
    model.train(was)
    words = [ds.vocab.decode(row) for row in decoded.tokens.tolist()]
    return float(reward_scorer(ds).scores(words, ids).mean())


def test_scst_after_cross_entropy_raises_the_rewards(data_dir, tmp_path, train_images):
    out = tmp_path / "run"
    kw = dict(dropout=0.0, lr=6e-3, scst_baseline="mean", scst_samples=5, scst_batch_size=16, scst_lr=1e-3)
    xe = train(_config(data_dir, out, steps=100, **kw))
    before = _train_cider(xe.model, train_images, samples=8), _train_cider(xe.model, train_images)
    # continue the cross-entropy run with SCST (the switch at a resume)
    result = train(_config(data_dir, out, steps=130, scst_from_step=100, **kw), resume=True)
    after = _train_cider(result.model, train_images, samples=8), _train_cider(result.model, train_images)
    entries = [e for e in _metrics(out) if e["kind"] == "train"]
    assert [e["phase"] for e in entries] == ["xe"] * 100 + ["scst"] * 30
    scst = entries[100:]
    assert {"reward", "baseline", "sample_length", "loss", "lr", "grad_norm"} <= set(scst[0])
    assert all(e["lr"] == 1e-3 for e in scst)
    first = sum(e["reward"] for e in scst[:8]) / 8
    last = sum(e["reward"] for e in scst[-8:]) / 8
    print(f"training images: sample CIDEr-D {before[0]:.3f} -> {after[0]:.3f}, greedy {before[1]:.3f} -> "
          f"{after[1]:.3f}; logged batch reward {first:.3f} -> {last:.3f}")
    assert after[0] > before[0] + 0.15      # the mean reward of samples (what SCST maximises)
    assert after[1] > before[1]             # and the greedy captions' CIDEr-D
    assert last > first + 0.1
    latest = load_checkpoint(out / LATEST)
    assert latest.extra["data_phase"] == "scst" and latest.data_position == {"epoch": 14, "batch": 2}


def test_scst_exact_resume_and_checkpoints(data_dir, tmp_path):
    # 2 cross-entropy steps, then 6 SCST steps (batches of 8 of the 32 images: 4 per epoch)
    kw = dict(steps=8, scst_from_step=2, scst_batch_size=8, scst_samples=2, scst_lr=1e-3, dropout=0.2,
              val_every=3, checkpoint_every=4)
    straight = train(_config(data_dir, tmp_path / "a", **kw))
    train(_config(data_dir, tmp_path / "b", **dict(kw, steps=5)))
    latest = load_checkpoint(tmp_path / "b" / LATEST)
    assert latest.step == 5 and latest.extra["data_phase"] == "scst"
    assert latest.data_position == {"epoch": 0, "batch": 3}
    resumed = train(_config(data_dir, tmp_path / "b", **kw), resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "phase", "loss", "reward", "baseline", "sample_length")
    la = [tuple(e.get(k) for k in keys) for e in _metrics(tmp_path / "a") if e["kind"] == "train"]
    lb = [tuple(e.get(k) for k in keys) for e in _metrics(tmp_path / "b") if e["kind"] == "train"]
    assert la == lb and [e[1] for e in la] == ["xe"] * 2 + ["scst"] * 6
    vals = [e for e in _metrics(tmp_path / "a") if e["kind"] == "val"]
    assert [v["step"] for v in vals] == [3, 6, 8] and straight.best_cider == max(v["cider_d"] for v in vals)
    best = load_checkpoint(tmp_path / "a" / "checkpoint-best.pt")
    assert best.step == straight.best_step and best.extra["data_phase"] == "scst"
    assert load_checkpoint(tmp_path / "a" / LATEST).data_position == {"epoch": 1, "batch": 2}
    # a run already in SCST cannot go back to cross-entropy, nor change its SCST batches
    with pytest.raises(ValueError, match="scst_from_step must stay between 0 and 8"):
        train(_config(data_dir, tmp_path / "a", **dict(kw, steps=10, scst_from_step=9)), resume=True)
    with pytest.raises(ValueError, match="SCST images per batch"):
        train(_config(data_dir, tmp_path / "a", **dict(kw, steps=10, scst_batch_size=4)), resume=True)


def test_bad_scst_options(data_dir, tmp_path, capsys, train_images):
    bad = [(dict(scst_baseline="best"), "scst_baseline must be 'greedy' or 'mean'"),
           (dict(scst_baseline="mean", scst_samples=1), "scst_samples must be at least 2 with scst_baseline 'mean'"),
           (dict(scst_samples=0), "scst_samples must be at least 1"),
           (dict(scst_from_step=-2), "scst_from_step must be -1"),
           (dict(scst_lr=0.0), "scst_lr must be > 0"),
           (dict(scst_batch_size=-1), "scst_batch_size must be >= 0"),
           (dict(scst_samples=2.5), "scst_samples must be an int")]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**options)
    assert cli_main(["train", "--data", data_dir, "--out", str(tmp_path / "x"), "--scst-baseline", "max"]) == 2
    assert "scst_baseline must be 'greedy' or 'mean', got 'max'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    ds, _ = train_images
    scorer = reward_scorer(ds)
    with pytest.raises(ValueError, match="mean baseline needs at least 2"):
        SCSTObjective(scorer, ds.vocab, samples=1, baseline="mean")
    with pytest.raises(ValueError, match="baseline must be"):
        SCSTObjective(scorer, ds.vocab, baseline="none")
    with pytest.raises(ValueError, match="samples must be a positive int"):
        SCSTObjective(scorer, ds.vocab, samples=0)


def test_ddp_scst_two_processes_gloo(data_dir, tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "run"
    config = _config(data_dir, out, steps=4, scst_from_step=1, scst_batch_size=4, scst_samples=2, dropout=0.1,
                     val_every=2, checkpoint_every=2).to_dict()
    mp.start_processes(ddp_train_worker, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # each rank sampled its own images: equal weights mean the SCST gradients were all-reduced
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    latest = load_checkpoint(out / LATEST)
    assert latest.step == 4 and latest.extra["data_phase"] == "scst" and latest.extra["world_size"] == 2
    assert latest.data_position == {"epoch": 0, "batch": 3}  # 8 batches of 4 images: 4 per rank
    assert [e["phase"] for e in _metrics(out) if e["kind"] == "train"] == ["xe", "scst", "scst", "scst"]
