"""geocap.ort_import on a tiny random ORT-keyed state dict and infos.pkl built here: the imported
model's teacher-forced log-probabilities against an independent re-implementation of ORT's
forward (tests/ort_reference.py) by flash-attention's rule, ORT's token ids and words in
captions, every kind of bad file (a pickle that would run code among them) and the CLI."""
from __future__ import annotations

import argparse
import collections
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch

from geocap.captioner import Captioner
from geocap.checkpoint import load_checkpoint
from geocap.cli.import_ort import add_parser as add_import_ort_parser
from geocap.ort_import import END_WORD, OrtImportError, RefusedGlobal, RestrictedUnpickler, import_ort

from helpers import random_boxes
from ort_reference import ort_log_probs

WORDS = ["a", "man", "dog", "on", "the", "grass", "UNK", "horse", "red", "car"]
IX_TO_WORD = {str(i + 1): w for i, w in enumerate(WORDS)}
V = len(WORDS) + 1
D_FEAT, D_MODEL, D_FF, LAYERS, HEADS = 16, 32, 64, 2, 8


def make_opt(use_bn=0, legacy_extra_skip=False, **overrides) -> argparse.Namespace:
    opt = dict(caption_model="relation_transformer", num_layers=LAYERS, input_encoding_size=D_MODEL,
               rnn_size=D_FF, att_feat_size=D_FEAT, drop_prob_lm=0.5, seq_length=16, vocab_size=len(WORDS),
               use_bn=use_bn, legacy_extra_skip=legacy_extra_skip, box_trignometric_embedding=True,
               id="tiny", checkpoint_path="log_tiny")
    opt.update(overrides)
    return argparse.Namespace(**opt)


def make_ort_state(use_bn=0, seed=0, end_bias=0.0) -> dict:
    """A random state dict with ORT's key names and shapes, written from ORT's architecture
    (not from geocap's model), as ``model.state_dict()`` of ORT's RelationTransformerModel saves it."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    def linear(name, fan_in, fan_out):
        state[name + ".weight"] = rand(fan_out, fan_in, scale=1.0 / math.sqrt(fan_in))
        state[name + ".bias"] = rand(fan_out, scale=0.1)

    def norm(name):
        state[name + ".a_2"] = rand(D_MODEL, scale=0.1, shift=1.0)
        state[name + ".b_2"] = rand(D_MODEL, scale=0.1)

    if use_bn:
        state["att_embed.0.weight"] = rand(D_FEAT, scale=0.2, shift=1.0)
        state["att_embed.0.bias"] = rand(D_FEAT, scale=0.2)
        state["att_embed.0.running_mean"] = rand(D_FEAT, scale=0.5)
        state["att_embed.0.running_var"] = torch.rand(D_FEAT, generator=g) * 2 + 0.2
        state["att_embed.0.num_batches_tracked"] = torch.tensor(1234)
    linear(f"att_embed.{1 if use_bn else 0}", D_FEAT, D_MODEL)
    for i in range(LAYERS):
        e = f"model.encoder.layers.{i}"
        for j in range(4):
            linear(f"{e}.self_attn.linears.{j}", D_MODEL, D_MODEL)
        for h in range(HEADS):
            state[f"{e}.self_attn.WGs.{h}.weight"] = rand(1, 64, scale=0.3)
            state[f"{e}.self_attn.WGs.{h}.bias"] = rand(1, scale=0.3, shift=0.3)
        linear(f"{e}.feed_forward.w_1", D_MODEL, D_FF)
        linear(f"{e}.feed_forward.w_2", D_FF, D_MODEL)
        for k in range(2):
            norm(f"{e}.sublayer.{k}.norm")
    norm("model.encoder.norm")
    for i in range(LAYERS):
        d = f"model.decoder.layers.{i}"
        for attn in ("self_attn", "src_attn"):
            for j in range(4):
                linear(f"{d}.{attn}.linears.{j}", D_MODEL, D_MODEL)
        linear(f"{d}.feed_forward.w_1", D_MODEL, D_FF)
        linear(f"{d}.feed_forward.w_2", D_FF, D_MODEL)
        for k in range(3):
            norm(f"{d}.sublayer.{k}.norm")
    norm("model.decoder.norm")
    state["model.tgt_embed.0.lut.weight"] = rand(V, D_MODEL, scale=1.0 / math.sqrt(D_MODEL))
    pe = torch.zeros(1, 5000, D_MODEL)  # ORT's positional table buffer (not a parameter of geocap's)
    state["model.tgt_embed.1.pe"] = pe
    linear("model.generator.proj", D_MODEL, V)
    state["model.generator.proj.bias"][0] += end_bias
    return state


def write_ort_files(folder, state, opt, vocab=None, **extra_infos):
    """model.pth and infos.pkl in ``folder`` as ORT's train.py writes them; returns both paths."""
    model_pth, infos_pkl = os.path.join(folder, "model.pth"), os.path.join(folder, "infos_tiny.pkl")
    torch.save(state, model_pth)
    infos = {"iter": 100, "epoch": 1, "iterators": {"train": 5, "val": 0, "test": 0},
             "split_ix": {"train": [0, 1, 2]}, "best_val_score": 0.75, "opt": opt,
             "vocab": dict(IX_TO_WORD) if vocab is None else vocab, **extra_infos}
    with open(infos_pkl, "wb") as fh:
        pickle.dump(infos, fh)
    return model_pth, infos_pkl


