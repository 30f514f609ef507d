"""Geometry-biased attention (ORT), four implementations side by side, and geocap's signed box
embedding beside its ORT one: forward and forward+backward.

Variants (every timed function computes the geometry from the boxes itself; nothing is cached
between calls):

``eager``      ``geocap.kernels.reference.reference_attention``: ORT's code op by op (the
               ``[B, N, N, 64]`` box embedding, per-head ``Linear(64 -> 1)``, relu / clamp / log,
               ``QK^T / sqrt(d)``, padded keys -1e9, softmax, ``@ V``).
``sdpa_bias``  ``geometry_log_bias(boxes, W_g, b_g)`` (``[B, H, N, N]`` float32, no embedding
               tensor), padded keys set to -inf, cast to q's dtype, then
               ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)``; the bias is inside
               the timed function. geocap's own bias: what geocap offers a user of SDPA.
``sdpa_ort_bias``  the bias built the ORT way, as a user without geocap writes it: ORT's
               ``[B, N, N, 64]`` box embedding (``box_relation_embedding``), the per-head
               ``Linear(64 -> 1)`` (``F.linear`` with W_g, b_g), relu / clamp / log, padded keys
               -inf, then ``F.scaled_dot_product_attention(attn_mask=bias)``.
``flex``       ``torch.nn.attention.flex_attention`` compiled (``torch.compile(flex_attention)``)
               with a ``score_mod`` that evaluates ORT's 64-channel geometry (dx, dy, dw, dh; 8
               frequencies; sin and cos) per (query, key, head) from per-box centres and sizes
               (captured [B, N] tensors, computed eagerly in the timed function) and adds
               ``log(clamp(relu(x), 1e-6))``, padded keys -inf. CUDA only (see the skip reason).
``geocap``     ``geocap.kernels.geo_attention(..., backend="auto")``: the Triton kernel on CUDA,
               the blocked PyTorch path on CPU.
``geocap_signed``  the same with ``embedding="signed"`` (asinh of the signed centre offsets in
               place of ORT's log of their absolute value): what the direction-aware embedding costs.

fwd+bwd times the forward plus ``torch.autograd.grad`` of the output (a fixed random upstream
gradient) with respect to q, k, v, W_g and b_g, for every variant.

Shapes: H = 8, d = 64, N in {36, 100, 512, 2048}; batch per N in ``BATCH`` (GPU: 64, 32, 4, 4;
CPU: 8, 2, 1, 1, and on CPU N = 2048 is forward-only). dtypes: float32 on CPU; float16 and
bfloat16 on CUDA (q, k, v in that dtype; boxes, W_g, b_g float32, as parameters are kept).
Inputs: valid normalised boxes (x1 < x2, y1 < y2 in [0, 1]); per image 10-30 % of the keys
padded (at the end, as ORT pads detections), padded boxes all-zero; q, k, v ~ N(0, 1);
W_g, b_g ~ N(0, 0.1); fixed seeds.

Timing: ``benchmark.pedantic``. Untimed warm-up first (CPU: one call, which also sizes the run;
CUDA: the first call compiles, a second warms up, a third sizes the run), then ``iterations``
calls per round so a round lasts at least ~100 ms on CPU / ~20 ms on CUDA; on CPU 5 rounds (3 when
a call takes over 0.5 s, 1 over 2 s), on CUDA 5-25 rounds within ~0.5 s. The timer synchronises
the CUDA device at both ends of a round (``@pytest.mark.benchmark(timer=...)``), so asynchronous
launches are timed to completion without a sync per call. pytest-benchmark reports
per-call times (round time / iterations). Never run this under the Triton interpreter: on CPU
``backend="auto"`` is the PyTorch path anyway.

Peak memory (``benchmark.extra_info``, measured once after timing; bench/memory.py has the details):
  CUDA: ``peak_cuda_alloc_mb`` = ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the call.
  CPU: ``peak_rss_growth_mb`` = in a child forked from the benchmark process (``multiprocessing``
  ``'fork'``, one thread), after one unmeasured warm-up call, ``malloc_trim(0)`` and a reset of the
  RSS high-water mark (``/proc/self/clear_refs``): ``getrusage().ru_maxrss`` over one call minus
  the RSS read from ``/proc/self/statm`` just before it.
Also in extra_info: variant, pass, N, B, H, d, dtype, device, rounds, iterations, grad_inputs, and
the 1-minute load average before and after the timing (a shared machine shows up there); a
``note`` if flex could not differentiate its captured W_g / b_g and was timed with q, k, v grads only.

Benchmarks are grouped by (pass, N, dtype); bench/conftest.py prints per group each variant's
median, its speed-up over eager, geocap's speed-up over each peer and the peak memory, and writes
them as JSON to ``$GEOCAP_BENCH_SUMMARY`` when set. Nothing here asserts speed: the benchmarks
only check that outputs (and gradients) are finite; the non-benchmark tests at the end check that
the variants compute the same attention.

Environment knobs (all optional): ``GEOCAP_BENCH_N`` (e.g. ``36,100``), ``GEOCAP_BENCH_DTYPES``
(e.g. ``float16``), ``GEOCAP_BENCH_VARIANTS`` (e.g. ``eager,geocap``), ``GEOCAP_BENCH_PASSES``
(``fwd``, ``fwd+bwd``), ``GEOCAP_BENCH_ROUND_BUDGET_S`` (CUDA time per benchmark, default 0.5),
``GEOCAP_BENCH_COMPILED_FLEX=0`` (``test_variants_agree`` leaves compiled flex out: a cold compile
of one shape took minutes on the H200; gpu_check.sh compiles it in the background instead).
"""
from __future__ import annotations

