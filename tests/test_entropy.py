"""attention_entropy against an independent float64 NumPy/SciPy reference, on both backends.

Tolerances: the reference is computed in float64 from the values x actually holds (after its
rounding to fp16/bf16/fp32), so input rounding is no source of error; what remains is float32
arithmetic: a few roundings per term (u = 6e-8; ~2^-22 for a GPU's approximate lg2/ex2) and
~log2(L) more in each tree reduction, relative to sum |terms| ~ H + O(1). That is ~1e-6 at these
sizes (observed on CPU: < 1e-6). RTOL = ATOL = 1e-5 keeps a 10x margin and still catches real
bugs (a lost term or a wrong mask moves H by far more); float64 gets 1e-12.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import entr

import geocap.kernels.entropy as entropy_mod
from geocap.kernels.entropy import attention_entropy
from geocap.kernels.triton_entropy import block_sizes, triton_attention_entropy

BACKENDS = ("torch", "triton")
TOL = {torch.float64: 1e-12}
TOL32 = 1e-5
# the `device` fixture is constant for a session, so reusing it across hypothesis examples is safe
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def reference(x, mask=None, from_logits=False, normalized=False) -> np.ndarray:
    """float64 NumPy/SciPy entropy of x's rows, from the values x holds."""
    xd = x.detach().cpu().double().numpy()
    valid = np.ones(xd.shape, bool) if mask is None else np.broadcast_to(mask.cpu().numpy(), xd.shape)
    if from_logits:
        z = np.where(valid, xd, -np.inf)
        top = z.max(-1, keepdims=True, initial=-np.inf)
        e = np.where(valid, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
        total = e.sum(-1, keepdims=True)
        p = e / np.where(total > 0, total, 1.0)
    else:
        p = np.where(valid, xd, 0.0)
    h = entr(p).sum(-1)
    if normalized:
        n = valid.sum(-1)
        h = np.where(n > 1, h / np.log(np.maximum(n, 2)), 0.0)
    return h


def assert_close(got, want, dtype=torch.float32):
    tol = TOL.get(dtype, TOL32)
    want = torch.as_tensor(np.asarray(want, dtype=np.float64))
    assert got.shape == want.shape
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=tol, atol=tol)


