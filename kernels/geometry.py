"""The ORT box-relation geometry, in PyTorch: one definition that the eager reference, the
PyTorch fallback and the Triton kernels' tests all rely on.

Conventions (Herdade et al. 2019, the ORT code, exactly): boxes ``[B, N, 4]`` are
(x1, y1, x2, y2) normalised to [0, 1]; cx = (x1 + x2) / 2, w = x2 - x1 + 1 (the +1 is ORT's,
kept even on normalised boxes). For query box i and key box j, with ``embedding="ort"`` (the default, ORT exactly)::

    dx[i, j] = log(max(|cx_i - cx_j| / w_i, 1e-3))     dy likewise with cy, h_i
    dw[i, j] = log(w_i / w_j)                          dh likewise, no clamp

ORT's dx and dy lose the sign of the offset, so a layout and its mirror image get the same
bias ("left of" and "right of" look alike). ``embedding="signed"`` keeps everything else and
replaces them by::

    dx[i, j] = asinh((cx_i - cx_j) / (2e-3 w_i))       dy likewise with cy, h_i

With u = (cx_i - cx_j) / w_i this is odd in u and smooth through 0 (d dx / du = 1 / sqrt(u^2 +
(2e-3)^2) <= 500, where ORT's 1/|u| reaches 1000 at its clamp and drops to 0 below it), and for
|u| >> 1e-3 it equals ``sign(u) (log|u| - log 1e-3)`` up to O((1e-3 / u)^2): ORT's dx shifted
so that its clamp floor maps to 0, with the sign restored. For u > 0 its sinusoids are ORT's
rotated by a fixed phase per frequency (which W_g can absorb), for u < 0 the sines change sign.
Its range matches ORT's: |u| <= 1.02 for boxes within ``BOX_SLACK`` of [0, 1] (w_i >= 1), so
|dx| <= asinh(510) = 6.93 against ORT's |log 1e-3| = 6.91, and 100 f dx stays within ~693.

Each of the four is multiplied by 100 and by the frequencies ``wave_len ** (-k / (dim_g / 8))``
for k = 0 .. dim_g/8 - 1; the embedding is ``[sin(dx f), sin(dy f), sin(dw f), sin(dh f),
cos(dx f), cos(dy f), cos(dw f), cos(dh f)]`` (dim_g channels). Head h's geometry logit is
``x = emb . wg_weight[h] + wg_bias[h]`` and its attention bias is ``log(clamp(relu(x), 1e-6))``.

The dw/dh channels are separable: with a_i = 100 f log w_i, dw f = a_i - a_j, so
``sin(a_i - a_j) = sin a_i cos a_j - cos a_i sin a_j`` (and cos likewise). Their part of x is a
rank-2*dim_g/4 product of per-box factors, which :func:`block_log_bias` uses so only the
dx/dy half of the channels needs sin/cos per (query, key) pair.
"""
from __future__ import annotations

import functools

import torch

DIM_G = 64
WAVE_LEN = 1000.0
SCALE = 100.0
DX_CLAMP = 1e-3
# embedding="signed": dx = asinh(u / SIGNED_OFFSET_SCALE); 2 x DX_CLAMP puts asinh's log branch
# (asinh z ~ log 2z) exactly at ORT's log(|u| / DX_CLAMP)
SIGNED_OFFSET_SCALE = 2 * DX_CLAMP
BIAS_CLAMP = 1e-6
# the box-relation embeddings geo_attention offers: ORT's (|offset|) and the signed one
EMBEDDINGS = ("ort", "signed")


