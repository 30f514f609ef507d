"""Per-call overhead of geo_attention beside SDPA at a tiny shape, where the host's work is
everything: B = 1, N = 4, H = 8, d = 64, float32, 1 of 4 keys padded.

Variants (group per pass, ``fwd`` and ``fwd+bwd``; the baseline is ``sdpa``):

``sdpa``               ``F.scaled_dot_product_attention(q, k, v)``: no geometry, no mask; the floor.
``geocap_checks_on``   ``geo_attention(..., backend="auto")`` with the box value checks on (default).
``geocap_checks_off``  the same under ``value_checks(False)``, as geocap's model calls it.

On CPU ``backend="auto"`` is the PyTorch path (the Triton path runs only under the interpreter
here: its per-call cost is counted in operators by tests/test_op_counts.py, not timed). fwd+bwd
adds ``torch.autograd.grad`` to q, k, v (and W_g, b_g for geocap). Each benchmark records in
``extra_info`` the aten kernels and host syncs of one call (kernels/op_count.py) and the
1-minute load average. Goal on the development CPU: the PyTorch path's forward with checks off
at most 150 us (433 us at commit e14c9ee, before the per-call overhead was cut). Nothing here asserts speed.

Timing: ``benchmark.pedantic``, 2 s of warm-up calls, then 7 rounds of enough calls for >= 50 ms;
pytest-benchmark reports per-call times; compare medians, and the minimum on a loaded machine.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from geocap.kernels import geo_attention, value_checks
from geocap.kernels.op_count import count_ops

B, N, H, D = 1, 4, 8, 64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ("sdpa", "geocap_checks_on", "geocap_checks_off")
WARMUP_S = 2.0


def _inputs(requires_grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(B, N, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(B, N, 2, generator=g) * 0.3], dim=-1)
    t = {"q": torch.randn(B, H, N, D, generator=g), "k": torch.randn(B, H, N, D, generator=g),
         "v": torch.randn(B, H, N, D, generator=g), "boxes": boxes,
         "wg_weight": torch.randn(H, 64, generator=g) * 0.1, "wg_bias": torch.randn(H, generator=g) * 0.1}
    t = {k: x.to(DEVICE).requires_grad_(requires_grad and k != "boxes") for k, x in t.items()}
    t["attention_mask"] = torch.tensor([[True, True, True, False]], device=DEVICE)
    return t


def _forward(variant: str, x: dict) -> torch.Tensor:
    if variant == "sdpa":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])
    with value_checks(variant == "geocap_checks_on"):
        return geo_attention(x["q"], x["k"], x["v"], x["boxes"], x["wg_weight"], x["wg_bias"],
                             x["attention_mask"], backend="auto").out


def _call_for(variant: str, backward: bool, x: dict):
    if not backward:
        def call():
            with torch.no_grad():
                return _forward(variant, x)
        return call
    wrt = [x[n] for n in (("q", "k", "v") if variant == "sdpa" else ("q", "k", "v", "wg_weight", "wg_bias"))]
    grad_out = torch.ones(B, H, N, D, device=DEVICE)

    def call():
        return torch.autograd.grad(_forward(variant, x), wrt, grad_out)
    return call


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_per_call_overhead(benchmark, variant, pass_):
    backward = pass_ == "fwd+bwd"
    x = _inputs(backward)
    call = _call_for(variant, backward, x)
    # a fresh process's first few thousand calls ran up to 30 % slower on the development VM (the
    # allocator and caches settling): warm up for WARMUP_S seconds, not a fixed small count
    deadline = time.perf_counter() + WARMUP_S
    while time.perf_counter() < deadline:
        call()
    _sync()
    with count_ops() as counts:
        call()
    t0 = time.perf_counter()
    for _ in range(20):
        call()
    _sync()
    per_call = max((time.perf_counter() - t0) / 20, 1e-7)
    iterations = max(1, min(100000, math.ceil(0.05 / per_call)))
    benchmark.group = f"overhead {pass_} B={B} N={N}"
    benchmark.extra_info.update(
        variant=variant, baseline=variant == "sdpa", subject=variant == "geocap_checks_off", **{"pass": pass_},
        B=B, N=N, H=H, d=D, dtype="float32", device=DEVICE.type, threads=torch.get_num_threads(),
        aten_kernels=counts.kernels, host_syncs=counts.syncs, triton_launches=counts.triton_launches,
        loadavg_1m_before=round(os.getloadavg()[0], 2))
    benchmark.pedantic(call, rounds=7, iterations=iterations, warmup_rounds=0)
    benchmark.extra_info["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
