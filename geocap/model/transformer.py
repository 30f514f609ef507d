"""The Object Relation Transformer (Herdade et al., NeurIPS 2019) on geocap.kernels.

Data flow, for B images with N region slots (``attention_mask [B, N]`` bool, True = real box,
attended to; False = padding) and captions of T tokens::

    features [B, N, D] --Linear+ReLU+Dropout--> [B, N, d_model] --Encoder (box attention)--> memory
    tokens [B, T] --Embedding * sqrt(d_model) + sinusoid, Dropout--> --Decoder(memory)-->
        --Linear(d_model -> V), log_softmax--> log_probs [B, T, V]

Conventions: boxes ``[B, N, 4]`` normalised (x1, y1, x2, y2); padded slots may hold anything
(features are zeroed, boxes ignored); token ids ``config.pad_id``, ``config.bos_id``,
``config.eos_id`` as the vocabulary's (geocap's <pad> 0, <bos> 1, <eos> 2 by default; a model
imported from ORT uses 0 for all three); the input tokens of teacher forcing are
``captions[:, :-1]``, starting with <bos>, and ``log_probs[:, t]`` predicts token t + 1.

Parameter correspondence with ORT's code (used by :mod:`geocap.ort_import`, which checks every
name and shape and loads the result strictly; l = layer, h = head). ORT's keys are its
``RelationTransformerModel.state_dict()``: ``att_embed.*`` at the top, everything else under
``model.``:

============================================  =====================================================
geocap                                        ORT
============================================  =====================================================
feature_embed.0.{weight,bias}                 att_embed.0.{weight,bias} (use_bn=0); with use_bn=1
                                              att_embed.1.*, ORT's eval-mode BatchNorm1d
                                              att_embed.0.{weight,bias,running_mean,running_var}
                                              folded into it
encoder.layers.l.self_attn.{q,k,v,out}_proj   model.encoder.layers.l.self_attn.linears.{0,1,2,3}
encoder.layers.l.self_attn.wg_weight[h]       model.encoder.layers.l.self_attn.WGs.h.weight[0]
encoder.layers.l.self_attn.wg_bias[h]         model.encoder.layers.l.self_attn.WGs.h.bias[0]
encoder.layers.l.{attn,ff}_norm               model.encoder.layers.l.sublayer.{0,1}.norm
encoder.layers.l.feed_forward.w_{1,2}         model.encoder.layers.l.feed_forward.w_{1,2}
decoder.layers.l.self_attn.{q,k,v,out}_proj   model.decoder.layers.l.self_attn.linears.{0,1,2,3}
decoder.layers.l.cross_attn.{q,k,v,out}_proj  model.decoder.layers.l.src_attn.linears.{0,1,2,3}
decoder.layers.l.{self,cross,ff}_norm         model.decoder.layers.l.sublayer.{0,1,2}.norm
decoder.layers.l.feed_forward.w_{1,2}         model.decoder.layers.l.feed_forward.w_{1,2}
encoder.norm, decoder.norm                    model.encoder.norm, model.decoder.norm
word_embed.weight                             model.tgt_embed.0.lut.weight
generator.{weight,bias}                       model.generator.proj.{weight,bias}
============================================  =====================================================

Not loaded: ORT's ``model.tgt_embed.1.pe`` (the sinusoidal table; here a non-persistent buffer,
recomputed) and BatchNorm's ``num_batches_tracked``. ORT's vocabulary has ``len(ix_to_word) + 1``
ids, 0 being start, end and padding at once. ORT's ``legacy_extra_skip`` adds the box attention's
value input to the merged heads *before* the output projection (``x = input_value + x;
return linears[-1](x)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from geocap.kernels import value_checks
from geocap.kernels.deprecation import renamed_argument
from geocap.kernels.validation import check_boxes, check_finite, require_tensor

from .config import ORTConfig
from .decoder import Decoder, DecoderCache, Packing
from .encoder import Encoder
from .layers import MultiHeadAttention, sinusoidal_positions


@dataclass
class Memory:
    """The encoded images: ``states [B, N, d_model]`` (after the encoder's final norm), ``mask
    [B, N]`` (the encoder's ``attention_mask``: True = real box, attended to by cross-attention)
    and each decoder layer's cross-attention ``keys[l]``/``values[l]`` ``[B, H, N, d_model // H]``,
    projected once in :meth:`ObjectRelationTransformer.encode`."""

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
class AttentionMaps:
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


def box_features(boxes: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, N, 5]``: each object's normalised ``(x1, y1, x2, y2, area)`` from ``boxes [B, N, 4]``,
    0 in the padded slots of ``attention_mask [B, N]`` (whatever they held), in ``dtype``."""
    b = boxes.to(dtype)
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return torch.cat([b, area[..., None]], dim=-1).masked_fill(~attention_mask[..., None], 0.0)


class ObjectRelationTransformer(nn.Module):
    """ORT captioner. ``backend`` (``"auto"``, ``"triton"``, ``"torch"``) is the default backend of
    every attention call; each method also takes ``backend=`` to override it for one call."""

    def __init__(self, config: ORTConfig, *, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        d = config.d_model
        self.feature_embed = nn.Sequential(nn.Linear(config.input_dim, d), nn.ReLU(), nn.Dropout(config.dropout))
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

    # -- input checks ------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return self.generator.weight.device

    def _check_images(self, features, boxes, attention_mask) -> torch.Tensor:
        """Validate the encoder's inputs (see :meth:`encode`); returns the bool mask ``[B, N]``."""
        require_tensor("features", features)
        d = self.config.feature_dim
        if features.dim() != 3 or features.shape[-1] != d:
            raise ValueError(f"features must have shape [B, N, {d}] (D = config.feature_dim), "
                             f"got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if features.device != self._device:
            raise ValueError(f"features are on {features.device} but the model is on {self._device}")
        b, n, _ = features.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        require_tensor("attention_mask", attention_mask)
        if attention_mask.shape != (b, n) or attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be a bool tensor [B, N] = {(b, n)}, "
                             f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        if attention_mask.device != features.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but features are on "
                             f"{features.device}")
        check_finite("features", features, attention_mask)
        if boxes is None:
            if self.config.geometry:
                raise ValueError("boxes must be a tensor [B, N, 4]: this model's encoder uses geometry "
                                 "(config.geometry=True)")
            if self.config.box_features:
                raise ValueError("boxes must be a tensor [B, N, 4]: this model reads each object's box as features "
                                 "(config.box_features=True)")
            return attention_mask
        # shape, dtype and the values of the real slots: finite, x2 >= x1, y2 >= y1, within [0, 1]
        check_boxes(boxes, b, n, attention_mask)
        if boxes.device != features.device:
            raise ValueError(f"boxes are on {boxes.device} but features are on {features.device}")
        return attention_mask

    def _check_tokens(self, tokens, *, batch: Optional[int] = None, right_padded: bool = False,
                      layout: str = "[B, T]") -> None:
        """Word ids ``tokens`` (``layout``; ``[B]`` allowed when layout is ``"[B] or [B, t]"``): an
        integer tensor on the model's device, ids in ``[0, vocab_size)``, ``batch`` rows when given.
        ``right_padded``: <pad> may appear only after a row's last real token (position 0, the
        <bos>, is not looked at: some vocabularies give <bos> and <pad> one id). One host
        synchronisation (for the id range and the padding), none for an empty tensor."""
        require_tensor("tokens", tokens)
        if tokens.dim() != 2 and not (tokens.dim() == 1 and layout != "[B, T]"):
            raise ValueError(f"tokens must have shape {layout}, got {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer word ids, got dtype {tokens.dtype}")
        if batch is not None and tokens.shape[0] != batch:
            raise ValueError(f"tokens have {tokens.shape[0]} rows but there are {batch} images")
        if tokens.device != self._device:
            raise ValueError(f"tokens are on {tokens.device} but the model is on {self._device}")
        if tokens.numel() == 0:
            return
        flags = [tokens.min().long(), tokens.max().long()]
        if right_padded and tokens.dim() == 2 and tokens.shape[1] > 2:
            pad = tokens[:, 1:] == self.config.pad_id
            flags.append((pad[:, :-1] & ~pad[:, 1:]).any().long())
        lo, hi, *inner = torch.stack(flags).tolist()
        v = self.config.vocab_size
        if lo < 0 or hi >= v:
            raise ValueError(f"tokens hold ids {lo}..{hi}, outside the vocabulary's 0..{v - 1} "
                             f"(config.vocab_size = {v})")
        if inner and inner[0]:
            pad = tokens[:, 1:] == self.config.pad_id
            row = int((pad[:, :-1] & ~pad[:, 1:]).any(1).nonzero()[0, 0])
            raise ValueError(f"tokens row {row} holds <pad> (id {self.config.pad_id}) before a real token: pad "
                             f"captions on the right only (the decoder does not mask <pad> keys)")

    def _check_memory(self, memory) -> None:
        if not isinstance(memory, Memory):
            raise ValueError(f"memory must be a Memory from encode(), got {type(memory).__name__}")
        c = self.config
        expected = (c.heads, c.head_dim)
        if (len(memory.keys) != c.layers or len(memory.values) != c.layers or memory.states.shape[-1] != c.d_model
                or any(tuple(k.shape[1:2]) + tuple(k.shape[3:]) != expected for k in memory.keys + memory.values)):
            shape = tuple(memory.keys[0].shape) if memory.keys else ()
            raise ValueError(f"memory does not fit this model (layers {c.layers}, d_model {c.d_model}, heads "
                             f"{c.heads}): it holds {len(memory.keys)} layers of keys {shape}; encode with this model")

    # -- encoder -----------------------------------------------------------------------------
    def _encode(self, features, boxes, attention_mask, backend, return_attention):
        attention_mask = self._check_images(features, boxes, attention_mask)
        # padded slots may hold anything (even NaN); zero them so nothing can leak through 0 * NaN
        features = features.to(self.feature_embed[0].weight.dtype).masked_fill(~attention_mask[..., None], 0.0)
        if self.config.box_features:
            features = torch.cat([features, box_features(boxes, attention_mask, features.dtype)], dim=-1)
        x = self.feature_embed(features)
        with value_checks(False):  # the box values were checked above, once
            states, stats = self.encoder(x, boxes, attention_mask, backend=backend,
                                         return_attention=return_attention)
        keys, values = self.decoder.memory_keys_values(states)
        return Memory(states, attention_mask, keys, values), stats

    @renamed_argument("box_mask", "attention_mask")
    def encode(self, features: torch.Tensor, boxes: Optional[torch.Tensor],
               attention_mask: Optional[torch.Tensor] = None, *, return_attention: bool = False,
               backend: Optional[str] = None) -> Union[Memory, tuple[Memory, AttentionMaps]]:
        """Encode ``features [B, N, D]``, ``boxes [B, N, 4]``, ``attention_mask [B, N]`` (bool, True =
        real box, attended to; False = padding; None = all real) into a :class:`Memory` (its
        cross-attention keys/values computed up front). ``box_mask``, the mask's name before, is a
        deprecated alias of ``attention_mask`` (DeprecationWarning; both at once is a TypeError).

        Checked (ValueError naming the argument): D = ``config.feature_dim``, floating-point
        features on the model's device, finite in the real slots (the error names the image
        and the box), the mask's shape and dtype, and the boxes of the real
        slots: finite, x2 >= x1, y2 >= y1, normalised to [0, 1] (this holds with
        ``config.geometry=False`` too, where the boxes are otherwise unused and may be None).
        ``B = 0`` gives an empty Memory; an image without a real box (N = 0, or a mask row all
        False) is encoded, and the decoder's cross-attention then attends to nothing.

        ``return_attention=True`` returns ``(memory, AttentionMaps)`` whose ``encoder_probs[l]``
        ``[B, H, N, N]`` and ``encoder_entropy[l]`` ``[B, H, N]`` hold each encoder layer's
        self-attention (its decoder lists stay empty).
        """
        memory, stats = self._encode(features, boxes, attention_mask, self._backend(backend), return_attention)
        if not return_attention:
            return memory
        return memory, AttentionMaps(encoder_probs=[s.probs for s in stats],
                                       encoder_entropy=[s.entropy for s in stats])

    # -- decoder -----------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``tokens [B, t]`` at positions ``start .. start + t - 1`` -> ``[B, t, d_model]``:
        word embedding * sqrt(d_model) + sinusoidal position, then dropout. ValueError for ids
        outside the vocabulary or positions beyond ``config.max_len``."""
        self._check_tokens(tokens)
        return self._embed(tokens, start)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        t = tokens.shape[1]
        if start + t > self.config.max_len:
            raise ValueError(f"positions up to {start + t} exceed config.max_len = {self.config.max_len}")
        x = self.word_embed(tokens.long()) * math.sqrt(self.config.d_model) + self.positions[start:start + t]
        return self.embed_dropout(x)

    def _decode(self, memory, tokens, cache, backend, return_attention, positions=None):
        x = self._embed(tokens, 0 if cache is None else cache.length)
        if positions is not None and cache is None and not return_attention:
            # only the wanted positions and those before them (causality) are decoded at all
            kept = positions.flip(1).cummax(1).values.flip(1)           # [R, T]: up to each row's last wanted
            packing = Packing(kept)
            states = self.decoder.forward_packed(packing.pack(x), packing, memory, backend=backend)
            states = states[positions[kept]]                            # [M, d]
            return torch.log_softmax(self.generator(states), dim=-1), None, [], []
        states, cache, self_stats, cross_stats = self.decoder(x, memory, cache, backend=backend,
                                                              return_attention=return_attention)
        if positions is not None:
            states = states[positions]                                  # [M, d]: skip the others' output layer
        return torch.log_softmax(self.generator(states), dim=-1), cache, self_stats, cross_stats

    @renamed_argument("box_mask", "attention_mask")
    def forward(self, features: torch.Tensor, boxes: torch.Tensor, attention_mask: Optional[torch.Tensor],
                tokens: torch.Tensor, *, return_attention: bool = False, backend: Optional[str] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, AttentionMaps]]:
        """Teacher forcing: ``tokens [B, T]`` input ids (starting with <bos>) ->
        ``log_probs [B, T, V]``, row t the distribution of token t + 1.

        Captions of different lengths are padded on the right with <pad> (after <eos>): by
        causality a real position never sees a later <pad>, so its log-probabilities equal those of
        the caption alone; <pad> before a real token (left padding) is refused, since <pad> keys are
        not masked. Inputs (``attention_mask [B, N]`` True = real box, its deprecated alias
        ``box_mask``) are checked as in :meth:`encode`, and ``tokens`` must be integer ids in
        ``[0, vocab_size)`` with B rows (ValueError naming the argument). ``B = 0`` gives
        ``[0, T, V]``; ``T = 0`` gives ``[B, 0, V]``.

        ``return_attention=True`` returns ``(log_probs, AttentionMaps)`` with every layer's attention
        weights and entropies (encoder self, decoder self, cross).
        """
        if isinstance(features, torch.Tensor) and features.dim() == 3:
            self._check_tokens(tokens, batch=features.shape[0], right_padded=True)
        backend = self._backend(backend)
        memory, enc_stats = self._encode(features, boxes, attention_mask, backend, return_attention)
        log_probs, _, self_stats, cross_stats = self._decode(memory, tokens, None, backend, return_attention)
        if not return_attention:
            return log_probs
        rec = AttentionMaps(
            [s.probs for s in enc_stats], [s.entropy for s in enc_stats],
            [s.probs for s in self_stats], [s.entropy for s in self_stats],
            [s.probs for s in cross_stats], [s.entropy for s in cross_stats])
        return log_probs, rec

    def teacher_force(self, memory: Memory, tokens: torch.Tensor, *, return_attention: bool = False,
                      positions: Optional[torch.Tensor] = None, backend: Optional[str] = None
                      ) -> Union[torch.Tensor, tuple[torch.Tensor, AttentionMaps]]:
        """Teacher forcing over a given :class:`Memory`: ``tokens [R, T]`` input ids (starting
        with <bos>, right-padded as in :meth:`forward`), row r decoded against memory row r ->
        ``log_probs [R, T, V]``, row t the distribution of token t + 1.

        ``teacher_force(encode(features, boxes, attention_mask), tokens)`` is ``forward(features,
        boxes, attention_mask, tokens)``; encoding once and expanding the memory to several captions
        per image (``memory.index_select(image_of_row)`` or ``memory.repeat_interleave(k)``) runs the
        encoder once per image. In training mode that image's captions then share the encoder's dropout
        draw (made by :meth:`encode`); the decoder draws its own per caption. ValueError for a
        ``memory`` of another model, or ``tokens`` that are not integer ids in ``[0, vocab_size)``
        with as many rows as ``memory``, or padded on the left.

        ``return_attention=True`` returns ``(log_probs, AttentionMaps)`` whose ``decoder_probs[l]``
        ``[R, H, T, T]``, ``decoder_entropy[l]`` ``[R, H, T]``, ``cross_probs[l]`` ``[R, H, T, N]``
        and ``cross_entropy[l]`` ``[R, H, T]`` hold each decoder layer's attention (its encoder
        lists stay empty: see :meth:`encode`).

        ``positions``: optional bool ``[R, T]`` (True = wanted, e.g. the positions in a loss):
        returns only those rows of the log-probabilities, packed ``[M, V]`` in row-major order
        (``log_probs[positions]``): the output layer and its softmax run only there, and (without
        ``return_attention``) the decoder layers only at each row's positions up to its last wanted one
        (:class:`~geocap.model.decoder.Packing`); on right-padded captions what this skips is <pad>.
        """
        self._check_memory(memory)
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[0] != memory.batch_size:
            raise ValueError(f"tokens have {tokens.shape[0]} rows but memory has {memory.batch_size} (expand the "
                             f"memory to the captions with index_select or repeat_interleave)")
        self._check_tokens(tokens, right_padded=True)
        if positions is not None and (not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool
                                      or positions.shape != tokens.shape or positions.device != tokens.device):
            raise ValueError(f"positions must be a bool tensor shaped like tokens {tuple(tokens.shape)} on "
                             f"{tokens.device}, got {getattr(positions, 'dtype', type(positions).__name__)} "
                             f"{tuple(getattr(positions, 'shape', ()))}")
        log_probs, _, self_stats, cross_stats = self._decode(memory, tokens, None, self._backend(backend),
                                                             return_attention, positions)
        if not return_attention:
            return log_probs
        return log_probs, AttentionMaps(
            decoder_probs=[s.probs for s in self_stats], decoder_entropy=[s.entropy for s in self_stats],
            cross_probs=[s.probs for s in cross_stats], cross_entropy=[s.entropy for s in cross_stats])

    def decode_step(self, memory: Memory, tokens: torch.Tensor, cache: Optional[DecoderCache] = None, *,
                    backend: Optional[str] = None) -> tuple[torch.Tensor, DecoderCache]:
        """Incremental decoding: the distribution of the next token.

        ``tokens``: the last token ``[B]``, or the tokens so far ``[B, t]`` of which only those
        not yet in ``cache`` (``tokens[:, cache.length:]``) are run; ``cache`` None at the start
        (then ``tokens`` is typically the <bos> column). ``memory`` rows must match ``tokens``
        rows (expand with ``memory.repeat_interleave(k)`` or ``index_select`` for beams).
        Returns ``(log_probs [B, V] for the token after the last, new DecoderCache)``; the prefix is
        never re-decoded. Call in eval mode for deterministic results. ValueError for a ``memory``
        or ``cache`` of another model or batch, ids outside the vocabulary, or positions beyond
        ``config.max_len``.
        """
        self._check_memory(memory)
        self._check_tokens(tokens, layout="[B] or [B, t]")
        if cache is not None:
            if not isinstance(cache, DecoderCache) or len(cache.keys) != self.config.layers:
                raise ValueError("cache must be the DecoderCache a previous decode_step of this model returned")
            if cache.keys[0].shape[0] != memory.batch_size:
                raise ValueError(f"cache has {cache.keys[0].shape[0]} rows but memory has {memory.batch_size}")
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
