"""geocap.captioner.Captioner on a tiny model: the save/load round trip, teacher-forced scores
against the model's forward, captions (greedy and beam) as vocabulary words consistent with
those scores, eval mode, numpy inputs, and errors naming the bad argument."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geocap.captioner import Captioner
from geocap.checkpoint import CheckpointError
from geocap.data.vocab import BOS, EOS, PAD, SPECIALS, Vocabulary
from geocap.model import ObjectRelationTransformer, ORTConfig

from helpers import random_boxes

WORDS = ["a", "man", "dog", "on", "the", "grass", "riding", "horse", "red", "car", "with", "street"]
TINY = dict(feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64, max_len=64)


def make_captioner(seed=0, dropout=0.1) -> Captioner:
    vocab = Vocabulary(list(SPECIALS) + WORDS, min_count=1)
    torch.manual_seed(seed)
    model = ObjectRelationTransformer(ORTConfig(vocab_size=len(vocab), dropout=dropout, **TINY)).eval()
    return Captioner(model, vocab)


def make_inputs(batch=3, n=5, seed=1):
    """features [B, N, 16], boxes [B, N, 4], attention_mask [B, N] (5, 3, 1 real boxes)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, 16, generator=g)
    boxes = random_boxes(batch, n, generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor([n, 3, 1, 2][:batch])[:, None]
    return features, boxes, mask


def make_tokens(batch=3, t=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), len(SPECIALS) + len(WORDS), (batch, t), generator=g)


@pytest.fixture(scope="module")
def captioner():
    return make_captioner()


def test_save_load_round_trip(tmp_path, captioner):
    path = tmp_path / "captioner.pt"
    captioner.save(path)
    loaded = Captioner.load(path, device="cpu")
    assert loaded.config == captioner.config and loaded.vocab.words == captioner.vocab.words
    assert not loaded.model.training and loaded.device == torch.device("cpu")
    features, boxes, mask = make_inputs()
    tokens = make_tokens()
    assert torch.equal(loaded.log_probs(features, boxes, tokens, mask),
                       captioner.log_probs(features, boxes, tokens, mask))
    assert loaded.caption(features, boxes, mask) == captioner.caption(features, boxes, mask)


