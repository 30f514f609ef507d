"""Triton kernel of ``attention_entropy``: blocks of ``BLOCK_R`` rows, a loop over each row in
``BLOCK_L`` tiles, fp32 accumulation, fp16/bf16/fp32 read natively.

The grid is persistent: ``P = min(row blocks, programs)`` programs are launched and program
``p`` handles row blocks ``p, p + P, p + 2P, ...`` (every block exactly once). On a GPU
``programs`` is ``PROGRAMS_PER_SM`` times the SM count; under the interpreter it is
``INTERPRETER_PROGRAMS``, small, so that the tests walk several blocks per program. On a GPU the
tile shape and warps are autotuned (:data:`TUNED_TILES`); under the interpreter, and when the
caller passes ``block_r``/``block_l``, one fixed configuration (:func:`block_sizes`) is used.

Rows of ``x`` ``[..., L]`` are addressed without copies whenever the leading dims collapse to
at most two (size, stride) levels: row ``r`` starts at
``(r // inner) * stride_outer + (r % inner) * stride_inner`` (one level: ``inner = 1``, so the
division folds away at compile time). That covers contiguous tensors, slices of the last axis,
``[A, B, L]`` views with A and B swapped, and broadcast masks such as ``[B, 1, 1, L]``
(expanded with zero strides); anything else is copied once.

Probabilities accumulate ``sum p log2 p`` (scaled by ln 2 once per row); logits run the shared
online softmax of ``triton_online.py``. NaN, infinite or negative inputs make the row's result
NaN/inf, which the caller detects on the output.

Cost on sm_90 (SASS of the compiled kernel, 2048-long fp16 rows): ~10.5 instructions per
element for probabilities, below the ~14 per element at which instruction issue would cap
HBM bandwidth; ~20 for logits (the online softmax's exp and three row reductions per tile), so
logits are bound by instruction issue at roughly 2/3 of HBM bandwidth.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._backend import interpreter_requested
from .op_count import triton_launch
from .triton_online import NEG_INIT, online_softmax_finish, online_softmax_step

# Probabilities below this are treated as this inside log2 (their p log p is < 1e-28 anyway):
# keeps p log p finite where the GPU's approximate log2 / flush-to-zero meets subnormals.
_TINY_P = tl.constexpr(1.0e-30)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _entropy_kernel(
    x_ptr, mask_ptr, out_ptr, n_rows, row_len, row_bucket,
    x_inner, x_stride_outer, x_stride_inner, x_stride_col,
    m_inner, m_stride_outer, m_stride_inner, m_stride_col,
    FROM_LOGITS: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, EVEN_L: tl.constexpr, FAST_LOG2: tl.constexpr,
):
    """Entropies of rows ``[0, n_rows)`` into ``out_ptr``; ``row_bucket`` is only the autotuner's key."""
    # persistent grid: program p takes row blocks p, p + P, p + 2P, ... (P = programs launched)
    for block in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        _entropy_rows(
            block * BLOCK_R + tl.arange(0, BLOCK_R), x_ptr, mask_ptr, out_ptr, n_rows, row_len,
            x_inner, x_stride_outer, x_stride_inner, x_stride_col,
            m_inner, m_stride_outer, m_stride_inner, m_stride_col,
            FROM_LOGITS, HAS_MASK, NORMALIZED, BLOCK_R, BLOCK_L, EVEN_L, FAST_LOG2,
        )