import math
import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from geocap.kernels import box_relation_embedding, geo_attention, geometry_log_bias, value_checks
from geocap.kernels.geometry import DIM_G, SCALE, WAVE_LEN, BIAS_CLAMP, DX_CLAMP
from geocap.kernels.reference import eager_geometry_log_bias, reference_attention

try:  # the bench directory is on sys.path under pytest's default (prepend) import mode
    from memory import peak_memory_info
except ImportError:  # pragma: no cover - imported as a package
    from .memory import peak_memory_info

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
H, D = 8, 64
VARIANTS = ("eager", "sdpa_bias", "sdpa_ort_bias", "flex", "geocap", "geocap_signed")
PASSES = ("fwd", "fwd+bwd")
SIZES = (36, 100, 512, 2048)
BATCH = {36: 64, 100: 32, 512: 4, 2048: 4} if CUDA else {36: 8, 100: 2, 512: 1, 2048: 1}
DTYPES = (torch.float16, torch.bfloat16) if CUDA else (torch.float32,)
CPU_FWD_ONLY_ABOVE = 512  # CPU: fwd+bwd only up to this N


def _env_list(name, default, convert=str):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return tuple(default)
    return tuple(convert(x.strip()) for x in raw.split(",") if x.strip())


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"GEOCAP_BENCH_DTYPES: unknown dtype {name!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sync_timer() -> float:
    """perf_counter that first waits for the CUDA device: used at both ends of a timed round."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=sync_timer)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_inputs(batch, n, dtype, device, *, requires_grad=False, seed=0):
    """q, k, v ``[B, H, N, d]``; boxes ``[B, N, 4]`` valid normalised; W_g ``[H, 64]``, b_g ``[H]``
    float32; attention_mask ``[B, N]`` (True = real) with 10-30 % padded keys at the end."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, H, n, D, generator=g) for _ in range(3))
    x1 = torch.rand(batch, n, generator=g) * 0.8
    y1 = torch.rand(batch, n, generator=g) * 0.8
    bw = 0.02 + torch.rand(batch, n, generator=g) * (1.0 - x1 - 0.02)
    bh = 0.02 + torch.rand(batch, n, generator=g) * (1.0 - y1 - 0.02)
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=-1).clamp(0.0, 1.0)
    n_pad = ((0.1 + 0.2 * torch.rand(batch, generator=g)) * n).long().clamp(0, max(n - 1, 0))
    mask = torch.arange(n)[None, :] < (n - n_pad)[:, None]
    boxes = boxes * mask[..., None]                       # padded detections are all-zero boxes
    wg_weight = torch.randn(H, DIM_G, generator=g) * 0.1
    wg_bias = torch.randn(H, generator=g) * 0.1
    out = dict(q=q.to(device, dtype), k=k.to(device, dtype), v=v.to(device, dtype), boxes=boxes.to(device),
               wg_weight=wg_weight.to(device), wg_bias=wg_bias.to(device), attention_mask=mask.to(device))
    if requires_grad:
        for name in ("q", "k", "v", "wg_weight", "wg_bias"):
            out[name].requires_grad_(True)
    return out


