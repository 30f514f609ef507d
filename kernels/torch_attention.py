"""The PyTorch path of geo_attention / attention: runs everywhere, memory bounded.

Queries are processed in blocks so no ``[B, H, N, N]`` scores tensor (and never a
``[B, N, N, 64]`` embedding) exists for large N; the geometry is computed per block with the
separable dw/dh channels (kernels/geometry.py) and shared across heads. fp16/bf16 inputs are
computed in float32, float64 in float64. Under autograd, large problems recompute each block in
the backward (activation checkpointing) so the backward is bounded too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .geometry import BoxFactors, block_log_bias, compute_dtype, scalar_constant
from .reference import MASKED_SCORE, causal_keep

# Temporaries per query block stay below about this many bytes.
BLOCK_BUDGET_BYTES = 64 * 2**20
# Above this many score elements the backward recomputes blocks instead of storing them.
CHECKPOINT_ABOVE_ELEMENTS = 2**22


def _query_block_size(batch: int, heads: int, n_keys: int, itemsize: int) -> int:
    # per query row: ~64 floats per key for the pairwise geometry (arguments, sin, cos, their
    # products) and ~8 [H, Nk] score-sized temporaries (geometry logits, bias, masks, softmax)
    per_row = batch * n_keys * itemsize * (64 + 8 * heads)
    return max(1, min(4096, BLOCK_BUDGET_BYTES // max(per_row, 1)))


def _block(q, k, v, keep_keys, qf, kf, wg_weight, wg_bias, q_start, n_queries, causal, dropout_p,
           want_probs, want_entropy, differentiating, sdpa_masks):
    """Attention of the query block ``q [B, H, m, d]`` (rows ``q_start:q_start + m``) over all keys.

    The log-geometry and the masks become one additive bias for
    ``F.scaled_dot_product_attention`` (fused softmax), except when differentiating on CPU,
    where plain ops are cheaper than SDPA's math fallback. ``sdpa_masks``: SDPA alone computes
    the block (:func:`torch_attention`), so masked keys get -inf and a row without any valid key
    comes out 0 from SDPA itself. Returns ``(out [B, H, m, d], probs [B, H, m, Nk] or None,
    entropy [B, H, m] or None)`` in the compute dtype.
    """
    m, n_keys = q.shape[-2], k.shape[-2]
    bias = None
    if qf is not None:
        bias = block_log_bias(qf, kf, wg_weight, wg_bias)
    keep = keep_keys                                                   # [B, 1, 1, Nk] or None
    if causal:
        keep_causal = causal_keep(n_queries, n_keys, q.device, q_start, q_start + m)
        keep = keep_causal[None, None] if keep is None else keep & keep_causal
    has_key = None
    if keep is not None:
        # unless SDPA alone masks (-inf, above), masked keys get the reference's finite -1e9, so a
        # row without any valid key gets finite (uniform) weights, zeroed below by one multiply: no
        # test of the mask on the host. Without a causal mask the caller zeroed the padded keys'
        # values instead (such a row then averages zeros), so only the weights, when wanted, need it
        if not sdpa_masks and (causal or want_probs or want_entropy):
            has_key = keep.any(-1, keepdim=True)
        masked = scalar_constant(-math.inf if sdpa_masks else MASKED_SCORE, q.dtype, q.device)
        bias = torch.where(keep, scalar_constant(0.0, q.dtype, q.device) if bias is None else bias, masked)
    if (want_probs or want_entropy) and not differentiating and dropout_p == 0:
        # the weights are wanted anyway (dumps, recorded decoding): one softmax serves the output
        # too, instead of SDPA's own plus a second for the weights
        logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        probs = torch.softmax(logits if bias is None else logits + bias, dim=-1)
        if has_key is not None:
            probs = probs * has_key
        entropy = torch.special.entr(probs).sum(-1) if want_entropy else None
        return probs @ v, (probs if want_probs else None), entropy
    if differentiating and q.device.type == "cpu":
        # SDPA's differentiable CPU path is its "math" fallback, which adds its own passes for
        # fully masked rows (handled above); the plain ops are cheaper to differentiate
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
        out = F.dropout(weights, dropout_p) @ v if dropout_p > 0 else weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if has_key is not None:
        out = out * has_key
    probs = entropy = None
    if want_probs or want_entropy:
        with torch.no_grad():
            logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            probs = torch.softmax(logits if bias is None else logits + bias, dim=-1)
            if has_key is not None:
                probs = probs * has_key
            entropy = torch.special.entr(probs).sum(-1) if want_entropy else None
    return out, (probs if want_probs else None), entropy


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipped when it is already (per-call overhead: this path serves tiny calls too)."""
    return t if t.dtype == dtype else t.to(dtype)