def geometry_frequencies(dim_g: int = DIM_G, wave_len: float = WAVE_LEN, *, dtype=torch.float32, device=None):
    """``[dim_g // 8]`` frequencies ``wave_len ** (-k / (dim_g / 8))`` (cached per device and
    dtype: no host-to-device copy per call). Do not modify the returned tensor."""
    if dim_g <= 0 or dim_g % 8:
        raise ValueError(f"dim_g must be a positive multiple of 8, got {dim_g}")
    return _frequencies(dim_g, float(wave_len), dtype, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _frequencies(dim_g: int, wave_len: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    n = dim_g // 8
    return torch.tensor([wave_len ** (-k / n) for k in range(n)], dtype=dtype, device=device)


def box_centers_sizes(boxes: torch.Tensor):
    """``(cx, cy, w, h)``, each ``[B, N]``, with ORT's +1 on the sizes."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1 + 1.0, y2 - y1 + 1.0


def _offset_feature(u: torch.Tensor, embedding: str) -> torch.Tensor:
    """dx (or dy) from the relative offset ``u = (c_i - c_j) / s_i``: ORT's ``log(max(|u|, 1e-3))``
    or the signed ``asinh(u / 2e-3)``."""
    if embedding == "signed":
        return torch.asinh(u / SIGNED_OFFSET_SCALE)
    return torch.log(torch.clamp(torch.abs(u), min=DX_CLAMP))


def center_offset(query_centers: torch.Tensor, query_sizes: torch.Tensor, key_centers: torch.Tensor,
                  embedding: str = "ort") -> torch.Tensor:
    """``[B, Nq, Nk]`` dx (or dy) for query centres and sizes ``[B, Nq]`` and key centres ``[B, Nk]``:
    ORT's ``log(max(|c_i - c_j| / s_i, 1e-3))`` or the signed ``asinh((c_i - c_j) / s_i / 2e-3)``
    (the module docstring gives both), in ORT's op order (the reference's formula)."""
    u = (query_centers[:, :, None] - key_centers[:, None, :]) / query_sizes[:, :, None]
    return _offset_feature(u, embedding)


def coordinate_offset(query_lo: torch.Tensor, query_hi: torch.Tensor, query_sizes: torch.Tensor,
                      key_lo: torch.Tensor, key_hi: torch.Tensor, embedding: str = "ort") -> torch.Tensor:
    """:func:`center_offset` from the box edges (x1, x2 or y1, y2; each ``[B, Nq]`` / ``[B, Nk]``):
    ``c_i - c_j = ((lo_i - lo_j) + (hi_i - hi_j)) / 2``. Equal in exact arithmetic, and more
    accurate in float32: ``c_i - c_j`` from rounded centres cancels when centres nearly coincide,
    and the sinusoids of ``100 f dx`` magnify that error (geometry-logit errors up to 5e-3);
    the differences of edges are exact for nearby boxes (Sterbenz). The fast paths use this."""
    u = ((query_lo[:, :, None] - key_lo[:, None, :]) + (query_hi[:, :, None] - key_hi[:, None, :])) \
        * 0.5 / query_sizes[:, :, None]
    return _offset_feature(u, embedding)


def box_displacement(boxes: torch.Tensor, embedding: str = "ort") -> torch.Tensor:
    """``[B, N, N, 4]`` = (dx, dy, dw, dh)[i, j] for query box i and key box j."""
    cx, cy, w, h = box_centers_sizes(boxes)
    dx = center_offset(cx, w, cx, embedding)
    dy = center_offset(cy, h, cy, embedding)
    dw = torch.log(w[:, :, None] / w[:, None, :])
    dh = torch.log(h[:, :, None] / h[:, None, :])
    return torch.stack([dx, dy, dw, dh], dim=-1)


def box_relation_embedding(boxes: torch.Tensor, dim_g: int = DIM_G, wave_len: float = WAVE_LEN, *,
                           embedding: str = "ort") -> torch.Tensor:
    """``[B, N, N, dim_g]`` sinusoidal embedding of the box displacements (ORT's BoxRelationalEmbedding
    with ``embedding="ort"``, the signed dx/dy with ``"signed"``).

    Computed in ``boxes.dtype``; builds the full pairwise tensor, so it is meant for inspection
    and for the reference, not for large N (the attention paths never build it).
    """
    from .validation import check_boxes, check_embedding

    check_boxes(boxes)
    check_embedding(embedding)
    disp = box_displacement(boxes, embedding)                        # [B, N, N, 4]
    freq = geometry_frequencies(dim_g, wave_len, dtype=boxes.dtype, device=boxes.device)
    args = (SCALE * disp)[..., None] * freq                          # [B, N, N, 4, dim_g/8]
    args = args.flatten(-2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def zero_padded_boxes(boxes: torch.Tensor, key_padding_mask) -> torch.Tensor:
    """Boxes of padded objects (mask False) replaced by zeros: padding may hold anything, and
    the rows of padded queries should not depend on it."""
    return boxes if key_padding_mask is None else boxes.masked_fill(~key_padding_mask[..., None], 0.0)


def log_geometry_bias_from_logits(x: torch.Tensor) -> torch.Tensor:
    """``log(clamp(relu(x), 1e-6))``: ORT's attention bias from the per-head geometry logits."""
    return torch.log(torch.clamp(torch.relu(x), min=BIAS_CLAMP))


class BoxFactors:
    """Per-box quantities the fast geometry path needs, computed once per call.

    Attributes (``B`` batch, ``N`` boxes, float32 or float64):
    ``x1, y1, x2, y2`` (the edges: centre offsets are taken from them, :func:`coordinate_offset`)
    and ``w, h`` ``[B, N]``; ``sin_far, cos_far`` ``[B, N, 16]`` = sin/cos of
    100 f_k log w (k = 0..7) then of 100 f_k log h, the separable dw/dh factors;
    ``embedding`` the dx/dy form (``EMBEDDINGS``).
    """

    def __init__(self, boxes: torch.Tensor, dtype: torch.dtype, embedding: str = "ort"):
        self.embedding = embedding
        b = boxes.to(dtype)
        self.x1, self.y1, self.x2, self.y2 = b.unbind(-1)
        self.w, self.h = box_centers_sizes(b)[2:]
        freq = geometry_frequencies(DIM_G, WAVE_LEN, dtype=dtype, device=b.device)
        log_sizes = torch.stack([self.w.log(), self.h.log()], dim=-1)          # [B, N, 2]
        far_args = (SCALE * log_sizes[..., None] * freq).flatten(-2)           # [B, N, 16]
        self.sin_far, self.cos_far = torch.sin(far_args), torch.cos(far_args)
        self.freq = freq

    def rows(self, start: int, stop: int) -> "BoxFactors":
        """The same factors restricted to boxes ``start:stop`` (a query block)."""
        sub = object.__new__(BoxFactors)
        for name in ("x1", "y1", "x2", "y2", "w", "h", "sin_far", "cos_far"):
            setattr(sub, name, getattr(self, name)[:, start:stop])
        sub.freq, sub.embedding = self.freq, self.embedding
        return sub


def split_geometry_weights(wg_weight: torch.Tensor):
    """Split ``[H, 64]`` into the pairwise (dx, dy) weights ``[H, 32]`` (order: sin dx, sin dy,
    cos dx, cos dy) and the separable (dw, dh) sin / cos weights, each ``[H, 16]``."""
    near = torch.cat([wg_weight[:, 0:16], wg_weight[:, 32:48]], dim=1)
    return near, wg_weight[:, 16:32], wg_weight[:, 48:64]


def _near_features(qf: BoxFactors, kf: BoxFactors) -> torch.Tensor:
    """``[B, 32, Nq, Nk]`` pairwise channels, channel-first: sin of 100 f_k dx (k = 0..7), sin of
    100 f_k dy, then cos of the same, so that the per-head logits are one ``[H, 32] @ [32, Nq Nk]``
    product per image (no permute of a pair-sized tensor)."""
    dx = coordinate_offset(qf.x1, qf.x2, qf.w, kf.x1, kf.x2, qf.embedding)
    dy = coordinate_offset(qf.y1, qf.y2, qf.h, kf.y1, kf.y2, qf.embedding)
    freq = qf.freq[None, :, None, None]                                                  # [1, 8, 1, 1]
    n_freq = freq.shape[1]
    # (100 d) f, rounded in the reference's order: the sinusoid of a large argument magnifies it
    args = torch.cat([(SCALE * dx)[:, None] * freq, (SCALE * dy)[:, None] * freq], dim=1)  # [B, 16, Nq, Nk]
    feats = args.new_empty((args.shape[0], 4 * n_freq) + args.shape[2:])
    torch.sin(args, out=feats[:, :2 * n_freq])
    torch.cos(args, out=feats[:, 2 * n_freq:])
    return feats


def _far_sides(qf: BoxFactors, kf: BoxFactors, wg_weight):
    """The separable dw/dh part of the logits as ``query_side [B, H, Nq, 32] @ key_side [B, 1, 32, Nk]``:
    sin(a_i - a_j) w_s + cos(a_i - a_j) w_c = c_j (w_s s_i + w_c c_i) + s_j (w_c s_i - w_s c_i)."""
    _, w_sin_far, w_cos_far = split_geometry_weights(wg_weight)
    s_i, c_i = qf.sin_far[:, None], qf.cos_far[:, None]                                   # [B, 1, Nq, 16]
    ws, wc = w_sin_far[None, :, None], w_cos_far[None, :, None]                           # [1, H, 1, 16]
    query_side = torch.cat([ws * s_i + wc * c_i, wc * s_i - ws * c_i], dim=-1)            # [B, H, Nq, 32]
    key_side = torch.cat([kf.cos_far, kf.sin_far], dim=-1).transpose(-1, -2)[:, None]     # [B, 1, 32, Nk]
    return query_side, key_side


def _logits_from_features(feats, qf: BoxFactors, kf: BoxFactors, wg_weight, wg_bias):
    """``[B, H, Nq, Nk]`` geometry logits from the pairwise channels ``feats [B, 32, Nq, Nk]``."""
    wg_weight = wg_weight.to(feats.dtype)
    w_near = split_geometry_weights(wg_weight)[0]                                         # [H, 32]
    batch, _, n_q, n_k = feats.shape
    heads = w_near.shape[0]
    query_side, key_side = _far_sides(qf, kf, wg_weight)
    x = query_side @ key_side                                                              # [B, H, Nq, Nk]
    x.view(batch, heads, n_q * n_k).baddbmm_(w_near.expand(batch, heads, w_near.shape[1]),
                                            feats.view(batch, feats.shape[1], n_q * n_k))
    return x.add_(wg_bias.to(x.dtype)[None, :, None, None])


class _BlockLogBias(torch.autograd.Function):
    """``log(clamp(x, 1e-6))`` of the per-head geometry logits ``x`` (equal to
    ``box_relation_embedding(boxes) @ wg_weight.T + wg_bias`` without building the embedding)
    with a hand-written backward: the
    gradients of W_g and b_g come from one pass over ``dL/dx`` (the boxes take none), instead
    of autograd's chain through every intermediate."""

    @staticmethod
    def forward(ctx, wg_weight, wg_bias, qf, kf):
        # the geometry term is ill-conditioned: always in the factors' dtype, never autocast's
        with torch.autocast(qf.w.device.type, enabled=False):
            feats = _near_features(qf, kf)
            x = _logits_from_features(feats, qf, kf, wg_weight, wg_bias)
        clamped = torch.clamp_(x, min=BIAS_CLAMP)
        ctx.save_for_backward(clamped, feats)
        ctx.factors = (qf, kf)
        return torch.log(clamped)

    @staticmethod
    def backward(ctx, d_bias):
        with torch.autocast(d_bias.device.type, enabled=False):
            return _BlockLogBias._backward(ctx, d_bias)

    @staticmethod
    def _backward(ctx, d_bias):
        clamped, feats = ctx.saved_tensors
        qf, kf = ctx.factors
        # d log(max(x, c)) / dx = 1/x where x > c, else 0; sign(max(x, c) - c) is that 0/1 step
        # (a float op: a bool mask and masked_fill cost ~8x more on CPU)
        dx = (d_bias.to(clamped.dtype) / clamped).mul_(torch.sign(clamped - BIAS_CLAMP))  # [B, H, Nq, Nk]
        batch, heads, n_q, n_k = dx.shape
        n_half = feats.shape[1] // 2
        g_near = (dx.reshape(batch, heads, n_q * n_k)
                  @ feats.view(batch, feats.shape[1], n_q * n_k).transpose(1, 2)).sum(0)  # [H, 32]
        dx_cos = dx @ kf.cos_far[:, None]                                                  # [B, H, Nq, 16]
        dx_sin = dx @ kf.sin_far[:, None]
        s_i, c_i = qf.sin_far[:, None], qf.cos_far[:, None]
        g_far_sin = (s_i * dx_cos - c_i * dx_sin).sum(dim=(0, 2))                         # [H, 16]
        g_far_cos = (c_i * dx_cos + s_i * dx_sin).sum(dim=(0, 2))
        d_weight = torch.cat([g_near[:, :n_half], g_far_sin, g_near[:, n_half:], g_far_cos], dim=1)  # channel order
        return d_weight, dx.sum(dim=(0, 2, 3)), None, None


def block_log_bias(qf: BoxFactors, kf: BoxFactors, wg_weight: torch.Tensor, wg_bias: torch.Tensor) -> torch.Tensor:
    """``[B, H, Nq, Nk]`` log-geometry bias for a block of query boxes; differentiable in
    wg_weight and wg_bias (same dtype as the factors)."""
    return _BlockLogBias.apply(wg_weight, wg_bias, qf, kf)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def geometry_log_bias(boxes: torch.Tensor, wg_weight: torch.Tensor, wg_bias: torch.Tensor, *,
                      embedding: str = "ort") -> torch.Tensor:
    """``[B, H, N, N]`` = ``log(clamp(relu(box_relation_embedding(boxes, embedding=embedding) @ wg_weight.T
    + wg_bias), 1e-6))``.

    Computed in float32 (float64 for float64 boxes) with the separable dw/dh channels, so the
    ``[B, N, N, 64]`` embedding is never built.
    """
    from .validation import check_boxes, check_embedding, check_geometry_weights

    check_boxes(boxes)
    check_geometry_weights(wg_weight, wg_bias)
    check_embedding(embedding)
    f = BoxFactors(boxes, compute_dtype(boxes.dtype), embedding)
    ct = f.w.dtype
    return block_log_bias(f, f, wg_weight.to(ct), wg_bias.to(ct))


__all__ = [
    "DIM_G", "EMBEDDINGS", "WAVE_LEN", "BoxFactors", "block_log_bias", "box_centers_sizes", "box_displacement",
    "box_relation_embedding", "center_offset", "compute_dtype", "coordinate_offset", "geometry_frequencies", "geometry_log_bias",
    "log_geometry_bias_from_logits", "split_geometry_weights", "zero_padded_boxes",
]
