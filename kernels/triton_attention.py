"""Triton kernels for geometry-biased attention (ORT) and plain attention: forward, backward,
and the torch.autograd.Function that ties them together.

Forward (one program per (query block, batch*head)): for each key tile, the geometry logit
``x = emb(boxes_i, boxes_j) . W_g[h] + b_g[h]`` is computed in registers from the BM query and
BN key boxes it loads (never an N x N or N x N x 64 tensor in memory): all four channel groups
(dx, dy from the box edges, dw, dh as ORT's log(w_i / w_j)) take sin/cos per pair. (The dw/dh
channels are separable into per-box factors, which saves half the sin/cos, but that form's
rounding does not cancel for equal sizes and missed eager near the log floor on degenerate and
identical boxes.) ``log(max(x, 1e-6))`` joins the scaled
scores, then the online softmax (kernels/triton_online.py) with its entropy accumulator, the
optional dropout, and ``P @ V``. The log-sum-exp is stored for the backward.

Backward: ``dk, dv`` and per-block partial sums of ``dW_g, db_g`` (one program per key block,
reduced afterwards: deterministic, no float atomics), then ``dq`` (one program per query block).
Dropout regenerates the same counter-based (Philox) mask from (seed, head, row, column).

All arithmetic is fp32 on fp16/bf16/fp32 inputs; dots of fp32 inputs use IEEE precision (not
TF32) so the fp32 path is as accurate as eager fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._backend import interpreter_requested
from .geometry import geometry_frequencies
from .op_count import triton_launch
from .triton_math import sincos
from .triton_online import NEG_INIT, online_softmax_finish, online_softmax_step


# --------------------------------------------------------------------------------------------
# Geometry inside a tile
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, mask, F32: tl.constexpr):
    """Load a q/k/v/dO tile; ``F32`` upcasts it (bf16 under the interpreter, which has no bf16 dot)."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_boxes(Boxes, b, offs, N, Mask, HAS_MASK: tl.constexpr):
    """``(xs, ys, w, h)`` of boxes ``offs`` of image ``b``: ``xs`` ``[n, 2]`` = (x1, x2) and ``ys`` = (y1, y2)
    (centre offsets are taken from the edges, kernels/geometry.py ``coordinate_offset``); ORT's sizes
    w = x2 - x1 + 1, h likewise. Boxes are fp32 [B, N, 4]; padded ones (``Mask`` 0) read as zeros, as
    kernels/geometry.py ``zero_padded_boxes`` makes them (they may hold anything, NaN included)."""
    inside = offs < N
    if HAS_MASK:
        inside = inside & (tl.load(Mask + b * N + offs, mask=offs < N, other=0) != 0)
    base = Boxes + (b * N + offs) * 4
    x1 = tl.load(base + 0, mask=inside, other=0.0)
    y1 = tl.load(base + 1, mask=inside, other=0.0)
    x2 = tl.load(base + 2, mask=inside, other=0.0)
    y2 = tl.load(base + 3, mask=inside, other=0.0)
    return tl.join(x1, x2), tl.join(y1, y2), x2 - x1 + 1.0, y2 - y1 + 1.0


@triton.jit
def _query_block_geometry(Boxes, WgW, WgB, b, h, offs_m, NQ, Freq, Mask, HAS_GEO: tl.constexpr,
                          HAS_MASK: tl.constexpr):
    """Per-query-block, per-head geometry: ``(xs, ys, w, h, bias)`` (edges and sizes as in
    ``_load_boxes``, ``bias`` = b_g[h]). Scalars 0 stand in for every value when ``HAS_GEO`` is off."""
    if HAS_GEO:
        xs, ys, w, hh = _load_boxes(Boxes, b, offs_m, NQ, Mask, HAS_MASK)
        return xs, ys, w, hh, tl.load(WgB + h)
    else:
        return 0.0, 0.0, 0.0, 0.0, 0.0


@triton.jit
def _key_block_geometry(Boxes, b, offs_n, NK, Freq, Mask, HAS_GEO: tl.constexpr, HAS_MASK: tl.constexpr):
    """``(xs, ys, w, h)`` of a key block (as in ``_load_boxes``; scalars 0 when ``HAS_GEO`` is off)."""
    if HAS_GEO:
        return _load_boxes(Boxes, b, offs_n, NK, Mask, HAS_MASK)
    else:
        return 0.0, 0.0, 0.0, 0.0


