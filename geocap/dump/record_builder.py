"""Building :class:`~geocap.data.attention_record.Record` objects from a batch of images on the model.

One pass per batch: the encoder runs once per image (its self-attention maps are the image's,
shared by all its records), the decoder teacher-forces every caption row of the batch against
its image's memory (the model's public ``encode`` / ``teacher_force``), both with ``return_attention=True``
so the fused kernels return the attention weights and per-row entropies. Maps are cast to float16
on the model's device before they are copied to the host.

A caption row's ``ids`` are the tokens the decoder produces (caption words then <eos>, unless cut
at max_len); its decoder input is ``<bos>`` followed by ``ids[:-1]``, so row t of every decoder
map is the step that predicts ``ids[t]`` (the Record convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from geocap.data.attention_record import Record

WHAT = {"encoder": "encoder_self", "decoder": "decoder_self", "cross": "cross"}

__all__ = ["CaptionRow", "WHAT", "generate_rows", "record_batch", "stack_layers"]


@dataclass
class CaptionRow:
    """One caption of image ``image`` (index in the batch): ``ids`` the produced token ids
    (ending with <eos> unless cut at the decoding limit), ``kind``, ``caption_id`` (-1 for
    generated), ``referents`` / ``source_referents`` (``[len(ids)]`` or None)."""
    image: int
    ids: list
    kind: str
    caption_id: int = -1
    referents: Optional[np.ndarray] = None
    source_referents: Optional[np.ndarray] = None


def stack_layers(layers, dtype) -> Optional[np.ndarray]:
    """``[B, L, H, ...]`` numpy from a model ``AttentionMaps``'s per-layer list (``[B, H, ...]`` each)."""
    if not layers or layers[0] is None:
        return None
    return torch.stack(list(layers), 1).to(dtype).cpu().numpy()


def encode_batch(model, features: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, *, record_encoder: bool):
    """The batch's Memory and, when ``record_encoder``, its encoder maps ``[B, L, H, N, N]``
    (float16 numpy) and entropies ``[B, L, H, N]`` (float32 numpy); else (memory, None, None)."""
    if not record_encoder:
        return model.encode(features, boxes, mask), None, None
    memory, rec = model.encode(features, boxes, mask, return_attention=True)
    return memory, stack_layers(rec.encoder_probs, torch.float16), stack_layers(rec.encoder_entropy, torch.float32)


def generate_rows(model, memory, *, beam_size: int, max_len: int) -> list:
    """The model's own caption of each image of ``memory`` (beam search, greedy for
    ``beam_size`` 1) as :class:`CaptionRow` s of kind "generated"."""
    from geocap.decoding import beam_search, greedy_decode
    if beam_size == 1:
        decoded = greedy_decode(model, memory, max_len=max_len)
    else:
        decoded = beam_search(model, memory, beam_size=beam_size, max_len=max_len)
    rows = []
    for b, (tokens, length) in enumerate(zip(decoded.tokens.tolist(), decoded.lengths.tolist())):
        rows.append(CaptionRow(image=b, ids=tokens[:length], kind="generated"))
    return rows


def record_batch(model, features: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, rows_fn, *,
                 image_ids: Sequence[int], words: Sequence[str], what: Sequence[str],
                 objects: Sequence[dict]) -> list:
    """Records of a batch of B images, grouped per image: ``list[list[Record]]``.

    ``features [B, N, D]``, ``boxes [B, N, 4]``, ``mask [B, N]`` on the model's device;
    ``rows_fn(memory) -> list[CaptionRow]`` gives the caption rows (it may decode with the
    memory); ``words`` the vocabulary; ``what`` map kinds among "encoder", "decoder", "cross"
    (maps and entropies are recorded for those only); ``objects[b]`` the per-image fields put in
    every record (``labels``, ``clusters``, ``features``: arrays ``[N_b]`` / ``[N_b, D]`` or None;
    ``width``, ``height``: pixels or None, put in ``record.extra`` when both are known).
    The model must be in eval mode; runs under ``torch.no_grad()``.
    """
    names = {WHAT[w] for w in what}
    with torch.no_grad():
        memory, enc_maps, enc_ent = encode_batch(model, features, boxes, mask,
                                                 record_encoder="encoder_self" in names)
        rows = rows_fn(memory)
        dec = {}
        if rows and names & {"decoder_self", "cross"}:
            t = max(len(r.ids) for r in rows)
            inputs = torch.full((len(rows), t), model.config.pad_id, dtype=torch.long)
            inputs[:, 0] = model.config.bos_id
            for i, r in enumerate(rows):
                inputs[i, 1:len(r.ids)] = torch.tensor(r.ids[:-1], dtype=torch.long)
            index = torch.tensor([r.image for r in rows], dtype=torch.long, device=memory.states.device)
            _, rec = model.teacher_force(memory.index_select(index), inputs.to(index.device), return_attention=True)
            if "decoder_self" in names:
                dec["decoder_self"] = (stack_layers(rec.decoder_probs, torch.float16),
                                       stack_layers(rec.decoder_entropy, torch.float32))
            if "cross" in names:
                dec["cross"] = (stack_layers(rec.cross_probs, torch.float16),
                                stack_layers(rec.cross_entropy, torch.float32))
    counts = mask.sum(1).tolist()
    box_np = boxes.float().cpu().numpy()
    out = [[] for _ in range(len(image_ids))]
    per_image: dict = {}        # an image's records share one object per per-image array (pickled once)
    for i, r in enumerate(rows):
        b, n, t = r.image, int(counts[r.image]), len(r.ids)
        fields = {name: objects[b].get(name) for name in ("labels", "clusters", "features")}
        width, height = objects[b].get("width"), objects[b].get("height")
        fields["extra"] = {"width": int(width), "height": int(height)} if width and height else {}
        if b not in per_image:
            per_image[b] = {"boxes": box_np[b, :n]}
            if enc_maps is not None:
                per_image[b].update(encoder_self=enc_maps[b, :, :, :n, :n], encoder_entropy=enc_ent[b, :, :, :n])
        shared = per_image[b]
        if enc_maps is not None:
            fields["encoder_self"] = shared["encoder_self"]
            fields["encoder_entropy"] = shared["encoder_entropy"]
        if "decoder_self" in dec:
            maps, ent = dec["decoder_self"]
            fields["decoder_self"], fields["decoder_entropy"] = maps[i, :, :, :t, :t], ent[i, :, :, :t]
        if "cross" in dec:
            maps, ent = dec["cross"]
            fields["cross"], fields["cross_entropy"] = maps[i, :, :, :t, :n], ent[i, :, :, :t]
        out[b].append(Record(image_id=int(image_ids[b]), boxes=shared["boxes"], tokens=[words[k] for k in r.ids],
                             kind=r.kind, caption_id=r.caption_id, referents=r.referents,
                             source_referents=r.source_referents, **fields))
    return out
