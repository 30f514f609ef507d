"""``geocap demo``: every attention backend against the float64 eager reference, then a small
timing table. Runs on the embedded synthetic inputs (random boxes, features and weights from a
fixed seed), on CPU (Triton under the interpreter when enabled) or a GPU."""
from __future__ import annotations

import time

import torch

from geocap.kernels import geo_attention, geometry_log_bias
from geocap.kernels._backend import interpreter_requested
from geocap.kernels.reference import reference_attention
from geocap.errors import UsageError


def synthetic_inputs(batch, heads, n, head_dim, dtype, device, seed=0):
    """Random q, k, v, valid boxes, ORT-scale geometry weights and a key mask with ~20% padding."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) for _ in range(3))
    xy = torch.rand(batch, n, 2, generator=g) * 0.8
    wh = torch.rand(batch, n, 2, generator=g) * (1 - xy)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    weight, bias = torch.randn(heads, 64, generator=g) * 0.3, torch.randn(heads, generator=g) * 0.3
    mask = torch.rand(batch, n, generator=g) > 0.2
    mask[:, 0] = True
    cast = dict(device=device, dtype=dtype)
    return (q.to(**cast), k.to(**cast), v.to(**cast), boxes.to(device), weight.to(**cast), bias.to(**cast),
            mask.to(device))


def _sdpa_with_bias(q, k, v, boxes, weight, bias, mask):
    attn_bias = geometry_log_bias(boxes, weight, bias).to(q.dtype)
    attn_bias = attn_bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)


def _time(fn, repeats, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def run_demo(batch=4, heads=8, n=36, head_dim=64, repeats=5) -> int:
    for name, value in (("batch", batch), ("heads", heads), ("n", n), ("head_dim", head_dim), ("repeats", repeats)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch"]
    if device.type == "cuda" or interpreter_requested():
        backends.append("triton")
    print(f"geocap kernel demo on {device} (B={batch}, H={heads}, N={n}, d={head_dim}, ~20% padded keys)")
    if device.type == "cpu":
        print("Triton runs under the CPU interpreter here: checked for correctness, not timed."
              if "triton" in backends else "Triton skipped (no GPU, interpreter off).")

    print("\nmax |error| against the float64 eager reference; pass = within 2x the eager error at that dtype")
    print(f"{'dtype':10s}{'eager':>12s}" + "".join(f"{b:>12s}" for b in backends) + "   verdict")
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        inputs = synthetic_inputs(batch, heads, n, head_dim, dtype, device)
        ref, _ = reference_attention(*(t.double() if t.is_floating_point() else t for t in inputs))
        eager_err = (reference_attention(*inputs)[0].double() - ref).abs().max().item()
        errs = [(geo_attention(*inputs, backend=b).out.double() - ref).abs().max().item() for b in backends]
        ok = all(e <= max(2 * eager_err, 1e-5) for e in errs)
        failures += not ok
        print(f"{str(dtype).replace('torch.', ''):10s}{eager_err:12.2e}" + "".join(f"{e:12.2e}" for e in errs)
              + ("   ok" if ok else "   FAIL"))

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    inputs = synthetic_inputs(batch, heads, n, head_dim, dtype, device)
    timed = {"eager ORT-style": lambda: reference_attention(*inputs),
             "SDPA + precomputed bias": lambda: _sdpa_with_bias(*inputs),
             "geocap (torch)": lambda: geo_attention(*inputs, backend="torch")}
    if device.type == "cuda":
        timed["geocap (triton)"] = lambda: geo_attention(*inputs, backend="triton")
    print(f"\nforward time, {str(dtype).replace('torch.', '')}, mean of {repeats} calls")
    times = {name: _time(fn, repeats, device) for name, fn in timed.items()}
    for name, ms in times.items():
        print(f"  {name:26s}{ms:9.3f} ms   {times['eager ORT-style'] / ms:5.2f}x eager")
    print("\nall backends agree with the reference" if not failures else f"\n{failures} dtype(s) FAILED")
    return 1 if failures else 0
