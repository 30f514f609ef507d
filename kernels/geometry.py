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
``sin(a_i - a_j) = sin a_i cos a_j - cos a_i sin a_j`` (and cos likewise). The Triton kernels use
that (only the dx/dy half needs sin/cos per pair). The PyTorch path (:func:`block_log_bias`)
computes all four per pair as ORT does, channel-first, so that the per-head logits are one
matmul and plain autograd differentiates them cheaply (boxes take no gradient, so only
``dW_g = G @ feats^T`` and ``db_g = sum G`` are formed): few operators per call, nothing
torch.compile or torch.func cannot trace.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

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
    dtype: no host-to-device copy per call; not cached under a FakeTensorMode). Do not modify the
    returned tensor."""
    if dim_g <= 0 or dim_g % 8:
        raise ValueError(f"dim_g must be a positive multiple of 8, got {dim_g}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if _fake_mode_active():   # never cache a FakeTensor: later real calls would get it back
        return _frequencies.__wrapped__(dim_g, float(wave_len), dtype, device)
    return _frequencies(dim_g, float(wave_len), dtype, device)


def _fake_mode_active() -> bool:
    """Whether a FakeTensorMode is active (tensors made now are fakes without data). False while
    torch.compile traces: it handles the cached constants itself (and cannot trace the query)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


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
    return torch.log(_clamped_ratio(u))


def _clamped_ratio(u: torch.Tensor) -> torch.Tensor:
    """``max(|u|, 1e-3)``: what ORT's dx (or dy) takes the log of."""
    return torch.clamp(torch.abs(u), min=DX_CLAMP)


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


