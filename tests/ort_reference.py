"""An independent re-implementation of ORT's teacher-forced forward, on ORT's own state dict.

This is the check of ``geocap.ort_import``: it reads the ORT-keyed state dict directly (the
names of Herdade et al.'s ``RelationTransformerModel``) and computes the log-probabilities with
plain torch ops in ORT's order, written from ORT's architecture, so it shares no code with
``geocap.model`` or ``geocap.kernels`` (it imports neither). It runs in whatever ``dtype`` it
is given (float32 to measure the error of ORT's own fp32 run, float64 as the ground truth).

What it reproduces, in ORT's order:

* ``att_embed``: [BatchNorm1d in eval mode (eps 1e-5) when ``use_bn``], Linear, ReLU (dropout is
  off in eval), applied to the real regions only; padded slots stay 0 (ORT's ``pack_wrapper``).
* The encoder: pre-norm sublayers ``x + sublayer(norm(x))`` with ORT's LayerNorm
  ``a_2 * (x - mean) / (std + 1e-6) + b_2`` (unbiased std); box self-attention with the
  relational embedding of ORT's ``BoxRelationalEmbedding`` (dim 64, wave_len 1000, trigonometric),
  one ``Linear(64 -> 1)`` per head (``WGs.h``), ``relu``, ``log(clamp(w_g, 1e-6))`` added to the
  scaled dot products whose padded keys were set to -1e9; with ``legacy_extra_skip`` the
  attention's value input is added before the output projection (``linears[3]``).
* The decoder: word embedding * sqrt(d_model) + sinusoidal positions; masked self-attention (key
  j visible to query i when j <= i and, as ORT's ``seq_mask``, the key token is not 0, position 0
  always visible), cross-attention over the real regions, feed-forward; final norm; generator
  ``log_softmax(proj(x))``.
"""
from __future__ import annotations

import math

import torch

LAYER_NORM_EPS = 1e-6
BATCH_NORM_EPS = 1e-5
DIM_G, WAVE_LEN = 64, 1000.0
MASK_FILL = -1e9


def _get(opt, name, default):
    return opt.get(name, default) if isinstance(opt, dict) else getattr(opt, name, default)


def layer_norm(x, p, prefix):
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)  # unbiased, as torch.Tensor.std
    return p[prefix + ".a_2"] * (x - mean) / (std + LAYER_NORM_EPS) + p[prefix + ".b_2"]


def linear(x, p, prefix):
    return x @ p[prefix + ".weight"].transpose(0, 1) + p[prefix + ".bias"]


def box_relational_embedding(boxes):
    """``boxes [B, N, 4]`` (x1, y1, x2, y2) -> ``[B, N, N, 64]`` exactly as ORT's utils."""
    b = boxes.shape[0]
    x_min, y_min, x_max, y_max = torch.chunk(boxes, 4, dim=-1)                  # each [B, N, 1]
    cx, cy = (x_min + x_max) * 0.5, (y_min + y_max) * 0.5
    w, h = (x_max - x_min) + 1.0, (y_max - y_min) + 1.0
    delta_x = torch.log(torch.clamp(torch.abs((cx - cx.view(b, 1, -1)) / w), min=1e-3))
    delta_y = torch.log(torch.clamp(torch.abs((cy - cy.view(b, 1, -1)) / h), min=1e-3))
    delta_w = torch.log(w / w.view(b, 1, -1))
    delta_h = torch.log(h / h.view(b, 1, -1))
    position = torch.stack([delta_x, delta_y, delta_w, delta_h], dim=-1)       # [B, N, N, 4]
    feat_range = torch.arange(DIM_G // 8, dtype=boxes.dtype, device=boxes.device)
    dim_mat = 1.0 / torch.pow(torch.tensor(WAVE_LEN, dtype=boxes.dtype), feat_range / (DIM_G / 8))
    mul = (100.0 * position)[..., None] * dim_mat                               # [B, N, N, 4, 8]
    mul = mul.reshape(*mul.shape[:3], -1)                                       # [B, N, N, 32]
    return torch.cat([torch.sin(mul), torch.cos(mul)], dim=-1)


def split_heads(x, heads):
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(p, prefix, q_in, kv_in, keep, heads, geometry=None, extra_skip=False):
    """ORT's MultiHeadedAttention / BoxMultiHeadedAttention; ``keep [B, 1 or Nq, Nk]`` bool."""
    q = split_heads(linear(q_in, p, prefix + ".linears.0"), heads)
    k = split_heads(linear(kv_in, p, prefix + ".linears.1"), heads)
    v = split_heads(linear(kv_in, p, prefix + ".linears.2"), heads)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None], MASK_FILL)
    if geometry is not None:
        w_g = torch.cat([linear(geometry, p, f"{prefix}.WGs.{h}") for h in range(heads)], dim=-1)  # [B, N, N, H]
        w_g = torch.relu(w_g.permute(0, 3, 1, 2))
        scores = torch.log(torch.clamp(w_g, min=1e-6)) + scores
    x = merge_heads(torch.softmax(scores, dim=-1) @ v)
    if extra_skip:
        x = kv_in + x  # ORT: `x = input_value + x`, before the output projection
    return linear(x, p, prefix + ".linears.3")