@triton.jit
def _entropy_rows(
    rows, x_ptr, mask_ptr, out_ptr, n_rows, row_len,
    x_inner, x_stride_outer, x_stride_inner, x_stride_col,
    m_inner, m_stride_outer, m_stride_inner, m_stride_col,
    FROM_LOGITS: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, EVEN_L: tl.constexpr, FAST_LOG2: tl.constexpr,
):
    """One block: the entropies of ``rows`` (``[BLOCK_R]`` row indices, some may be ``>= n_rows``)."""
    row_ok = rows < n_rows
    # Rows past the end re-read the last row (their results are not stored): loads need no
    # row mask, and with EVEN_L no mask at all, which saves selects on every element.
    rows = tl.minimum(rows, n_rows - 1)
    # int32 division (folded away when inner == 1, the usual one-level case), int64 offsets
    x_rows = x_ptr + (rows // x_inner).to(tl.int64) * x_stride_outer
    x_rows += (rows % x_inner).to(tl.int64) * x_stride_inner
    if HAS_MASK:
        m_rows = mask_ptr + (rows // m_inner).to(tl.int64) * m_stride_outer
        m_rows += (rows % m_inner).to(tl.int64) * m_stride_inner
    cols0 = tl.arange(0, BLOCK_L)

    m_i = tl.full([BLOCK_R], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    t_i = tl.zeros([BLOCK_R], tl.float32)
    plogp = tl.zeros([BLOCK_R], tl.float32)
    count = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, row_len, BLOCK_L):
        cols = start + cols0
        x_ptrs = x_rows[:, None] + cols[None, :] * x_stride_col
        # x is loaded under the bounds mask only, so the load stays vectorised; the user's mask
        # is applied afterwards (and so masked NaNs never reach the arithmetic).
        if EVEN_L:
            valid = tl.full([1, BLOCK_L], 1, tl.int1)
            v = tl.load(x_ptrs).to(tl.float32)
        else:
            valid = (cols < row_len)[None, :]
            v = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(m_rows[:, None] + cols[None, :] * m_stride_col, mask=valid, other=0)
            valid = valid & (keep != 0)
            if NORMALIZED:
                count += tl.sum(valid.to(tl.int32), 1)
        if FROM_LOGITS:
            m_i, _alpha, _p, l_i, t_i = online_softmax_step(m_i, l_i, t_i, v, valid)
        else:
            if HAS_MASK:
                v = tl.where(valid, v, 0.0)
            # p log2 p: 0 for p = 0 (and -0); log2 of a negative p or NaN is NaN and stays
            arg = tl.where(v >= 0.0, tl.maximum(v, _TINY_P), v)
            if FAST_LOG2:  # one MUFU op instead of libdevice's ~25-instruction log2f
                lg = tl.inline_asm_elementwise(
                    "lg2.approx.ftz.f32 $0, $1;", "=f,f", [arg], dtype=tl.float32, is_pure=True, pack=1
                )
            else:
                lg = tl.log2(arg)
            plogp += tl.sum(v * lg, 1)

    if FROM_LOGITS:
        _lse, h = online_softmax_finish(m_i, l_i, t_i)
    else:
        h = -_LN2 * plogp
    if NORMALIZED:
        if HAS_MASK:
            n = count.to(tl.float32)
        else:
            n = tl.zeros([BLOCK_R], tl.float32) + row_len
        # h * 0 rather than 0: a NaN of a bad row with fewer than two valid entries stays visible
        h = tl.where(n > 1.0, h / tl.log(tl.maximum(n, 2.0)), h * 0.0)
    tl.store(out_ptr + rows, h, mask=row_ok)


def _fast_log2(device: torch.device) -> bool:
    """Use PTX ``lg2.approx.ftz.f32`` (one MUFU op; abs. error ~2^-22, so < 2e-7 nats on H)?

    Only on NVIDIA GPUs: ``tl.log2`` compiles to libdevice's exact log2f (~25 instructions per
    element), which would make the probabilities kernel instruction-bound at about half of HBM
    bandwidth. ``.ftz`` is safe because the argument is clamped to >= 1e-30, a normal float.
    Inline assembly does not run under the interpreter (nor on ROCm): they keep ``tl.log2``.
    """
    return device.type == "cuda" and torch.version.hip is None and not interpreter_requested()


# Persistent grid: at most this many programs per SM on a GPU (4 programs of 4 or 8 warps = 16-32
# warps, a quarter to half of an H100 SM's 64, each thread with 2-8 16-byte loads of one tile in
# flight; not measured against other counts: the GPU benchmark sweeps 1-8), and this many
# programs under the interpreter, where programs run one after another and the count only
# decides how many row blocks each one walks.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 2
MAX_BLOCK_L = 2048                      # on a GPU; rows longer than this loop over tiles
# Autotuned on a GPU: (elements per tile, num_warps). A tile's elements per thread are
# tile / (32 * num_warps): 2048 / 128 = 16, 4096 / 128 = 32, 4096 / 256 = 16, 8192 / 256 = 32;
# times the element size that is 32-64 bytes per thread of fp16/bf16 and 64-128 of fp32, i.e.
# 2-8 16-byte loads per thread and tile, issued together (the compiled PTX has 128-bit loads for
# these shapes: tests/test_entropy.py::test_kernel_compiles_for_sm90). The tile's shape follows
# the row length (:func:`fit_tile`) and does not change these counts. The 16-element tiles
# spread each tile's row reductions over half as many elements as the fixed tile (whose ~10.5
# instructions per element, module docstring, were counted at 32): the tuner measures whether
# that costs bandwidth.
TUNED_TILES = ((2048, 4), (4096, 4), (4096, 8), (8192, 8))


def fit_tile(tile: int, row_len: int, max_cols: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_L)`` of a ``tile``-element tile (power of two >= 16) for rows of ``row_len``.

    A row fits one tile up to ``min(max_cols, tile)`` entries, shorter rows are stacked
    ``BLOCK_R`` high, so ``BLOCK_R * BLOCK_L == tile``; ``BLOCK_L`` depends on ``row_len`` only
    through its bucket (:func:`row_bucket`).
    """
    block_l = max(16, min(triton.next_power_of_2(max(row_len, 1)), max_cols, tile))
    return max(1, tile // block_l), block_l


def row_bucket(row_len: int) -> int:
    """The autotuner's row-length key: ``next_power_of_2`` in ``[16, 2 * MAX_BLOCK_L]`` (longer rows
    share the last bucket: they all loop over ``MAX_BLOCK_L``-wide tiles)."""
    return max(16, min(triton.next_power_of_2(max(row_len, 1)), 2 * MAX_BLOCK_L))


def block_sizes(n_rows: int, row_len: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """The fixed ``(BLOCK_R, BLOCK_L, num_warps)`` for ``n_rows`` rows of ``row_len`` entries.

    Used under the interpreter (where autotuning would time every configuration, slowly) and on
    a GPU when the caller fixes ``block_r`` / ``block_l``. On a GPU: tiles of up to 4096
    elements with 4 warps, rows up to 2048 long in one tile, shorter rows stacked ``BLOCK_R``
    high. 32 elements per thread amortise the per-tile row reductions (SASS for sm_90: ~10.5
    instructions per element on fp16 probabilities, under the ~14 that HBM bandwidth allows) and
    keep 64 bytes of fp16 per thread in flight (four 16-byte loads). Under the interpreter tiles
    stay small (at most 64 columns, 512 elements) so that the tests walk several tiles per row
    cheaply. ``BLOCK_R`` never exceeds the row count rounded up to a power of two.
    """
    if interpret is None:
        interpret = interpreter_requested()
    max_cols, max_tile = (64, 512) if interpret else (MAX_BLOCK_L, 4096)
    block_r, block_l = fit_tile(max_tile, row_len, max_cols)
    return min(block_r, triton.next_power_of_2(max(n_rows, 1))), block_l, 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device: torch.device) -> int:
    """Programs of the persistent grid: ``PROGRAMS_PER_SM`` x SMs (cached per device) on a GPU,
    ``INTERPRETER_PROGRAMS`` under the interpreter."""
    if device.type != "cuda" or interpreter_requested():
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _tune_tiles(configs, named_args, **kwargs):
    """Autotuner hook: shape each tile of :data:`TUNED_TILES` for the call's row length."""
    shaped = {}
    for config in configs:
        block_r, block_l = fit_tile(config.kwargs["BLOCK_R"] * config.kwargs["BLOCK_L"], named_args["row_len"],
                                    MAX_BLOCK_L)
        shaped[(block_r, block_l, config.num_warps)] = triton.Config(
            {"BLOCK_R": block_r, "BLOCK_L": block_l}, num_warps=config.num_warps)
    return list(shaped.values())


# EVEN_L (no column masks) follows from the chosen BLOCK_L, on both paths
_entropy_launch = triton.heuristics({"EVEN_L": lambda a: a["row_len"] % a["BLOCK_L"] == 0})(_entropy_kernel)
# GPU: tuned once per (row-length bucket, mode, dtypes of x and mask: triton adds the dtypes of
# tensor arguments to the key); the tile's shape depends on the row length only through the
# bucket, so one cached choice serves the whole bucket. Tuning times each candidate with
# do_bench (about 0.1 s each, synchronising: not inside CUDA-graph capture); ``.best_config``
# is the configuration of the last call (:func:`tuned_config`, which the benchmark records).
_entropy_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_R": tile // MAX_BLOCK_L, "BLOCK_L": MAX_BLOCK_L}, num_warps=w)
             for tile, w in TUNED_TILES],
    key=["row_bucket", "FROM_LOGITS", "HAS_MASK", "NORMALIZED"],
    prune_configs_by={"early_config_prune": _tune_tiles},
)(_entropy_launch)


