"""attention_entropy against an independent float64 NumPy/SciPy reference, on both backends.

Tolerances: the reference is computed in float64 from the values x actually holds (after its
rounding to fp16/bf16/fp32), so input rounding is no source of error; what remains is float32
arithmetic: a few roundings per term (u = 6e-8; ~2^-22 for a GPU's approximate lg2/ex2) and
~log2(L) more in each tree reduction, relative to sum |terms| ~ H + O(1). That is ~1e-6 at these
sizes (observed on CPU: < 1e-6). RTOL = ATOL = 1e-5 keeps a 10x margin and still catches real
bugs (a lost term or a wrong mask moves H by far more); float64 gets 1e-12.
"""
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import entr

import geocap.kernels.entropy as entropy_mod
from geocap.kernels.entropy import attention_entropy
import geocap.kernels.triton_entropy as triton_entropy_mod
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


# ---- persistent grid ---------------------------------------------------------------------


@contextlib.contextmanager
def count_stores(out):
    """Under the interpreter: yields a per-element count of the kernel's stores into ``out`` (CPU
    tensors reach the kernel in their own storage). Compiled on a GPU: yields None (values only)."""
    if out.is_cuda or not triton_entropy_mod.interpreter_requested():
        yield None
        return
    from triton.runtime.interpreter import interpreter_builder

    counts = np.zeros(out.numel(), np.int64)
    base, end = out.data_ptr(), out.data_ptr() + 4 * out.numel()
    store = interpreter_builder.create_masked_store

    def counted_store(ptrs, value, mask, cache_policy):
        addr = ptrs.data[mask.data.astype(bool)].astype(np.int64)
        hit = addr[(addr >= base) & (addr < end)]
        np.add.at(counts, (hit - base) // 4, 1)
        return store(ptrs, value, mask, cache_policy)

    assert "create_masked_store" not in vars(interpreter_builder)  # a method of its class, shadowed here
    interpreter_builder.create_masked_store = counted_store
    try:
        yield counts
    finally:
        del interpreter_builder.create_masked_store


def check_each_row_once(launch, x, mask, *, block_r, programs, from_logits, normalized):
    """``launch`` (``triton_attention_entropy`` or a mutant) into a NaN-filled ``out``: every row
    must match the reference (a skipped row stays NaN) and be stored exactly once (a block
    walked twice stores its rows twice)."""
    out = torch.full(x.shape[:-1], float("nan"), device=x.device)
    with count_stores(out) as stores:
        got = launch(x, mask, from_logits=from_logits, normalized=normalized, block_r=block_r, block_l=16,
                     programs=programs, out=out)
    assert got is out
    assert_close(got, reference(x, mask, from_logits, normalized))
    if stores is not None:
        assert stores.tolist() == [1] * out.numel(), f"stores per row: {stores.tolist()}"


# (rows, BLOCK_R, programs): blocks per program uneven and the last block partial (7 rows, 4
# blocks, 3 programs: 2, 1, 1), more programs allowed than blocks, one row, one-row blocks over
# 4 programs (3, 3, 3, 2), no rows
GRIDS = [(7, 2, 3), (5, 2, 8), (1, 2, 2), (11, 1, 4), (0, 2, 2)]


@pytest.mark.parametrize("rows,block_r,programs", GRIDS)
def test_persistent_grid_stores_every_row_once(device, rows, block_r, programs):
    # L = 20: a whole and a partial 16-wide tile per row
    x, mask = make((rows, 20), device, from_logits=True, masked=True, seed=rows)
    for from_logits, m, normalized in ((False, None, False), (True, mask, True)):
        xx = x if from_logits else x.softmax(-1)
        check_each_row_once(triton_attention_entropy, xx, m, block_r=block_r, programs=programs,
                            from_logits=from_logits, normalized=normalized)


@pytest.mark.parametrize("from_logits", [False, True])
def test_persistent_grid_strided_rows_and_broadcast_mask(device, from_logits):
    base, _ = make((3, 4, 24), device, from_logits=from_logits, seed=5)
    x = base.permute(1, 0, 2)[..., 2:22]                # [4, 3, 20]: two row levels, row stride 24
    assert x.stride() == (24, 96, 1)
    mask = (torch.rand(4, 1, 20, generator=torch.Generator().manual_seed(2)) > 0.3).to(device)  # broadcast
    for m in (None, mask):
        # 12 rows in 6 blocks over 4 programs (2, 2, 1, 1)
        check_each_row_once(triton_attention_entropy, x, m, block_r=2, programs=4,
                            from_logits=from_logits, normalized=m is not None)


def _mutant(tmp_path, old: str, new: str):
    """kernels/triton_entropy.py with ``old`` replaced by ``new`` (exactly once), imported as a
    module of geocap.kernels (its relative imports resolve); returns its triton_attention_entropy."""
    src = Path(triton_entropy_mod.__file__).read_text()
    assert src.count(old) == 1, f"{old!r} must occur once in the kernel"
    name = f"_entropy_mutant_{abs(hash(new))}"
    path = tmp_path / f"{name}.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location(f"geocap.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.triton_attention_entropy


# the stride of the persistent loop, one too long (program p misses block p + P: rows stay NaN)
# and one too short (P - 1 programs' strides still cover every block, and some blocks twice: the
# values are right, the store count is not)
@pytest.mark.skipif(not triton_entropy_mod.interpreter_requested(), reason="store counts need the interpreter")
@pytest.mark.parametrize("wrong,caught", [("tl.num_programs(0) + 1", "not close"),  # row 6 left NaN
                                          ("tl.num_programs(0) - 1", "stores per row")])  # rows 4, 5 twice
def test_persistent_grid_check_fails_on_a_wrong_stride(tmp_path, wrong, caught):
    stride = "tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0))"
    launch = _mutant(tmp_path, stride, stride.replace("tl.num_programs(0)", wrong))
    x, _ = make((7, 20), "cpu", from_logits=False)
    with pytest.raises(AssertionError, match=caught):
        check_each_row_once(launch, x, None, block_r=2, programs=3, from_logits=False,
                            normalized=False)
    # the unmutated module passes the same check
    check_each_row_once(_mutant(tmp_path, stride, stride), x, None, block_r=2, programs=3,
                        from_logits=False, normalized=False)


def test_launch_arguments_are_checked(device):
    x = torch.rand(3, 5, device=device)
    with pytest.raises(ValueError, match="^programs must be >= 1"):
        triton_attention_entropy(x, programs=0)
    with pytest.raises(ValueError, match=r"^out must be a contiguous float32 tensor of shape \(3,\)"):
        triton_attention_entropy(x, out=torch.empty(3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="^out must be"):
        triton_attention_entropy(x, out=torch.empty(3, 2, device=device)[:, 0])


def test_program_count():
    if triton_entropy_mod.interpreter_requested():
        assert triton_entropy_mod.max_programs(torch.device("cpu")) == triton_entropy_mod.INTERPRETER_PROGRAMS
        triton_attention_entropy(torch.rand(3, 5))
        assert triton_entropy_mod.tuned_config() is None  # the interpreter runs the fixed tile, never tunes
    if torch.cuda.is_available() and not triton_entropy_mod.interpreter_requested():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert triton_entropy_mod.max_programs(torch.device("cuda", 0)) == triton_entropy_mod.PROGRAMS_PER_SM * sms


# ---- autotuned configurations --------------------------------------------------------------


def loads_16_bytes(block_r: int, block_l: int, num_warps: int, element_size: int) -> bool:
    """At least one full 16-byte vector per thread of a tile: elements per thread x bytes >= 16."""
    return block_r * block_l // (32 * num_warps) * element_size >= 16


def tuned(row_len: int):
    """The autotuner's candidate configurations for rows of ``row_len``, as tuples."""
    configs = triton_entropy_mod._tune_tiles(triton_entropy_mod._entropy_tuned.configs, {"row_len": row_len})
    return [(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_L"], c.num_warps) for c in configs]


def test_tuned_configs_keep_16_byte_loads_and_follow_the_bucket():
    assert not loads_16_bytes(1, 1024, 8, 2)  # the rule catches a too small tile: 4 fp16 = 8 bytes per thread
    tiles = [(br * bl, w) for br, bl, w in tuned(2048)]
    assert tiles == list(triton_entropy_mod.TUNED_TILES) and 2 <= len(tiles) <= 6
    for length in (1, 16, 49, 100, 777, 2048, 2049, 100_000):
        configs = tuned(length)
        assert [(br * bl, w) for br, bl, w in configs] == tiles      # the tile's size and warps do not move
        for br, bl, w in configs:
            assert loads_16_bytes(br, bl, w, 2) and bl <= triton_entropy_mod.MAX_BLOCK_L
            assert bl == max(16, min(triton.next_power_of_2(length), triton_entropy_mod.MAX_BLOCK_L, br * bl))
    # one cached choice per bucket: the shapes depend on the row length only through it
    bucket = triton_entropy_mod.row_bucket
    for lengths in ((1025, 1500, 2048), (2049, 5000, 100_000), (1, 9, 16)):
        assert len({bucket(n) for n in lengths}) == 1 and len({tuple(tuned(n)) for n in lengths}) == 1
    assert bucket(1024) != bucket(1025)
    key = triton_entropy_mod._entropy_tuned.keys
    assert "row_bucket" in key and "FROM_LOGITS" in key  # (dtypes of x and mask: added by triton)


def test_autotuned_path_runs_every_candidate_correctly(device, monkeypatch):
    # The tuned path on any device: its benchmarker replaced by one that checks each candidate's
    # result (EVEN_L from the candidate's BLOCK_L, the grid from its BLOCK_R) and makes the last
    # candidate win, which the next call with the same key then reuses without tuning.
    tuner = triton_entropy_mod._entropy_tuned
    monkeypatch.setattr(triton_entropy_mod, "_autotuned", lambda x, block_r, block_l: block_r is None)
    monkeypatch.setattr(tuner, "cache", {})
    x, mask = make((5, 40), device, from_logits=True, masked=True, seed=4)
    want = reference(x, mask, True, True)
    timed = []

    def bench(kernel_call, quantiles):
        kernel_call()
        out = tuner.nargs["out_ptr"]
        assert_close(out, want)
        out.fill_(float("nan"))              # the next candidate must write every row again
        timed.append(len(timed))
        return [10.0 - len(timed)] * 3

    monkeypatch.setitem(vars(tuner), "do_bench", bench)      # (a cached_property: not read first)
    got = triton_attention_entropy(x, mask, from_logits=True, normalized=True)
    assert_close(got, want)
    assert len(timed) == len(triton_entropy_mod.TUNED_TILES)
    last = triton_entropy_mod._tune_tiles(tuner.configs, {"row_len": 40})[-1]
    assert triton_entropy_mod.tuned_config() == dict(last.kwargs, num_warps=last.num_warps) == \
        {"BLOCK_R": 128, "BLOCK_L": 64, "num_warps": 8}
    got = triton_attention_entropy(x[:3, :33], mask[:3, :33], from_logits=True, normalized=True)  # same bucket
    assert len(timed) == len(triton_entropy_mod.TUNED_TILES)  # no second tuning
    assert_close(got, reference(x[:3, :33], mask[:3, :33], True, True))


# Compiles the kernel for sm_90 without a GPU (TRITON_INTERPRET off, in a subprocess), which
# catches what the interpreter lets through (non-constexpr globals, inline asm), and reports
# features of the PTX: 128-bit loads and MUFU lg2/ex2.
_COMPILE_SM90 = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from geocap.kernels.triton_entropy import _entropy_kernel as fn
from_logits, tiles = json.loads(sys.argv[1])
for block_r, block_l, warps in tiles:
    const = dict(FROM_LOGITS=from_logits, HAS_MASK=True, NORMALIZED=True, BLOCK_R=block_r, BLOCK_L=block_l,
                 EVEN_L=True, FAST_LOG2=True, x_inner=1, x_stride_col=1, m_inner=1, m_stride_col=1)
    ptrs = {"x_ptr": "*fp16", "mask_ptr": "*u8", "out_ptr": "*fp32"}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in fn.arg_names}
    aligned = ("x_ptr", "mask_ptr", "out_ptr", "row_len", "x_stride_outer", "m_stride_outer")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    target = GPUTarget("cuda", 90, 32)
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=target, options={"num_warps": warps})
    print(json.dumps({k: kernel.asm["ptx"].count(k) for k in ("ld.global.v4", "lg2.approx", "ex2.approx")}))
"""
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernel for real")
@pytest.mark.parametrize("from_logits,tiles", [
    # the fixed GPU tile; autotuned: the largest tile, and short rows stacked 256 high
    (False, [(2, 2048, 4), (4, 2048, 8), (256, 16, 4)]),
    (True, [(2, 2048, 4)]),
])
def test_kernel_compiles_for_sm90(from_logits, tiles):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE_SM90, json.dumps([from_logits, tiles])]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()[-len(tiles):]
    for (block_r, block_l, warps), line in zip(tiles, lines, strict=True):
        ptx = json.loads(line)
        # 16-byte loads per thread and tile: elements per thread x 2 bytes of fp16 x, x 1 byte of
        # mask, over 16 (32 elements in these tiles: 4 loads of x and 2 of the mask, in flight together)
        per_thread = block_r * block_l // (32 * warps)
        assert ptx["ld.global.v4"] >= per_thread * 2 // 16 + per_thread // 16, (block_r, block_l, warps, ptx)
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
