"""Eager ORT-style attention: the reference every other path is checked against.

This is how the ORT code computes attention, op by op: the ``[B, N, N, 64]`` box embedding,
one ``Linear(64 -> 1)`` per head, relu / clamp / log, ``QK^T / sqrt(d)``, padded keys set to
-1e9, the log-geometry term added, softmax, ``@ V``. It materialises everything, recomputes the
embedding per call and runs as geocap's model does: the geometry term in float32 (float64 for
float64 inputs) whatever the weights' dtype and outside autocast, like every geocap path, and the
attention itself in the inputs' dtype. So it serves three roles: with float64 inputs it is the
ground truth, at the inputs' own precision it measures the error an eager implementation makes
(the tests' tolerance), and it is the "eager" baseline of the benchmarks. (With the geometry
linear in bf16, as it was, the eager error of bf16 db_g was 24 % of |db_g| against 0.04 % for
geocap's paths, and the tests' 2x-eager tolerance let a db_g 40 % off pass.)

One deliberate difference from ORT: a query row whose keys are all padded attends to nothing
(output 0, probabilities 0) instead of spreading uniformly over padding, as in every other path;
and padded boxes count as zeros (they are not validated and may hold anything).
"""
from __future__ import annotations

import math

import torch

from .deprecation import renamed_argument
from .geometry import box_relation_embedding, compute_dtype, log_geometry_bias_from_logits, zero_padded_boxes

MASKED_SCORE = -1e9


def causal_keep(n_queries: int, n_keys: int, device=None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """``[stop - start, Nk]`` bool for query rows ``start:stop`` (default all ``Nq``): query i sees
    keys ``j <= i + Nk - Nq``, i.e. the last query is aligned with the last key (as in cached decoding)."""
    i = torch.arange(start, n_queries if stop is None else stop, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    return j <= i + (n_keys - n_queries)


def eager_geometry_log_bias(boxes, wg_weight, wg_bias, embedding="ort") -> torch.Tensor:
    """``[B, H, N, N]`` the ORT way: full embedding (ORT's, or the signed one), then the per-head
    linear; in float32 (float64 when any input is float64), never in autocast's dtype, as every
    geocap path."""
    ct = compute_dtype(torch.promote_types(boxes.dtype, wg_weight.dtype))
    with torch.autocast(boxes.device.type, enabled=False):
        emb = box_relation_embedding(boxes.to(ct), embedding=embedding)     # [B, N, N, 64]
        x = torch.nn.functional.linear(emb, wg_weight.to(ct), wg_bias.to(ct))  # [B, N, N, H]
        return log_geometry_bias_from_logits(x.permute(0, 3, 1, 2))


@renamed_argument("key_padding_mask", "attention_mask")
def reference_attention(q, k, v, boxes=None, wg_weight=None, wg_bias=None, attention_mask=None, *,
                        causal=False, dropout_keep=None, dropout_p=0.0, embedding="ort", log_bias=None):
    """Eager attention; returns ``(out [B, H, Nq, d], probs [B, H, Nq, Nk])``.

    With ``boxes``, ``wg_weight`` and ``wg_bias`` it is ORT's geometry attention (Nq == Nk), its
    box embedding chosen by ``embedding`` ("ort" or "signed"); without, plain scaled-dot-product
    attention. ``attention_mask`` (bool ``[B, Nk]``, True = attend to this key, False = padding;
    ``key_padding_mask`` is its deprecated alias) as in :func:`geocap.kernels.attention`.
    ``dropout_keep`` (bool ``[B, H, Nq, Nk]``)
    applies a given dropout mask with keep-scaling ``1 / (1 - dropout_p)``; ``probs`` are
    the attention weights before dropout. ``log_bias`` ``[B, H, Nq, Nk]``, when given, replaces the
    log-geometry term computed from the boxes (tests differentiate through it).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)[None, None]
    if causal:
        keep = keep & causal_keep(q.shape[-2], k.shape[-2], q.device)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :]
    scores = scores.masked_fill(~keep, max(MASKED_SCORE, torch.finfo(scores.dtype).min))
    if boxes is not None:
        if log_bias is None:
            boxes = zero_padded_boxes(boxes, attention_mask)
            log_bias = eager_geometry_log_bias(boxes, wg_weight, wg_bias, embedding)
        scores = scores + log_bias.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    weights = probs
    if dropout_keep is not None:
        weights = probs * dropout_keep / (1.0 - dropout_p)
    return weights @ v, probs