GRAD_INPUTS = ("q", "k", "v", "wg_weight", "wg_bias")


# ---------------------------------------------------------------------------------------------
# The four implementations: each (q, k, v, boxes, wg_weight, wg_bias, attention_mask) -> out
# ---------------------------------------------------------------------------------------------
def run_eager(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    return reference_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask)[0]


def run_sdpa_bias(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    bias = geometry_log_bias(boxes, wg_weight, wg_bias)                       # [B, H, N, N] float32
    bias = bias.masked_fill(~attention_mask[:, None, None, :], float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def run_sdpa_ort_bias(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    with value_checks(False):                                                 # a user's code checks nothing
        emb = box_relation_embedding(boxes.float())                           # [B, N, N, 64]
    x = F.linear(emb, wg_weight.float(), wg_bias.float()).permute(0, 3, 1, 2)  # [B, H, N, N]
    bias = torch.log(torch.clamp(F.relu(x), min=1e-6))
    bias = bias.masked_fill(~attention_mask[:, None, None, :], float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def run_geocap(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    return geo_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask, backend="auto").out


def run_geocap_signed(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    return geo_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask, backend="auto",
                         embedding="signed").out


FREQS = tuple(WAVE_LEN ** (-kk / (DIM_G // 8)) for kk in range(DIM_G // 8))


def box_geometry_score_mod(boxes, wg_weight, wg_bias, attention_mask):
    """A flex_attention ``score_mod`` adding ORT's log-geometry bias and the key padding.

    Per box it captures cx, cy, w, h (ORT's +1 sizes), log w, log h (float32); per pair it
    evaluates the embedding channels as ORT defines them (kernels/geometry.py)::

        100 dx = 100 log(max(|cx_i - cx_j| / w_i, 1e-3))    100 dy likewise
        100 dw = 100 (log w_i - log w_j)                     100 dh likewise
        x = b_g[h] + sum_k sum_{c in dx,dy,dw,dh} W_g[h, 8c + k] sin(100 c f_k) + W_g[h, 32 + 8c + k] cos(100 c f_k)

    and returns ``score + log(clamp(relu(x), 1e-6))`` (``-inf`` for padded keys). Channel order:
    the embedding is ``cat(sin(args), cos(args))`` with ``args = [4 components][8 frequencies]``.
    """
    b32 = boxes.to(torch.float32)
    x1, y1, x2, y2 = b32.unbind(-1)
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    w, h = x2 - x1 + 1.0, y2 - y1 + 1.0
    log_w, log_h = torch.log(w), torch.log(h)
    cx, cy, w, h, log_w, log_h = (t.contiguous() for t in (cx, cy, w, h, log_w, log_h))
    weight = wg_weight.to(torch.float32)
    bias_g = wg_bias.to(torch.float32)
    key_pad = torch.zeros_like(cx).masked_fill(~attention_mask, float("-inf"))  # [B, N]: 0 or -inf

    def score_mod(score, b, head, q_idx, kv_idx):
        ax = SCALE * torch.log(torch.clamp(torch.abs(cx[b, q_idx] - cx[b, kv_idx]) / w[b, q_idx], min=DX_CLAMP))
        ay = SCALE * torch.log(torch.clamp(torch.abs(cy[b, q_idx] - cy[b, kv_idx]) / h[b, q_idx], min=DX_CLAMP))
        aw = SCALE * (log_w[b, q_idx] - log_w[b, kv_idx])
        ah = SCALE * (log_h[b, q_idx] - log_h[b, kv_idx])
        x = bias_g[head]
        for kk, f in enumerate(FREQS):
            for comp, a in enumerate((ax, ay, aw, ah)):
                arg = a * f
                x = x + weight[head, 8 * comp + kk] * torch.sin(arg) + weight[head, 32 + 8 * comp + kk] * torch.cos(arg)
        geo = torch.log(torch.clamp(x, min=BIAS_CLAMP))      # == log(clamp(relu(x), 1e-6))
        return score + geo + key_pad[b, kv_idx]

    return score_mod


def flex_geometry_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask, *, attention=None):
    """flex_attention (``attention``, default the uncompiled op) with the geometry score_mod."""
    if attention is None:
        from torch.nn.attention.flex_attention import flex_attention as attention
    score_mod = box_geometry_score_mod(boxes, wg_weight, wg_bias, attention_mask)
    return attention(q, k, v, score_mod=score_mod)


_FLEX_COMPILED = None


def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``, built once: one kernel per shape and dtype
    (the recompile limit is raised for the sweep). A fresh score_mod closure per call does not
    recompile: its captured tensors become kernel inputs. The per-box preprocessing stays eager
    (a few [B, N] ops, inside the timed function): compiling it into the same graph fails to
    lower on CPU in torch 2.13 (NoValidChoicesError), and this is the documented flex pattern."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = max(
                512, torch._dynamo.config.accumulated_recompile_limit)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def run_flex(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    return flex_geometry_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask,
                                   attention=compiled_flex_attention())


RUNNERS = {"eager": run_eager, "sdpa_bias": run_sdpa_bias, "sdpa_ort_bias": run_sdpa_ort_bias, "flex": run_flex,
           "geocap": run_geocap,
           "geocap_signed": run_geocap_signed}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def _cases():
    sizes = _env_list("GEOCAP_BENCH_N", SIZES, int)
    dtypes = _env_list("GEOCAP_BENCH_DTYPES", [_dtype_name(d) for d in DTYPES])
    variants = _env_list("GEOCAP_BENCH_VARIANTS", VARIANTS)
    passes = _env_list("GEOCAP_BENCH_PASSES", PASSES)
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"GEOCAP_BENCH_VARIANTS: unknown variant {name!r}; choose from {VARIANTS}")
    for n in sizes:
        if n not in BATCH:
            raise ValueError(f"GEOCAP_BENCH_N: no batch size defined for N={n}; choose from {tuple(BATCH)}")
    for name in passes:
        if name not in PASSES:
            raise ValueError(f"GEOCAP_BENCH_PASSES: unknown pass {name!r}; choose from {PASSES}")
    # dtype outermost, variant innermost: a group's alternatives run back to back, and a run cut
    # short (timeout) still has complete groups for the first dtype.
    for dtype in dtypes:
        for pass_ in passes:
            for n in sizes:
                for variant in variants:
                    yield pytest.param(variant, pass_, n, dtype, id=f"{pass_}-N{n}-{dtype}-{variant}")


def _skip_reason(variant, pass_, n):
    if variant == "flex" and not CUDA:
        return (f"flex is benchmarked on CUDA only: torch {torch.__version__} has no flex_attention backward "
                "on CPU, and the comparison with flex is meant for the compiled CUDA kernel (on CPU its score_mod and "
                "compiled forward are checked by test_flex_score_mod_matches_geometry_log_bias / test_variants_agree)")
    if pass_ == "fwd+bwd" and not CUDA and n > CPU_FWD_ONLY_ABOVE:
        return (f"fwd+bwd at N={n} is not run on CPU by design (keeps the CPU sweep to a few minutes on 2 cores): "
                f"eager would keep several [B, N, N, 64] float32 tensors (~{n * n * 64 * 4 / 2**30:.0f} GiB each) "
                "for autograd")
    return None


def _plan(call):
    """Warm up and size the run: ``(rounds, iterations, seconds_per_call, result of the first call)``.

    CPU: the first (untimed-by-the-benchmark) call is the warm-up and also sizes the run.
    CUDA: the first call compiles, a second warms up, a third sizes the run."""
    t0 = sync_timer()
    first = call()
    per_call = sync_timer() - t0
    if CUDA:
        call()
        t0 = sync_timer()
        call()
        per_call = sync_timer() - t0
    per_call = max(per_call, 1e-7)
    if CUDA:
        iterations = max(1, min(1000, math.ceil(0.02 / per_call)))
        budget = float(os.environ.get("GEOCAP_BENCH_ROUND_BUDGET_S", "0.5"))
        rounds = max(5, min(25, int(budget / (per_call * iterations))))
    else:
        iterations = max(1, min(200, math.ceil(0.1 / per_call)))
        rounds = 1 if per_call > 2.0 else 3 if per_call > 0.5 else 5
    return rounds, iterations, per_call, first


def _assert_finite(name, t):
    assert t is not None, f"{name} is None"
    assert torch.isfinite(t.detach()).all(), f"{name} has non-finite values"


def _make_call(fn, inputs, backward, grad_names, grad_out):
    if backward:
        wrt = [inputs[name] for name in grad_names]

        def call():
            out = fn(**inputs)
            return out, torch.autograd.grad(out, wrt, grad_out)
    else:
        def call():
            with torch.no_grad():
                return fn(**inputs), ()
    return call


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@pytest.mark.parametrize("variant, pass_, n, dtype_name", list(_cases()))
def test_attention(benchmark, variant, pass_, n, dtype_name):
    reason = _skip_reason(variant, pass_, n)
    if reason:
        pytest.skip(reason)
    dtype = _dtype_from_name(dtype_name)
    batch = BATCH[n]
    backward = pass_ == "fwd+bwd"
    inputs = make_inputs(batch, n, dtype, DEVICE, requires_grad=backward, seed=n)
    fn = RUNNERS[variant]
    benchmark.group = f"{pass_} N={n} {dtype_name}"
    grad_out = (torch.randn(batch, H, n, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
                if backward else None)
    grad_names = GRAD_INPUTS if backward else ()
    note = None

    call = _make_call(fn, inputs, backward, grad_names, grad_out)
    try:
        rounds, iterations, per_call, (out, grads) = _plan(call)
    except Exception as exc:
        if not (variant == "flex" and backward):
            raise
        # Gradients to score_mod's captured buffers (W_g, b_g) are newer than the rest of flex: if
        # this torch cannot do them, time flex's backward to q, k, v only and say so.
        note = (f"flex backward to the captured W_g, b_g failed ({type(exc).__name__}: {str(exc)[:200]}); "
                "timed with gradients to q, k, v only")
        inputs["wg_weight"] = inputs["wg_weight"].detach()
        inputs["wg_bias"] = inputs["wg_bias"].detach()
        grad_names = ("q", "k", "v")
        call = _make_call(fn, inputs, backward, grad_names, grad_out)
        rounds, iterations, per_call, (out, grads) = _plan(call)
    _assert_finite(f"{variant} output", out)
    for name, g in zip(grad_names, grads):
        _assert_finite(f"{variant} d{name}", g)
    del out, grads

    benchmark.extra_info.update(
        variant=variant, **{"pass": pass_}, N=n, B=batch, H=H, d=D, dtype=dtype_name, device=DEVICE.type,
        device_name=torch.cuda.get_device_name() if CUDA else "cpu",
        torch=torch.__version__, threads=torch.get_num_threads(), rounds=rounds, iterations=iterations,
        grad_inputs=",".join(grad_names),
        backend=("triton" if CUDA else "torch") if variant.startswith("geocap") else variant,
        embedding="signed" if variant == "geocap_signed" else "ort")
    if note:
        benchmark.extra_info["note"] = note
    load_before = _loadavg()
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
    # 1-minute load average around the timing: on a shared machine, > ~threads means contention
    benchmark.extra_info.update(loadavg_1m_before=load_before, loadavg_1m_after=_loadavg())
    benchmark.extra_info.update(peak_memory_info(call, DEVICE))


# ---------------------------------------------------------------------------------------------
# Sanity (not timed): the variants compute the same attention
# ---------------------------------------------------------------------------------------------
def _index_grids(batch, heads, n, device):
    return (torch.arange(batch, device=device)[:, None, None, None],
            torch.arange(heads, device=device)[None, :, None, None],
            torch.arange(n, device=device)[None, None, :, None],
            torch.arange(n, device=device)[None, None, None, :])


def test_flex_score_mod_matches_geometry_log_bias():
    """The score_mod evaluated on broadcast index grids equals ORT's log-geometry bias (+ padding),
    computed the ORT way in float32 (``eager_geometry_log_bias``: the same formula, centre offsets
    from rounded centres as the score_mod takes them; geocap's ``geometry_log_bias`` takes them
    from the box edges, which rounds differently near the log floor)."""
    inp = make_inputs(2, 37, torch.float32, DEVICE, seed=3)
    score_mod = box_geometry_score_mod(inp["boxes"], inp["wg_weight"], inp["wg_bias"], inp["attention_mask"])
    zeros = torch.zeros(2, H, 37, 37, device=DEVICE)
    got = score_mod(zeros, *_index_grids(2, H, 37, DEVICE))
    want = eager_geometry_log_bias(inp["boxes"], inp["wg_weight"], inp["wg_bias"])
    want = want.masked_fill(~inp["attention_mask"][:, None, None, :], float("-inf"))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    # near the 1e-6 clamp log(x) amplifies float32 rounding, so compare the logits' scale
    torch.testing.assert_close(got[finite].exp(), want[finite].exp(), rtol=1e-4, atol=1e-5)
    assert (got[finite] - want[finite]).abs().max() < 1e-2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("n", [36, 100])
def test_variants_agree(n):
    """eager, sdpa_bias, geocap, flex uncompiled and flex compiled (torch.compile(flex_attention):
    Triton on CUDA, inductor's C++ template on CPU) agree with float64 eager."""
    dtype = torch.float32 if not CUDA else torch.float16
    inp = make_inputs(2, n, dtype, DEVICE, seed=5)
    names = ("q", "k", "v", "boxes", "wg_weight", "wg_bias")
    with torch.no_grad():
        ref = reference_attention(*(inp[k].double() for k in names), inp["attention_mask"])[0]
        outs = {"eager": run_eager(**inp), "sdpa_bias": run_sdpa_bias(**inp), "sdpa_ort_bias": run_sdpa_ort_bias(**inp),
                "geocap": run_geocap(**inp),
                "flex_uncompiled": flex_geometry_attention(**inp)}
        compiled_flex = os.environ.get("GEOCAP_BENCH_COMPILED_FLEX", "1") != "0"
        if compiled_flex and (CUDA or shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
            outs["flex"] = run_flex(**inp)
        signed_ref = reference_attention(*(inp[k].double() for k in names), inp["attention_mask"],
                                         embedding="signed")[0]
        signed = run_geocap_signed(**inp)
    # float32 inputs: the geometry's float32 sin/cos arguments (up to ~700 rad) limit agreement to ~1e-3
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, out in outs.items():
        torch.testing.assert_close(out.double(), ref, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(signed.double(), signed_ref, **tol, msg=lambda m: f"geocap_signed: {m}")
    assert (signed_ref - ref).abs().max() > 10 * tol["atol"]          # another embedding, not ORT's again