@triton.jit
def _near_arg(q_edges, qsize, k_edges, SIGNED: tl.constexpr):
    """``100 * dx`` ``[BM, BN]`` for the query and key x edges ``[n, 2]`` (x1, x2) and query widths
    ``qsize``; the same for dy with the y edges and heights. The centre offset is
    ``((x1_i - x1_j) + (x2_i - x2_j)) / 2``, exact for nearby boxes where a difference of rounded centres
    cancels. ORT: log of the clamped |offset| / size of the query box; ``SIGNED``:
    ``asinh(offset / size / 2e-3)`` (kernels/geometry.py, ``SIGNED_OFFSET_SCALE``)."""
    q_lo, q_hi = tl.split(q_edges)
    k_lo, k_hi = tl.split(k_edges)
    u = ((q_lo[:, None] - k_lo[None, :]) + (q_hi[:, None] - k_hi[None, :])) * 0.5 / qsize[:, None]
    if SIGNED:
        z = u / 2e-3
        # asinh|z| = log1p(y), y = |z| + z^2 / (1 + sqrt(z^2 + 1)) (|z| <= ~510: z^2 cannot overflow);
        # log1p(y) = log(1 + y) y / ((1 + y) - 1) corrects the rounding of 1 + y (Goldberg), which
        # log(|z| + sqrt(z^2 + 1)) leaves in (with it, fp32 db_g missed float64 by up to 3x more)
        a = tl.abs(z)
        y = a + a * a / (1.0 + tl.sqrt(a * a + 1.0))
        one_plus_y = 1.0 + y
        rounded_y = one_plus_y - 1.0
        d = tl.where(rounded_y == 0.0, y, tl.log(one_plus_y) * (y / tl.where(rounded_y == 0.0, 1.0, rounded_y)))
        return tl.where(z < 0.0, -d, d) * 100.0
    else:
        return tl.log(tl.maximum(tl.abs(u), 1e-3)) * 100.0


@triton.jit
def _size_arg(qsize, ksize):
    """``100 * dw`` ``[BM, BN]`` = 100 log(w_i / w_j) as ORT computes it (likewise dh with heights):
    per pair, not from separable per-box factors, whose rounding (eps x |100 f log w| per factor)
    does not cancel for equal sizes, where ORT's sin(0) and cos(0) are exact; near the log floor of
    the geometry logit that difference showed (degenerate and identical boxes)."""
    return tl.log(qsize[:, None] / ksize[None, :]) * 100.0


@triton.jit
def _near_logit(x, arg, wrow, Freq):
    """Add one pairwise channel group (dx or dy: its 8 sin and 8 cos weights at ``wrow`` and
    ``wrow + 32``) to the geometry logit ``x``."""
    for kk in range(8):
        sin_a, cos_a = sincos(arg * tl.load(Freq + kk))
        x += tl.load(wrow + kk) * sin_a + tl.load(wrow + 32 + kk) * cos_a
    return x


@triton.jit
def _geometry_logit(qxs, qys, qw, qh, kxs, kys, kw, kh, WgW, bias, h, Freq, SIGNED: tl.constexpr):
    """Head ``h``'s geometry logit ``x`` ``[BM, BN]`` before relu / clamp / log: the four channel
    groups (dx, dy, dw, dh; weights at columns 0, 8, 16, 24 and +32 for the cosines) per pair."""
    x = tl.zeros(qw.shape, tl.float32)[:, None] + tl.zeros(kw.shape, tl.float32)[None, :] + bias
    row = WgW + h * 64
    x = _near_logit(x, _near_arg(qxs, qw, kxs, SIGNED), row, Freq)
    x = _near_logit(x, _near_arg(qys, qh, kys, SIGNED), row + 8, Freq)
    x = _near_logit(x, _size_arg(qw, kw), row + 16, Freq)
    x = _near_logit(x, _size_arg(qh, kh), row + 24, Freq)
    return x


@triton.jit
def _dropout_keep(Seed, bh, offs_m, offs_n, NK, dropout_p):
    """Keep-mask ``[BM, BN]``: Philox stream per (seed, batch*head), counter = row * NK + column; the
    seed is read from device memory (``Seed``, int64 [1]), so a captured CUDA graph draws a new
    mask on each replay (torch.randint on the device advances the captured generator)."""
    rnd = tl.rand(tl.load(Seed) + bh * 1000003, offs_m[:, None] * NK + offs_n[None, :])
    return rnd >= dropout_p


