"""One cross-entropy training step: the teacher-forcing loss of a per-image batch (each image
encoded once, its memory expanded to its captions) and the optimiser update the trainer makes.

Batches (:class:`~geocap.data.dataset.Batch`, per image): ``captions [B, K, T]``, each row
``<bos> w1 .. wL <eos> <pad>..`` in the vocabulary's ids, ``caption_lengths [B, K]`` = L + 2 (0
for the padding captions of an image with fewer than K). The loss covers the targets
``captions[..., 1:]`` at positions ``< caption_lengths - 1``: the L words and <eos>. The mask comes
from the lengths, not from ``targets != pad``: with ORT's ids (pad = bos = eos = 0) <eos> *is*
<pad>, and comparing ids would drop every caption's end from the loss.

Dropout: the encoder runs once per image, so in training mode an image's captions share its
encoder dropout draw (ORT's own trainer encodes a copy of the image per caption, each with its
own draw; per-image trainers of the ORT family make the same trade as here); the decoder's
dropout is drawn per caption.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from geocap.data.vocab import PAD
from geocap.errors import DataError

__all__ = ["CaptionRows", "CrossEntropyObjective", "caption_rows", "make_optimizer", "optimizer_update",
           "target_mask", "token_loss"]


def token_loss(log_probs: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0, pad_id: Optional[int] = PAD,
               *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token loss over the targets in the loss: ``log_probs [R, T, V]``, ``targets
    [R, T]``, ``mask [R, T]`` bool (or packed: ``[M, V]``, ``[M]``, ``[M]``), True = in the loss;
    None: ``targets != pad_id``, right for a vocabulary whose <eos> is not its <pad> (see
    :func:`target_mask`). With ``smoothing`` ε:
    ``(1 - ε) * NLL + ε * mean of -log p`` over the V - 1 ids other than ``pad_id`` (over all V
    when ``pad_id`` is None, as for a vocabulary whose <pad> is also <eos>, a real target).
    Returns a float32 scalar (0 when the mask is empty)."""
    log_probs = log_probs.float()
    if mask is None:
        if pad_id is None:
            raise ValueError("token_loss needs a mask when pad_id is None")
        mask = targets != pad_id
    elif mask.shape != targets.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor shaped like targets {tuple(targets.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    n = mask.sum().clamp(min=1)
    loss = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if smoothing > 0:
        if pad_id is None:
            uniform = -log_probs.mean(-1)
        else:
            uniform = -(log_probs.sum(-1) - log_probs[..., pad_id]) / (log_probs.shape[-1] - 1)
        loss = (1.0 - smoothing) * loss + smoothing * uniform
    return (loss * mask).sum() / n


def target_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool ``[R, width]``: True at the targets ``captions[:, 1:]`` of captions of framed lengths
    ``lengths [R]`` (L + 2, <bos> and <eos> included), i.e. positions ``< lengths - 1``."""
    return torch.arange(width, device=lengths.device) < (lengths - 1)[:, None]


@dataclass
class CaptionRows:
    """The captions of a per-image batch that are trained on, one row each, image-major:
    ``image_index [R]`` int64, the batch row (image) of each caption; ``captions [R, T]`` the
    framed captions, T = the longest kept one's L + 2; ``lengths [R]`` int64, L + 2."""
    image_index: torch.Tensor
    captions: torch.Tensor
    lengths: torch.Tensor


def _check_captions_per_image(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"captions_per_image must be None (all) or a positive int, got {value!r}")


def caption_rows(batch, captions_per_image: Optional[int] = None) -> CaptionRows:
    """The real captions of the per-image ``batch`` (those of length > 0), at most the first
    ``captions_per_image`` of each image (None: all). ValueError for a per-caption batch, a
    bad ``captions_per_image`` or a batch without any caption."""
    if batch.captions.dim() != 3 or batch.caption_lengths.shape != batch.captions.shape[:2]:
        raise ValueError(f"cross-entropy batches are per image: captions [B, K, T] and caption_lengths [B, K], got "
                         f"{tuple(batch.captions.shape)} and {tuple(batch.caption_lengths.shape)}")
    _check_captions_per_image(captions_per_image)
    b, k, t = batch.captions.shape
    device = batch.captions.device
    keep = batch.caption_lengths > 0
    if captions_per_image is not None and captions_per_image < k:
        keep &= torch.arange(k, device=device) < captions_per_image
    keep = keep.reshape(-1)
    lengths = batch.caption_lengths.reshape(-1)[keep]
    if lengths.numel() == 0:
        raise DataError(f"the batch of images {batch.image_ids.tolist()} holds no caption")
    width = int(lengths.max())
    return CaptionRows(image_index=torch.arange(b, device=device).repeat_interleave(k)[keep],
                       captions=batch.captions.reshape(b * k, t)[keep, :width], lengths=lengths)


class CrossEntropyObjective:
    """The cross-entropy loss of a per-image batch (module doc), the trainer's and the
    benchmark's.

    ``pad_id``, ``eos_id``: the vocabulary's; ``smoothing`` ε as in :func:`token_loss` (which
    leaves <pad> out of the uniform part unless it is also <eos>); ``captions_per_image``: None
    (every caption of each image) or k (the first k).
    """

    def __init__(self, *, pad_id: int, eos_id: int, smoothing: float = 0.0,
                 captions_per_image: Optional[int] = None):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        _check_captions_per_image(captions_per_image)
        self.pad_id, self.eos_id = pad_id, eos_id
        self.smoothing, self.captions_per_image = smoothing, captions_per_image

    @classmethod
    def for_vocab(cls, vocab, **kwargs) -> "CrossEntropyObjective":
        """The objective with ``vocab``'s (a :class:`~geocap.data.vocab.Vocabulary`) pad and eos ids."""
        return cls(pad_id=vocab.pad_id, eos_id=vocab.eos_id, **kwargs)

    def __call__(self, policy: Callable, batch, *,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None
                 ) -> tuple[torch.Tensor, int]:
        """``(loss, tokens)`` of ``batch`` (a collated per-image Batch on the model's device):
        the mean over the targets in the loss, and their number (the words and <eos> of every
        caption trained on). ``policy``: a
        :class:`~geocap.train.scst.PolicyModule` or its DDP wrapper (called once: encode the
        ``B`` images, expand the memory to the ``R`` captions, teacher-force them); ``autocast``:
        a factory of the mixed-precision context of that call."""
        rows = caption_rows(batch, self.captions_per_image)
        inputs, targets = rows.captions[:, :-1], rows.captions[:, 1:]
        mask = target_mask(rows.lengths, targets.shape[1])
        with (autocast or contextlib.nullcontext)():
            # [M, V]: the output layer runs only at the M targets in the loss
            log_probs = policy(batch.features, batch.boxes, batch.attention_mask, inputs, image_index=rows.image_index,
                               positions=mask)
        pad = None if self.pad_id == self.eos_id else self.pad_id
        picked = targets[mask]
        loss = token_loss(log_probs, picked, self.smoothing, pad, mask=torch.ones_like(picked, dtype=torch.bool))
        return loss, int(picked.numel())


def make_optimizer(params: Sequence[torch.Tensor], kind: str, *, lr: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The trainer's optimiser over ``params``: ``"noam"`` = Adam(betas (0.9, 0.98), eps 1e-9,
    lr set by the schedule), ``"adamw"`` = AdamW(``lr``, ``weight_decay``). Fused (one kernel
    over all parameters) where torch has a fused kernel for the parameters' device (CPU, CUDA):
    the same update up to float rounding, and on the CPU 3-5x cheaper than the per-tensor loop
    (11.5 vs 37-60 ms per step for 11 M parameters, bench/RESULTS.md)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    extra = {"fused": True} if fused else {}
    if kind == "noam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98), eps=1e-9, **extra)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)
    raise ValueError(f"optimizer must be 'noam' or 'adamw', got {kind!r}")


def optimizer_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], *,
                     grad_clip: float = 0.0, scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
    """The trainer's update from ``loss``: zero the gradients, backward (through ``scaler`` when
    given: fp16), clip the gradients' global L2 norm at ``grad_clip`` (0: no clipping), step.
    Returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return norm