def test_log_probs_match_forward(captioner):
    features, boxes, mask = make_inputs()
    tokens = make_tokens(t=4)
    out = captioner.log_probs(features, boxes, tokens, mask)
    assert out.shape == (3, 5, len(captioner.vocab)) and not out.requires_grad
    with torch.no_grad():
        bos = torch.full((3, 1), BOS)
        expected = captioner.model(features, boxes, mask, torch.cat([bos, tokens], 1))
    assert torch.equal(out, expected)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0)
    # position 0 conditions on <bos> only: the same for any tokens; position t changes with tokens[:, t - 1]
    other = tokens.clone()
    other[:, 2] = (other[:, 2] - 3) % len(WORDS) + 4
    changed = captioner.log_probs(features, boxes, other, mask)
    torch.testing.assert_close(changed[:, :3], out[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[:, 3:], out[:, 3:])
    # no tokens: one position, the first word's distribution
    empty = captioner.log_probs(features, boxes, torch.zeros(3, 0, dtype=torch.long), mask)
    torch.testing.assert_close(empty[:, 0], out[:, 0], atol=1e-6, rtol=0)


def test_numpy_inputs_and_default_mask(captioner):
    features, boxes, mask = make_inputs()
    tokens = make_tokens()
    ref = captioner.log_probs(features, boxes, tokens, mask)
    got = captioner.log_probs(features.numpy(), boxes.numpy().astype(np.float64), tokens.numpy().astype(np.int32),
                              mask.numpy())
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    full = torch.ones_like(mask)
    torch.testing.assert_close(captioner.log_probs(features, boxes, tokens),
                               captioner.log_probs(features, boxes, tokens, full), atol=0, rtol=0)
    assert captioner.caption(features.numpy(), boxes.numpy(), mask.numpy()) == captioner.caption(features, boxes, mask)


def test_trailing_pad_rows(captioner):
    features, boxes, mask = make_inputs()
    tokens = make_tokens(t=5)
    padded = tokens.clone()
    padded[1, 2:] = PAD
    out = captioner.log_probs(features, boxes, padded, mask)
    alone = captioner.log_probs(features[1:2], boxes[1:2], tokens[1:2, :2], mask[1:2])
    torch.testing.assert_close(out[1:2, :3], alone, atol=1e-5, rtol=0)


def _greedy_check(captioner, features, boxes, mask, captions, max_len):
    """Each greedy word is the argmax (over words and <eos>) of the teacher-forced scores of its
    prefix, and the caption ends where <eos> is the argmax (or at max_len)."""
    for b, text in enumerate(captions):
        ids = captioner.vocab.encode(text.split())
        assert len(ids) <= max_len
        scores = captioner.log_probs(features[b:b + 1], boxes[b:b + 1], torch.tensor([ids], dtype=torch.long),
                                     mask[b:b + 1])[0]
        scores[:, [PAD, BOS]] = float("-inf")
        choice = scores.argmax(-1).tolist()
        assert choice[:len(ids)] == ids
        if len(ids) < max_len:
            assert choice[len(ids)] == EOS


def test_greedy_and_beam_captions(captioner):
    features, boxes, mask = make_inputs()
    allowed = set(WORDS) | {"<unk>"}
    for beam_size in (1, 3):
        captions = captioner.caption(features, boxes, mask, beam_size=beam_size, max_len=6)
        assert isinstance(captions, list) and len(captions) == 3
        for text in captions:
            assert isinstance(text, str)
            assert set(text.split()) <= allowed and len(text.split()) <= 6
    _greedy_check(captioner, features, boxes, mask, captioner.caption(features, boxes, mask, beam_size=1, max_len=6), 6)
    assert captioner.caption(features[:0], boxes[:0], mask[:0]) == []
    # with <eos> made likelier some captions end before max_len, and do so where <eos> is the argmax
    ending = make_captioner()
    with torch.no_grad():
        ending.model.generator.bias[EOS] += 1.0
    captions = ending.caption(features, boxes, mask, beam_size=1, max_len=6)
    assert any(len(text.split()) < 6 for text in captions)
    _greedy_check(ending, features, boxes, mask, captions, 6)


def test_eval_mode_and_restored_training_flag():
    captioner = make_captioner(dropout=0.5)
    captioner.model.train()
    features, boxes, mask = make_inputs()
    tokens = make_tokens()
    first = captioner.log_probs(features, boxes, tokens, mask)
    assert torch.equal(first, captioner.log_probs(features, boxes, tokens, mask))  # no dropout
    assert captioner.model.training
    greedy = captioner.caption(features, boxes, mask, beam_size=1)
    assert greedy == captioner.caption(features, boxes, mask, beam_size=1)
    assert captioner.model.training
    captioner.model.eval()
    assert torch.equal(first, captioner.log_probs(features, boxes, tokens, mask))


def _bad_cases():
    f, b, m = make_inputs()
    t = make_tokens()
    return {
        "features D": (dict(features=torch.randn(3, 5, 8)), "features"),
        "features 2-D": (dict(features=f[0]), "features"),
        "features int": (dict(features=f.long()), "features"),
        "features list": (dict(features=f.tolist()), "features"),
        "features device": (dict(features=torch.empty(3, 5, 16, device="meta")), "features"),
        "features no slots": (dict(features=f[:, :0], boxes=b[:, :0], attention_mask=m[:, :0]), "features"),
        "boxes last dim": (dict(boxes=b[..., :3]), "boxes"),
        "boxes N": (dict(boxes=b[:, :4]), "boxes"),
        "boxes B": (dict(boxes=b[:2]), "boxes"),
        "boxes int": (dict(boxes=(b * 10).long()), "boxes"),
        "mask shape": (dict(attention_mask=m[:, :4]), "attention_mask"),
        "mask dtype": (dict(attention_mask=m.float()), "attention_mask"),
        "mask empty row": (dict(attention_mask=torch.zeros_like(m)), "attention_mask"),
        "tokens float": (dict(tokens=t.float()), "tokens"),
        "tokens B": (dict(tokens=t[:2]), "tokens"),
        "tokens 1-D": (dict(tokens=t[0]), "tokens"),
        "tokens range": (dict(tokens=t + 100), "tokens"),
        "tokens bos": (dict(tokens=torch.cat([torch.full((3, 1), BOS), t], 1)), "tokens"),
        "tokens eos": (dict(tokens=torch.cat([t, torch.full((3, 1), EOS)], 1)), "tokens"),
        "tokens inner pad": (dict(tokens=torch.cat([torch.full((3, 1), PAD), t], 1)), "tokens"),
        "tokens too long": (dict(tokens=torch.full((3, 64), 5)), "tokens"),
    }


@pytest.mark.parametrize("name", sorted(_bad_cases()))
def test_bad_inputs_name_the_argument(captioner, name):
    override, argument = _bad_cases()[name]
    features, boxes, mask = make_inputs()
    args = dict(features=features, boxes=boxes, tokens=make_tokens(), attention_mask=mask)
    args.update(override)
    with pytest.raises(ValueError, match=argument):
        captioner.log_probs(**args)
    if argument != "tokens":
        args.pop("tokens")
        with pytest.raises(ValueError, match=argument):
            captioner.caption(**args)


@pytest.mark.parametrize("kwargs, argument", [(dict(beam_size=0), "beam_size"), (dict(beam_size=2.0), "beam_size"),
                                              (dict(max_len=0), "max_len"), (dict(max_len=65), "max_len")])
def test_bad_decoding_options(captioner, kwargs, argument):
    features, boxes, mask = make_inputs()
    with pytest.raises(ValueError, match=argument):
        captioner.caption(features, boxes, mask, **kwargs)


def test_constructor_and_load_errors(tmp_path, captioner):
    small = Vocabulary(list(SPECIALS) + WORDS[:-1])
    with pytest.raises(ValueError, match="vocab"):
        Captioner(captioner.model, small)
    with pytest.raises(ValueError, match="model"):
        Captioner(object(), captioner.vocab)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        Captioner.load(bad)


def test_shared_start_end_padding_id():
    """A vocabulary and model with ORT's ids (0 = <pad> = <bos> = <eos>): scoring starts from 0,
    0 pads a row only after its last word, captions stop at 0."""
    vocab = Vocabulary(["<eos>"] + WORDS, pad_id=0, bos_id=0, eos_id=0, unk_id=None)
    torch.manual_seed(4)
    config = ORTConfig(vocab_size=len(vocab), pad_id=0, bos_id=0, eos_id=0, dropout=0.0, **TINY)
    model = ObjectRelationTransformer(config).eval()
    cap = Captioner(model, vocab)
    features, boxes, mask = make_inputs()
    tokens = torch.randint(1, len(vocab), (3, 4), generator=torch.Generator().manual_seed(5))
    tokens[1, 2:] = 0
    with torch.no_grad():
        expected = model(features, boxes, mask, torch.cat([torch.zeros(3, 1, dtype=torch.long), tokens], 1))
    assert torch.equal(cap.log_probs(features, boxes, tokens, mask), expected)
    inner = tokens.clone()
    inner[0, 1] = 0
    with pytest.raises(ValueError, match="only after"):
        cap.log_probs(features, boxes, inner, mask)
    with torch.no_grad():
        model.generator.bias[0] += 3.0
    from geocap.decoding import greedy_decode
    with torch.no_grad():
        decoded = greedy_decode(model, model.encode(features, boxes, mask), max_len=6)
    captions = cap.caption(features, boxes, mask, beam_size=1, max_len=6)
    assert captions == [" ".join(WORDS[i - 1] for i in ids) for ids in decoded.to_lists()]
    # some caption has words and then ended at 0 (kept in tokens, not in the words)
    assert any(ids and n == len(ids) + 1 for ids, n in zip(decoded.to_lists(), decoded.lengths.tolist()))
    assert all(set(c.split()) <= set(WORDS) for c in cap.caption(features, boxes, mask, beam_size=3, max_len=6))
    with pytest.raises(ValueError, match="ids"):
        Captioner(model, Vocabulary(list(SPECIALS) + WORDS[:-3]))