def tuned_config() -> dict | None:
    """``{"BLOCK_R", "BLOCK_L", "num_warps"}`` that the autotuner chose for the last tuned launch;
    None before one (and under the interpreter, which never tunes)."""
    best = getattr(_entropy_tuned, "best_config", None)
    return None if best is None else dict(best.kwargs, num_warps=best.num_warps)


def _autotuned(x: torch.Tensor, block_r: int | None, block_l: int | None) -> bool:
    """Take the autotuned kernel: compiled on a GPU, tile not fixed by the caller."""
    return x.is_cuda and not interpreter_requested() and block_r is None and block_l is None


def _row_layout(t: torch.Tensor):
    """``(t, inner, stride_outer, stride_inner, stride_col)`` addressing the rows of ``t`` ``[..., L]``.

    Leading dims are merged where their strides allow; if more than two levels remain, ``t``
    is copied to contiguous memory (one level).
    """
    levels: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == size * stride:
            levels[-1] = [levels[-1][0] * size, stride]
        else:
            levels.append([size, stride])
    if len(levels) > 2 or abs(t.stride(-1)) * t.shape[-1] >= 2**31:  # (column offsets are int32)
        return _row_layout(t.contiguous())
    (_, outer_stride), (inner, inner_stride) = (levels + [[1, 0]] * (2 - len(levels)))[:2]
    return t, inner, outer_stride, inner_stride, t.stride(-1)


