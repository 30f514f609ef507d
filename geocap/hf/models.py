"""What geocap needs from each supported Hugging Face captioner, behind one small interface.

``captioner_for(model)`` wraps a loaded model: ``encode(pixel_values [1, 3, H, W])`` runs its
image encoder once and gives the image tokens' hidden states ``[1, N, D]`` and self-attention
maps (one ``[1, H, N, N]`` per layer); ``teacher_force(encoded, input_ids [1, T])`` runs its text
decoder on that encoding and gives the decoder self- and cross-attention maps (one
``[1, H, T, T]`` / ``[1, H, T, N]`` per layer); ``generate(pixel_values, **kwargs)`` is the
model's own ``generate()``. Every map is the model's own ``output_attentions`` output, taken
from the same submodule calls its ``forward`` makes.
"""
from __future__ import annotations

import torch

from geocap.errors import DataError, UsageError

from .patches import PatchGrid

SUPPORTED = ("VisionEncoderDecoderModel", "BlipForConditionalGeneration")


class UnsupportedModel(UsageError):
    """A model class geocap.hf cannot record; the message names it and the supported ones."""


def import_transformers():
    """``transformers``, or an ImportError saying how to install it. (Run from the repository
    root, ``import kernels`` inside transformers 5 gets Hugging Face's ``kernels``, not geocap's
    ``kernels/`` folder: that folder's ``__init__`` hands the name over, see ``geocap.kernels``.)"""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("geocap.hf needs transformers: pip install 'geocap[hf]'") from e
    return transformers


def captioner_for(model):
    """The wrapper of ``model``; :class:`UnsupportedModel` for a class not in ``SUPPORTED``."""
    name = type(model).__name__
    wrappers = {"VisionEncoderDecoderModel": _VisionEncoderDecoder, "BlipForConditionalGeneration": _Blip}
    if name not in wrappers:
        raise UnsupportedModel(f"model class {name} is not supported by geocap.hf; supported: {', '.join(SUPPORTED)}")
    if model.training:
        raise ValueError(f"model ({name}) is in training mode (dropout would change the maps); call model.eval() first")
    return wrappers[name](model)


def _patch_size(config) -> tuple:
    """The patch size of a ViT-like image encoder: one grid of patch tokens through every layer,
    an int number of layers and of heads; :class:`UnsupportedModel` naming the encoder otherwise
    (Swin's stages merge patches and have per-stage heads)."""
    size = getattr(config, "patch_size", None)
    name = f"{type(config).__name__} ({getattr(config, 'model_type', '?')})"
    if size is None:
        raise UnsupportedModel(f"image encoder {name} has no patch_size: geocap.hf records patch encoders "
                               f"(ViT-like: ViT, DeiT, BEiT, BLIP's); supported: {', '.join(SUPPORTED)}")
    for key in ("num_hidden_layers", "num_attention_heads"):
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedModel(f"image encoder {name} is not supported by geocap.hf: its {key} is {value!r}, "
                                   f"not one number (hierarchical encoders such as Swin merge patches between "
                                   f"stages, so there is no single patch grid); supported: ViT-like encoders "
                                   f"(ViT, DeiT, BEiT, BLIP's)")
    return (size, size) if isinstance(size, int) else tuple(size)


def _first(value):
    """An id given as an int or a list of ids (generation configs allow both): the first."""
    return value[0] if isinstance(value, (list, tuple)) else value


class _Captioner:
    """Shared parts; subclasses set ``start_id``, ``eos_id``, ``vocab_size``, ``patch`` and
    implement ``encode`` / ``teacher_force``."""

    def __init__(self, model):
        self.model = model
        self.name = type(model).__name__

    def grid(self, pixel_values: torch.Tensor, num_tokens: int) -> PatchGrid:
        """The patch grid of an image of ``pixel_values``'s size whose encoder gave ``num_tokens``."""
        rows, cols = pixel_values.shape[-2] // self.patch[0], pixel_values.shape[-1] // self.patch[1]
        prefix = num_tokens - rows * cols
        if prefix < 0 or prefix > 8:
            raise UnsupportedModel(f"{self.name}'s encoder gave {num_tokens} tokens for a {rows}x{cols} grid of "
                                   f"patches: not patch tokens after a few class/register tokens")
        return PatchGrid(rows, cols, prefix)

    def generate(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model.generate(pixel_values=pixel_values, **kwargs)
        return getattr(out, "sequences", out)

    @staticmethod
    def _require(maps, what: str, name: str):
        if not maps or any(m is None for m in maps):
            raise ValueError(f"{name} returned no {what} attention maps: load it with attn_implementation='eager'")
        return maps


class _VisionEncoderDecoder(_Captioner):
    def __init__(self, model):
        super().__init__(model)
        config, gen = model.config, getattr(model, "generation_config", None)
        self.start_id = config.decoder_start_token_id
        if self.start_id is None and gen is not None:
            self.start_id = gen.decoder_start_token_id
        self.eos_id = _first(gen.eos_token_id if gen is not None and gen.eos_token_id is not None
                             else config.decoder.eos_token_id)
        if self.start_id is None or self.eos_id is None:
            raise DataError(f"{self.name}: the config needs decoder_start_token_id and eos_token_id "
                             f"(got {self.start_id} and {self.eos_id})")
        self.vocab_size = config.decoder.vocab_size
        self.patch = _patch_size(config.encoder)

    def encode(self, pixel_values):
        out = self.model.encoder(pixel_values=pixel_values, output_attentions=True, return_dict=True)
        return out, out.last_hidden_state, self._require(out.attentions, "encoder", self.name)

    def teacher_force(self, encoded, input_ids):
        out = self.model(encoder_outputs=encoded, decoder_input_ids=input_ids, output_attentions=True, return_dict=True)
        return (self._require(out.decoder_attentions, "decoder", self.name),
                self._require(out.cross_attentions, "cross", self.name))


class _Blip(_Captioner):
    def __init__(self, model):
        super().__init__(model)
        text = model.config.text_config
        self.start_id, self.eos_id, self.vocab_size = text.bos_token_id, text.sep_token_id, text.vocab_size
        self.patch = _patch_size(model.config.vision_config)

    def encode(self, pixel_values):
        out = self.model.vision_model(pixel_values=pixel_values, output_attentions=True, return_dict=True)
        return out, out.last_hidden_state, self._require(out.attentions, "encoder", self.name)

    def teacher_force(self, encoded, input_ids):
        out = self.model.text_decoder(input_ids=input_ids, encoder_hidden_states=encoded.last_hidden_state,
                                      output_attentions=True, return_dict=True)
        return (self._require(out.attentions, "decoder", self.name),
                self._require(out.cross_attentions, "cross", self.name))
