"""Input checks shared by the ops: every failure is a ValueError that names the argument.

Shape conventions (as in the public API): q ``[B, H, Nq, d]``, k and v ``[B, H, Nk, d]``,
boxes ``[B, N, 4]`` as normalised (x1, y1, x2, y2), wg_weight ``[H, 64]``, wg_bias ``[H]``,
attention_mask ``[B, Nk]`` bool with True = real object (attend to it), False = padding.
"""
from __future__ import annotations

import torch

from .geometry import EMBEDDINGS

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
# Normalised boxes may overshoot [0, 1] by rounding in detectors' outputs; pixels do not fit this slack.
BOX_SLACK = 1e-2


_value_checks = True


class value_checks:  # noqa: N801 - used like torch.no_grad
    """Turn the checks of box *values* (finite, ordered, normalised) on or off inside a block.

    They are on by default; each is one fused reduction (about 5 operators) and one read of
    three numbers on the host: free for boxes on the CPU, one host synchronisation on a GPU.
    Where they run on a GPU (a choice made for the per-call overhead): once per batch where boxes enter a model
    (geocap.model's transformer checks them there and runs its attention layers with checks
    off, so a forward and backward inside the model, training and dumps never synchronise),
    and in the public ops when called directly. They never run while torch.compile traces or
    a CUDA graph is captured (:func:`value_checks_active`): validate boxes before such code.
    Shape, dtype and device checks always run. With checks off, bad boxes give undefined
    (possibly NaN) output.
    """

    __slots__ = ("_enabled", "_previous")

    # a class, not contextlib.contextmanager: entering and leaving cost ~0.5 us instead of ~2 us,
    # which counts where it wraps single attention calls (the encoder's layers after the first)
    def __init__(self, enabled: bool):
        self._enabled = bool(enabled)

    def __enter__(self) -> None:
        global _value_checks
        self._previous, _value_checks = _value_checks, self._enabled

    def __exit__(self, *exc) -> None:
        global _value_checks
        _value_checks = self._previous


def value_checks_active(t: torch.Tensor | None = None) -> bool:
    """True when box values are to be checked now: switched on (:func:`value_checks`), not
    inside torch.compile's tracing, not during CUDA-graph capture, and ``t`` (the tensor to
    check) is not a fake or meta tensor (a trace without data): a host read is impossible or
    would break the graph there."""
    if not _value_checks or torch.compiler.is_compiling():
        return False
    if t is not None and (t.device.type == "meta" or _is_fake(t)):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def require_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")


def require_same_device(named: dict) -> torch.device:
    """All tensors in ``named`` (name -> tensor or None) on one device; returns it."""
    first_name = device = None
    for n, t in named.items():
        if t is None:
            continue
        if device is None:
            first_name, device = n, t.device
        elif t.device != device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {device}; move them to one device")
    return device


def check_qkv(q, k, v, *, same_length: bool) -> None:
    """q ``[B, H, Nq, d]``, k/v ``[B, H, Nk, d]`` of one float dtype; Nq == Nk when ``same_length``."""
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
        qs, ks = q.shape, k.shape
        if (len(qs) == 4 and ks == v.shape and len(ks) == 4 and q.dtype in TORCH_DTYPES
                and q.dtype == k.dtype == v.dtype and qs[0] == ks[0] and qs[1] == ks[1] and qs[3] == ks[3] != 0
                and (qs[2] == ks[2] or not same_length)):
            return   # the common case in one expression; otherwise name the first bad argument
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t)
        require_ndim(name, t, 4, "[B, H, N, d]")
        require_dtype(name, t, TORCH_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    qs, ks = q.shape, k.shape
    if ks != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(ks)} and {tuple(v.shape)}")
    if qs[0] != ks[0] or qs[1] != ks[1] or qs[3] != ks[3]:
        raise ValueError(f"q {tuple(qs)} and k {tuple(ks)} must agree in batch, heads and head dim ([B, H, N, d])")
    if same_length and qs[2] != ks[2]:
        raise ValueError(f"q and k must have the same number of objects N, got {qs[2]} and {ks[2]}")
    if qs[3] == 0:
        raise ValueError("q has head dim d = 0")


def check_attention_mask(mask, batch: int, n_keys: int, name: str = "attention_mask") -> None:
    """``mask`` None, or a bool tensor ``[batch, n_keys]`` (True = attend to this key): ValueError naming ``name``."""
    if mask is None:
        return
    require_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = real object), got dtype {mask.dtype}")
    if mask.shape != (batch, n_keys):
        raise ValueError(f"{name} must have shape [B, N] = {(batch, n_keys)}, got {tuple(mask.shape)}")


def check_embedding(embedding) -> str:
    """``embedding`` one of :data:`~geocap.kernels.geometry.EMBEDDINGS` ("ort", "signed")."""
    if not isinstance(embedding, str) or embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {', '.join(map(repr, EMBEDDINGS))}, got {embedding!r}")
    return embedding


