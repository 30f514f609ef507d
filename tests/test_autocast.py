"""Attention under torch.autocast (mixed-precision training): the geometry term stays in float32
(it is ill-conditioned: autocast's bf16 matmuls would change it), and every backend runs the
forward and backward with results as close to float64 as the same inputs in bf16 give."""
import pytest
import torch

from geocap.kernels import geo_attention, geometry_log_bias
from helpers import DEVICE, ERROR_CAP, random_inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geometry_bias_ignores_autocast(dtype):
    t = random_inputs(2, 3, 7, 8, torch.float32, DEVICE, seed=1)
    weight = t["wg_weight"].clone().requires_grad_()
    plain = geometry_log_bias(t["boxes"], weight, t["wg_bias"])
    (g_plain,) = torch.autograd.grad(plain.sum(), weight)
    with torch.autocast(DEVICE.type, dtype=dtype):
        cast = geometry_log_bias(t["boxes"], weight, t["wg_bias"])
    (g_cast,) = torch.autograd.grad(cast.sum(), weight)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
    torch.testing.assert_close(g_cast, g_plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_geo_attention_under_autocast(backend):
    """q/k/v made by an autocast Linear (bf16), geometry weights float32 parameters: output and
    every gradient finite, and within bf16 rounding of the float64 computation."""
    dtype = torch.bfloat16
    t = random_inputs(2, 2, 5, 16, torch.float32, DEVICE, seed=3)
    proj = torch.nn.Linear(16, 16).to(DEVICE)
    leaves = {name: t[name].clone().requires_grad_() for name in ("q", "k", "v", "wg_weight", "wg_bias")}

    def run(autocast: bool, wide: torch.dtype, backend: str):
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast):
            q, k, v = (proj.to(wide)(leaves[n].to(wide)) for n in ("q", "k", "v"))
            out = geo_attention(q, k, v, t["boxes"].to(wide), leaves["wg_weight"].to(wide),
                                leaves["wg_bias"].to(wide), t["attention_mask"], backend=backend).out
        grads = torch.autograd.grad(out.float().square().sum(), list(leaves.values()))
        return out.double(), [g.double() for g in grads]

    out, grads = run(True, torch.float32, backend)
    proj.double()
    ref_out, ref_grads = run(False, torch.float64, "torch")
    proj.float()
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)
    # bf16 has 8 bits of mantissa: the equivalence tests' cap on bf16 errors, relative to each tensor's scale
    for name, got, ref in zip(["out", *leaves], [out, *grads], [ref_out, *ref_grads]):
        scale = ref.abs().max().clamp(min=1e-3)
        assert (got - ref).abs().max() <= ERROR_CAP[dtype] * scale, name
