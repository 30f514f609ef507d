"""Attention dropout: the Triton kernels regenerate one counter-based mask in forward and
backward; the PyTorch path uses torch's RNG. Both keep-scale by 1 / (1 - p)."""
import pytest
import torch

from geocap.kernels import geo_attention
from geocap.kernels.triton_attention import draw_dropout_seed, dropout_keep_mask
from helpers import (GRAD_NAMES, assert_within_eager_rule, differentiable, geometry_gradient_terms, grads_of,
                     random_inputs, run_reference, upcast)

P = 0.3


def _geo(x, backend, **kw):
    return geo_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"], x["attention_mask"],
                         backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dropout_equals_reference_with_the_same_mask(dtype, device):
    inputs = random_inputs(2, 2, 23, 32, dtype, device, seed=3)
    x = differentiable(inputs)
    torch.manual_seed(7)
    out = _geo(x, "triton", dropout_p=P).out
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = grads_of(out, x, grad_out)

    torch.manual_seed(7)
    keep = dropout_keep_mask(2, 2, 23, 23, P, draw_dropout_seed(), device)
    assert 0.6 < keep.float().mean().item() < 0.8
    ref_out, _, ref_grads = run_reference(upcast(inputs), grad_out, dropout_keep=keep, dropout_p=P)
    eager_out, _, eager_grads = run_reference(differentiable(inputs), grad_out, dropout_keep=keep, dropout_p=P)
    terms = geometry_gradient_terms(inputs, grad_out, dropout_keep=keep, dropout_p=P)
    assert_within_eager_rule("out", out, eager_out, ref_out, dtype)
    for name in GRAD_NAMES:
        assert_within_eager_rule(f"d{name}", grads[name], eager_grads[name], ref_grads[name], dtype,
                                 terms=terms.get(f"d{name}"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_is_seeded_unbiased_and_off_by_default(backend, device):
    inputs = random_inputs(1, 2, 40, 16, torch.float32, device, masked=False)
    torch.manual_seed(0)
    a = _geo(inputs, backend, dropout_p=P).out
    torch.manual_seed(0)
    b = _geo(inputs, backend, dropout_p=P).out
    assert torch.equal(a, b)
    c = _geo(inputs, backend, dropout_p=P).out
    assert not torch.equal(a, c)
    # attention weights are kept-and-rescaled: with v = 1 each output row averages to 1
    inputs["v"] = torch.ones_like(inputs["v"])
    rows = torch.stack([_geo(inputs, backend, dropout_p=P).out[..., 0] for _ in range(20)])
    assert abs(rows.mean().item() - 1.0) < 0.05
    torch.testing.assert_close(_geo(inputs, backend).out, torch.ones_like(inputs["v"]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_probs_and_entropy_are_before_dropout(backend, device):
    inputs = random_inputs(1, 2, 17, 16, torch.float32, device)
    plain = _geo(inputs, backend, return_entropy=True, return_probs=True)
    dropped = _geo(inputs, backend, dropout_p=0.5, return_entropy=True, return_probs=True)
    torch.testing.assert_close(dropped.probs, plain.probs)
    torch.testing.assert_close(dropped.entropy, plain.entropy)