def make(shape, device, *, from_logits, dtype=torch.float32, masked=False, seed=0):
    """Random probabilities (softmax of scaled Gaussians, with exact zeros) or logits, and a mask."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if from_logits:
        x = z
    else:
        x = z.softmax(-1)
        x = x.masked_fill(torch.rand(shape, generator=g) < 0.1, 0.0)  # exact zeros: 0 log 0 = 0
    mask = torch.rand(shape, generator=g) > 0.3 if masked else None
    return x.to(dtype).to(device), None if mask is None else mask.to(device)


CASES = [
    (b, dt)
    for b in BACKENDS
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if not (b == "triton" and dt == torch.float64)
]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalized", [False, True])
def test_matches_reference(device, backend, dtype, from_logits, masked, normalized):
    # L = 150: odd, and three 64-wide tiles under the interpreter
    x, mask = make((3, 5, 150), device, from_logits=from_logits, dtype=dtype, masked=masked)
    got = attention_entropy(x, mask, from_logits=from_logits, normalized=normalized, backend=backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.device == x.device
    assert_close(got, reference(x, mask, from_logits, normalized), dtype)


def test_auto_backend_and_float64(device):
    x, mask = make((4, 33), device, from_logits=True, dtype=torch.float64, masked=True)
    got = attention_entropy(x, mask, from_logits=True)  # "auto" never sends float64 to the kernel
    assert got.dtype == torch.float64
    assert_close(got, reference(x, mask, True), torch.float64)
    x32 = x.float()
    assert_close(attention_entropy(x32, mask, from_logits=True), reference(x32, mask, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 7, 64, 65, 192, 2500])
@pytest.mark.parametrize("from_logits", [False, True])
def test_row_lengths(device, backend, length, from_logits):
    # 192: several whole tiles under the interpreter; 2500 > 2048: several tiles on a GPU too
    x, mask = make((3, length), device, from_logits=from_logits, masked=length > 1, seed=length)
    for m in (None, mask):
        got = attention_entropy(x, m, from_logits=from_logits, backend=backend)
        assert_close(got, reference(x, m, from_logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_entry_rows(device, backend):
    p = torch.tensor([[1.0], [0.5], [0.0]], device=device)
    assert_close(attention_entropy(p, backend=backend), [0.0, 0.5 * math.log(2), 0.0])
    assert_close(attention_entropy(p, from_logits=True, backend=backend), [0.0, 0.0, 0.0])
    assert_close(attention_entropy(p, normalized=True, backend=backend), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_logits", [False, True])
def test_all_masked_rows_are_zero_and_masked_values_unread(device, backend, from_logits):
    x, _ = make((4, 70), device, from_logits=from_logits)
    mask = torch.ones(4, 70, dtype=torch.bool, device=device)
    mask[1] = False
    mask[2, 1:] = False  # a single valid entry
    x = x.masked_fill(~mask, float("nan"))  # masked entries may hold anything
    for normalized in (False, True):
        got = attention_entropy(x, mask, from_logits=from_logits, normalized=normalized, backend=backend)
        assert got[1].item() == 0.0
        assert_close(got, reference(x, mask, from_logits, normalized))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 7), (3, 0), (0,), (2, 3, 0)])
def test_empty(device, backend, shape):
    x = torch.rand(shape, device=device)
    for from_logits in (False, True):
        got = attention_entropy(x, torch.ones_like(x, dtype=torch.bool), from_logits=from_logits, backend=backend)
        assert got.shape == shape[:-1] and got.dtype == torch.float32
        assert bool((got == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_logits", [False, True])
def test_layouts_and_broadcast_masks(device, backend, from_logits):
    base, _ = make((2, 3, 4, 90), device, from_logits=from_logits, seed=3)
    views = {
        "slice of the last axis": base[..., 5:84],
        "permuted leading axes, two row levels": base.permute(2, 0, 1, 3),  # addressed in place
        "transposed leading axes, three row levels": base.transpose(1, 2),  # copied by the Triton path
        "strided last axis": base.transpose(-1, -2),
        "1-d": base[1, 2, 3],
    }
    for name, x in views.items():
        assert_close(attention_entropy(x, from_logits=from_logits, backend=backend), reference(x, None, from_logits))
        g = torch.Generator().manual_seed(1)
        masks = [torch.rand(*s, generator=g) > 0.4 for s in ((x.shape[-1],), x.shape[:-1] + (1,))]
        if x.dim() == 4:
            masks.append(torch.rand(x.shape[0], 1, 1, x.shape[-1], generator=g) > 0.4)  # key padding
        for mask in masks:
            mask = mask.to(device)
            got = attention_entropy(x, mask, from_logits=from_logits, normalized=True, backend=backend)
            assert_close(got, reference(x, mask, from_logits, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_logits_stay_accurate(device, backend, dtype, offset):
    # lse ~ 1e4 and E[s] ~ 1e4 cancel to H ~ 1..4: a float32 lse - E[s] would lose ~1e-3;
    # keeping t relative to the running max keeps fp32 accuracy on the values x holds.
    z, mask = make((4, 130), device, from_logits=True, masked=True, seed=7)
    x = (z.double() * (1 + 20 * (dtype != torch.float32)) + offset).to(dtype)
    for m in (None, mask):
        got = attention_entropy(x, m, from_logits=True, backend=backend)
        want = reference(x, m, from_logits=True)
        assert want.max() > 0.5  # not a degenerate one-hot case
        assert_close(got, want)


def test_torch_path_chunks_rows_and_columns(monkeypatch):
    # A 40-element tile budget: rows are chunked, leading dims that cannot flatten without a
    # copy are split, and rows longer than the tile go through the online merge across tiles.
    monkeypatch.setattr(entropy_mod, "TORCH_TILE_BYTES", 40 * entropy_mod.TEMPS_PER_ELEMENT * 4)
    for length in (30, 100):
        base, mask = make((3, 4, 5, length), "cpu", from_logits=True, masked=True, seed=length)
        for x, m in ((base, mask), (base.permute(2, 0, 1, 3), mask.permute(2, 0, 1, 3)), (base[0, 0, 0], None)):
            for from_logits in (False, True):
                xx = x if from_logits else x.softmax(-1)
                for normalized in (False, True):
                    got = attention_entropy(xx, m, from_logits=from_logits, normalized=normalized, backend="torch")
                    assert_close(got, reference(xx, m, from_logits, normalized))


@pytest.mark.parametrize("length", [77, 80])  # a partial last tile, and whole tiles only
def test_triton_tiles_smaller_than_row(device, length):
    x, mask = make((5, length), device, from_logits=True, masked=True, seed=11)
    for from_logits in (False, True):
        xx = x if from_logits else x.softmax(-1)
        for m in (None, mask):
            got = triton_attention_entropy(xx, m, from_logits=from_logits, normalized=True, block_r=2, block_l=16)
            assert_close(got, reference(xx, m, from_logits, True))


def test_block_sizes():
    # GPU: tiles of 4096 elements; a 2048-long row in one tile, short rows stacked.
    assert block_sizes(4 * 8 * 2048, 2048, interpret=False) == (2, 2048, 4)
    assert block_sizes(4 * 8 * 2048, 49, interpret=False) == (64, 64, 4)
    assert block_sizes(3, 100_000, interpret=False)[:2] == (2, 2048)
    assert block_sizes(1, 1, interpret=False)[:2] == (1, 16)
    br, bl, _ = block_sizes(1000, 1000, interpret=True)
    assert bl <= 64 and br * bl <= 512


# Compiles the kernel for sm_90 without a GPU (TRITON_INTERPRET off, in a subprocess), which
# catches what the interpreter lets through (non-constexpr globals, inline asm), and reports
# features of the PTX: 128-bit loads and MUFU lg2/ex2.
_COMPILE_SM90 = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from geocap.kernels.triton_entropy import _entropy_kernel as fn
from_logits = json.loads(sys.argv[1])
const = dict(FROM_LOGITS=from_logits, HAS_MASK=True, NORMALIZED=True, BLOCK_R=2, BLOCK_L=2048, EVEN_L=True,
             FAST_LOG2=True, x_inner=1, x_stride_col=1, m_inner=1, m_stride_col=1)
ptrs = {"x_ptr": "*fp16", "mask_ptr": "*u8", "out_ptr": "*fp32"}
sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in fn.arg_names}
aligned = ("x_ptr", "mask_ptr", "out_ptr", "row_len", "x_stride_outer", "m_stride_outer")
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(json.dumps({k: k in kernel.asm["ptx"] for k in ("ld.global.v4", "lg2.approx", "ex2.approx")}))
"""
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernel for real")
@pytest.mark.parametrize("from_logits", [False, True])
def test_kernel_compiles_for_sm90(from_logits):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE_SM90, json.dumps(from_logits)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = json.loads(run.stdout.strip().splitlines()[-1])
    assert ptx["ld.global.v4"]  # vectorised loads of x and of the mask
    assert ptx["ex2.approx" if from_logits else "lg2.approx"]  # MUFU, not libdevice's polynomials


