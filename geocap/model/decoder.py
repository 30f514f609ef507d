"""ORT's decoder: pre-norm layers of masked self-attention, cross-attention into the encoder
output and feed-forward, then a final norm.

The same code path serves teacher forcing (all T tokens at once, empty cache) and incremental
decoding (the new tokens only, over the cached keys/values of the prefix): the causal mask of
geocap.kernels is bottom-right aligned, so new query i sees the cached keys and new keys j <= i.

Padding tokens are not masked as keys: in geocap captions <pad> only follows <eos> (right
padding), so the causal mask already hides it from every position up to <eos>, whose outputs
equal those of the caption alone (to float rounding); the outputs at <pad> inputs are not trained on. (ORT
masks them too, which changes nothing at those positions.) Left padding would be attended, so
:meth:`~geocap.model.ObjectRelationTransformer.forward` refuses <pad> before a real token. Batched
decoding is unaffected as well: rows never mix, so a row that ended and is fed <pad> (greedy,
sampling), or a beam reordered or dropped by ``DecoderCache.index_select``, changes no other row
(tests/test_model.py checks all three).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from geocap.kernels import AttentionResult

from .config import ORTConfig
from .layers import FeedForward, LayerNorm, MultiHeadAttention


@dataclass
class DecoderCache:
    """Keys and values of the decoder self-attention for the tokens decoded so far.

    ``keys[l]``, ``values[l]``: layer l's ``[B, H, t, d_model // H]`` for the t tokens seen.
    Immutable in use: each step returns a new cache (the old one stays valid).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        """Number of tokens cached (the position of the next token)."""
        return self.keys[0].shape[2]

    def index_select(self, index: torch.Tensor) -> "DecoderCache":
        """Rows ``index`` (``[B']`` long) of every tensor: reorders or prunes beams."""
        return DecoderCache(tuple(k.index_select(0, index) for k in self.keys),
                            tuple(v.index_select(0, index) for v in self.values))

    def repeat_interleave(self, repeats: int) -> "DecoderCache":
        """Each row ``repeats`` times in a row (``[B] -> [B * repeats]``)."""
        return DecoderCache(tuple(k.repeat_interleave(repeats, 0) for k in self.keys),
                            tuple(v.repeat_interleave(repeats, 0) for v in self.values))


class Packing:
    """The kept positions of a right-padded ``[R, T]`` batch as one packed ``[M, ...]`` tensor.

    ``kept [R, T]`` bool must be a prefix of each row (True up to some position, False after):
    then dropping the others changes no kept position's output, since causal attention only
    looks back. Dense layers run on the ``M`` kept rows; attention unpacks its projected inputs
    to ``[R, T, ...]`` (zeros at dropped positions, which only dropped queries could see).
    """

    def __init__(self, kept: torch.Tensor):
        self.shape = tuple(kept.shape)
        self.index = kept.reshape(-1).nonzero().squeeze(1)              # [M] row-major flat positions

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, T, ...] -> [M, ...]``."""
        return x.reshape((-1,) + tuple(x.shape[2:])).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, ...] -> [R, T, ...]``, zeros at the dropped positions."""
        rows = self.shape[0] * self.shape[1]
        full = x.new_zeros((rows,) + tuple(x.shape[1:])).index_copy(0, self.index, x)
        return full.view(self.shape + tuple(x.shape[1:]))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention into the encoder output, feed-forward."""

    def __init__(self, config: ORTConfig):
        super().__init__()
        d, h, p = config.d_model, config.heads, config.dropout
        self.self_norm = LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, h, p)
        self.cross_norm = LayerNorm(d)
        self.cross_attn = MultiHeadAttention(d, h, p)
        self.ff_norm = LayerNorm(d)
        self.feed_forward = FeedForward(d, config.d_ff, p)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor, past: Optional[tuple[torch.Tensor, torch.Tensor]],
                memory_k: torch.Tensor, memory_v: torch.Tensor, memory_mask: Optional[torch.Tensor], *,
                backend: str = "auto", return_attention: bool = False, packing: Optional[Packing] = None):
        """``x [B, t, d_model]`` the new tokens; ``past`` this layer's cached ``(k, v)``
        ``[B, H, c, d]`` or None; ``memory_k``/``memory_v`` ``[B, H, N, d]`` the projected encoder
        output; ``memory_mask [B, N]`` True = real box. With ``packing`` (teacher forcing of a whole
        right-padded batch, no ``past``): ``x [M, d_model]`` holds only the kept positions, the dense
        layers run on those and attention on its inputs unpacked to ``[B, t, ...]``.

        Returns ``(x [B, t, d_model] (or [M, d_model]), (k, v) [B, H, c + t, d], self AttentionResult,
        cross AttentionResult)``.
        """
        pack = packing.pack if packing is not None else _same
        unpack = packing.unpack if packing is not None else _same
        sa, ca = self.self_attn, self.cross_attn
        h = self.self_norm(x)
        q, k, v = (sa.split_heads(unpack(proj(h))) for proj in (sa.q_proj, sa.k_proj, sa.v_proj))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        r_self = sa.attend(q, k, v, None, causal=True, backend=backend, return_attention=return_attention)
        x = x + self.dropout(sa.out_proj(pack(sa.merge_heads(r_self.out))))
        q = ca.split_heads(unpack(ca.q_proj(self.cross_norm(x))))
        r_cross = ca.attend(q, memory_k, memory_v, memory_mask, backend=backend, return_attention=return_attention)
        x = x + self.dropout(ca.out_proj(pack(ca.merge_heads(r_cross.out))))
        x = x + self.dropout(self.feed_forward(self.ff_norm(x)))
        return x, (k, v), r_self, r_cross


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


class Decoder(nn.Module):
    """``config.layers`` :class:`DecoderLayer` and a final :class:`LayerNorm`."""

    def __init__(self, config: ORTConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.norm = LayerNorm(config.d_model)

    def memory_keys_values(self, states: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each layer's cross-attention keys and values of the encoder output ``states [B, N, d_model]``."""
        kv = [layer.cross_attn.keys_values(states) for layer in self.layers]
        return tuple(k for k, _ in kv), tuple(v for _, v in kv)

    def forward(self, x: torch.Tensor, memory, cache: Optional[DecoderCache], *, backend: str = "auto",
                return_attention: bool = False
                ) -> tuple[torch.Tensor, DecoderCache, list[AttentionResult], list[AttentionResult]]:
        """``x [B, t, d_model]`` embedded new tokens, ``memory`` a :class:`~geocap.model.Memory`.
        Returns ``(states [B, t, d_model], new cache, [self AttentionResult], [cross AttentionResult])``."""
        keys, values, self_stats, cross_stats = [], [], [], []
        for i, layer in enumerate(self.layers):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            x, (k, v), s, c = layer(x, past, memory.keys[i], memory.values[i], memory.mask,
                                    backend=backend, return_attention=return_attention)
            keys.append(k)
            values.append(v)
            self_stats.append(s)
            cross_stats.append(c)
        return self.norm(x), DecoderCache(tuple(keys), tuple(values)), self_stats, cross_stats

    def forward_packed(self, x: torch.Tensor, packing: Packing, memory, *, backend: str = "auto") -> torch.Tensor:
        """Teacher forcing on the kept positions only: ``x [M, d_model]`` the embedded tokens
        packed by ``packing`` -> the final states ``[M, d_model]`` (see :class:`Packing`)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, None, memory.keys[i], memory.values[i], memory.mask, backend=backend, packing=packing)[0]
        return self.norm(x)
