"""geocap.checkpoint: the round trip of weights, config, vocabulary, optimizer/scheduler/step/extra,
random generator states, atomic writes, and every way a file can be wrong -- including a pickle
that would run code, which must be refused without running it."""
from __future__ import annotations

import hashlib
import os
import pickle
import random

import numpy as np
import pytest
import torch

import geocap
from geocap.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Checkpoint, CheckpointError, file_sha256,
                               load_checkpoint, restore_rng, save_checkpoint)
from geocap.data.vocab import SPECIALS, Vocabulary
from geocap.model import ObjectRelationTransformer, ORTConfig

WORDS = ["a", "man", "dog", "on", "the", "grass", "riding", "horse", "red", "car"]
TINY = dict(feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64, max_len=64)


def make_vocab() -> Vocabulary:
    return Vocabulary(list(SPECIALS) + WORDS, min_count=1)


def make_model(seed=0) -> ObjectRelationTransformer:
    torch.manual_seed(seed)
    return ObjectRelationTransformer(ORTConfig(vocab_size=len(make_vocab()), **TINY))


def train_one_step(model):
    """An Adam optimizer and StepLR scheduler that have taken one step (so both have state)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    features, boxes = torch.randn(2, 3, 16), torch.tensor([[0.1, 0.1, 0.5, 0.5]]).expand(2, 3, 4).contiguous()
    tokens = torch.tensor([[1, 4, 5], [1, 6, 7]])
    loss = -model(features, boxes, None, tokens)[:, :, 5].mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


@pytest.fixture
def saved(tmp_path):
    """(path, model) of a valid checkpoint with everything in it."""
    model = make_model()
    optimizer, scheduler = train_one_step(model)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model=model, config=model.config, vocab=make_vocab(), optimizer=optimizer,
                    scheduler=scheduler, step=7, extra={"data_position": {"epoch": 1, "index": 42},
                                                        "metrics": {"CIDEr": 0.5}})
    return path, model


def test_round_trip(saved):
    path, model = saved
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.path == str(path)
    assert ckpt.config == model.config
    assert ckpt.vocab.words == make_vocab().words and ckpt.vocab.min_count == 1
    assert ckpt.step == 7 and ckpt.format_version == CHECKPOINT_VERSION and ckpt.geocap_version == geocap.__version__
    assert ckpt.data_position == {"epoch": 1, "index": 42} and ckpt.metrics == {"CIDEr": 0.5}
    reference = model.state_dict()
    assert set(ckpt.model_state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ckpt.model_state[name], tensor), name
    rebuilt = ckpt.build_model().eval()
    model.eval()
    features, boxes = torch.randn(2, 3, 16), torch.tensor([[0.1, 0.2, 0.6, 0.7]]).expand(2, 3, 4).contiguous()
    tokens = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 9]])
    assert torch.equal(rebuilt(features, boxes, None, tokens), model(features, boxes, None, tokens))
    # optimizer and scheduler states load back into fresh ones and match
    optimizer = torch.optim.Adam(rebuilt.parameters(), lr=1e-3)
    optimizer.load_state_dict(ckpt.optimizer_state)
    assert optimizer.state_dict()["state"][0]["step"] == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scheduler.load_state_dict(ckpt.scheduler_state)
    assert scheduler.last_epoch == 1


def test_optional_parts_absent(tmp_path):
    model = make_model()
    path = tmp_path / "bare.pt"
    save_checkpoint(path, model=model, config=model.config.to_dict(), vocab=make_vocab(), rng=False)
    ckpt = load_checkpoint(path)
    assert ckpt.optimizer_state is None and ckpt.scheduler_state is None and ckpt.rng is None
    assert ckpt.step == 0 and ckpt.extra == {} and ckpt.metrics is None
    with pytest.raises(CheckpointError, match="no random generator states"):
        restore_rng(ckpt)


def test_rng_states_restore(tmp_path):
    model = make_model()
    path = tmp_path / "rng.pt"
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    save_checkpoint(path, model=model, config=model.config, vocab=make_vocab())
    first = (torch.rand(5), np.random.standard_normal(5), np.random.rand(5), [random.random() for _ in range(5)])
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.rng["torch"], torch.Tensor)
    assert all(isinstance(x, int) for x in ckpt.rng["python"]["state"])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng(ckpt)
    again = (torch.rand(5), np.random.standard_normal(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[2], again[2])
    assert first[3] == again[3]


def test_write_is_atomic(tmp_path, monkeypatch):
    model = make_model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model=model, config=model.config, vocab=make_vocab(), step=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, config=model.config, vocab=make_vocab(), step=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1


@pytest.mark.parametrize("case", ["config", "vocab", "extra", "step"])
def test_save_refuses_inconsistent_arguments(tmp_path, case):
    model = make_model()
    kwargs = dict(model=model, config=model.config, vocab=make_vocab())
    if case == "config":
        kwargs["config"] = ORTConfig(vocab_size=len(make_vocab()), **{**TINY, "d_ff": 128})
        match = "do not fit|shape"
    elif case == "vocab":
        kwargs["vocab"] = Vocabulary(list(SPECIALS) + WORDS[:-1])
        match = "vocab_size"
    elif case == "extra":
        kwargs["extra"] = {"metrics": object()}
        match = "JSON"
    else:
        kwargs["step"] = -1
        match = "step"
    path = tmp_path / "model.pt"
    with pytest.raises(ValueError, match=match):
        save_checkpoint(path, **kwargs)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_file_sha256(saved):
    path, _ = saved
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(str(path)) == file_sha256(path)


# -- files that are not (valid) checkpoints ------------------------------------------------------
def _resave(path, target, mutate):
    data = torch.load(path, weights_only=True)
    mutate(data)
    torch.save(data, target)


def _mutations():
    def drop(key):
        return lambda d: d.pop(key)

    def set_(key, value):
        return lambda d: d.__setitem__(key, value)

    def drop_weight(d):
        d["model"].pop("generator.weight")

    def extra_weight(d):
        d["model"]["something.else"] = torch.zeros(3)

    def bigger_config(d):
        d["config"]["d_ff"] = 128

    def short_vocab(d):
        d["vocab"]["words"] = d["vocab"]["words"][:-1]

    return {
        "other format": (set_("format", "someone-else"), "not a geocap checkpoint"),
        "wrong version": (set_("format_version", CHECKPOINT_VERSION + 1), "format version"),
        "missing vocab": (drop("vocab"), "missing vocab"),
        "missing model": (drop("model"), "missing model"),
        "missing weight": (drop_weight, "missing generator.weight"),
        "unexpected weight": (extra_weight, "unexpected something.else"),
        "weights vs config": (bigger_config, "shape"),
        "vocab vs config": (short_vocab, "vocab_size"),
        "bad config field": (lambda d: d["config"].__setitem__("colour", "red"), "invalid config"),
        "bad vocab": (lambda d: d["vocab"].__setitem__("words", ["x", "y"]), "invalid vocabulary"),
        "bad step": (set_("step", "seven"), "step"),
        "vocab ids vs config": (lambda d: d["vocab"].update(pad_id=3, unk_id=0), "pad/bos/eos ids"),
        "bad vocab id": (lambda d: d["vocab"].__setitem__("eos_id", 99), "eos_id"),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_foreign_or_inconsistent_checkpoint(saved, tmp_path, name):
    path, _ = saved
    mutate, match = _mutations()[name]
    target = tmp_path / "bad.pt"
    _resave(path, target, mutate)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(target)
    assert isinstance(info.value, ValueError)
    assert str(target) in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "empty", "random bytes", "truncated", "text", "list", "plain dict",
                                  "bare tensor"])
def test_unreadable_or_foreign_file(saved, tmp_path, kind):
    path, _ = saved
    target = tmp_path / "bad.pt"
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "random bytes":
        target.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        target.write_text('{"format": "geocap-checkpoint"}')
    elif kind == "list":
        torch.save([1, 2, 3], target)
    elif kind == "plain dict":
        torch.save({"state_dict": make_model().state_dict()}, target)
    elif kind == "bare tensor":
        torch.save(torch.zeros(3), target)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(target)
    assert str(target) in str(info.value)
    message = str(info.value)
    if kind == "missing":
        assert "missing" in message
    elif kind in ("list", "plain dict", "bare tensor"):
        assert "not a geocap checkpoint" in message
    else:
        assert "not a loadable geocap checkpoint" in message


class _Exploit:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("container", ["raw pickle", "torch zip", "inside a checkpoint"])
def test_pickle_with_code_is_refused_without_running(saved, tmp_path, container):
    path, _ = saved
    sentinel = tmp_path / "pwned"
    exploit = _Exploit(f"touch '{sentinel}'")
    target = tmp_path / "evil.pt"
    if container == "raw pickle":
        target.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "payload": exploit}, protocol=2))
    elif container == "torch zip":
        torch.save(exploit, target)
    else:
        _resave(path, target, lambda d: d["extra"].__setitem__("metrics", exploit))
    with pytest.raises(CheckpointError, match="never unpickled") as info:
        load_checkpoint(target)
    assert str(target) in str(info.value)
    assert "False" not in str(info.value)  # torch's advice to retry unsafely is not passed on
    assert not sentinel.exists()
    # control: the payload is live, an unrestricted unpickler would have run it
    if container == "raw pickle":
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(_Exploit(f"touch '{control}'")))
        assert control.exists()


def test_special_ids_round_trip_and_old_files(tmp_path):
    """A vocabulary with other special ids (ORT's: one id 0 for <pad>, <bos>, <eos>; no <unk>) is
    saved with its ids and the config that shares them; a file without ids (written before the
    ids were stored) loads with the defaults 0-3; a config with other ids than the vocabulary is refused."""
    vocab = Vocabulary(["<eos>"] + WORDS, pad_id=0, bos_id=0, eos_id=0, unk_id=None)
    config = ORTConfig(vocab_size=len(vocab), pad_id=0, bos_id=0, eos_id=0, **TINY)
    model = ObjectRelationTransformer(config)
    path = tmp_path / "ort_ids.pt"
    save_checkpoint(path, model=model, config=config, vocab=vocab, rng=False)
    ckpt = load_checkpoint(path)
    assert ckpt.vocab == vocab and ckpt.vocab.unk_id is None and ckpt.config.eos_id == 0
    with pytest.raises(ValueError, match="pad/bos/eos ids"):
        save_checkpoint(tmp_path / "bad.pt", model=make_model(), config=make_model().config,
                        vocab=Vocabulary(list(SPECIALS) + WORDS, pad_id=0, bos_id=2, eos_id=1), rng=False)
    assert not (tmp_path / "bad.pt").exists()
    default = tmp_path / "default.pt"
    save_checkpoint(default, model=make_model(), config=make_model().config, vocab=make_vocab(), rng=False)
    old = tmp_path / "old.pt"
    _resave(default, old, lambda d: d.__setitem__("vocab", {"words": d["vocab"]["words"], "min_count": 1}))
    assert load_checkpoint(old).vocab == make_vocab()


def test_box_embedding_round_trips_and_old_files_read_as_ort(tmp_path):
    """config.embedding is saved and restored (the rebuilt model computes with it); a checkpoint
    written before the field existed loads as ORT's embedding."""
    torch.manual_seed(0)
    signed = ObjectRelationTransformer(ORTConfig(vocab_size=len(make_vocab()), embedding="signed", **TINY)).eval()
    path = tmp_path / "signed.pt"
    save_checkpoint(path, model=signed, config=signed.config, vocab=make_vocab(), rng=False)
    rebuilt = load_checkpoint(path).build_model().eval()
    assert rebuilt.config.embedding == "signed" and rebuilt.encoder.layers[0].self_attn.embedding == "signed"
    features = torch.randn(1, 2, 16)
    boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.5], [0.6, 0.2, 0.9, 0.4]]])
    tokens = torch.tensor([[1, 4, 5]])
    assert torch.equal(rebuilt(features, boxes, None, tokens), signed(features, boxes, None, tokens))
    old = tmp_path / "old.pt"
    _resave(path, old, lambda d: d["config"].pop("embedding"))
    assert load_checkpoint(old).config.embedding == "ort"


def test_loading_a_checkpoint_does_not_import_torch_dynamo(saved):
    """Checking the weights against the config builds the model on the CPU with its
    initialisation skipped, not on the meta device (whose initialisers import torch._dynamo:
    seconds of start-up for every command that loads a checkpoint)."""
    import subprocess
    import sys

    path, _ = saved
    code = ("import sys\nfrom geocap.checkpoint import load_checkpoint\n"
            f"ckpt = load_checkpoint({str(path)!r})\nckpt.build_model()\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_skipped_initialisation_gives_the_real_model_names_shapes_and_dtypes():
    from geocap.checkpoint import _expected_state

    for config in (ORTConfig(vocab_size=len(make_vocab()), **TINY),
                   ORTConfig(vocab_size=len(make_vocab()), **{**TINY, "geometry": False})):
        real = ObjectRelationTransformer(config).state_dict()
        assert _expected_state(config) == {k: (tuple(v.shape), v.dtype) for k, v in real.items()}