def scalar_constant(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """0-dim tensor holding ``value`` (cached per value, dtype and device, except under a
    FakeTensorMode; do not modify): ``torch.where``'s other branch without a ``scalar_tensor``
    launch per call (the tiny calls of the PyTorch path are op-overhead bound)."""
    device = torch.device(device)
    if _fake_mode_active():
        return _scalar_constant.__wrapped__(float(value), dtype, device)
    return _scalar_constant(float(value), dtype, device)


@functools.lru_cache(maxsize=64)
def _scalar_constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def zero_padded_boxes(boxes: torch.Tensor, attention_mask) -> torch.Tensor:
    """Boxes ``[B, N, 4]`` of padded objects (``attention_mask [B, N]`` False) replaced by zeros:
    padding may hold anything, and the rows of padded queries should not depend on it."""
    if attention_mask is None:
        return boxes
    return torch.where(attention_mask.unsqueeze(-1), boxes, scalar_constant(0.0, boxes.dtype, boxes.device))


def log_geometry_bias_from_logits(x: torch.Tensor) -> torch.Tensor:
    """``log(clamp(relu(x), 1e-6))``: ORT's attention bias from the per-head geometry logits."""
    return torch.log(torch.clamp(torch.relu(x), min=BIAS_CLAMP))


class BoxFactors:
    """Per-box quantities of the PyTorch fast path, computed once per call, already shaped for
    the pair tensors ``[B, 4, 8, Nq, Nk]`` of :func:`pair_arguments` (the tiny calls of this path
    are bound by the number of operator calls: each view here saves one per use).

    Attributes (``B`` batch, ``N`` boxes, float32 or float64): ``query_edges`` ``[B, 2 (lo, hi),
    2 (x, y), 1, N, 1]`` and ``key_edges`` ``[B, 2, 2, 1, 1, N]`` = the boxes' (x1, y1) and (x2, y2)
    (centre offsets are taken from them, :func:`coordinate_offset`); ``query_two_size``
    ``[B, 2, 1, N, 1]`` and ``key_two_size`` ``[B, 2, 1, 1, N]`` = 2 (w, h) with ORT's +1 (exactly
    twice ORT's sizes: their ratios are ORT's ratios, bit for bit); the singleton dimension is
    the frequencies' (``freq`` and ``scale`` from :func:`pair_constants`); ``embedding`` the dx/dy
    form (``EMBEDDINGS``). Boxes whose ``attention_mask [B, N]`` is False count as zeros
    (:func:`zero_padded_boxes`: padding may hold anything).
    """

    def __init__(self, boxes: torch.Tensor, dtype: torch.dtype, embedding: str = "ort", attention_mask=None):
        self.embedding = embedding
        b = zero_padded_boxes(boxes if boxes.dtype == dtype else boxes.to(dtype), attention_mask)
        constants = pair_constants(dtype, b.device)
        # [B, N, 4] -> [B, 2 (lo, hi), 2 (x, y), 1, N, 1]
        self.query_edges = b.view(b.shape[0], b.shape[1], 2, 2, 1, 1).permute(0, 2, 3, 4, 1, 5)
        self.key_edges = self.query_edges.mT
        lo, hi = self.query_edges.unbind(1)
        # 2 + 2 (hi - lo) rounds once, to exactly 2 (hi - lo + 1) as ORT rounds it: one operator fewer
        self.query_two_size = torch.add(constants.two, hi - lo, alpha=2.0)
        self.key_two_size = self.query_two_size.mT
        self.freq, self.scale = constants.freq, constants.scale

    def rows(self, start: int, stop: int) -> "BoxFactors":
        """The same factors with the queries restricted to boxes ``start:stop`` (a query block)."""
        sub = object.__new__(BoxFactors)
        sub.__dict__.update(self.__dict__)
        sub.query_edges = self.query_edges[..., start:stop, :]
        sub.query_two_size = self.query_two_size[..., start:stop, :]
        return sub


class PairConstants(NamedTuple):
    """The PyTorch path's constants for one dtype and device: ``freq`` ``[dim_g // 8, 1, 1]`` the
    frequencies f_k shaped to scale ``[..., Nq, Nk]`` pair tensors; 0-dim ``two`` (2.0) and ``scale``
    (``SCALE``): tensor operands, as a Python number costs a wrapped-scalar tensor per call."""
    freq: torch.Tensor
    two: torch.Tensor
    scale: torch.Tensor


def pair_constants(dtype: torch.dtype, device) -> PairConstants:
    """:class:`PairConstants` (cached, except under a FakeTensorMode; do not modify): one lookup
    per call instead of one per constant."""
    if _fake_mode_active():
        return _pair_constants.__wrapped__(dtype, torch.device(device))
    return _pair_constants(dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _pair_constants(dtype: torch.dtype, device: torch.device) -> PairConstants:
    freq = geometry_frequencies(DIM_G, WAVE_LEN, dtype=dtype, device=device).view(-1, 1, 1)
    return PairConstants(freq, torch.tensor(2.0, dtype=dtype, device=device),
                         torch.tensor(SCALE, dtype=dtype, device=device))


def pair_arguments(qf: BoxFactors, kf: BoxFactors) -> torch.Tensor:
    """``[B, 4, 8, Nq, Nk]`` the embedding's arguments ``100 f_k d`` for d = dx, dy, dw, dh and the
    8 frequencies (flattened, the embedding's channel order): the sin and the cos of this tensor
    are the embedding's two halves. dx/dy from the edges (:func:`coordinate_offset`'s formula),
    dw/dh = log(w_i / w_j) as ORT computes them."""
    edge_offsets = qf.query_edges - kf.key_edges                                   # [B, 2, 2, 1, Nq, Nk]
    u = edge_offsets.sum(1) / qf.query_two_size                                    # (lo_i - lo_j) + (hi_i - hi_j)
    size_ratio = qf.query_two_size / kf.key_two_size                               # dw, dh = log of it
    if qf.embedding == "ort":                                                      # one log for all four
        disp = torch.log(torch.cat([_clamped_ratio(u), size_ratio], dim=1))        # [B, 4, 1, Nq, Nk]
    else:
        disp = torch.cat([_offset_feature(u, qf.embedding), torch.log(size_ratio)], dim=1)
    # (100 d) f, rounded in the reference's order (not d (100 f)): near the log floor of the
    # geometry logit the sinusoids of these ~700 rad arguments magnify a different rounding into
    # errors up to 14x eager's (tests/test_attention_precision.py)
    return disp * qf.scale * qf.freq                                               # [B, 4, 8, Nq, Nk]


def geometry_logits(qf: BoxFactors, kf: BoxFactors, wg_weight, wg_bias) -> torch.Tensor:
    """``[B, H, Nq, Nk]`` the per-head geometry logits ``x = emb . W_g[h] + b_g[h]`` without
    building the embedding pair-last: one ``[H, 64] @ [64, Nq Nk]`` product per image.
    Differentiable in wg_weight and wg_bias (the factors' dtype)."""
    args = pair_arguments(qf, kf)
    batch, _, _, n_q, n_k = args.shape
    heads, dim_g = wg_weight.shape
    feats = torch.cat([torch.sin(args), torch.cos(args)], dim=1).view(batch, dim_g, n_q * n_k)
    x = torch.baddbmm(wg_bias.view(1, heads, 1), wg_weight.expand(batch, heads, dim_g), feats)
    return x.view(batch, heads, n_q, n_k)


def block_log_bias(qf: BoxFactors, kf: BoxFactors, wg_weight: torch.Tensor, wg_bias: torch.Tensor) -> torch.Tensor:
    """``[B, H, Nq, Nk]`` log-geometry bias ``log(max(x, 1e-6))`` (= ORT's ``log(clamp(relu(x), 1e-6))``)
    for a block of query boxes; differentiable in wg_weight and wg_bias (same dtype as the
    factors). The geometry term is ill-conditioned: always in the factors' dtype, never autocast's."""
    device_type = qf.freq.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return block_log_bias(qf, kf, wg_weight, wg_bias)
    return torch.log(torch.clamp(geometry_logits(qf, kf, wg_weight, wg_bias), min=BIAS_CLAMP))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def geometry_log_bias(boxes: torch.Tensor, wg_weight: torch.Tensor, wg_bias: torch.Tensor, *,
                      embedding: str = "ort") -> torch.Tensor:
    """``[B, H, N, N]`` = ``log(clamp(relu(box_relation_embedding(boxes, embedding=embedding) @ wg_weight.T
    + wg_bias), 1e-6))``.

    Computed in float32 (float64 for float64 boxes) by :func:`block_log_bias`: the embedding is
    built channel-first, never as a ``[B, N, N, 64]`` tensor.
    """
    from .validation import check_boxes, check_embedding, check_geometry_weights

    check_boxes(boxes)
    check_geometry_weights(wg_weight, wg_bias)
    check_embedding(embedding)
    ct = compute_dtype(boxes.dtype)
    f = BoxFactors(boxes, ct, embedding)
    return block_log_bias(f, f, wg_weight.to(ct), wg_bias.to(ct))


__all__ = [
    "DIM_G", "EMBEDDINGS", "WAVE_LEN", "BoxFactors", "block_log_bias", "box_centers_sizes", "box_displacement",
    "box_relation_embedding", "center_offset", "compute_dtype", "coordinate_offset", "geometry_frequencies",
    "geometry_log_bias", "geometry_logits", "log_geometry_bias_from_logits", "pair_arguments", "pair_constants",
    "scalar_constant", "zero_padded_boxes",
]
