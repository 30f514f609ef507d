"""The ORT-style baselines of bench/ort_style.py (used by bench/test_bench_captioner.py) compute
what geocap computes: teacher forcing, one decoding step over a re-decoded prefix, per-image beam
search and a training step, on a tiny model; attention dropout is live in training; bad input
raises ValueError."""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys

import pytest
import torch

from geocap.decoding import beam_search
from geocap.model import Memory, ObjectRelationTransformer, ORTConfig
from geocap.train import token_loss

from helpers import random_boxes

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "ort_style.py"
_SPEC = importlib.util.spec_from_file_location("geocap_bench_ort_style", _PATH)
ort_style = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = ort_style  # the importlib recipe: dataclasses look their module up there
_SPEC.loader.exec_module(ort_style)

TINY = dict(vocab_size=23, feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64, max_len=32)
PAD, BOS, EOS = 0, 1, 2


def make_model(seed=0, **overrides) -> ObjectRelationTransformer:
    torch.manual_seed(seed)
    return ObjectRelationTransformer(ORTConfig(**{**TINY, **overrides}), backend="torch").eval()


def make_images(batch=4, n=7, seed=1):
    """features [B, N, 16], boxes [B, N, 4], attention_mask [B, N] with 7, 5, 1, 3 real boxes; padded
    slots hold garbage (both sides must ignore it)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, TINY["feature_dim"], generator=g) * 2
    boxes = random_boxes(batch, n, generator=g)
    attention_mask = torch.arange(n)[None, :] < torch.tensor([7, 5, 1, 3][:batch])[:, None]
    return features, boxes, attention_mask


def make_tokens(rows=4, t=9, seed=2):
    """[R, t] teacher-forcing inputs: <bos>, words, and row 1 ended early (<eos> then <pad>)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, TINY["vocab_size"], (rows, t), generator=g)
    tokens[:, 0] = BOS
    tokens[1, 5], tokens[1, 6:] = EOS, PAD
    return tokens


@pytest.mark.parametrize("overrides", [{}, {"legacy_extra_skip": True}, {"geometry": False}],
                         ids=["ort", "legacy_extra_skip", "no_geometry"])
def test_teacher_forcing_matches_model(overrides):
    model = make_model(**overrides)
    ort = ort_style.OrtStyleCaptioner(model)
    images, tokens = make_images(), make_tokens()
    with torch.no_grad():
        ours, theirs = model(*images, tokens), ort(*images, tokens)
    assert theirs.shape == ours.shape == (4, 9, TINY["vocab_size"])
    real = tokens != PAD  # ORT also masks <pad> keys: the outputs at <pad> inputs may differ (never trained on)
    torch.testing.assert_close(theirs[real], ours[real], rtol=1e-4, atol=1e-5)


def test_encode_keeps_states_only_and_ignores_padded_slots():
    # float64: geocap takes centre offsets from edge differences and ORT from rounded centres, so in
    # float32 their geometry logits differ by the rounding ORT's formula loses (up to ~2e-4 in the states)
    model = make_model().double()
    ort = ort_style.OrtStyleCaptioner(model)
    features, boxes, attention_mask = make_images()
    features, boxes = features.double(), boxes.double()
    with torch.no_grad():
        memory = ort.encode(features, boxes, attention_mask)
        garbage = features.masked_fill(~attention_mask[..., None], float("nan"))
        again = ort.encode(garbage, boxes.masked_fill(~attention_mask[..., None], 7.0), attention_mask)
        ours = model.encode(features, boxes, attention_mask)
    assert memory.keys == () and memory.values == ()
    torch.testing.assert_close(memory.states[attention_mask], ours.states[attention_mask], rtol=1e-9, atol=1e-10)
    assert torch.equal(again.states[attention_mask], memory.states[attention_mask])


def test_decode_step_redecodes_the_prefix():
    """A greedy loop through decode_step: the state is the whole prefix, and every step's
    log-probabilities are the model's cached decode_step's."""
    model = make_model()
    ort = ort_style.OrtStyleCaptioner(model)
    images = make_images()
    token = torch.full((4,), BOS)
    state, cache = None, None
    with torch.no_grad():
        memory, ort_memory = model.encode(*images), ort.encode(*images)
        for step in range(6):
            theirs, state = ort.decode_step(ort_memory, token, state)
            ours, cache = model.decode_step(memory, token, cache)
            assert state.length == step + 1 and torch.equal(state.tokens[:, -1], token)
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
            token = ours.argmax(-1)
    assert state.tokens[:, 0].eq(BOS).all()
    reordered = state.index_select(torch.tensor([3, 0]))
    assert torch.equal(reordered.tokens, state.tokens[[3, 0]])


@pytest.mark.parametrize("beam_size, length_penalty", [(1, 0.0), (3, 0.0), (3, 0.7)])
def test_beam_search_matches_geocap(beam_size, length_penalty):
    model = make_model()
    images = make_images()
    with torch.no_grad():
        ours = beam_search(model, model.encode(*images), beam_size=beam_size, max_len=12,
                           length_penalty=length_penalty)
    theirs = ort_style.ort_beam_search(ort_style.OrtStyleCaptioner(model), *images, beam_size=beam_size,
                                       max_len=12, length_penalty=length_penalty)
    assert torch.equal(theirs.tokens, ours.tokens) and torch.equal(theirs.lengths, ours.lengths)
    torch.testing.assert_close(theirs.scores, ours.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs.token_log_probs, ours.token_log_probs, rtol=1e-4, atol=1e-4)
    assert theirs.eos_id == EOS