@triton.jit
def _logits(q, k, sm_scale, qxs, qys, qw, qh, bias, kxs, kys, kw, kh, WgW, h, Freq,
            HAS_GEO: tl.constexpr, DOT_PRECISION: tl.constexpr, SIGNED: tl.constexpr):
    """``(s, x)``: the attention logits ``[BM, BN]`` (scaled scores plus log-geometry) and the
    geometry logit ``x`` they include (``s`` itself when ``HAS_GEO`` is off)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
    x = s
    if HAS_GEO:
        x = _geometry_logit(qxs, qys, qw, qh, kxs, kys, kw, kh, WgW, bias, h, Freq, SIGNED)
        s += tl.log(tl.maximum(x, 1e-6))
    return s, x


@triton.jit
def _valid(offs_m, offs_n, b, NQ, NK, Mask, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    valid = (offs_n[None, :] < NK) & (offs_m[:, None] >= 0)
    if HAS_MASK:
        km = tl.load(Mask + b * NK + offs_n, mask=offs_n < NK, other=0)
        valid = valid & (km != 0)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
    return valid


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Ent, Probs, Boxes, WgW, WgB, Freq, Mask,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, NQ, NK, sm_scale, dropout_p, Seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_GEO: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    RETURN_ENT: tl.constexpr, RETURN_PROBS: tl.constexpr, DOT_PRECISION: tl.constexpr, F32: tl.constexpr,
    SIGNED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # int64 base offsets (q, k, v may hold over 2**31 elements); offsets within a (batch, head) stay int32
    K_bh = K + (b.to(tl.int64) * skb + h.to(tl.int64) * skh)
    Q_bh = Q + (b.to(tl.int64) * sqb + h.to(tl.int64) * sqh)
    V_bh = V + (b.to(tl.int64) * svb + h.to(tl.int64) * svh)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q_bh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   row_ok[:, None] & d_ok[None, :], F32)
    qxs, qys, qw, qh, bias = _query_block_geometry(Boxes, WgW, WgB, b, h, offs_m, NQ, Freq, Mask, HAS_GEO,
                                                                      HAS_MASK)

    m_i = tl.zeros([BM], dtype=tl.float32) + NEG_INIT
    l_i = tl.zeros([BM], dtype=tl.float32)
    t_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BM + NK - NQ)
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        kv_ok = (offs_n < NK)[:, None] & d_ok[None, :]
        k = _load_tile(K_bh + offs_n[:, None] * skn + offs_d[None, :] * skd, kv_ok, F32)
        kxs, kys, kw, kh = _key_block_geometry(Boxes, b, offs_n, NK, Freq, Mask, HAS_GEO, HAS_MASK)
        s, _x = _logits(q, k, sm_scale, qxs, qys, qw, qh, bias, kxs, kys, kw, kh, WgW, h, Freq,
                        HAS_GEO, DOT_PRECISION, SIGNED)
        valid = _valid(offs_m, offs_n, b, NQ, NK, Mask, HAS_MASK, CAUSAL)
        m_i, alpha, p, l_i, t_i = online_softmax_step(m_i, l_i, t_i, s, valid, RETURN_ENT)
        if DROPOUT:
            keep = _dropout_keep(Seed, bh, offs_m, offs_n, NK, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = _load_tile(V_bh + offs_n[:, None] * svn + offs_d[None, :] * svd, kv_ok, F32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    lse, ent = online_softmax_finish(m_i, l_i, t_i)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (b.to(tl.int64) * sob + h.to(tl.int64) * soh) + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * NQ + offs_m, lse, mask=row_ok)
    if RETURN_ENT:
        tl.store(Ent + bh * NQ + offs_m, ent, mask=row_ok)
    if RETURN_PROBS:
        # second pass: the normalised weights, now that the log-sum-exp is known
        for start_n in range(0, NK, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < NK
            k = _load_tile(K_bh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                           n_ok[:, None] & d_ok[None, :], F32)
            kxs, kys, kw, kh = _key_block_geometry(Boxes, b, offs_n, NK, Freq, Mask, HAS_GEO, HAS_MASK)
            s, _x = _logits(q, k, sm_scale, qxs, qys, qw, qh, bias, kxs, kys, kw, kh, WgW, h, Freq,
                            HAS_GEO, DOT_PRECISION, SIGNED)
            valid = _valid(offs_m, offs_n, b, NQ, NK, Mask, HAS_MASK, CAUSAL)
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            # int64 base: B * H * NQ * NK reaches 2**31 for dump-sized batches (NQ * NK stays int32)
            tl.store(Probs + bh.to(tl.int64) * NQ * NK + offs_m[:, None] * NK + offs_n[None, :], p,
                     mask=row_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _near_weight_grads(dx, arg, Freq, g_near, first: tl.constexpr):
    """Add ``sum_ij dx_ij sin/cos(f_k arg_ij)`` to channels ``first + k`` / ``32 + first + k`` of ``g_near`` [64]."""
    cols = tl.arange(0, 64)
    for kk in range(8):
        sin_a, cos_a = sincos(arg * tl.load(Freq + kk))
        g_near += tl.where(cols == first + kk, tl.sum(tl.sum(dx * sin_a, 1), 0), 0.0)
        g_near += tl.where(cols == 32 + first + kk, tl.sum(tl.sum(dx * cos_a, 1), 0), 0.0)
    return g_near


@triton.jit
def _geometry_weight_grads(dx, qxs, qys, qw, qh, kxs, kys, kw, kh, Freq, g_w, SIGNED: tl.constexpr):
    """Add one tile's contribution to dL/dW_g ``[64]`` given ``dx = dL/dx`` ``[BM, BN]``: every channel
    from its per-pair argument, as the forward computes it."""
    g_w = _near_weight_grads(dx, _near_arg(qxs, qw, kxs, SIGNED), Freq, g_w, 0)
    g_w = _near_weight_grads(dx, _near_arg(qys, qh, kys, SIGNED), Freq, g_w, 8)
    g_w = _near_weight_grads(dx, _size_arg(qw, kw), Freq, g_w, 16)
    g_w = _near_weight_grads(dx, _size_arg(qh, kh), Freq, g_w, 24)
    return g_w


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, DW, DB, Boxes, WgW, WgB, Freq, Mask,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    H, NQ, NK, sm_scale, dropout_p, Seed, N_KBLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_GEO: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, F32: tl.constexpr, SIGNED: tl.constexpr,
):
    """dK, dV (stored with q's strides layout [B, H, NK, d] contiguous) and this key block's
    partial dW_g ``[64]`` / db_g for its (batch, head)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # int64 base offsets (q, k, v may hold over 2**31 elements); offsets within a (batch, head) stay int32
    DO_bh = DO + (b.to(tl.int64) * sdb + h.to(tl.int64) * sdh)
    K_bh = K + (b.to(tl.int64) * skb + h.to(tl.int64) * skh)
    Q_bh = Q + (b.to(tl.int64) * sqb + h.to(tl.int64) * sqh)
    V_bh = V + (b.to(tl.int64) * svb + h.to(tl.int64) * svh)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = (offs_n < NK)[:, None] & d_ok[None, :]
    k = _load_tile(K_bh + offs_n[:, None] * skn + offs_d[None, :] * skd, kv_ok, F32)
    v = _load_tile(V_bh + offs_n[:, None] * svn + offs_d[None, :] * svd, kv_ok, F32)
    kxs, kys, kw, kh = _key_block_geometry(Boxes, b, offs_n, NK, Freq, Mask, HAS_GEO, HAS_MASK)
    dk = tl.zeros([BN, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BN, BLOCK_D], dtype=tl.float32)
    g_w = tl.zeros([64], dtype=tl.float32)
    g_bias = tl.zeros([BM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BN - (NK - NQ), 0) // BM * BM
    for start_m in range(lo, NQ, BM):
        offs_m = start_m + tl.arange(0, BM)
        row_ok = offs_m < NQ
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = _load_tile(Q_bh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, q_ok, F32)
        do = _load_tile(DO_bh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, q_ok, F32)
        lse = tl.load(Lse + bh * NQ + offs_m, mask=row_ok, other=-NEG_INIT)
        delta = tl.load(Delta + bh * NQ + offs_m, mask=row_ok, other=0.0)
        qxs, qys, qw, qh, bias = _query_block_geometry(
            Boxes, WgW, WgB, b, h, offs_m, NQ, Freq, Mask, HAS_GEO, HAS_MASK)
        s, x = _logits(q, k, sm_scale, qxs, qys, qw, qh, bias, kxs, kys, kw, kh, WgW, h, Freq,
                       HAS_GEO, DOT_PRECISION, SIGNED)
        valid = _valid(offs_m, offs_n, b, NQ, NK, Mask, HAS_MASK, CAUSAL)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        p_used = p
        if DROPOUT:
            keep = _dropout_keep(Seed, bh, offs_m, offs_n, NK, dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if HAS_GEO:
            dx = tl.where(x >= 1e-6, ds / tl.maximum(x, 1e-6), 0.0)
            g_w = _geometry_weight_grads(dx, qxs, qys, qw, qh, kxs, kys, kw, kh, Freq, g_w, SIGNED)
            g_bias += tl.sum(dx, 1)
    # dK and dV are written contiguous [B, H, NK, d]
    out_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    bh_offset = bh.to(tl.int64) * NK * HEAD_DIM
    tl.store(DK + bh_offset + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + bh_offset + out_offs, dv.to(DV.dtype.element_ty), mask=kv_ok)
    if HAS_GEO:
        part = bh * N_KBLOCKS + pid_n
        tl.store(DW + part * 64 + tl.arange(0, 64), g_w)
        tl.store(DB + part, tl.sum(g_bias, 0))


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, DQ, Lse, Delta, Boxes, WgW, WgB, Freq, Mask,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    H, NQ, NK, sm_scale, dropout_p, Seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_GEO: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, F32: tl.constexpr, SIGNED: tl.constexpr,
):
    """dQ for one query block (written contiguous [B, H, NQ, d])."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # int64 base offsets (q, k, v may hold over 2**31 elements); offsets within a (batch, head) stay int32
    DO_bh = DO + (b.to(tl.int64) * sdb + h.to(tl.int64) * sdh)
    K_bh = K + (b.to(tl.int64) * skb + h.to(tl.int64) * skh)
    Q_bh = Q + (b.to(tl.int64) * sqb + h.to(tl.int64) * sqh)
    V_bh = V + (b.to(tl.int64) * svb + h.to(tl.int64) * svh)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    q_ok = row_ok[:, None] & d_ok[None, :]
    q = _load_tile(Q_bh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, q_ok, F32)
    do = _load_tile(DO_bh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, q_ok, F32)
    lse = tl.load(Lse + bh * NQ + offs_m, mask=row_ok, other=-NEG_INIT)
    delta = tl.load(Delta + bh * NQ + offs_m, mask=row_ok, other=0.0)
    qxs, qys, qw, qh, bias = _query_block_geometry(Boxes, WgW, WgB, b, h, offs_m, NQ, Freq, Mask, HAS_GEO,
                                                                      HAS_MASK)
    dq = tl.zeros([BM, BLOCK_D], dtype=tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BM + NK - NQ)
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        kv_ok = (offs_n < NK)[:, None] & d_ok[None, :]
        k = _load_tile(K_bh + offs_n[:, None] * skn + offs_d[None, :] * skd, kv_ok, F32)
        v = _load_tile(V_bh + offs_n[:, None] * svn + offs_d[None, :] * svd, kv_ok, F32)
        kxs, kys, kw, kh = _key_block_geometry(Boxes, b, offs_n, NK, Freq, Mask, HAS_GEO, HAS_MASK)
        s, _x = _logits(q, k, sm_scale, qxs, qys, qw, qh, bias, kxs, kys, kw, kh, WgW, h, Freq,
                        HAS_GEO, DOT_PRECISION, SIGNED)
        valid = _valid(offs_m, offs_n, b, NQ, NK, Mask, HAS_MASK, CAUSAL)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(Seed, bh, offs_m, offs_n, NK, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + bh.to(tl.int64) * NQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_ok)


@triton.jit
def _dropout_mask_kernel(Keep, H, NQ, NK, dropout_p, Seed, BM: tl.constexpr, BN: tl.constexpr):
    """Materialise the keep-mask the attention kernels use (for tests and inspection)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    for start_n in range(0, NK, BN):
        offs_n = start_n + tl.arange(0, BN)
        keep = _dropout_keep(Seed, bh, offs_m, offs_n, NK, dropout_p)
        tl.store(Keep + bh.to(tl.int64) * NQ * NK + offs_m[:, None] * NK + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m < NQ)[:, None] & (offs_n < NK)[None, :])


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------
def _pow2_at_least_16(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def gpu_block_config(head_dim: int, backward: bool = False, fp32: bool = False):
    """``(BM, BN, num_warps)`` for large N on a GPU.

    Chosen from ``ptxas -v`` on sm_90 (kernels/compile_check.py; bench/RESULTS.md has the
    table): the largest tiles that compile without register spills for fp16/bf16, with the
    geometry, mask and dropout on. fp32 inputs take IEEE (non-tensor-core) dots whose operand
    tiles live in registers: smaller tiles, and the fp32 backward still spills. Not yet timed
    on a GPU.
    """
    if fp32 and (backward or head_dim > 64):
        return 32, 32, 8
    if backward:
        return (32, 32, 8) if head_dim > 64 else (64, 32, 8)
    return (64, 32, 8) if head_dim > 64 else (64, 64, 8)


def block_config(n_queries: int, n_keys: int, head_dim: int, backward: bool = False, fp32: bool = False):
    """``(BM, BN, num_warps)``: 16 x 16 under the interpreter (fast on CPU); on a GPU
    :func:`gpu_block_config`, shrunk to the next power of two of small N."""
    if interpreter_requested():
        return 16, 16, 4
    bm, bn, warps = gpu_block_config(head_dim, backward, fp32)
    return _pow2_at_least_16(n_queries, bm), _pow2_at_least_16(n_keys, bn), warps


def _upcast_in_kernel(dtype: torch.dtype) -> bool:
    """The Triton interpreter has no bf16 dot and rounds fp32 -> bf16 wrongly: there bf16 tiles
    are computed in fp32 and results are written to fp32 buffers that torch rounds."""
    return dtype == torch.bfloat16 and interpreter_requested()


def _strides(t):
    return [t.stride(i) for i in range(4)]


def dropout_keep_mask(batch, heads, n_queries, n_keys, dropout_p, seed, device) -> torch.Tensor:
    """The bool keep-mask ``[B, H, Nq, Nk]`` the kernels draw for ``(dropout_p, seed)``; ``seed`` an
    int64 ``[1]`` tensor (:func:`draw_dropout_seed`) or an int."""
    keep = torch.empty((batch, heads, n_queries, n_keys), dtype=torch.int8, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    if keep.numel():
        grid = (triton.cdiv(n_queries, 16), batch * heads)
        with triton_launch():
            _dropout_mask_kernel[grid](keep, heads, n_queries, n_keys, dropout_p, seed, BM=16, BN=16)
    return keep.bool()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _mask_bytes(attention_mask: torch.Tensor) -> torch.Tensor:
    """The bool mask as int8 without a copy (same bytes): the kernels read 0 / 1."""
    return attention_mask.contiguous().view(torch.int8)


# --------------------------------------------------------------------------------------------
# Registered ops: torch.compile, FakeTensorMode and CUDA-graph capture see them as opaque ops
# with known output shapes (their fake implementations), so nothing runs while tracing.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("geocap::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boxes: Optional[torch.Tensor],
                  wg_weight: Optional[torch.Tensor], wg_bias: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], causal: bool,
                  dropout_p: float, return_entropy: bool, return_probs: bool, signed: bool,
                  fp32_out: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward kernel: ``(out [B, H, Nq, d], lse [B, H, Nq], entropy [B, H, Nq] or [0],
    probs [B, H, Nq, Nk] or [0])``. ``out`` is float32 when ``fp32_out`` (the backward's delta
    for dW_g / db_g) or bf16 under the interpreter, else q's dtype; the rest float32.
    ``seed``: int64 ``[1]`` on q's device when ``dropout_p > 0``."""
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    has_geo = boxes is not None
    f32 = _upcast_in_kernel(q.dtype)
    out = torch.empty((batch, heads, nq, d), dtype=_out_dtype(q.dtype, fp32_out), device=q.device)
    lse = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    ent = torch.empty((batch, heads, nq) if return_entropy else (0,), dtype=torch.float32, device=q.device)
    probs = torch.empty((batch, heads, nq, nk) if return_probs else (0,), dtype=torch.float32, device=q.device)
    freq = geometry_frequencies(dtype=torch.float32, device=q.device)
    geo = (_f32(boxes), _f32(wg_weight), _f32(wg_bias)) if has_geo else (freq,) * 3
    mask = _mask_bytes(attention_mask) if attention_mask is not None else freq
    bm, bn, warps = block_config(nq, nk, d, fp32=q.dtype == torch.float32)
    grid = (triton.cdiv(nq, bm), batch * heads)
    with triton_launch():
        _fwd_kernel[grid](
            q, k, v, out, lse, ent, probs, *geo, freq, mask,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, nq, nk, 1.0 / math.sqrt(d), dropout_p, seed if dropout_p > 0 else lse,
            HEAD_DIM=d, BLOCK_D=_pow2_at_least_16(d, 256), BM=bm, BN=bn,
            HAS_GEO=has_geo, HAS_MASK=attention_mask is not None, CAUSAL=causal, DROPOUT=dropout_p > 0,
            RETURN_ENT=return_entropy, RETURN_PROBS=return_probs, DOT_PRECISION=_precision(q.dtype), F32=f32,
            SIGNED=signed, num_warps=warps,
        )
    return out, lse, ent, probs


def _out_dtype(dtype: torch.dtype, fp32_out: bool) -> torch.dtype:
    return torch.float32 if (fp32_out or _upcast_in_kernel(dtype)) else dtype


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if (dtype == torch.float32 or _upcast_in_kernel(dtype)) else "tf32"


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, boxes, wg_weight, wg_bias, attention_mask, seed, causal, dropout_p,
                        return_entropy, return_probs, signed, fp32_out):
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    return (q.new_empty((batch, heads, nq, d), dtype=_out_dtype(q.dtype, fp32_out)),
            q.new_empty((batch, heads, nq), dtype=torch.float32),
            q.new_empty((batch, heads, nq) if return_entropy else (0,), dtype=torch.float32),
            q.new_empty((batch, heads, nq, nk) if return_probs else (0,), dtype=torch.float32))


@torch.library.custom_op("geocap::attention_bwd", mutates_args=())
def attention_bwd(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, boxes: Optional[torch.Tensor], wg_weight: Optional[torch.Tensor],
                  wg_bias: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], causal: bool, dropout_p: float,
                  signed: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels: ``(dq, dk, dv, dW_g [H, 64] or [0], db_g [H] or [0])`` for ``d_out`` in
    the dtype ``out`` was stored in; dq/dk/dv in q's
    dtype (float32 under the interpreter's bf16), the geometry gradients float32. ``out`` is
    the forward's output as stored (float32 when geometry gradients are wanted)."""
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    has_geo = boxes is not None
    f32 = _upcast_in_kernel(q.dtype)
    # dW_g and db_g sum ds / x over every (query, key) pair, where each row of ds sums to 0 up
    # to delta's error; delta from the output rounded to fp16/bf16 made their error ~6x the
    # eager one (fp16, tests/test_attention_equivalence.py), so the forward stores it in float32
    # (and dO arrives in the stored dtype); the kernels take dO in q's dtype
    delta = (d_out.float() * out.float()).sum(-1)                                           # [B, H, NQ]
    d_out = d_out.to(q.dtype).contiguous()
    store_dtype = torch.float32 if f32 else q.dtype
    dq = torch.empty((batch, heads, nq, d), dtype=store_dtype, device=q.device)
    dk = torch.empty((batch, heads, nk, d), dtype=store_dtype, device=k.device)
    dv = torch.empty((batch, heads, nk, d), dtype=store_dtype, device=v.device)
    bm, bn, warps = block_config(nq, nk, d, backward=True, fp32=q.dtype == torch.float32)
    n_kblocks = triton.cdiv(nk, bn)
    if has_geo:
        dw_part = torch.empty((batch, heads, n_kblocks, 64), dtype=torch.float32, device=q.device)
        db_part = torch.empty((batch, heads, n_kblocks), dtype=torch.float32, device=q.device)
    else:
        dw_part = db_part = lse
    freq = geometry_frequencies(dtype=torch.float32, device=q.device)
    geo = (_f32(boxes), _f32(wg_weight), _f32(wg_bias)) if has_geo else (freq,) * 3
    mask = _mask_bytes(attention_mask) if attention_mask is not None else freq
    common = dict(HEAD_DIM=d, BLOCK_D=_pow2_at_least_16(d, 256), BM=bm, BN=bn, HAS_GEO=has_geo,
                  HAS_MASK=attention_mask is not None, CAUSAL=causal, DROPOUT=dropout_p > 0,
                  DOT_PRECISION=_precision(q.dtype), F32=f32, SIGNED=signed, num_warps=warps)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(d_out))
    sm_scale = 1.0 / math.sqrt(d)
    seed = seed if dropout_p > 0 else lse
    with triton_launch():
        _bwd_kv_kernel[(n_kblocks, batch * heads)](
            q, k, v, d_out, dk, dv, lse, delta, dw_part, db_part, *geo, freq, mask,
            *strides, heads, nq, nk, sm_scale, dropout_p, seed, n_kblocks, **common)
    with triton_launch():
        _bwd_q_kernel[(triton.cdiv(nq, bm), batch * heads)](
            q, k, v, d_out, dq, lse, delta, *geo, freq, mask,
            *strides, heads, nq, nk, sm_scale, dropout_p, seed, **common)
    if has_geo:
        return dq, dk, dv, dw_part.sum(dim=(0, 2)), db_part.sum(dim=(0, 2))
    empty = lse.new_empty((0,))
    return dq, dk, dv, empty, empty.clone()


@attention_bwd.register_fake
def _attention_bwd_fake(d_out, q, k, v, out, lse, boxes, wg_weight, wg_bias, attention_mask, seed, causal,
                        dropout_p, signed):
    store_dtype = torch.float32 if _upcast_in_kernel(q.dtype) else q.dtype
    heads = q.shape[1]
    has_geo = boxes is not None
    return (q.new_empty(q.shape, dtype=store_dtype), k.new_empty(k.shape, dtype=store_dtype),
            v.new_empty(v.shape, dtype=store_dtype),
            q.new_empty((heads, 64) if has_geo else (0,), dtype=torch.float32),
            q.new_empty((heads,) if has_geo else (0,), dtype=torch.float32))


_FWD_INPUTS = ("q", "k", "v", "boxes", "wg_weight", "wg_bias", "attention_mask", "seed", "causal", "dropout_p",
               "return_entropy", "return_probs", "signed", "fp32_out")


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FWD_INPUTS, inputs))
    out, lse = output[0], output[1]
    ctx.save_for_backward(named["q"], named["k"], named["v"], out, lse, named["boxes"], named["wg_weight"],
                          named["wg_bias"], named["attention_mask"], named["seed"])
    ctx.flags = (named["causal"], named["dropout_p"], named["signed"])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)             # entropy, probs and lse take no gradient: no zeros for them