def triton_attention_entropy(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    from_logits: bool = False,
    normalized: bool = False,
    block_r: int | None = None,
    block_l: int | None = None,
    programs: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel on checked inputs: ``x`` ``[..., L]`` (fp16/bf16/fp32), ``mask`` None or
    bool broadcastable to ``x``. Returns float32 ``x.shape[:-1]``; bad values come back as NaN/inf.

    On a GPU the tile configuration is autotuned (the first call of a row-length bucket, mode
    and dtype times :data:`TUNED_TILES`, which synchronises); ``block_r`` / ``block_l`` (powers
    of two) fix it instead, with :func:`block_sizes` filling in the one not given, as under the
    interpreter. ``programs`` caps the persistent grid (default :func:`max_programs`). ``out``
    (float32, contiguous, ``x.shape[:-1]``) is written in full and returned; by default it is a
    new ``torch.empty``.
    """
    length = x.shape[-1]
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1 (the persistent grid's size), got {programs}")
    if out is None:
        out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)   # every row is stored: no memset
    elif (out.shape != x.shape[:-1] or out.dtype != torch.float32 or not out.is_contiguous()
          or out.device != x.device):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(x.shape[:-1])} on {x.device}, "
                         f"got {str(out.dtype).replace('torch.', '')} {tuple(out.shape)} on {out.device}")
    if out.numel() == 0:
        return out
    if length == 0:                                  # no valid entry: entropy 0
        return out.zero_()
    x_args = _row_layout(x)
    if mask is None:
        m_args = (x_args[0], 1, 0, 0, 0)  # not read: HAS_MASK is off
    else:
        m_args = _row_layout(mask.expand(x.shape).view(torch.uint8))
    n_rows = out.numel()
    cap = programs or max_programs(x.device)
    grid = lambda meta: (min(triton.cdiv(n_rows, meta["BLOCK_R"]), cap),)   # noqa: E731
    args = (x_args[0], m_args[0], out, n_rows, length, row_bucket(length), *x_args[1:], *m_args[1:])
    flags = dict(FROM_LOGITS=from_logits, HAS_MASK=mask is not None, NORMALIZED=normalized,
                 FAST_LOG2=_fast_log2(x.device))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext(), triton_launch():
        if _autotuned(x, block_r, block_l):
            _entropy_tuned[grid](*args, **flags)
        else:
            br, bl, warps = block_sizes(n_rows, length)
            _entropy_launch[grid](*args, **flags, BLOCK_R=block_r or br, BLOCK_L=block_l or bl, num_warps=warps)
    return out