def check_geometry_weights(wg_weight, wg_bias, heads: int | None = None, dim_g: int = 64) -> None:
    """wg_weight ``[H, dim_g]`` and wg_bias ``[H]``; ``heads=None`` takes H from wg_weight."""
    if (heads is not None and isinstance(wg_weight, torch.Tensor) and isinstance(wg_bias, torch.Tensor)
            and wg_weight.dtype in TORCH_DTYPES and wg_bias.dtype in TORCH_DTYPES
            and wg_weight.shape == (heads, dim_g) and wg_bias.shape == (heads,)):
        return   # the common case in one expression; otherwise name the first bad argument
    require_tensor("wg_weight", wg_weight)
    require_tensor("wg_bias", wg_bias)
    require_dtype("wg_weight", wg_weight, TORCH_DTYPES)
    require_dtype("wg_bias", wg_bias, TORCH_DTYPES)
    if heads is None:
        require_ndim("wg_weight", wg_weight, 2, f"[H, {dim_g}]")
        heads = wg_weight.shape[0]
    if tuple(wg_weight.shape) != (heads, dim_g):
        raise ValueError(f"wg_weight must have shape [H, {dim_g}] = {(heads, dim_g)}, got {tuple(wg_weight.shape)}")
    if tuple(wg_bias.shape) != (heads,):
        raise ValueError(f"wg_bias must have shape [H] = {(heads,)}, got {tuple(wg_bias.shape)}")


def check_finite(name: str, t: torch.Tensor, valid=None) -> None:
    """ValueError naming ``name`` and the first ``[b, i]`` whose values hold NaN or inf, for
    ``t`` ``[B, N, ...]``; rows where ``valid`` ``[B, N]`` is False are not checked. A value
    check (skipped unless :func:`value_checks_active`): one reduction and one host synchronisation."""
    if t.numel() == 0 or not value_checks_active(t):
        return
    bad = ~torch.isfinite(t.detach()).flatten(2).all(-1)
    if valid is not None:
        bad &= valid
    if not bool(bad.any()):
        return
    bi, ni = (int(x) for x in bad.nonzero()[0].tolist())
    kind = "NaN" if bool(torch.isnan(t[bi, ni]).any()) else "inf"
    raise ValueError(f"{name} hold {kind} values: image {bi}, box {ni} ({name}[{bi}, {ni}]; "
                     f"{int(bad.sum())} boxes affected)")


def check_boxes(boxes, batch: int | None = None, n: int | None = None, attention_mask=None) -> None:
    """boxes ``[B, N, 4]`` normalised (x1, y1, x2, y2): finite, x2 >= x1, y2 >= y1, inside [0, 1].

    Padded entries (``attention_mask [B, N]`` False) are not checked. The value checks (when
    :func:`value_checks_active`) are one fused reduction and one host read of three numbers;
    only when they fail are the offending boxes located for the message.
    """
    require_tensor("boxes", boxes)
    require_dtype("boxes", boxes, TORCH_DTYPES)
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [B, N, 4] as (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if batch is not None and (boxes.shape[0] != batch or boxes.shape[1] != n):
        raise ValueError(f"boxes must have shape [B, N, 4] = {(batch, n, 4)}, got {tuple(boxes.shape)}")
    if boxes.numel() == 0 or not value_checks_active(boxes):
        return
    b = boxes.detach()
    if _boxes_pass(b, attention_mask):
        return
    _raise_for_boxes(b, attention_mask)


def _boxes_pass(b: torch.Tensor, attention_mask) -> bool:
    """One pass: min and max of the (unpadded) coordinates and the least x2 - x1 / y2 - y1; NaN
    propagates through both reductions and fails every comparison, inf fails the range."""
    if attention_mask is not None:
        b = torch.where(attention_mask[..., None], b, 0.5)
    low, high = torch.aminmax(b)
    least_size = (b[..., 2:] - b[..., :2]).amin()
    low, high, least_size = torch.stack([low, high, least_size]).tolist()
    return low >= -BOX_SLACK and high <= 1 + BOX_SLACK and least_size >= 0


def _raise_for_boxes(b: torch.Tensor, attention_mask) -> None:
    """The ValueError for boxes that failed :func:`_boxes_pass`, naming the first bad box."""
    valid = torch.ones(b.shape[:2], dtype=torch.bool, device=b.device) if attention_mask is None else attention_mask
    nonfinite = (~torch.isfinite(b)).any(-1) & valid
    inverted = ((b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1])) & valid
    outside = ((b < -BOX_SLACK) | (b > 1 + BOX_SLACK)).any(-1) & valid & ~nonfinite
    flags = torch.stack([nonfinite.any(), inverted.any(), outside.any()]).tolist()

    def first(bad: torch.Tensor) -> str:
        bi, ni = (int(x) for x in bad.nonzero()[0].tolist())
        return f"boxes[{bi}, {ni}] = {b[bi, ni].tolist()}"

    if flags[0]:
        raise ValueError(f"boxes hold NaN or inf values: {first(nonfinite)}")
    if flags[1]:
        raise ValueError(f"boxes must satisfy x2 >= x1 and y2 >= y1 (x1, y1, x2, y2 order): {first(inverted)}")
    if not flags[2]:  # pragma: no cover - _boxes_pass and these masks disagree only on a bug
        raise AssertionError("boxes failed the fused check but no box is bad")
    raise ValueError(
        f"boxes must be normalised to [0, 1] (divide pixel coordinates by the image width and height): {first(outside)}"
    )