# ---- properties ---------------------------------------------------------------------------


def _draw(rows, length, seed, scale, device):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, generator=g) * scale
    mask = torch.rand(rows, length, generator=g) > 0.3
    return logits.to(device), mask.to(device)


shapes = dict(
    rows=st.integers(1, 4),
    length=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(**shapes)
def test_property_bounds(device, backend, rows, length, seed, scale):
    logits, mask = _draw(rows, length, seed, scale, device)
    n = mask.sum(-1).double().cpu()
    h = attention_entropy(logits, mask, from_logits=True, backend=backend).double().cpu()
    assert bool((h >= -TOL32).all()) and bool((h <= n.clamp(min=1).log() + TOL32).all())
    hn = attention_entropy(logits, mask, from_logits=True, normalized=True, backend=backend).cpu()
    assert bool((hn >= -TOL32).all()) and bool((hn <= 1 + TOL32).all())


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(**shapes)
def test_property_uniform_gives_log_n(device, backend, rows, length, seed, scale):
    _, mask = _draw(rows, length, seed, scale, device)
    n = mask.sum(-1, keepdim=True)
    probs = torch.where(mask, 1.0 / n.clamp(min=1), float("nan"))  # masked: garbage
    const = torch.full(mask.shape, scale * 1e3, device=device)  # any constant logit
    want = n.squeeze(-1).double().cpu().clamp(min=1).log()
    assert_close(attention_entropy(probs, mask, backend=backend), want)
    assert_close(attention_entropy(const, mask, from_logits=True, backend=backend), want)
    one = (n.squeeze(-1) > 1).double().cpu()
    assert_close(attention_entropy(probs, mask, normalized=True, backend=backend), one)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(**shapes)
def test_property_logits_equal_softmax_probs(device, backend, rows, length, seed, scale):
    logits, mask = _draw(rows, length, seed, scale, device)
    probs = logits.double().masked_fill(~mask, -math.inf).softmax(-1).nan_to_num(0.0).float()
    got = attention_entropy(logits, mask, from_logits=True, backend=backend)
    assert_close(got, attention_entropy(probs, mask, backend=backend).double().cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(**shapes, from_logits=st.booleans())
def test_property_permutation_invariant(device, backend, rows, length, seed, scale, from_logits):
    x, mask = _draw(rows, length, seed, scale, device)
    if not from_logits:
        x = x.softmax(-1)
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(seed)).to(device)
    got = attention_entropy(x[:, perm], mask[:, perm], from_logits=from_logits, backend=backend)
    assert_close(got, attention_entropy(x, mask, from_logits=from_logits, backend=backend).double().cpu())


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,mask,match",
    [
        ([[0.5, 0.5]], None, "^x must be a torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.int64), None, "^x must be a floating-point"),
        (torch.tensor(0.5), None, "^x must have at least one dimension"),
        (torch.rand(2, 3), [[True] * 3] * 2, "^mask must be a torch.Tensor"),
        (torch.rand(2, 3), torch.ones(2, 3), "^mask must be a bool tensor"),
        (torch.rand(2, 3), torch.ones(2, dtype=torch.bool), "^mask of shape"),
        (torch.rand(2, 3), torch.ones(2, 2, 3, dtype=torch.bool), "^mask of shape"),
        (torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool, device="meta"), "^mask is on meta"),
    ],
)
def test_bad_arguments(x, mask, match):
    with pytest.raises(ValueError, match=match):
        attention_entropy(x, mask, backend="torch")