def make_inputs(seed=1):
    """features [3, 5, 16], boxes [3, 5, 4] (valid everywhere, padded slots too), mask with 5, 3, 1
    real boxes; tokens [3, 6] of ORT word ids, rows 1 and 2 ended early (0-padded)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 5, D_FEAT, generator=g) * 2
    boxes = random_boxes(3, 5, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1])[:, None]
    tokens = torch.randint(1, V, (3, 6), generator=g)
    lengths = torch.tensor([6, 4, 2])
    tokens[torch.arange(6)[None, :] >= lengths[:, None]] = 0
    return features, boxes, mask, tokens, lengths


def reference(state, opt, features, boxes, mask, tokens, dtype):
    inputs = torch.cat([torch.zeros(tokens.shape[0], 1, dtype=torch.long), tokens], dim=1)
    return ort_log_probs(state, opt, features, boxes, mask, inputs, dtype=dtype)


def valid_positions(lengths, width):
    """[B, T + 1] True at the positions ORT's log-probs are defined for: 0 .. length (the end)."""
    return torch.arange(width)[None, :] <= lengths[:, None]


# -- (a) the log-probabilities ----------------------------------------------------------------
@pytest.mark.parametrize("use_bn", [0, 1])
@pytest.mark.parametrize("legacy_extra_skip", [False, True])
def test_log_probs_match_ort_reference(tmp_path, use_bn, legacy_extra_skip):
    state = make_ort_state(use_bn=use_bn)
    opt = make_opt(use_bn=use_bn, legacy_extra_skip=legacy_extra_skip)
    captioner = import_ort(*write_ort_files(tmp_path, state, opt))
    assert captioner.config.legacy_extra_skip is legacy_extra_skip and captioner.config.heads == HEADS
    assert captioner.config.embedding == "ort"          # an ORT checkpoint is always ORT's box embedding
    features, boxes, mask, tokens, lengths = make_inputs()
    ours = captioner.log_probs(features, boxes, tokens, mask).double()
    ref64 = reference(state, opt, features, boxes, mask, tokens, torch.float64)
    ref32 = reference(state, opt, features, boxes, mask, tokens, torch.float32).double()
    valid = valid_positions(lengths, tokens.shape[1] + 1)
    assert ours.shape == ref64.shape == (3, 7, V)
    err = (ours - ref64).abs()[valid].max().item()
    err32 = (ref32 - ref64).abs()[valid].max().item()
    bound = max(2 * err32, 1e-5)
    assert err <= bound, f"imported model vs ORT float64: {err:.3g}, ORT fp32 vs float64: {err32:.3g}"
    # the comparison discriminates: the distributions are far from uniform, and ORT with the
    # other legacy_extra_skip setting (or without BatchNorm folding) differs by far more
    assert ref64[valid].std(-1).min() > 0.05
    other = reference(state, make_opt(use_bn=use_bn, legacy_extra_skip=not legacy_extra_skip),
                      features, boxes, mask, tokens, torch.float64)
    assert (other - ref64).abs()[valid].max() > 1000 * bound


def test_padded_boxes_and_features_do_not_matter(tmp_path):
    state = make_ort_state(use_bn=1, seed=3)
    opt = make_opt(use_bn=1)
    captioner = import_ort(*write_ort_files(tmp_path, state, opt))
    features, boxes, mask, tokens, lengths = make_inputs(seed=4)
    changed_f, changed_b = features.clone(), boxes.clone()
    changed_f[~mask] = 123.0
    changed_b[~mask] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    a = captioner.log_probs(features, boxes, tokens, mask)
    b = captioner.log_probs(changed_f, changed_b, tokens, mask)
    valid = valid_positions(lengths, tokens.shape[1] + 1)
    assert torch.allclose(a[valid], b[valid], atol=1e-5)
    ref = reference(state, opt, changed_f, changed_b, mask, tokens, torch.float64)
    assert (b.double() - ref).abs()[valid].max() < 1e-4