def test_concat_decoded_pads_to_the_widest():
    model = make_model()
    ort = ort_style.OrtStyleCaptioner(model)
    images = make_images()
    with torch.no_grad():
        memory = model.encode(*images)
        parts = [beam_search(model, memory.index_select(torch.tensor([i])), beam_size=2, max_len=10)
                 for i in range(4)]
    whole = ort_style.concat_decoded(parts, PAD)
    assert whole.tokens.shape == (4, max(p.tokens.shape[1] for p in parts))
    for i, part in enumerate(parts):
        width = part.tokens.shape[1]
        assert torch.equal(whole.tokens[i, :width], part.tokens[0])
        assert (whole.tokens[i, width:] == PAD).all() and (whole.token_log_probs[i, width:] == 0).all()
    with pytest.raises(ValueError, match="at least one part"):
        ort_style.concat_decoded([], PAD)
    assert ort.config is model.config


def test_per_caption_batch_copies_features_per_caption():
    features, boxes, attention_mask = make_images()
    captions = make_tokens(rows=12).reshape(4, 3, 9)
    f, b, m, c = ort_style.per_caption_batch(features, boxes, attention_mask, captions)
    assert f.shape == (12, 7, 16) and b.shape == (12, 7, 4) and m.shape == (12, 7) and c.shape == (12, 9)
    assert torch.equal(f[3], features[1]) and torch.equal(f[5], features[1]) and torch.equal(m[11], attention_mask[3])
    assert torch.equal(c[4], captions[1, 1])
    with pytest.raises(ValueError, match="captions must have shape"):
        ort_style.per_caption_batch(features, boxes, attention_mask, captions[:3])


def test_training_step_gives_the_same_update():
    """Eval mode (no dropout): one SGD step through the ORT-style forward and through the model
    moves every parameter the same way; the loss is token_loss of the model's forward."""
    base = make_model()
    images = make_images()
    captions = make_tokens(rows=8, seed=5)
    captions[:, -1] = torch.where(captions[:, -2] == PAD, PAD, EOS)
    captions = captions.reshape(4, 2, 9)
    f, b, m, flat = ort_style.per_caption_batch(*images, captions)
    updated, losses = {}, {}
    for name in ("ort_style", "geocap"):
        model = copy.deepcopy(base)
        forward = (ort_style.OrtStyleCaptioner(model).__call__ if name == "ort_style" else model)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.5)
        losses[name] = ort_style.training_step(lambda inputs, fw=forward: fw(f, b, m, inputs), flat, opt, params,
                                               grad_clip=0.0)
        updated[name] = model
    with torch.no_grad():
        expected = token_loss(base(f, b, m, flat[:, :-1]), flat[:, 1:])
    torch.testing.assert_close(losses["ort_style"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["geocap"], expected, rtol=1e-5, atol=1e-6)
    still = []
    for (name, p0), p1, p2 in zip(base.named_parameters(), updated["ort_style"].parameters(),
                                  updated["geocap"].parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=lambda msg, name=name: f"{name}: {msg}")
        if torch.equal(p1, p0):
            still.append(name)
    # a step moves every parameter except keys' biases, which may get an exactly zero gradient
    # (softmax ignores a shift shared by all keys)
    assert all(name.endswith("k_proj.bias") for name in still), still


def test_training_step_rejects_a_non_finite_loss():
    model = make_model()
    params = list(model.parameters())
    captions = make_tokens()

    def forward(inputs):
        return torch.full((inputs.shape[0], inputs.shape[1], TINY["vocab_size"]), float("nan"), requires_grad=True)

    with pytest.raises(FloatingPointError, match="loss is nan"):
        ort_style.training_step(forward, captions, torch.optim.SGD(params, lr=0.1), params)


def test_attention_dropout_is_live_in_training():
    """Train mode: ORT's nn.Dropout on the attention weights changes the output and follows the
    global seed; eval mode is deterministic."""
    model = make_model(dropout=0.3)
    ort = ort_style.OrtStyleCaptioner(model)
    images, tokens = make_images(), make_tokens()
    with torch.no_grad():
        plain = ort(*images, tokens)
        model.train()
        # only attention dropout: switch the other dropout layers off
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(3)
        first = ort(*images, tokens)
        torch.manual_seed(3)
        second = ort(*images, tokens)
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain, atol=1e-3)


def test_bad_input_raises():
    model = make_model()
    ort = ort_style.OrtStyleCaptioner(model)
    features, boxes, attention_mask = make_images()
    with pytest.raises(ValueError, match="ObjectRelationTransformer"):
        ort_style.OrtStyleCaptioner(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="features must have shape"):
        ort.encode(features[..., :5], boxes, attention_mask)
    with pytest.raises(ValueError, match="attention_mask"):
        ort.encode(features, boxes, attention_mask[:, :3])
    with pytest.raises(ValueError, match="boxes must have shape"):
        ort.encode(features, boxes[:, :3], attention_mask)
    memory = Memory(torch.zeros(2, 7, 32), torch.ones(2, 7, dtype=torch.bool), (), ())
    with pytest.raises(ValueError, match="tokens must have shape"):
        ort.decoder_states(memory, make_tokens(rows=3))
    with pytest.raises(ValueError, match="last token"):
        ort.decode_step(memory, make_tokens(rows=2))
