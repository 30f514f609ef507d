"""Triton kernel of ``attention_entropy``: one program per ``BLOCK_R`` rows, a loop over the
row in ``BLOCK_L`` tiles, fp32 accumulation, fp16/bf16/fp32 read natively.

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
    x_ptr, mask_ptr, out_ptr, n_rows, row_len,
    x_inner, x_stride_outer, x_stride_inner, x_stride_col,
    m_inner, m_stride_outer, m_stride_inner, m_stride_col,
    FROM_LOGITS: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, EVEN_L: tl.constexpr, FAST_LOG2: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
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


def block_sizes(n_rows: int, row_len: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_L, num_warps)`` for ``n_rows`` rows of ``row_len`` entries.

    On a GPU a program streams tiles of up to 4096 elements with 4 warps: rows up to 2048 long
    fit one tile, shorter rows are stacked ``BLOCK_R`` high. 32 elements per thread amortise
    the per-tile row reductions (SASS for sm_90: ~10.5 instructions per element on fp16
    probabilities, under the ~14 that HBM bandwidth allows) and keep 64 bytes per thread in
    flight. Under the interpreter tiles stay small (at most 64 columns) so that the tests walk
    several tiles per row cheaply.
    """
    if interpret is None:
        interpret = interpreter_requested()
    max_cols, max_tile = (64, 512) if interpret else (2048, 4096)
    block_l = max(16, min(triton.next_power_of_2(max(row_len, 1)), max_cols))
    block_r = max(1, min(max_tile // block_l, triton.next_power_of_2(max(n_rows, 1))))
    return block_r, block_l, 4


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
) -> torch.Tensor:
    """Launch the kernel on checked inputs: ``x`` ``[..., L]`` (fp16/bf16/fp32), ``mask`` None or
    bool broadcastable to ``x``. Returns float32 ``x.shape[:-1]``; bad values come back as NaN/inf.

    ``block_r`` / ``block_l`` (powers of two) override :func:`block_sizes`, for tests.
    """
    length = x.shape[-1]
    if length == 0:                                  # no valid entry: entropy 0
        return torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)   # every row is stored: no memset
    if out.numel() == 0:
        return out
    x_args = _row_layout(x)
    if mask is None:
        m_args = (x_args[0], 1, 0, 0, 0)  # not read: HAS_MASK is off
    else:
        m_args = _row_layout(mask.expand(x.shape).view(torch.uint8))
    br, bl, warps = block_sizes(out.numel(), length)
    br, bl = block_r or br, block_l or bl
    grid = (triton.cdiv(out.numel(), br),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext(), triton_launch():
        _entropy_kernel[grid](
            x_args[0], m_args[0], out, out.numel(), length,
            *x_args[1:], *m_args[1:],
            FROM_LOGITS=from_logits, HAS_MASK=mask is not None, NORMALIZED=normalized,
            BLOCK_R=br, BLOCK_L=bl, EVEN_L=length % bl == 0, FAST_LOG2=_fast_log2(x.device), num_warps=warps,
        )
    return out