# -- (b) ORT's ids and words ------------------------------------------------------------------
def greedy_ort_reference(state, opt, features, boxes, mask, max_len):
    """Greedy decoding with the float64 ORT reference, as ORT's _sample: start at 0, argmax over
    every id, stop at 0. Returns each image's list of word ids (without the final 0)."""
    out = []
    for b in range(features.shape[0]):
        inputs = torch.zeros(1, 1, dtype=torch.long)
        words = []
        for _ in range(max_len):
            lp = ort_log_probs(state, opt, features[b:b + 1], boxes[b:b + 1], mask[b:b + 1], inputs)
            nxt = int(lp[0, -1].argmax())
            if nxt == 0:
                break
            words.append(nxt)
            inputs = torch.cat([inputs, torch.tensor([[nxt]])], dim=1)
        out.append(words)
    return out


def test_ids_words_and_captions_are_orts(tmp_path):
    state = make_ort_state(seed=8, end_bias=1.0)
    opt = make_opt()
    model_pth, infos_pkl = write_ort_files(tmp_path, state, opt)
    out = tmp_path / "imported.pt"
    captioner = import_ort(model_pth, infos_pkl, out)
    vocab = captioner.vocab
    assert vocab.words == [END_WORD] + WORDS and len(vocab) == V
    assert all(vocab.words[int(i)] == w for i, w in IX_TO_WORD.items())
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 0, 0, WORDS.index("UNK") + 1)
    c = captioner.config
    assert (c.pad_id, c.bos_id, c.eos_id, c.vocab_size) == (0, 0, 0, V)
    assert vocab.encode(["a", "zebra", "car"]) == [1, 7, 10] and vocab.decode([2, 3, 0, 5]) == "man dog"

    features, boxes, mask, _, _ = make_inputs(seed=6)
    max_len = 8
    expected = greedy_ort_reference(state, opt, features, boxes, mask, max_len)
    assert any(0 < len(w) < max_len for w in expected)  # some caption ends at id 0 before max_len
    words = [" ".join(IX_TO_WORD[str(i)] for i in ids) for ids in expected]
    assert captioner.caption(features, boxes, mask, beam_size=1, max_len=max_len) == words
    beams = captioner.caption(features, boxes, mask, beam_size=3, max_len=max_len)
    assert all(set(s.split()) <= set(WORDS) for s in beams)

    loaded = Captioner.load(out, device="cpu")
    assert loaded.vocab == vocab and loaded.config == c
    assert loaded.caption(features, boxes, mask, beam_size=1, max_len=max_len) == words
    ckpt = load_checkpoint(out)
    info = ckpt.extra["imported_from"]
    assert info["format"] == "ort" and info["model"] == "model.pth" and info["opt"]["num_layers"] == LAYERS
    assert info["ignored_globals"] == []


def test_log_probs_tokens_use_orts_zero(tmp_path):
    captioner = import_ort(*write_ort_files(tmp_path, make_ort_state(), make_opt()))
    features, boxes, mask, tokens, _ = make_inputs()
    inner = tokens.clone()
    inner[0, 1] = 0  # 0 (end/padding) before a word
    with pytest.raises(ValueError, match="tokens"):
        captioner.log_probs(features, boxes, inner, mask)


# -- (c) bad files ----------------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this would create ``path`` (builtins.open(path, "w"))."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_without_running(tmp_path):
    state, opt = make_ort_state(), make_opt()
    target = tmp_path / "pwned.txt"
    model_pth, infos_pkl = write_ort_files(tmp_path, state, opt)
    out = tmp_path / "out.pt"
    # inside opt
    with open(infos_pkl, "wb") as fh:
        pickle.dump({"opt": argparse.Namespace(**vars(opt), evil=_CreatesFile(str(target))),
                     "vocab": IX_TO_WORD}, fh)
    with pytest.raises(OrtImportError, match=r"infos_tiny\.pkl.*infos\['opt'\].*open.*never loads") as info:
        import_ort(model_pth, infos_pkl, out)
    assert "io.open" in str(info.value) or "builtins.open" in str(info.value)
    # the whole file
    with open(infos_pkl, "wb") as fh:
        pickle.dump(_CreatesFile(str(target)), fh)
    with pytest.raises(OrtImportError, match=r"infos_tiny\.pkl.*open.*never loads"):
        import_ort(model_pth, infos_pkl, out)
    # the vocabulary
    with open(infos_pkl, "wb") as fh:
        pickle.dump({"opt": opt, "vocab": {**IX_TO_WORD, "11": _CreatesFile(str(target))}}, fh)
    with pytest.raises(OrtImportError, match=r"infos\['vocab'\].*open"):
        import_ort(model_pth, infos_pkl, out)
    assert not target.exists() and not out.exists()


