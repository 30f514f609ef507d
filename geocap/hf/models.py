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

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from geocap.errors import UsageError

from .patches import PatchGrid

SUPPORTED = ("VisionEncoderDecoderModel", "BlipForConditionalGeneration")


class UnsupportedModel(UsageError):
    """A model class geocap.hf cannot record; the message names it and the supported ones."""


def import_transformers():
    """``transformers``, importable from anywhere.

    transformers imports the ``kernels`` distribution (Hugging Face's hub kernels) when it is
    installed; run from the repository root (``python -m pytest``, ``python -c``), the current
    folder comes first on ``sys.path`` and its ``kernels/`` (geocap's own, installed as
    ``geocap.kernels``) would be taken for it. So the installed ``kernels`` is imported first,
    with this repository's root out of the way.
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError("geocap.hf needs transformers: pip install 'geocap[hf]'") from e
    if "kernels" not in sys.modules:
        repo_root = Path(__file__).resolve().parents[2]
        spec = importlib.util.find_spec("kernels")
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent == repo_root / "kernels":
            saved = list(sys.path)
            sys.path[:] = [p for p in saved if Path(p or ".").resolve() != repo_root]
            try:
                if importlib.util.find_spec("kernels") is not None:
                    importlib.import_module("kernels")
            finally:
                sys.path[:] = saved
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
    size = getattr(config, "patch_size", None)
    if size is None:
        raise UnsupportedModel(f"image encoder {type(config).__name__} has no patch_size: geocap.hf records "
                               f"patch encoders (ViT-like); supported: {', '.join(SUPPORTED)}")
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
            raise ValueError(f"{self.name}: the config needs decoder_start_token_id and eos_token_id "
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