def _backward(ctx, d_out, _d_lse, _d_ent, _d_probs):
    q, k, v, out, lse, boxes, wg_weight, wg_bias, mask, seed = ctx.saved_tensors
    causal, dropout_p, signed = ctx.flags
    with torch.no_grad():                       # first-order only: no autograd through the backward op
        dq, dk, dv, d_weight, d_bias = attention_bwd(d_out, q, k, v, out, lse, boxes, wg_weight, wg_bias, mask,
                                                     seed, causal, dropout_p, signed)
    if boxes is not None:
        d_weight, d_bias = d_weight.to(wg_weight.dtype), d_bias.to(wg_bias.dtype)
    else:
        d_weight = d_bias = None
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, d_weight, d_bias) + (None,) * 8


class _TritonAttention(torch.autograd.Function):
    """Autograd of the two registered ops, in ``setup_context`` style (torch.func.grad needs it).

    Not ``attention_fwd.register_autograd``: the Function that torch.library generates from it is
    legacy-style (``forward(ctx, ...)``), which torch.func.grad rejects ("must override
    setup_context", torch 2.13). torch.compile traces this Function and sees the ops as opaque
    nodes with fake implementations."""

    @staticmethod
    def forward(*inputs):
        return attention_fwd(*inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def draw_dropout_seed(device="cpu") -> torch.Tensor:
    """The Philox seed of one call: int64 ``[1]`` drawn on ``device`` by torch's generator for it
    (so torch.manual_seed makes dropout reproducible), never read on the host: a CUDA graph that
    captures the call draws a fresh seed on each replay."""
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def triton_attention(q, k, v, *, boxes=None, wg_weight=None, wg_bias=None, attention_mask=None,
                     causal=False, dropout_p=0.0, return_entropy=False, return_probs=False, embedding="ort"):
    """Inputs validated by the caller (kernels/attention.py); ``embedding`` "ort" or "signed" (the
    box embedding's dx/dy form, kernels/geometry.py); padded boxes (mask False) are ignored (read as
    zeros). Returns ``(out, entropy, probs)``."""
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    if batch * heads * nq == 0:
        return (q.new_zeros((batch, heads, nq, d)),
                q.new_zeros((batch, heads, nq), dtype=torch.float32) if return_entropy else None,
                q.new_zeros((batch, heads, nq, nk), dtype=torch.float32) if return_probs else None)
    has_geo = boxes is not None
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    fp32_out = has_geo and torch.is_grad_enabled() and (wg_weight.requires_grad or wg_bias.requires_grad)
    out, _lse, ent, probs = _TritonAttention.apply(q, k, v, boxes, wg_weight, wg_bias, attention_mask, seed, causal,
                                          float(dropout_p), return_entropy, return_probs,
                                          has_geo and embedding == "signed", fp32_out)
    return (out.to(q.dtype), ent.detach() if return_entropy else None, probs.detach() if return_probs else None)