def test_foreign_objects_elsewhere_in_infos_are_ignored(tmp_path):
    """Real ORT infos hold numpy scalars (best_val_score is pycocoevalcap's CIDEr): never
    constructed, listed, and the import goes on."""
    model_pth, infos_pkl = write_ort_files(tmp_path, make_ort_state(), make_opt(),
                                           best_val_score=np.float64(1.1))
    out = tmp_path / "out.pt"
    import_ort(model_pth, infos_pkl, out)
    ignored = load_checkpoint(out).extra["imported_from"]["ignored_globals"]
    assert ignored and all(name.startswith("numpy") for name in ignored)


def test_python2_style_pickle_of_the_namespace(tmp_path):
    """Protocol 0 (Python 2's cPickle default) pickles a Namespace through copyreg._reconstructor."""
    model_pth, infos_pkl = write_ort_files(tmp_path, make_ort_state(), make_opt())
    with open(infos_pkl, "wb") as fh:
        pickle.dump({"opt": make_opt(), "vocab": IX_TO_WORD}, fh, protocol=0)
    assert import_ort(model_pth, infos_pkl).config.layers == LAYERS


def _state_without(key):
    state = make_ort_state()
    del state[key]
    return state


def _state_with(key, value):
    state = make_ort_state()
    state[key] = value
    return state


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "wgs shape", "nan", "layers"])
def test_bad_state_dict_names_the_key(tmp_path, case):
    key = {"missing": "model.decoder.layers.1.feed_forward.w_2.bias",
           "unexpected": "model.encoder.layers.2.sublayer.0.norm.a_2",
           "shape": "model.generator.proj.weight",
           "wgs shape": "model.encoder.layers.0.self_attn.WGs.3.weight",
           "nan": "model.encoder.layers.1.self_attn.linears.2.weight",
           "layers": "model.encoder.layers.1.self_attn.linears.0.weight"}[case]
    opt = make_opt()
    if case == "missing":
        state = _state_without(key)
    elif case == "unexpected":
        state = _state_with(key, torch.ones(D_MODEL))
    elif case == "shape":
        state = _state_with(key, torch.zeros(V + 1, D_MODEL))
    elif case == "wgs shape":
        state = _state_with(key, torch.zeros(1, 32))
    elif case == "nan":
        state = make_ort_state()
        state[key][0, 0] = float("nan")
    else:  # the opt says one layer, the file has two
        state, opt = make_ort_state(), make_opt(num_layers=1)
    model_pth, infos_pkl = write_ort_files(tmp_path, state, opt)
    out = tmp_path / "out.pt"
    with pytest.raises(OrtImportError, match=r"model\.pth.*" + key.replace(".", r"\.")):
        import_ort(model_pth, infos_pkl, out)
    assert not out.exists()


def test_use_bn_mismatch_and_use_bn_2(tmp_path):
    model_pth, infos_pkl = write_ort_files(tmp_path, make_ort_state(use_bn=1), make_opt(use_bn=0))
    with pytest.raises(OrtImportError, match=r"unexpected key att_embed\.0\.running_mean"):
        import_ort(model_pth, infos_pkl)
    model_pth, infos_pkl = write_ort_files(tmp_path, make_ort_state(use_bn=1), make_opt(use_bn=2))
    with pytest.raises(OrtImportError, match=r"infos_tiny\.pkl.*use_bn = 2"):
        import_ort(model_pth, infos_pkl)


