"""Property-based cases (hypothesis) over shapes, masks and box edge cases: both backends agree
with the float64 reference by the eager rule, never produce NaN, and return proper
distributions."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geocap.kernels import geo_attention
from helpers import DEVICE, assert_within_eager_rule, run_reference, upcast

BOX_KINDS = ["random", "degenerate", "identical", "full_image", "tiny", "corner"]


@st.composite
def problems(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n, d = draw(st.integers(1, 40)), draw(st.sampled_from([16, 32]))
    seed = draw(st.integers(0, 2**16))
    kinds = draw(st.lists(st.sampled_from(BOX_KINDS), min_size=n * b, max_size=n * b))
    mask_mode = draw(st.sampled_from(["none", "random", "one_empty_image"]))
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b * n, 2, generator=g, dtype=torch.float64)
    wh = torch.rand(b * n, 2, generator=g, dtype=torch.float64) * (1 - xy)
    boxes = torch.cat([xy, xy + wh], -1)
    for i, kind in enumerate(kinds):
        if kind == "degenerate":
            boxes[i, 2:] = boxes[i, :2]
        elif kind == "identical":
            boxes[i] = boxes[0]
        elif kind == "full_image":
            boxes[i] = torch.tensor([0.0, 0.0, 1.0, 1.0])
        elif kind == "tiny":
            boxes[i, 2:] = boxes[i, :2] + 1e-6
        elif kind == "corner":
            boxes[i] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    boxes = boxes.clamp(0, 1).view(b, n, 4).float()
    mask = None
    if mask_mode != "none":
        mask = torch.rand(b, n, generator=g) > 0.4
        if mask_mode == "one_empty_image":
            mask[0] = False
    inputs = {
        "q": torch.randn(b, h, n, d, generator=g), "k": torch.randn(b, h, n, d, generator=g),
        "v": torch.randn(b, h, n, d, generator=g), "boxes": boxes,
        "wg_weight": torch.randn(h, 64, generator=g) * 0.3, "wg_bias": torch.randn(h, generator=g) * 0.3,
        "attention_mask": mask,
    }
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["torch", "triton"]), st.sampled_from(["ort", "signed"]))
def test_backends_agree_with_reference_and_make_distributions(x, backend, embedding):
    x = dict(x, embedding=embedding)
    result = geo_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"], x["attention_mask"],
                           backend=backend, return_entropy=True, return_probs=True, embedding=embedding)
    assert torch.isfinite(result.out).all() and torch.isfinite(result.entropy).all()
    ref_out, ref_probs, _ = run_reference(upcast(x), None)
    eager_out, eager_probs, _ = run_reference(x, None)
    assert_within_eager_rule("out", result.out, eager_out, ref_out, x["q"].dtype)
    assert_within_eager_rule("probs", result.probs, eager_probs, ref_probs, x["q"].dtype)

    mask = x["attention_mask"]
    n = x["q"].shape[2]
    valid = torch.full(x["boxes"].shape[:2], True, device=DEVICE) if mask is None else mask
    counts = valid.sum(-1)                                                  # [B]
    sums = result.probs.sum(-1)                                             # [B, H, N]
    expected = (counts > 0).float()[:, None, None].expand_as(sums)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=0)
    upper = torch.log(counts.clamp(min=1).float())[:, None, None] + 1e-5
    assert (result.entropy >= -1e-6).all() and (result.entropy <= upper).all()
    assert result.probs.shape[-1] == n and math.isfinite(result.probs.sum().item())
