"""The Object Relation Transformer (Herdade et al., NeurIPS 2019) on geocap.kernels.

Data flow, for B images with N region slots (``box_mask`` True = real) and captions of T tokens::

    features [B, N, D] --Linear+ReLU+Dropout--> [B, N, d_model] --Encoder (box attention)--> memory
    tokens [B, T] --Embedding * sqrt(d_model) + sinusoid, Dropout--> --Decoder(memory)-->
        --Linear(d_model -> V), log_softmax--> log_probs [B, T, V]

Conventions: boxes ``[B, N, 4]`` normalised (x1, y1, x2, y2); padded slots may hold anything
(features are zeroed, boxes ignored); token ids as in geocap.data.vocab (<pad> 0, <bos> 1,
<eos> 2 by default); the input tokens of teacher forcing are ``captions[:, :-1]``, starting
with <bos>, and ``log_probs[:, t]`` predicts token t + 1.

Parameter correspondence with ORT's code (for a checkpoint importer; ORT prefixes ``model.``
on the transformer part, l = layer):

=======================================  ==========================================================
geocap                                    ORT
=======================================  ==========================================================
feature_embed.0                           att_embed.0 (the Linear after the optional BatchNorm)
encoder.layers.l.self_attn.{q,k,v,out}_proj  encoder.layers.l.self_attn.linears.{0,1,2,3}
encoder.layers.l.self_attn.wg_weight[h]   encoder.layers.l.self_attn.WGs.h.weight[0]
encoder.layers.l.self_attn.wg_bias[h]     encoder.layers.l.self_attn.WGs.h.bias[0]
encoder.layers.l.{attn_norm, ff_norm}     encoder.layers.l.sublayer.{0, 1}.norm
encoder.layers.l.feed_forward.w_{1,2}     encoder.layers.l.feed_forward.w_{1,2}
decoder.layers.l.{self,cross}_attn.*      decoder.layers.l.{self_attn, src_attn}.linears.*
decoder.layers.l.{self,cross,ff}_norm     decoder.layers.l.sublayer.{0, 1, 2}.norm
encoder.norm, decoder.norm                encoder.norm, decoder.norm
word_embed                                tgt_embed.0.lut
generator                                 generator.proj
=======================================  ==========================================================

(The sinusoidal table is a non-persistent buffer, recomputed, so ORT's ``tgt_embed.1.pe`` is not
loaded. Verify the names against a real checkpoint when writing the importer.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .config import ORTConfig
from .decoder import Decoder, DecoderCache
from .encoder import Encoder
from .layers import MultiHeadAttention, sinusoidal_positions


@dataclass
class Memory:
    """The encoded images: ``states [B, N, d_model]`` (after the encoder's final norm), ``mask
    [B, N]`` (True = real box) and each decoder layer's cross-attention ``keys[l]``/``values[l]``
    ``[B, H, N, d_model // H]``, projected once in :meth:`ObjectRelationTransformer.encode`."""

    states: torch.Tensor
    mask: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    def index_select(self, index: torch.Tensor) -> "Memory":
        """Rows ``index`` (``[B']`` long) of every tensor, e.g. the image of each beam."""
        return Memory(self.states.index_select(0, index), self.mask.index_select(0, index),
                      tuple(k.index_select(0, index) for k in self.keys),
                      tuple(v.index_select(0, index) for v in self.values))

    def repeat_interleave(self, repeats: int) -> "Memory":
        """Each image ``repeats`` times in a row (``[B] -> [B * repeats]``): k beams per image."""
        return Memory(self.states.repeat_interleave(repeats, 0), self.mask.repeat_interleave(repeats, 0),
                      tuple(k.repeat_interleave(repeats, 0) for k in self.keys),
                      tuple(v.repeat_interleave(repeats, 0) for v in self.values))


@dataclass
class AttentionRecord:
    """Per-layer attention weights (before dropout) and their entropies (nats per query row),
    float32 and detached. L layers; N box slots; T tokens.

    encoder_probs[l] ``[B, H, N, N]``, encoder_entropy[l] ``[B, H, N]``;
    decoder_probs[l] ``[B, H, T, T]``, decoder_entropy[l] ``[B, H, T]``;
    cross_probs[l] ``[B, H, T, N]``, cross_entropy[l] ``[B, H, T]``.
    Padded keys get weight 0; rows of padded box queries are computed but meaningless.
    """

    encoder_probs: list[torch.Tensor] = field(default_factory=list)
    encoder_entropy: list[torch.Tensor] = field(default_factory=list)
    decoder_probs: list[torch.Tensor] = field(default_factory=list)
    decoder_entropy: list[torch.Tensor] = field(default_factory=list)
    cross_probs: list[torch.Tensor] = field(default_factory=list)
    cross_entropy: list[torch.Tensor] = field(default_factory=list)


class ObjectRelationTransformer(nn.Module):
    """ORT captioner. ``backend`` (``"auto"``, ``"triton"``, ``"torch"``) is the default backend of
    every attention call; each method also takes ``backend=`` to override it for one call."""

    def __init__(self, config: ORTConfig, *, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        d = config.d_model
        self.feature_embed = nn.Sequential(nn.Linear(config.feature_dim, d), nn.ReLU(), nn.Dropout(config.dropout))
        self.encoder = Encoder(config)
        self.word_embed = nn.Embedding(config.vocab_size, d)
        self.register_buffer("positions", sinusoidal_positions(config.max_len, d), persistent=False)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.decoder = Decoder(config)
        self.generator = nn.Linear(d, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ORT's init: xavier-uniform for every matrix, torch's defaults for biases and the norms'
        ones/zeros; the geometry rows as ORT's per-head ``Linear(64 -> 1)`` (see MultiHeadAttention)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiHeadAttention) and m.geometry:
                m.reset_geometry_parameters()

    def _backend(self, backend: Optional[str]) -> str:
        return self.backend if backend is None else backend

    # -- encoder -----------------------------------------------------------------------------
    def _encode(self, features, boxes, box_mask, backend, record):
        if features.dim() != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features must have shape [B, N, {self.config.feature_dim}], got {tuple(features.shape)}")
        b, n, _ = features.shape
        if box_mask is None:
            box_mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        if box_mask.shape != (b, n) or box_mask.dtype != torch.bool:
            raise ValueError(f"box_mask must be a bool tensor [B, N] = {(b, n)}, got {box_mask.dtype} {tuple(box_mask.shape)}")
        # padded slots may hold anything (even NaN); zero them so nothing can leak through 0 * NaN
        features = features.to(self.feature_embed[0].weight.dtype).masked_fill(~box_mask[..., None], 0.0)
        x = self.feature_embed(features)
        states, stats = self.encoder(x, boxes, box_mask, backend=backend, record=record)
        keys, values = self.decoder.memory_keys_values(states)
        return Memory(states, box_mask, keys, values), stats

    def encode(self, features: torch.Tensor, boxes: torch.Tensor, box_mask: Optional[torch.Tensor] = None, *,
               backend: Optional[str] = None) -> Memory:
        """Encode ``features [B, N, D]``, ``boxes [B, N, 4]``, ``box_mask [B, N]`` (True = real;
        None = all real) into a :class:`Memory` (its cross-attention keys/values computed up front)."""
        return self._encode(features, boxes, box_mask, self._backend(backend), False)[0]

    # -- decoder -----------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``tokens [B, t]`` at positions ``start .. start + t - 1`` -> ``[B, t, d_model]``:
        word embedding * sqrt(d_model) + sinusoidal position, then dropout."""
        t = tokens.shape[1]
        if start + t > self.config.max_len:
            raise ValueError(f"positions up to {start + t} exceed config.max_len = {self.config.max_len}")
        x = self.word_embed(tokens) * math.sqrt(self.config.d_model) + self.positions[start:start + t]
        return self.embed_dropout(x)

    def _decode(self, memory, tokens, cache, backend, record):
        x = self.embed_tokens(tokens, 0 if cache is None else cache.length)
        states, cache, self_stats, cross_stats = self.decoder(x, memory, cache, backend=backend, record=record)
        return torch.log_softmax(self.generator(states), dim=-1), cache, self_stats, cross_stats

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, box_mask: Optional[torch.Tensor],
                tokens: torch.Tensor, *, record: bool = False, backend: Optional[str] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, AttentionRecord]]:
        """Teacher forcing: ``tokens [B, T]`` input ids (starting with <bos>) ->
        ``log_probs [B, T, V]``, row t the distribution of token t + 1.

        ``record=True`` returns ``(log_probs, AttentionRecord)`` with every layer's attention
        weights and entropies (encoder self, decoder self, cross).
        """
        backend = self._backend(backend)
        memory, enc_stats = self._encode(features, boxes, box_mask, backend, record)
        log_probs, _, self_stats, cross_stats = self._decode(memory, tokens, None, backend, record)
        if not record:
            return log_probs
        rec = AttentionRecord(
            [s.probs for s in enc_stats], [s.entropy for s in enc_stats],
            [s.probs for s in self_stats], [s.entropy for s in self_stats],
            [s.probs for s in cross_stats], [s.entropy for s in cross_stats])
        return log_probs, rec

    def decode_step(self, memory: Memory, tokens: torch.Tensor, cache: Optional[DecoderCache] = None, *,
                    backend: Optional[str] = None) -> tuple[torch.Tensor, DecoderCache]:
        """Incremental decoding: the distribution of the next token.

        ``tokens``: the last token ``[B]``, or the tokens so far ``[B, t]`` of which only those
        not yet in ``cache`` (``tokens[:, cache.length:]``) are run; ``cache`` None at the start
        (then ``tokens`` is typically the <bos> column). ``memory`` rows must match ``tokens``
        rows (expand with ``memory.repeat_interleave(k)`` or ``index_select`` for beams).
        Returns ``(log_probs [B, V] for the token after the last, new DecoderCache)``; the prefix is
        never re-decoded. Call in eval mode for deterministic results.
        """
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        elif cache is not None:
            if tokens.shape[1] <= cache.length:
                raise ValueError(f"tokens hold {tokens.shape[1]} positions but the cache already has {cache.length}")
            tokens = tokens[:, cache.length:]
        if tokens.shape[0] != memory.batch_size:
            raise ValueError(f"tokens have {tokens.shape[0]} rows but memory has {memory.batch_size}")
        log_probs, cache, _, _ = self._decode(memory, tokens, cache, self._backend(backend), False)
        return log_probs[:, -1], cache