def test_truncated_or_foreign_model_file(tmp_path):
    model_pth, infos_pkl = write_ort_files(tmp_path, make_ort_state(), make_opt())
    data = open(model_pth, "rb").read()
    with open(model_pth, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(OrtImportError, match=r"model\.pth: not a loadable ORT model file"):
        import_ort(model_pth, infos_pkl)
    torch.save({"weights": [1, 2, 3]}, model_pth)
    with pytest.raises(OrtImportError, match=r"model\.pth.*'weights' is not a tensor"):
        import_ort(model_pth, infos_pkl)
    with pytest.raises(OrtImportError, match="no such ORT model file"):
        import_ort(tmp_path / "absent.pth", infos_pkl)


@pytest.mark.parametrize("case", ["no opt", "no vocab", "corrupt", "truncated", "not a dict", "bad vocab",
                                  "missing option", "vocab size"])
def test_bad_infos_file(tmp_path, case):
    model_pth, infos_pkl = write_ort_files(tmp_path, make_ort_state(), make_opt())
    good = open(infos_pkl, "rb").read()
    opt_without_layers = argparse.Namespace(**{k: v for k, v in vars(make_opt()).items() if k != "num_layers"})
    payload, match = {
        "no opt": (pickle.dumps({"vocab": IX_TO_WORD}), "no 'opt'"),
        "no vocab": (pickle.dumps({"opt": make_opt()}), "no 'vocab'"),
        "corrupt": (os.urandom(64), "not a readable ORT infos pickle"),
        "truncated": (good[: len(good) // 2], "not a readable ORT infos pickle"),
        "not a dict": (pickle.dumps([1, 2]), "is a dict, got list"),
        "bad vocab": (pickle.dumps({"opt": make_opt(), "vocab": {"1": "a", "3": "b"}}), "ix_to_word keys"),
        "missing option": (pickle.dumps({"opt": opt_without_layers, "vocab": IX_TO_WORD}), "num_layers"),
        "vocab size": (pickle.dumps({"opt": make_opt(vocab_size=9), "vocab": IX_TO_WORD}), "vocab_size = 9"),
    }[case]
    with open(infos_pkl, "wb") as fh:
        fh.write(payload)
    with pytest.raises(OrtImportError, match=r"infos_tiny\.pkl.*" + match):
        import_ort(model_pth, infos_pkl)


# -- (d) the command line ---------------------------------------------------------------------
def test_cli(tmp_path, capsys):
    state, opt = make_ort_state(use_bn=1, seed=7), make_opt(use_bn=1)
    model_pth, infos_pkl = write_ort_files(tmp_path, state, opt)
    parser = argparse.ArgumentParser(prog="geocap")
    add_import_ort_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "ckpt" / "ort.pt"
    out.parent.mkdir()
    args = parser.parse_args(["import-ort", model_pth, infos_pkl, "--out", str(out)])
    assert args.func(args) == 0
    assert not Captioner.load(out, device="cpu").config.legacy_extra_skip
    args = parser.parse_args(["import-ort", model_pth, infos_pkl, "--out", str(out), "--legacy-extra-skip", "1"])
    assert args.func(args) == 0 and Captioner.load(out, device="cpu").config.legacy_extra_skip
    args = parser.parse_args(["import-ort", model_pth, infos_pkl, "--out", str(out), "--legacy-extra-skip", "0"])
    assert args.func(args) == 0
    assert "ort.pt" in capsys.readouterr().out
    captioner = Captioner.load(out, device="cpu")
    features, boxes, mask, tokens, lengths = make_inputs(seed=8)
    ours = captioner.log_probs(features, boxes, tokens, mask).double()
    ref = reference(state, opt, features, boxes, mask, tokens, torch.float64)
    assert (ours - ref).abs()[valid_positions(lengths, 7)].max() < 1e-4
    assert sorted(os.listdir(out.parent)) == ["ort.pt"]  # no temporary files left
    with pytest.raises(SystemExit):
        parser.parse_args(["import-ort", model_pth])  # INFOS_PKL and --out are required


def test_restricted_unpickler_admits_only_plain_data():
    """A global named but never called, and containers built by admitted callables, stay data."""
    data = pickle.dumps({"fn": os.path.join, "od": collections.OrderedDict(a=1), "s": {1, 2}})
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    loaded = unpickler.load()
    assert issubclass(loaded["fn"], RefusedGlobal) and loaded["fn"].global_name.endswith(".join")
    assert loaded["od"] == {"a": 1} and loaded["s"] == {1, 2}
    assert unpickler.refused == [loaded["fn"].global_name]


def test_legacy_extra_skip_absent_means_off_unless_overridden(tmp_path):
    opt = argparse.Namespace(**{k: v for k, v in vars(make_opt()).items() if k != "legacy_extra_skip"})
    paths = write_ort_files(tmp_path, make_ort_state(), opt)
    assert not import_ort(*paths).config.legacy_extra_skip
    assert import_ort(*paths, legacy_extra_skip=True).config.legacy_extra_skip
