"""Records of a Hugging Face captioner: its attention over reference and generated captions.

Per image: the encoder runs once (its self-attention maps and hidden states are the image's,
shared by all its records); each caption is teacher-forced alone through the decoder on that
encoding (batch of one, so every map is exactly what the model returns for that caption).
The conventions are the Record's (geocap.data.attention_record), as ``geocap dump`` follows
them for ORT:

- objects = the encoder's image tokens in its order: class/register tokens then patches
  (geocap.hf.patches: boxes are grid cells; special tokens get the whole image and are listed
  in ``extra["special_objects"]``, with ``extra["patch_grid"] = [rows, cols]``);
  ``features [N, D]`` float32 = the encoder's output hidden state of each token;
- a caption's ``ids`` are the tokens the decoder produces, ending with the model's end token
  (BLIP: [SEP]) unless generation was cut; its decoder input is the model's start token
  (``decoder_start_token_id``; BLIP: its bos) followed by ``ids[:-1]``, so row t of every
  decoder map is the step that predicts ``ids[t]``. ``tokens`` are the tokenizer's token strings
  (the ids as strings without one), the end token written ``"<eos>"``; ``extra["token_ids"]``
  keeps the ids;
- maps float16 (the model's weights cast, as dumps store them); entropies float32, computed by
  ``geocap.kernels.attention_entropy`` on the model's maps before the cast;
- extra ``width`` / ``height``: the size of ``pixel_values`` in pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from geocap.data.attention_record import ENTROPY_NAMES, Record
from geocap.dump.record_builder import WHAT, stack_layers
from geocap.kernels import attention_entropy

from .models import SUPPORTED, UnsupportedModel, captioner_for, import_transformers

__all__ = ["SUPPORTED", "UnsupportedModel", "record_captions"]


def record_captions(model, pixel_values: torch.Tensor, *, image_ids: Sequence[int],
                    captions: Optional[Sequence[Sequence]] = None, generate: bool = False,
                    generate_kwargs: Optional[dict] = None, tokenizer=None,
                    what: Sequence[str] = ("encoder", "decoder", "cross")) -> list:
    """Records of B images, grouped per image: ``list[list[Record]]``.

    Args:
        model: a loaded ``VisionEncoderDecoderModel`` or ``BlipForConditionalGeneration`` in eval
            mode, with eager attention (``attn_implementation="eager"``) so it returns its maps.
        pixel_values: ``[B, 3, H, W]`` as its processor makes them, on the model's device.
        image_ids: B ints, one per image.
        captions: per image a list of reference captions (kind "reference", ``caption_id`` = its
            index), each token ids without the start token (the end token is appended when
            missing) or a string (tokenized with ``tokenizer``, no special tokens added).
        generate: also record the model's own caption of each image (kind "generated"): its
            ``generate(pixel_values=..., **generate_kwargs)`` output, then teacher-forced.
        tokenizer: a tokenizer or a processor holding one (``.tokenizer``): token strings, and
            text captions; optional.
        what: map kinds among "encoder", "decoder", "cross" (maps and entropies of those only).

    Raises:
        UnsupportedModel naming the class; ValueError naming the argument or the image for bad input.
    """
    import_transformers()
    captioner = captioner_for(model)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    names = _check_what(what)
    pixel_values, image_ids = _check_images(pixel_values, image_ids)
    if captions is not None and len(captions) != len(image_ids):
        raise ValueError(f"captions must hold one list per image ({len(image_ids)}), got {len(captions)}")
    out = []
    with torch.no_grad():
        for b, image_id in enumerate(image_ids):
            pixels = pixel_values[b:b + 1]
            rows = [(j, _reference_ids(c, captioner, tok, image_id, j), "reference")
                    for j, c in enumerate(captions[b] if captions is not None else [])]
            if generate:
                sequence = captioner.generate(pixels, **(generate_kwargs or {}))[0].tolist()
                rows.append((-1, _generated_ids(sequence, captioner, image_id), "generated"))
            encoded, hidden, encoder_maps = captioner.encode(pixels)
            grid = captioner.grid(pixels, hidden.shape[1])
            image = {"boxes": grid.boxes(), "features": hidden[0].float().cpu().numpy(),
                     "extra": {"width": int(pixels.shape[-1]), "height": int(pixels.shape[-2]),
                               "special_objects": grid.special, "patch_grid": [grid.rows, grid.cols]}}
            if "encoder_self" in names:
                image.update(_maps_and_entropy("encoder_self", encoder_maps))
            records = []
            for caption_id, ids, kind in rows:
                fields = dict(image, extra=dict(image["extra"], token_ids=list(ids)))
                if names & {"decoder_self", "cross"}:
                    inputs = torch.tensor([[captioner.start_id] + ids[:-1]], dtype=torch.long, device=pixels.device)
                    decoder_maps, cross_maps = captioner.teacher_force(encoded, inputs)
                    for name, maps in (("decoder_self", decoder_maps), ("cross", cross_maps)):
                        if name in names:
                            fields.update(_maps_and_entropy(name, maps))
                tokens = _token_strings(ids, captioner.eos_id, tok)
                records.append(Record(image_id=image_id, tokens=tokens, kind=kind, caption_id=caption_id,
                                      **fields).validate())
            out.append(records)
    return out


def _maps_and_entropy(name: str, layers) -> dict:
    """``{name: [L, H, R, K] float16, entropy name: [L, H, R] float32}`` from the model's
    per-layer ``[1, H, R, K]`` maps; entropies by the streaming kernel on the uncast maps."""
    maps = torch.stack([m[0] for m in layers]).float()
    return {name: stack_layers(layers, torch.float16)[0], ENTROPY_NAMES[name]: attention_entropy(maps).cpu().numpy()}


def _check_what(what) -> set:
    if isinstance(what, str) or not set(what) <= set(WHAT):
        raise ValueError(f"what must be a list of map kinds among {sorted(WHAT)}, got {what!r}")
    return {WHAT[w] for w in what}


def _check_images(pixel_values, image_ids):
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or not pixel_values.is_floating_point():
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a float tensor [B, 3, H, W], got {shape}")
    image_ids = [int(i) for i in image_ids]
    if len(image_ids) != pixel_values.shape[0]:
        raise ValueError(f"image_ids must hold one id per image of pixel_values ({pixel_values.shape[0]}), "
                         f"got {len(image_ids)}")
    return pixel_values, image_ids


def _reference_ids(caption, captioner, tok, image_id: int, j: int) -> list:
    where = f"caption {j} of image {image_id}"
    if isinstance(caption, str):
        if tok is None:
            raise ValueError(f"{where} is text: pass tokenizer= (or a processor) to tokenize it, or give token ids")
        caption = tok(caption, add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in caption]
    if not ids or ids[-1] != captioner.eos_id:
        ids.append(captioner.eos_id)
    bad = [i for i in ids if not 0 <= i < captioner.vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {captioner.vocab_size})")
    if captioner.eos_id in ids[:-1]:
        raise ValueError(f"{where}: the end token {captioner.eos_id} appears before the caption's end")
    return ids


def _generated_ids(sequence: list, captioner, image_id: int) -> list:
    """``generate()``'s output for one image without its start token (one image is never
    padded: the output ends at the end token, or where generation was cut)."""
    if not sequence or sequence[0] != captioner.start_id:
        raise ValueError(f"image {image_id}: {captioner.name}.generate() did not start with the start token "
                         f"{captioner.start_id}: {sequence[:5]}")
    return sequence[1:]


def _token_strings(ids: list, eos_id: int, tok) -> list:
    words = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    return ["<eos>" if i == eos_id else w for i, w in zip(ids, words)]