def sinusoid(length, d_model, dtype):
    position = torch.arange(length, dtype=dtype)[:, None]
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=dtype) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, dtype=dtype)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def ort_log_probs(state, opt, att_feats, boxes, att_masks, inputs, dtype=torch.float64):
    """ORT's teacher-forced log-probabilities.

    ``state``: ORT's state dict (``att_embed.*``, ``model.*``); ``opt``: a Namespace or dict with
    ``num_layers``, ``use_bn`` (0 or 1), ``legacy_extra_skip``; ``att_feats [B, N, D]``,
    ``boxes [B, N, 4]`` normalised, ``att_masks [B, N]`` (nonzero = real region);
    ``inputs [B, T]`` ORT token ids, column 0 the start token 0 (ORT's ``seq[:, :-1]``).
    Returns ``[B, T, V]`` in ``dtype``.
    """
    p = {k: v.to(dtype) for k, v in state.items() if v.is_floating_point()}
    layers = int(_get(opt, "num_layers", 6))
    use_bn = int(_get(opt, "use_bn", 0) or 0)
    extra_skip = bool(_get(opt, "legacy_extra_skip", False))
    heads = sum(1 for k in state if k.startswith("model.encoder.layers.0.self_attn.WGs.") and k.endswith(".weight"))
    feats, boxes = att_feats.to(dtype), boxes.to(dtype)
    real = att_masks.bool()

    # att_embed on the real regions only (pack_wrapper); padded slots are 0
    x = feats
    if use_bn:
        x = ((x - p["att_embed.0.running_mean"]) / torch.sqrt(p["att_embed.0.running_var"] + BATCH_NORM_EPS)
             * p["att_embed.0.weight"] + p["att_embed.0.bias"])
    x = torch.relu(linear(x, p, f"att_embed.{1 if use_bn else 0}"))
    x = x * real[..., None].to(dtype)

    geometry = box_relational_embedding(boxes)
    keep_regions = real[:, None, :]                                              # [B, 1, N]
    for i in range(layers):
        pre = f"model.encoder.layers.{i}"
        h = layer_norm(x, p, pre + ".sublayer.0.norm")
        x = x + attention(p, pre + ".self_attn", h, h, keep_regions, heads, geometry, extra_skip)
        h = layer_norm(x, p, pre + ".sublayer.1.norm")
        x = x + linear(torch.relu(linear(h, p, pre + ".feed_forward.w_1")), p, pre + ".feed_forward.w_2")
    memory = layer_norm(x, p, "model.encoder.norm")

    d_model = memory.shape[-1]
    t = inputs.shape[1]
    y = p["model.tgt_embed.0.lut.weight"][inputs] * math.sqrt(d_model) + sinusoid(t, d_model, dtype)
    seq_mask = inputs > 0
    seq_mask[:, 0] = True
    keep_tokens = seq_mask[:, None, :] & torch.tril(torch.ones(t, t, dtype=torch.bool))[None]  # [B, T, T]
    for i in range(layers):
        pre = f"model.decoder.layers.{i}"
        h = layer_norm(y, p, pre + ".sublayer.0.norm")
        y = y + attention(p, pre + ".self_attn", h, h, keep_tokens, heads)
        h = layer_norm(y, p, pre + ".sublayer.1.norm")
        y = y + attention(p, pre + ".src_attn", h, memory, keep_regions, heads)
        h = layer_norm(y, p, pre + ".sublayer.2.norm")
        y = y + linear(torch.relu(linear(h, p, pre + ".feed_forward.w_1")), p, pre + ".feed_forward.w_2")
    y = layer_norm(y, p, "model.decoder.norm")
    return torch.log_softmax(linear(y, p, "model.generator.proj"), dim=-1)