def torch_attention(q, k, v, *, boxes=None, wg_weight=None, wg_bias=None, attention_mask=None,
                    causal=False, dropout_p=0.0, return_entropy=False, return_probs=False, embedding="ort"):
    """Inputs validated by the caller; padded boxes (mask False) count as zeros; ``embedding`` is
    the box embedding's dx/dy form ("ort" or "signed", kernels/geometry.py). Returns
    ``(out, entropy, probs)``: out in q's dtype,
    entropy ``[B, H, Nq]`` and probs ``[B, H, Nq, Nk]`` in the compute dtype (or None)."""
    ct = compute_dtype(q.dtype)
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[-2]
    if causal and n_queries == 1 and n_keys >= 1:
        causal = False   # bottom-right aligned, one query sees every key: cached decoding's every step
    if n_queries == 0:
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        return out, (q.new_zeros(q.shape[:-1], dtype=ct) if return_entropy else None), (
            q.new_zeros((batch, heads, 0, n_keys), dtype=ct) if return_probs else None)
    qc, kc, vc = (q, k, v) if q.dtype == ct else (q.to(ct), k.to(ct), v.to(ct))   # one dtype (validated)
    geo = boxes is not None
    factors = wgw = wgb = keep_keys = None
    if geo:
        factors = BoxFactors(boxes, ct, embedding, attention_mask)
        wgw, wgb = _as(wg_weight, ct), _as(wg_bias, ct)
    differentiating = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, wg_weight, wg_bias))
    # SDPA alone on CPU (no weights wanted, nothing to differentiate) gives a row whose scores are
    # all -inf zeros (tests/test_attention_equivalence.py checks it): no values to zero, no
    # multiply. Elsewhere masked scores are the reference's finite -1e9
    sdpa_masks = not (return_probs or return_entropy or differentiating) and q.device.type == "cpu"
    if attention_mask is not None:
        keep_keys = attention_mask.view(batch, 1, 1, n_keys)
        if not (causal or sdpa_masks):
            # padded keys' values zeroed (one multiply): their weights are exactly 0 in any row with
            # a valid key, and a row without one (uniform weights) then gives 0, as the reference's
            # zeroed output (finite padding only: 0 x NaN is NaN, as in the reference)
            vc = vc * attention_mask.view(batch, 1, n_keys, 1)
    step = _query_block_size(batch, heads, n_keys, ct.itemsize)
    recompute = differentiating and batch * heads * n_queries * n_keys > CHECKPOINT_ABOVE_ELEMENTS
    if step >= n_queries and not recompute:   # one block, the common case: no lists, no joins
        out, prob, entropy = _block(qc, kc, vc, keep_keys, factors, factors, wgw, wgb, 0, n_queries, causal,
                                    dropout_p, return_probs, return_entropy, differentiating, sdpa_masks)
        return (_as(out, q.dtype), entropy.detach() if return_entropy else None,
                prob.detach() if return_probs else None)
    outs, probs, entropies = [], [], []
    for start in range(0, n_queries, step):
        stop = min(start + step, n_queries)
        whole = start == 0 and stop == n_queries
        args = (qc if whole else qc[:, :, start:stop], kc, vc, keep_keys,
                (factors if whole else factors.rows(start, stop)) if geo else None,
                factors, wgw, wgb, start, n_queries, causal, dropout_p, return_probs, return_entropy,
                differentiating, sdpa_masks)
        o, p, h = checkpoint(_block, *args, use_reentrant=False) if recompute else _block(*args)
        outs.append(o)
        entropies.append(h)
        probs.append(p)
    out = _as(torch.cat(outs, dim=-2), q.dtype)
    entropy = torch.cat(entropies, dim=-1).detach() if return_entropy else None
    prob = torch.cat(probs, dim=-2).detach() if return_probs else None
    return out, entropy, prob