def test_bad_backend(device, monkeypatch):
    with pytest.raises(ValueError, match="^backend must be one of"):
        attention_entropy(torch.rand(2, 3, device=device), backend="cuda")
    with pytest.raises(ValueError, match="^x has dtype float64, which the Triton kernel"):
        attention_entropy(torch.rand(2, 3, dtype=torch.float64, device=device), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="^backend='triton' needs CUDA tensors"):
        attention_entropy(torch.rand(2, 3), backend="triton")  # a CPU tensor without the interpreter


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, from the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalized", [False, True])
def test_bad_values_raise(device, backend, normalized):
    def check(x, match, **kw):
        with pytest.raises(ValueError, match=match):
            attention_entropy(x.to(device), normalized=normalized, backend=backend, **kw)

    p = torch.full((3, 70), 1 / 70)
    for bad in (-0.01, float("nan"), float("inf")):
        q = p.clone()
        q[1, 66] = bad
        what = r"negative probabilities \(x\[1, 66\] = -0.01\)" if bad < 0 else r"NaN or infinite probabilities"
        check(q, "^x holds " + what)
        check(q[1:2, 66:67], "^x holds ")  # a single entry: normalized would give 0 without care
    for bad in (float("nan"), float("inf"), -float("inf")):
        s = torch.zeros(3, 70)
        s[2, 3] = bad
        check(s, r"^x holds NaN or infinite logits \(x\[2, 3\]", from_logits=True)
    check(torch.full((2, 4), 3e38), "^x row \\[0\\] has a non-finite entropy")  # finite, but p log p overflows
    # the same values under a mask are not read at all
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, 66] = False
    q = p.clone()
    q[1, 66] = float("nan")
    attention_entropy(q.to(device), mask.to(device), normalized=normalized, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_without_the_finiteness_check_does_not_synchronise(backend):
    """check_finite=False: no host read (bad rows come back NaN instead of raising); the default
    still raises. The Triton output is allocated without a memset (torch.empty): every row is stored."""
    from geocap.kernels.op_count import count_ops

    x = torch.softmax(torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)), -1)
    x[1, 2, 3] = float("nan")
    with count_ops() as counts:
        out = attention_entropy(x, backend=backend, check_finite=False)
    assert counts.syncs == 0, counts.summary()
    if backend == "triton":
        assert counts.kernels == 0 and counts.triton_launches == 1, counts.summary()
    assert torch.isnan(out[1, 2]) and torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        attention_entropy(x, backend=backend)
