"""Entropy of attention rows, ``attention_entropy``, and its PyTorch implementation.

``x`` is ``[..., L]``: every row along the last axis is one distribution, given either as
probabilities (``from_logits=False``) or as logits whose softmax is the distribution
(``from_logits=True``). The result is ``[...]`` (``x.shape[:-1]``), in nats.

Conventions:
- ``0 log 0 = 0``; probabilities are used as given (a row is not renormalised);
- ``mask`` (bool, broadcastable to ``x``; True = valid) drops entries entirely: masked
  probabilities do not count, masked logits leave the softmax; masked values are never
  inspected, so they may hold anything, NaN included;
- a row with no valid entry (including ``L = 0``) has entropy 0;
- ``normalized=True`` divides by ``log(n)``, ``n`` = valid entries in the row; 0 when ``n <= 1``;
- invalid values (NaN or infinite anywhere valid, negative probabilities, or values so large
  that the float32 arithmetic overflows) raise ValueError. They are detected on the output,
  not on ``x``: they turn the row's entropy into NaN or inf, and one ``isfinite`` reduction
  over the ``L`` times smaller output finds them.

The PyTorch path keeps the same online state as the Triton kernel (running max ``m``,
``l = sum exp(s - m)``, ``t = sum exp(s - m) (s - m)``; entropy ``log l - t / l``), and works
through tiles of a fixed budget of temporaries (``TORCH_TILE_BYTES``), whatever the size of ``x``.
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from .validation import KERNEL_DTYPES, TORCH_DTYPES, require_dtype, require_same_device, require_tensor

# The PyTorch path's temporaries of one tile stay below this (about TEMPS_PER_ELEMENT
# accumulation-dtype copies of the tile are alive at once). Measured on CPU, 16 MB is as fast
# as or faster than 64 MB: smaller temporaries are reused by the allocator and stay in cache.
# On CUDA larger tiles amortise the ~10 kernel launches per tile.
TORCH_TILE_BYTES = 16 << 20
TORCH_TILE_BYTES_CUDA = 256 << 20
TEMPS_PER_ELEMENT = 6
NEG_INIT = -1.0e30  # finite stand-in for -inf, as in triton_online.py


def attention_entropy(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    from_logits: bool = False,
    normalized: bool = False,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """Entropy (nats) of each row of ``x`` ``[..., L]`` along the last axis; returns ``[...]``.

    Args:
        x: probabilities, or logits when ``from_logits``; float16, bfloat16, float32 or float64
            (float64 on the torch backend only). Any leading shape, empty included; ``L >= 0``.
        mask: optional bool tensor broadcastable to ``x``; True = valid entry.
        from_logits: entropy of ``softmax(x)`` (over valid entries), computed online in tiles
            without materialising the softmax.
        normalized: divide by ``log(valid entries)``, so a uniform row gives 1; rows with at most
            one valid entry give 0.
        backend: "auto" (Triton for CUDA tensors except float64, else torch), "triton" or "torch".
        check_finite: raise on invalid values (one reduction over the output and one host read:
            a synchronisation on a GPU). False skips it (bad rows come back NaN or inf): for
            timing the kernel and for code that must not synchronise (on a GPU the Triton kernel's
            first call per row-length bucket, mode and dtype autotunes it, which synchronises
            once); it is skipped anyway while torch.compile traces.

    Returns:
        float32 tensor of shape ``x.shape[:-1]`` (float64 for float64 ``x``). Not differentiable.

    Raises:
        ValueError naming the argument: bad types, shapes, devices or dtypes; NaN or infinite
        valid entries of ``x``; negative probabilities.
    """
    mask = _check_inputs(x, mask)
    x = x.detach()
    which = resolve_backend(backend, x.device)
    if which == "triton" and backend == "auto" and x.dtype not in KERNEL_DTYPES:
        which = "torch"  # "auto" takes the kernel only for what it reads
    if which == "triton":
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"x has dtype {str(x.dtype).replace('torch.', '')}, which the Triton kernel does not read "
                "(float16, bfloat16, float32); use backend='torch' or convert x"
            )
        from .triton_entropy import triton_attention_entropy

        out = triton_attention_entropy(x, mask, from_logits=from_logits, normalized=normalized)
    else:
        out = torch_attention_entropy(x, mask, from_logits=from_logits, normalized=normalized)
    if check_finite and not torch.compiler.is_compiling():
        _raise_if_not_finite(out, x, mask, from_logits)
    return out


def _check_inputs(x, mask) -> torch.Tensor | None:
    require_tensor("x", x)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of probabilities or logits, got dtype {x.dtype}")
    require_dtype("x", x, TORCH_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last axis holds each distribution), got a 0-d tensor")
    if mask is None:
        return None
    require_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = valid entry), got dtype {mask.dtype}")
    require_same_device({"x": x, "mask": mask})
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    return mask.detach()


def _raise_if_not_finite(out: torch.Tensor, x: torch.Tensor, mask, from_logits: bool) -> None:
    """One reduction over ``out`` (and one host sync); on failure, explain using the first bad row."""
    if out.numel() == 0 or bool(torch.isfinite(out).all()):
        return
    r = int((~torch.isfinite(out)).flatten().nonzero()[0])
    idx = []
    for n in reversed(out.shape):
        idx.append(r % n)
        r //= n
    idx = tuple(reversed(idx))
    row = x[idx].double()
    valid = torch.ones_like(row, dtype=torch.bool) if mask is None else mask.expand(x.shape)[idx]

    def at(bad: torch.Tensor) -> str:
        j = int(bad.nonzero()[0])
        return f"x[{', '.join(str(i) for i in idx + (j,))}] = {row[j].item():.6g}"

    what = "logits" if from_logits else "probabilities"
    nonfinite = valid & ~torch.isfinite(row)
    if nonfinite.any():
        raise ValueError(f"x holds NaN or infinite {what} ({at(nonfinite)}); mask them out or fix them")
    negative = valid & (row < 0)
    if not from_logits and negative.any():
        raise ValueError(f"x holds negative probabilities ({at(negative)}); probabilities must be >= 0")
    raise ValueError(
        f"x row {list(idx)} has a non-finite entropy: its {what} are too large in magnitude "
        f"for {str(out.dtype).replace('torch.', '')} arithmetic"
    )


def torch_attention_entropy(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, from_logits: bool = False, normalized: bool = False
) -> torch.Tensor:
    """PyTorch implementation of :func:`attention_entropy` for checked inputs (no value checks).

    ``x`` ``[..., L]``, ``mask`` None or bool broadcastable to ``x``; returns ``[...]`` in float32
    (float64 for float64 ``x``). Rows are processed in chunks (and very long rows in column
    tiles) so that temporaries stay below ``TORCH_TILE_BYTES`` (``TORCH_TILE_BYTES_CUDA`` on
    CUDA); leading dims that cannot be
    flattened without a copy are split first, so no full-size copy of ``x`` is made either.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape[:-1], dtype=acc, device=x.device)
    if out.numel() == 0 or x.shape[-1] == 0:
        return out
    mask = None if mask is None else mask.expand(x.shape)
    budget = TORCH_TILE_BYTES_CUDA if x.is_cuda else TORCH_TILE_BYTES
    tile = max(1, budget // (TEMPS_PER_ELEMENT * out.element_size()))
    _fill(out, x, mask, tile, from_logits, normalized)
    return out


def _fill(out, x, mask, tile: int, from_logits: bool, normalized: bool) -> None:
    """Write the entropies of ``x`` ``[..., L]`` into ``out`` ``[...]`` (contiguous), chunk by chunk."""
    length = x.shape[-1]
    max_rows = max(1, tile // length)
    if out.numel() <= max_rows:  # small enough: one [rows, L] piece (a copy is at most ~tile)
        rows = _rows_entropy(
            x.reshape(-1, length),
            None if mask is None else mask.reshape(-1, length),
            max(1, tile // max(1, out.numel())),
            from_logits,
            normalized,
            out.dtype,
        )
        out.copy_(rows.reshape(out.shape))
        return
    step = max_rows // (out[0].numel() if out.dim() > 1 else 1)  # slices of axis 0 per chunk
    if step >= 1:
        for i in range(0, out.shape[0], step):
            sub_mask = None if mask is None else mask[i : i + step]
            _fill(out[i : i + step], x[i : i + step], sub_mask, tile, from_logits, normalized)
    else:  # one slice of axis 0 is already too big: split each one along its own first axis
        for i in range(out.shape[0]):
            _fill(out[i], x[i], None if mask is None else mask[i], tile, from_logits, normalized)


def _rows_entropy(x2, m2, cols: int, from_logits: bool, normalized: bool, acc: torch.dtype) -> torch.Tensor:
    """Entropies ``[R]`` of ``x2`` ``[R, L]`` (``m2`` None or bool ``[R, L]``), in column tiles of ``cols``."""
    rows, length = x2.shape
    count = torch.full((rows,), length, dtype=torch.int64, device=x2.device)
    if m2 is not None:
        count.zero_()
    m = torch.full((rows,), NEG_INIT, dtype=acc, device=x2.device)
    l = torch.zeros_like(m)  # noqa: E741 - named as in the online-softmax formulas
    t = torch.zeros_like(m)
    plogp = torch.zeros_like(m)
    for c0 in range(0, length, cols):
        s = x2[:, c0 : c0 + cols].to(acc)
        valid = None if m2 is None else m2[:, c0 : c0 + cols]
        if valid is not None and normalized:
            count += valid.sum(-1)
        if from_logits:
            m, l, t = _online_softmax_step(m, l, t, s, valid)
        else:
            if valid is not None:
                s = s.masked_fill(~valid, 0.0)
            plogp -= torch.special.entr(s).sum(-1)  # entr = -p log p (0 at 0, -inf below 0)
    if from_logits:
        empty = l == 0  # not l > 0: a NaN l (bad logits) must stay NaN
        l_safe = torch.where(empty, 1.0, l)
        h = torch.where(empty, 0.0, l_safe.log() - t / l_safe)
    else:
        h = -plogp
    if normalized:
        # h * 0 instead of 0 keeps a NaN of a bad row with fewer than two valid entries visible
        h = torch.where(count > 1, h / count.to(acc).log(), h * 0)
    return h


def _online_softmax_step(m, l, t, s, valid):  # noqa: E741
    """Torch twin of ``triton_online.online_softmax_step`` on a ``[R, C]`` tile; returns ``(m, l, t)``."""
    if valid is not None:
        s = s.masked_fill(~valid, NEG_INIT)
    m_new = torch.maximum(m, s.amax(-1))
    alpha = torch.exp(m - m_new)
    shifted = s - m_new[:, None]
    p = shifted.exp()
    if valid is not None:
        p = p.masked_fill(~valid, 0.0)
    t_new = alpha * (t + l * (m - m_new)) + (p * shifted).sum(-1)
    return m_new, l * alpha + p.sum(-1), t_new
