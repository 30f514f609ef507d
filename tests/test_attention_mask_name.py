"""The padding mask is ``attention_mask`` everywhere (bool, True = attend to this key / a real box,
Hugging Face's meaning); its old names (``key_padding_mask`` in the kernels and attention
modules, ``box_mask`` in the model, ``feature_mask`` in the Captioner) are deprecated aliases:
they give the same result with a DeprecationWarning naming the new one, and both names at once
are a TypeError naming both. The meaning itself is pinned: padded keys (False) do not change the
output, and an inverted mask changes it."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from geocap.captioner import Captioner
from geocap.data.vocab import SPECIALS, Vocabulary
from geocap.kernels import attention, geo_attention
from geocap.kernels.deprecation import renamed_argument
from geocap.kernels.reference import reference_attention
from geocap.model import MultiHeadAttention, ObjectRelationTransformer, ORTConfig
from geocap.train.scst import PolicyModule

from helpers import random_boxes, random_inputs

TINY = dict(feature_dim=16, layers=1, d_model=16, heads=2, d_ff=32, max_len=16, dropout=0.0)
WORDS = ["a", "dog", "on", "the", "grass"]


def _geo(x, backend, **mask):
    return geo_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"], backend=backend, **mask)


def _plain(x, backend, **mask):
    return attention(x["q"], x["k"], x["v"], backend=backend, **mask)


def _reference(x, backend, **mask):
    return reference_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"], **mask)[0]


def _out(result):
    return result.out if hasattr(result, "out") else result


@pytest.fixture(scope="module")
def inputs():
    x = random_inputs(2, 1, 5, 8, torch.float32, "cpu", seed=3)
    x["attention_mask"][:, 1] = False     # a padded key in every row, the first key real
    return x


def _deprecated(call, old):
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated.*'attention_mask'") as record:
        result = call()
    assert all(r.filename == __file__ for r in record if issubclass(r.category, DeprecationWarning)), \
        "the warning names the caller's line"
    return result


OPS = {"geo_attention": _geo, "attention": _plain, "reference_attention": _reference}
CASES = [("geo_attention", "torch"), ("geo_attention", "triton"), ("attention", "torch"),
         ("attention", "triton"), ("reference_attention", None)]


@pytest.mark.parametrize("op,backend", [c for c in CASES if c[1] != "triton"])   # the alias acts before dispatch
def test_kernel_alias_gives_identical_results_with_a_warning(inputs, op, backend):
    fn, mask = OPS[op], inputs["attention_mask"]
    new = fn(inputs, backend, attention_mask=mask)
    old = _deprecated(lambda: fn(inputs, backend, key_padding_mask=mask), "key_padding_mask")
    assert torch.equal(_out(new), _out(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # the new name warns about nothing
        fn(inputs, backend, attention_mask=mask)


@pytest.mark.parametrize("op,backend", CASES)
def test_kernel_mask_means_attend(inputs, op, backend):
    """True = attend: values behind a False key do not count, behind a True key they do; the
    inverted mask gives another output (a path that read the mask the other way round fails)."""
    fn, mask = OPS[op], inputs["attention_mask"]
    ref = _out(fn(inputs, backend, attention_mask=mask))
    for key, padded in ((1, True), (0, False)):
        moved = dict(inputs, v=inputs["v"].clone())
        moved["v"][:, :, key] += 5.0
        out = _out(fn(moved, backend, attention_mask=mask))
        assert torch.allclose(out, ref, atol=1e-6) == padded, f"key {key} (padded: {padded})"
    inverted = _out(fn(inputs, backend, attention_mask=~mask))
    assert (inverted - ref).abs().max() > 1e-2


@pytest.mark.parametrize("op", ["geo_attention", "attention", "reference_attention"])
def test_kernel_both_names_raise(inputs, op):
    fn, mask = OPS[op], inputs["attention_mask"]
    with pytest.raises(TypeError, match="'attention_mask'.*'key_padding_mask'"):
        fn(inputs, "torch", attention_mask=mask, key_padding_mask=mask)


def test_both_names_raise_when_the_new_one_is_positional(inputs):
    x, mask = inputs, inputs["attention_mask"]
    with pytest.raises(TypeError, match="'attention_mask'.*'key_padding_mask'"):
        geo_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"], mask, key_padding_mask=mask)
    with pytest.raises(TypeError, match="'attention_mask'.*'key_padding_mask'"):
        attention(x["q"], x["k"], x["v"], None, key_padding_mask=mask)


def test_signatures_show_the_new_name_only():
    for fn in (geo_attention, attention, reference_attention, ObjectRelationTransformer.forward,
               ObjectRelationTransformer.encode, MultiHeadAttention.forward, MultiHeadAttention.attend,
               PolicyModule.forward, Captioner.caption, Captioner.log_probs):
        params = inspect.signature(fn).parameters
        assert "attention_mask" in params, fn.__qualname__
        assert not {"key_padding_mask", "box_mask", "feature_mask"} & set(params), fn.__qualname__


def test_renamed_argument_refuses_a_function_without_the_new_name():
    with pytest.raises(TypeError, match="must have a parameter 'attention_mask'"):
        renamed_argument("key_padding_mask", "attention_mask")(lambda q, mask=None: q)


# -- the model ------------------------------------------------------------------------------
def _model_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 4, TINY["feature_dim"], generator=g)
    boxes = random_boxes(2, 4, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, False, True, False]])
    tokens = torch.tensor([[1, 5, 6], [1, 7, 8]])
    return features, boxes, mask, tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ObjectRelationTransformer(ORTConfig(vocab_size=len(SPECIALS) + len(WORDS), **TINY)).eval()


def test_model_aliases(model):
    features, boxes, mask, tokens = _model_inputs()
    new = model(features, boxes, attention_mask=mask, tokens=tokens)
    old = _deprecated(lambda: model(features, boxes, box_mask=mask, tokens=tokens), "box_mask")
    assert torch.equal(new, old)
    assert torch.equal(model.encode(features, boxes, attention_mask=mask).states,
                       _deprecated(lambda: model.encode(features, boxes, box_mask=mask), "box_mask").states)
    policy = PolicyModule(model)
    assert torch.equal(policy(features, boxes, attention_mask=mask, tokens=tokens),
                       _deprecated(lambda: policy(features, boxes, box_mask=mask, tokens=tokens), "box_mask"))
    for call in (lambda: model(features, boxes, mask, tokens, box_mask=mask),
                 lambda: model.encode(features, boxes, attention_mask=mask, box_mask=mask),
                 lambda: policy(features, boxes, mask, tokens, box_mask=mask)):
        with pytest.raises(TypeError, match="'attention_mask'.*'box_mask'"):
            call()
    # True = real box: a padded slot's features do not count, the inverted mask changes the output
    moved = features.clone()
    moved[0, 3] += 3.0
    assert torch.allclose(model(moved, boxes, mask, tokens), new, atol=1e-6)
    assert (model(features, boxes, ~mask, tokens) - new).abs().max() > 1e-3


def test_attention_module_aliases(model):
    attn = model.encoder.layers[0].self_attn
    features, boxes, mask, _ = _model_inputs()
    x = torch.randn(2, 4, TINY["d_model"], generator=torch.Generator().manual_seed(4))
    new = attn(x, boxes, attention_mask=mask)[0]
    old = _deprecated(lambda: attn(x, boxes, key_padding_mask=mask), "key_padding_mask")[0]
    assert torch.equal(new, old)
    q, (k, v) = attn.split_heads(attn.q_proj(x)), attn.keys_values(x)
    assert torch.equal(attn.attend(q, k, v, attention_mask=mask).out,
                       _deprecated(lambda: attn.attend(q, k, v, key_padding_mask=mask), "key_padding_mask").out)
    with pytest.raises(TypeError, match="'attention_mask'.*'key_padding_mask'"):
        attn(x, boxes, mask, key_padding_mask=mask)
    with pytest.raises(TypeError, match="'attention_mask'.*'key_padding_mask'"):
        attn.attend(q, k, v, attention_mask=mask, key_padding_mask=mask)


def test_captioner_aliases(model):
    cap = Captioner(model, Vocabulary(list(SPECIALS) + WORDS, min_count=1))
    features, boxes, mask, _ = _model_inputs()
    words = torch.tensor([[4, 5], [6, 0]])
    new = cap.log_probs(features, boxes, words, attention_mask=mask)
    old = _deprecated(lambda: cap.log_probs(features, boxes, words, feature_mask=mask), "feature_mask")
    assert torch.equal(new, old)
    assert cap.caption(features, boxes, attention_mask=mask, beam_size=2, max_len=4) == _deprecated(
        lambda: cap.caption(features, boxes, feature_mask=mask, beam_size=2, max_len=4), "feature_mask")
    for call in (lambda: cap.caption(features, boxes, mask, feature_mask=mask),
                 lambda: cap.log_probs(features, boxes, words, attention_mask=mask, feature_mask=mask)):
        with pytest.raises(TypeError, match="'attention_mask'.*'feature_mask'"):
            call()
    moved = features.clone()
    moved[1, 1] = float("nan")                  # a padded slot may hold anything
    assert torch.equal(cap.log_probs(moved, boxes, words, attention_mask=mask), new)
    assert (cap.log_probs(features, boxes, words, attention_mask=~mask) - new).abs().max() > 1e-3


def test_batch_box_mask_is_a_deprecated_alias():
    from geocap.data.dataset import Batch

    mask = torch.tensor([[True, False]])
    batch = Batch(features=torch.zeros(1, 2, 3), boxes=torch.zeros(1, 2, 4), attention_mask=mask,
                  captions=torch.zeros(1, 3, dtype=torch.int64), caption_lengths=torch.ones(1, dtype=torch.int64),
                  image_ids=torch.zeros(1, dtype=torch.int64))
    with pytest.warns(DeprecationWarning, match="Batch.attention_mask"):
        assert batch.box_mask is mask
