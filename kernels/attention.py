"""Public attention ops: ``geo_attention`` (ORT's geometry-biased self-attention) and
``attention`` (the same kernel family without geometry), dispatched to Triton or PyTorch.

Shapes: q ``[B, H, Nq, d]``, k and v ``[B, H, Nk, d]``; boxes ``[B, N, 4]`` normalised
(x1, y1, x2, y2); wg_weight ``[H, 64]``, wg_bias ``[H]`` (ORT's per-head ``Linear(64 -> 1)``);
attention_mask ``[B, Nk]`` bool, True = attend to this key (a real object), False = padding (as
Hugging Face's ``attention_mask``; the opposite of torch's ``key_padding_mask``, where True means
ignore). ``key_padding_mask``, this argument's name before, is still accepted for one release as
a deprecated alias with the same values (DeprecationWarning; both at once is a TypeError).

Both return :class:`AttentionResult` ``(out, entropy, probs)``: ``out`` ``[B, H, Nq, d]`` in q's
dtype; ``entropy`` ``[B, H, Nq]`` (nats, per query row, of the attention distribution before
dropout) and ``probs`` ``[B, H, Nq, Nk]`` (before dropout) are None unless asked for, float32
(float64 for float64 inputs) and detached: they are diagnostics, not differentiable outputs.
A query row whose keys are all padded attends to nothing: out 0, probs 0, entropy 0. Padded
boxes may hold anything; padded keys and values must be finite (weight 0 times NaN is NaN; the
PyTorch path adds the mask to the scores, so a NaN key leaks there too, while the Triton kernel
replaces masked scores).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._backend import resolve_backend
from .deprecation import renamed_argument
from .torch_attention import torch_attention
from .validation import (KERNEL_DTYPES, check_attention_mask, check_boxes, check_embedding, check_geometry_weights,
                         check_qkv, require_dtype, require_same_device)


class AttentionResult(NamedTuple):
    out: torch.Tensor
    entropy: Optional[torch.Tensor]
    probs: Optional[torch.Tensor]


def _check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _run(backend, device, q, k, v, boxes, wg_weight, wg_bias, attention_mask, causal, dropout_p,
         return_entropy, return_probs, embedding="ort") -> AttentionResult:
    chosen = resolve_backend(backend, device)
    if chosen == "triton":
        require_dtype("q", q, KERNEL_DTYPES)
        from .triton_attention import triton_attention
        fn = triton_attention
    else:
        fn = torch_attention
    out, entropy, probs = fn(q, k, v, boxes=boxes, wg_weight=wg_weight, wg_bias=wg_bias,
                             attention_mask=attention_mask, causal=causal, dropout_p=dropout_p,
                             return_entropy=return_entropy, return_probs=return_probs, embedding=embedding)
    return AttentionResult(out, entropy, probs)


@renamed_argument("key_padding_mask", "attention_mask")
def geo_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask=None, *, dropout_p=0.0,
                  return_entropy=False, return_probs=False, backend="auto", embedding="ort") -> AttentionResult:
    """ORT attention: ``softmax(QK^T / sqrt(d) [padded keys -1e9] + log(clamp(relu(E W_g^T + b_g), 1e-6))) V``.

    The geometry is computed from ``boxes`` inside the op (float32; never an ``[N, N, 64]``
    tensor). Gradients flow to q, k, v, wg_weight and wg_bias; boxes take none. ``dropout_p``
    drops attention weights (keep-scaled), as ORT does in training; pass 0 in evaluation.
    ``embedding`` picks the box embedding E: ``"ort"`` (ORT's, which sees only |offset| between
    centres) or ``"signed"`` (the signed centre offsets, so a layout and its mirror image differ);
    kernels/geometry.py defines both. ``attention_mask [B, N]`` bool, True = real object (attended
    to and its box checked), False = padding; None = all real.
    """
    check_embedding(embedding)
    check_qkv(q, k, v, same_length=True)
    batch, heads, n, _ = q.shape
    check_attention_mask(attention_mask, batch, n)
    check_geometry_weights(wg_weight, wg_bias, heads)
    device = q.device
    if not (k.device == device == v.device == boxes.device == wg_weight.device == wg_bias.device
            and (attention_mask is None or attention_mask.device == device)):
        require_same_device(dict(q=q, k=k, v=v, boxes=boxes, wg_weight=wg_weight, wg_bias=wg_bias,
                                 attention_mask=attention_mask))
    check_boxes(boxes, batch, n, attention_mask)
    return _run(backend, device, q, k, v, boxes, wg_weight, wg_bias, attention_mask, False, _check_dropout(dropout_p),
                return_entropy, return_probs, embedding)


@renamed_argument("key_padding_mask", "attention_mask")
def attention(q, k, v, attention_mask=None, *, causal=False, dropout_p=0.0, return_entropy=False,
              return_probs=False, backend="auto") -> AttentionResult:
    """Scaled-dot-product attention with key padding and optional causal masking (bottom-right
    aligned: query i sees keys ``j <= i + Nk - Nq``), for decoder self- and cross-attention.
    ``attention_mask [B, Nk]`` bool, True = attend to this key, False = padding; None = all keys."""
    check_qkv(q, k, v, same_length=False)
    check_attention_mask(attention_mask, q.shape[0], k.shape[2])
    device = q.device
    if not (k.device == device == v.device and (attention_mask is None or attention_mask.device == device)):
        require_same_device(dict(q=q, k=k, v=v, attention_mask=attention_mask))
    return _run(backend, device, q, k, v, None, None, None, attention_mask, bool(causal), _check_dropout(dropout_p),
                return_entropy, return_probs)
