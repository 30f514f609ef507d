"""The Python API: caption images and score captions with a trained model.

    captioner = Captioner.load("model.pt")              # a geocap checkpoint
    captioner.caption(features, boxes, attention_mask)  # -> ["a man riding a horse", ...]
    captioner.log_probs(features, boxes, tokens)        # -> [B, T + 1, V]

Inputs, for B images with N region slots of D = ``config.feature_dim`` features:

``features``       ``[B, N, D]`` floating point
``boxes``          ``[B, N, 4]`` floating point, normalised (x1, y1, x2, y2) in [0, 1]
``attention_mask`` ``[B, N]`` bool, True = real box, attended to; False = padding (None: every
                   slot real); each image needs at least one real box; padded slots may hold
                   anything. ``feature_mask``, its name before, is a deprecated alias for one
                   release (DeprecationWarning; passing both is a TypeError)
``tokens``         ``[B, T]`` integer word ids of the vocabulary, without <bos>/<eos>, padded
                   after a row's last word with the vocabulary's ``pad_id``

Special ids (<pad>, <bos>, <eos>) are the vocabulary's (``vocab.pad_id`` ...), which the model's
config must share: geocap's 0, 1, 2, or e.g. an imported ORT model's single id 0 for all three.

numpy arrays and torch tensors are both accepted; numpy arrays and CPU tensors are moved to the
model's device, tensors on another device are refused (ValueError naming the argument).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch

from geocap.checkpoint import load_checkpoint, save_checkpoint
from geocap.data.vocab import Vocabulary
from geocap.kernels.deprecation import renamed_argument
from geocap.model import ObjectRelationTransformer, ORTConfig

ArrayLike = Union[np.ndarray, torch.Tensor]


class Captioner:
    """An :class:`~geocap.model.ObjectRelationTransformer` with its :class:`~geocap.data.vocab.Vocabulary`.

    ``model.config.vocab_size`` must equal ``len(vocab)`` and the config's <pad>/<bos>/<eos> ids
    must be the vocabulary's (``vocab.pad_id``, ``vocab.bos_id``, ``vocab.eos_id``). Methods run
    the model in eval mode under ``torch.no_grad()`` and put it back in the mode it was in.
    """

    def __init__(self, model: ObjectRelationTransformer, vocab: Vocabulary):
        if not isinstance(model, ObjectRelationTransformer):
            raise ValueError(f"model must be an ObjectRelationTransformer, got {type(model).__name__}")
        if not isinstance(vocab, Vocabulary):
            raise ValueError(f"vocab must be a Vocabulary, got {type(vocab).__name__}")
        config = model.config
        if config.vocab_size != len(vocab):
            raise ValueError(f"vocab has {len(vocab)} words but model.config.vocab_size is {config.vocab_size}")
        ids = (vocab.pad_id, vocab.bos_id, vocab.eos_id)
        if (config.pad_id, config.bos_id, config.eos_id) != ids:
            raise ValueError(f"model.config's <pad>/<bos>/<eos> ids {(config.pad_id, config.bos_id, config.eos_id)} "
                             f"are not the vocabulary's {ids}")
        self.model = model
        self.vocab = vocab

    @property
    def config(self) -> ORTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        c = self.config
        return (f"Captioner({len(self.vocab)} words, D={c.feature_dim}, layers={c.layers}, d_model={c.d_model}, "
                f"device={self.device})")

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, device: Union[str, torch.device, None] = None) -> "Captioner":
        """The captioner of the geocap checkpoint at ``path`` (loaded safely, see
        :mod:`geocap.checkpoint`), on ``device`` (default: CUDA when available, else CPU), in eval mode."""
        checkpoint = load_checkpoint(path, map_location="cpu")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = checkpoint.build_model(device).eval()
        return cls(model, checkpoint.vocab)

    def save(self, path) -> None:
        """Write the model and vocabulary as a geocap checkpoint (no optimizer or RNG state), atomically."""
        save_checkpoint(os.fspath(path), model=self.model, config=self.config, vocab=self.vocab, rng=False)

    # -- inputs ------------------------------------------------------------------------------
    def _tensor(self, name: str, value) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":         # strings, objects, dates, complex...
                raise ValueError(f"{name} must be a numeric array, got dtype {value.dtype}")
            return torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
        device = self.device
        if value.device != device:
            if value.device.type != "cpu":
                raise ValueError(f"{name} is on {value.device} but the model is on {device}")
            value = value.to(device)
        return value

    def _inputs(self, features, boxes, attention_mask):
        """Checked ``(features [B, N, D], boxes [B, N, 4] float32, mask [B, N] bool)`` on the model's device."""
        features = self._tensor("features", features)
        boxes = self._tensor("boxes", boxes)
        d = self.config.feature_dim
        if features.dim() != 3 or features.shape[-1] != d:
            raise ValueError(f"features must have shape [B, N, {d}] (D = config.feature_dim), "
                             f"got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        b, n, _ = features.shape
        if n == 0:
            raise ValueError("features must have at least one box slot (N >= 1)")
        if tuple(boxes.shape) != (b, n, 4):
            raise ValueError(f"boxes must have shape [B, N, 4] = {(b, n, 4)} to match features, "
                             f"got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise ValueError(f"boxes must be floating point, got {boxes.dtype}")
        if attention_mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        else:
            mask = self._tensor("attention_mask", attention_mask)
            if mask.dtype != torch.bool:
                raise ValueError(f"attention_mask must be bool (True = real box), got {mask.dtype}")
            if tuple(mask.shape) != (b, n):
                raise ValueError(f"attention_mask must have shape [B, N] = {(b, n)}, got {tuple(mask.shape)}")
            if b and not bool(mask.any(dim=1).all()):
                empty = torch.nonzero(~mask.any(dim=1)).flatten().tolist()
                raise ValueError(f"attention_mask marks no real box for image(s) {empty[:10]}")
        return features, boxes.to(torch.float32), mask

    def _tokens(self, tokens, batch: int) -> torch.Tensor:
        tokens = self._tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.shape[0] != batch:
            raise ValueError(f"tokens must have shape [B, T] with B = {batch}, got {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer word ids, got {tokens.dtype}")
        if tokens.shape[1] + 1 > self.config.max_len:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; with <bos> at most config.max_len = "
                             f"{self.config.max_len} fit")
        tokens = tokens.long()
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= len(self.vocab):
                raise ValueError(f"tokens hold ids {lo}..{hi}, outside the vocabulary's 0..{len(self.vocab) - 1}")
            v = self.vocab
            marks = [i for i in {v.bos_id, v.eos_id} if i != v.pad_id]
            if marks and bool(torch.isin(tokens, torch.tensor(marks, device=tokens.device)).any()):
                raise ValueError("tokens must not contain <bos> or <eos> (they are added internally)")
            pad = tokens == v.pad_id
            if bool((pad[:, :-1] & ~pad[:, 1:]).any()):
                raise ValueError("tokens may hold <pad> only after a row's last word")
        return tokens

    # -- API ---------------------------------------------------------------------------------
    @renamed_argument("feature_mask", "attention_mask")
    def caption(self, features: ArrayLike, boxes: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                beam_size: int = 3, max_len: int = 20) -> list:
        """One caption per image: ``B`` strings of vocabulary words joined by spaces (no special
        tokens; an image whose first token is <eos> gets ""). ``beam_size`` 1 is greedy decoding,
        more is beam search with that many beams; at most ``max_len`` words per caption.
        ``attention_mask [B, N]``: True = real box (see the module's docstring)."""
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= self.config.max_len:
            raise ValueError(f"max_len must be an int in [1, config.max_len = {self.config.max_len}], got {max_len!r}")
        features, boxes, mask = self._inputs(features, boxes, attention_mask)
        if features.shape[0] == 0:
            return []
        from geocap.decoding import beam_search, greedy_decode
        training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                memory = self.model.encode(features, boxes, mask)
                if beam_size == 1:
                    decoded = greedy_decode(self.model, memory, max_len=max_len)
                else:
                    decoded = beam_search(self.model, memory, beam_size=beam_size, max_len=max_len)
        finally:
            self.model.train(training)
        # Decoded.tokens: no <bos>, <eos> then <pad>; Vocabulary.decode stops at either
        return [self.vocab.decode(row) for row in decoded.tokens.tolist()]

    @renamed_argument("feature_mask", "attention_mask")
    def log_probs(self, features: ArrayLike, boxes: ArrayLike, tokens: ArrayLike,
                  attention_mask: Optional[ArrayLike] = None) -> torch.Tensor:
        """Teacher-forced scores of ``tokens [B, T]`` (word ids, no <bos>/<eos>): returns
        ``[B, T + 1, V]`` log-probabilities on the model's device, where position ``t`` is
        ``log P(next word | <bos>, tokens[:, :t])``; position ``T`` scores what follows the last
        word (its ``[vocab.eos_id]`` entry is the probability that the caption ends there).

        Rows of different lengths may be padded with <pad> (``vocab.pad_id``) after their last
        word: row b's end is then predicted at position ``length_b`` and the positions after it
        are meaningless. ``attention_mask [B, N]``: True = real box (see the module's docstring).
        """
        features, boxes, mask = self._inputs(features, boxes, attention_mask)
        tokens = self._tokens(tokens, features.shape[0])
        bos = torch.full((tokens.shape[0], 1), self.vocab.bos_id, dtype=torch.long, device=tokens.device)
        training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                return self.model(features, boxes, mask, torch.cat([bos, tokens], dim=1))
        finally:
            self.model.train(training)
