"""ORT-style baselines for the captioner benchmarks: the weights of an
:class:`~geocap.model.ObjectRelationTransformer` run the way ORT's code runs them.

ORT (Herdade et al.'s code, a fork of ruotianluo's self-critical.pytorch) differs from geocap in
how it executes the same network, not in what it computes. This module reproduces that execution
on geocap's parameters (the model's own ``Linear``, ``LayerNorm``, feed-forward and embedding
modules; nothing is copied), so both sides of a benchmark share every weight:

* **Eager attention.** Every attention is ``geocap.kernels.reference.reference_attention``: ORT's
  op-by-op code (the ``[B, N, N, 64]`` box embedding recomputed in every encoder layer, one
  ``Linear(64 -> 1)`` per head, relu / clamp / log, ``QK^T / sqrt(d)``, padded keys -1e9,
  softmax, ``@ V``), with attention dropout as ORT's ``nn.Dropout`` on the weights.
* **No decoder cache.** ORT's ``decode(memory, mask, ys, subsequent_mask)`` runs the decoder over
  the whole prefix ``ys [R, t]`` at every step and keeps only the last position; its
  cross-attention projects the encoder output into keys and values in every layer of every call
  (``src_attn.linears``), so :class:`OrtStyleCaptioner` keeps only the encoder states in its
  :class:`~geocap.model.Memory` (``keys``/``values`` are empty) and projects them per call.
* **Beams one image at a time.** ORT's ``_sample_beam`` encodes the batch once, then loops over
  the images: image ``i``'s memory is expanded to ``k`` beams and its beam search runs alone,
  the state being the token prefix ``ys`` that is reordered with the surviving beams
  (:func:`ort_beam_search`).
* **Features repeated per caption in training.** ORT's loader copies each image's features
  ``seq_per_img`` times and the model encodes every copy: a training batch is per caption
  (:func:`per_caption_batch`). geocap's trainer reads per-image batches instead and encodes each
  image once (:class:`geocap.train.CrossEntropyObjective`).

What is *not* ORT's: the beam selection rule. ORT's ``beam_step`` keeps ``k`` beams, parks ended
ones in ``done_beams`` and always runs ``seq_length`` steps; here each image's search is
:func:`geocap.decoding.beam_search` itself (with ``B = 1``), driven through this module's
prefix-re-decoding :meth:`OrtStyleCaptioner.decode_step`, so that the baseline chooses exactly
the captions geocap chooses and a benchmark compares equal work. Its early stop can only make
the baseline cheaper than ORT's fixed ``seq_length`` steps (a random model rarely ends a
caption early anyway). ORT's decoder also masks <pad> keys in teacher forcing (not in
decoding), which this module does as well (it changes nothing at the positions trained on).

Shapes and conventions are the model's (see :mod:`geocap.model.transformer`): features
``[B, N, D]``, boxes ``[B, N, 4]`` normalised, ``attention_mask [B, N]`` True = real; tokens start
with <bos>; ``log_probs [R, t, V]``. Train/eval mode (dropout) follows the wrapped model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from geocap.decoding import Decoded, beam_search
from geocap.kernels.reference import reference_attention
from geocap.model import Memory, MultiHeadAttention, ObjectRelationTransformer
from geocap.train import optimizer_update, token_loss

__all__ = ["OrtStyleCaptioner", "PrefixState", "concat_decoded", "ort_beam_search", "per_caption_batch",
           "training_step"]


@dataclass
class PrefixState:
    """ORT's decoding state: the tokens decoded so far, ``tokens [R, t]`` (<bos> first), one row
    per beam. Takes the place of geocap's ``DecoderCache`` in :func:`geocap.decoding.beam_search`,
    which reorders it with :meth:`index_select` as it reorders the cache."""

    tokens: torch.Tensor

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def index_select(self, index: torch.Tensor) -> "PrefixState":
        """Rows ``index`` (``[R']`` long): the prefixes of the surviving beams."""
        return PrefixState(self.tokens.index_select(0, index))


class OrtStyleCaptioner:
    """Runs ``model``'s weights the ORT way (module docstring): eager attention, memory projected
    in every decoder call, the whole prefix re-decoded. Holds no parameter of its own.

    ``config`` is the model's; ``decode_step`` has :meth:`ObjectRelationTransformer.decode_step`'s
    signature, with a :class:`PrefixState` for the cache, so :func:`geocap.decoding.beam_search`
    can drive it.
    """

    def __init__(self, model: ObjectRelationTransformer):
        if not isinstance(model, ObjectRelationTransformer):
            raise ValueError(f"model must be an ObjectRelationTransformer, got {type(model).__name__}")
        self.model = model
        self.config = model.config

    # -- attention, ORT's eager way ---------------------------------------------------------
    def _dropout_keep(self, mha: MultiHeadAttention, shape) -> tuple[Optional[torch.Tensor], float]:
        """ORT's ``nn.Dropout`` on the attention weights: a keep mask ``[B, H, Nq, Nk]`` in
        training (None in eval mode or at p = 0) and its p."""
        p = mha.dropout if mha.training else 0.0
        if p == 0.0:
            return None, 0.0
        return torch.rand(shape, device=mha.q_proj.weight.device) >= p, p

    def _attend(self, mha: MultiHeadAttention, x: torch.Tensor, source: torch.Tensor,
                attention_mask: Optional[torch.Tensor], *, causal: bool = False,
                boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mha`` with queries from ``x [B, Nq, d_model]`` and keys/values projected from
        ``source [B, Nk, d_model]`` (projected here, every call); ``boxes [B, N, 4]`` for the
        encoder's box attention. With ``mha.legacy_extra_skip`` (encoder self-attention) ORT's
        extra skip: the value input added to the merged heads before the output projection.
        Returns ``[B, Nq, d_model]``."""
        q = mha.split_heads(mha.q_proj(x))
        k, v = mha.keys_values(source)
        keep, p = self._dropout_keep(mha, q.shape[:3] + (k.shape[2],))
        geo = (boxes, mha.wg_weight, mha.wg_bias) if boxes is not None else (None, None, None)
        out, _ = reference_attention(q, k, v, *geo, attention_mask, causal=causal, dropout_keep=keep, dropout_p=p)
        merged = mha.merge_heads(out)
        if mha.legacy_extra_skip:
            merged = source + merged  # ORT: `x = input_value + x`, then `linears[-1](x)`
        return mha.out_proj(merged)

    # -- encoder ----------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, boxes: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None) -> Memory:
        """Encode ``features [B, N, D]`` with ``boxes [B, N, 4]`` and ``attention_mask [B, N]`` (None =
        all real). Returns a :class:`Memory` holding ``states`` and ``mask`` only (empty
        ``keys``/``values``: ORT projects them in every decoder call)."""
        model = self.model
        if features.dim() != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features must have shape [B, N, {self.config.feature_dim}], got {tuple(features.shape)}")
        b, n, _ = features.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        if attention_mask.shape != (b, n) or attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be a bool tensor [B, N] = {(b, n)}, got {attention_mask.dtype} "
                             f"{tuple(attention_mask.shape)}")
        if boxes.shape != (b, n, 4):
            raise ValueError(f"boxes must have shape [B, N, 4] = {(b, n, 4)}, got {tuple(boxes.shape)}")
        x = model.feature_embed(features.masked_fill(~attention_mask[..., None], 0.0))
        for layer in model.encoder.layers:
            attn = layer.self_attn
            h = layer.attn_norm(x)
            x = x + layer.dropout(self._attend(attn, h, h, attention_mask, boxes=boxes if attn.geometry else None))
            x = x + layer.dropout(layer.feed_forward(layer.ff_norm(x)))
        return Memory(model.encoder.norm(x), attention_mask, (), ())

    # -- decoder ----------------------------------------------------------------------------
    def decoder_states(self, memory: Memory, tokens: torch.Tensor, *, mask_padding: bool = True) -> torch.Tensor:
        """ORT's ``decode``: the decoder over the whole of ``tokens [R, t]`` (positions 0 .. t-1,
        <bos> first) and ``memory`` (``R`` rows), no cache. Returns the states after the final
        norm, ``[R, t, d_model]``. With ``mask_padding`` (teacher forcing) <pad> tokens are masked
        as keys, as ORT's ``seq_mask`` does (position 0 always kept); ORT's decoding uses the
        causal mask alone (``mask_padding=False``)."""
        model = self.model
        if tokens.dim() != 2 or tokens.shape[0] != memory.batch_size:
            raise ValueError(f"tokens must have shape [R, t] with R = {memory.batch_size} (memory rows), "
                             f"got {tuple(tokens.shape)}")
        token_mask = None
        if mask_padding:
            token_mask = tokens != self.config.pad_id
            token_mask[:, 0] = True
        x = model.embed_tokens(tokens, 0)
        for layer in model.decoder.layers:
            h = layer.self_norm(x)
            x = x + layer.dropout(self._attend(layer.self_attn, h, h, token_mask, causal=True))
            x = x + layer.dropout(self._attend(layer.cross_attn, layer.cross_norm(x), memory.states, memory.mask))
            x = x + layer.dropout(layer.feed_forward(layer.ff_norm(x)))
        return model.decoder.norm(x)

    def log_probs(self, states: torch.Tensor) -> torch.Tensor:
        """ORT's ``logit`` + ``log_softmax``: ``states [..., d_model] -> [..., V]``."""
        return torch.log_softmax(self.model.generator(states), dim=-1)

    def decode(self, memory: Memory, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing over ``memory``: ``log_probs [R, t, V]`` of :meth:`decoder_states`."""
        return self.log_probs(self.decoder_states(memory, tokens))

    def __call__(self, features: torch.Tensor, boxes: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing, as ``ObjectRelationTransformer.forward``: ``log_probs [B, T, V]``."""
        return self.decode(self.encode(features, boxes, attention_mask), tokens)

    def decode_step(self, memory: Memory, tokens: torch.Tensor, cache: Optional[PrefixState] = None, *,
                    backend: Optional[str] = None) -> tuple[torch.Tensor, PrefixState]:
        """ORT's ``core``: append ``tokens [R]`` to the prefix in ``cache`` (None: the prefix
        starts here), re-decode the whole prefix, return ``(log_probs [R, V] of its last
        position, the longer PrefixState)``; like ORT's ``get_logprobs_state``, only the last
        position goes through the output layer. ``backend`` is accepted and ignored (always eager)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be the last token of each row, [R], got {tuple(tokens.shape)}")
        prefix = tokens[:, None] if cache is None else torch.cat([cache.tokens, tokens[:, None]], dim=1)
        states = self.decoder_states(memory, prefix, mask_padding=False)
        return self.log_probs(states[:, -1]), PrefixState(prefix)


def concat_decoded(parts: Sequence[Decoded], pad_id: int) -> Decoded:
    """One :class:`Decoded` of the rows of ``parts`` in order (tokens padded with ``pad_id``,
    token log-probabilities with 0, to the widest part)."""
    if not parts:
        raise ValueError("concat_decoded needs at least one part")
    width = max(p.tokens.shape[1] for p in parts)

    def widen(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Decoded(torch.cat([widen(p.tokens, pad_id) for p in parts]), torch.cat([p.lengths for p in parts]),
                   torch.cat([p.scores for p in parts]),
                   torch.cat([widen(p.token_log_probs, 0.0) for p in parts]), eos_id=parts[0].eos_id)


def ort_beam_search(ort: OrtStyleCaptioner, features: torch.Tensor, boxes: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], *, beam_size: int = 3, max_len: int = 16,
                    length_penalty: float = 0.0) -> Decoded:
    """ORT's ``_sample_beam``: encode the ``B`` images at once, then for each image alone run a
    beam search of ``beam_size`` beams whose every step re-decodes the ``[beam_size, t]`` prefix
    (:meth:`OrtStyleCaptioner.decode_step`). Returns a :class:`Decoded` with ``B`` rows, as
    :func:`geocap.decoding.beam_search` (whose selection rule each image's search uses)."""
    with torch.no_grad():
        memory = ort.encode(features, boxes, attention_mask)
        device = memory.states.device
        parts = [beam_search(ort, memory.index_select(torch.tensor([i], device=device)), beam_size=beam_size,
                             max_len=max_len, length_penalty=length_penalty)
                 for i in range(memory.batch_size)]
    return concat_decoded(parts, ort.config.pad_id)


def per_caption_batch(features: torch.Tensor, boxes: torch.Tensor, attention_mask: torch.Tensor,
                      captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORT's ``seq_per_img`` layout: ``captions [B, K, T]`` (K per image) -> ``(features
    [B*K, N, D], boxes [B*K, N, 4], attention_mask [B*K, N], captions [B*K, T])``, image i's
    features copied to rows ``i*K .. i*K + K - 1``."""
    if captions.dim() != 3 or captions.shape[0] != features.shape[0]:
        raise ValueError(f"captions must have shape [B, K, T] with B = {features.shape[0]}, got "
                         f"{tuple(captions.shape)}")
    k = captions.shape[1]
    return (features.repeat_interleave(k, 0), boxes.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0),
            captions.reshape(-1, captions.shape[-1]))


def training_step(forward: Callable[[torch.Tensor], torch.Tensor], captions: torch.Tensor,
                  optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], *, grad_clip: float = 0.1,
                  label_smoothing: float = 0.0, pad_id: int = 0) -> torch.Tensor:
    """One optimiser update on a per-caption batch, for any model: ``forward(inputs [R, T-1]) ->
    log_probs [R, T-1, V]`` on the inputs ``captions[:, :-1]`` (``captions [R, T]`` per caption,
    <bos> first), :func:`geocap.train.token_loss` against ``captions[:, 1:]`` (the targets that
    are not ``pad_id``: a vocabulary whose <eos> differs from <pad>), then the trainer's
    :func:`geocap.train.optimizer_update` (backward, gradient-norm clipping at ``grad_clip``, 0:
    none, step). Returns the loss (detached)."""
    inputs, targets = captions[:, :-1], captions[:, 1:]
    loss = token_loss(forward(inputs), targets, label_smoothing, pad_id)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training_step: the loss is {loss.item()}")
    optimizer_update(loss, optimizer, params, grad_clip=grad_clip)
    return loss.detach()
