"""ORT's encoder: pre-norm layers of box self-attention and feed-forward, then a final norm.

Each sublayer is ``x + dropout(sublayer(norm(x)))``. No positional encoding: the regions are a
set, and the only notion of where they are is the geometry term of the attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from geocap.kernels import AttentionResult, value_checks

from .config import ORTConfig
from .layers import FeedForward, LayerNorm, MultiHeadAttention


class EncoderLayer(nn.Module):
    """Box self-attention (or plain self-attention when ``config.geometry`` is False) and feed-forward."""

    def __init__(self, config: ORTConfig):
        super().__init__()
        d = config.d_model
        self.attn_norm = LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, config.heads, config.dropout, geometry=config.geometry,
                                            legacy_extra_skip=config.legacy_extra_skip, embedding=config.embedding)
        self.ff_norm = LayerNorm(d)
        self.feed_forward = FeedForward(d, config.d_ff, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, attention_mask: Optional[torch.Tensor], *,
                backend: str = "auto", return_attention: bool = False) -> tuple[torch.Tensor, AttentionResult]:
        """``x [B, N, d_model]``, ``boxes [B, N, 4]``, ``attention_mask [B, N]`` (True = real box) ->
        ``(x [B, N, d_model], AttentionResult of the self-attention)``."""
        a, stats = self.self_attn(self.attn_norm(x), boxes, attention_mask, backend=backend,
                                  return_attention=return_attention)
        x = x + self.dropout(a)
        x = x + self.dropout(self.feed_forward(self.ff_norm(x)))
        return x, stats


class Encoder(nn.Module):
    """``config.layers`` :class:`EncoderLayer` and a final :class:`LayerNorm`."""

    def __init__(self, config: ORTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))
        self.norm = LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, attention_mask: Optional[torch.Tensor], *,
                backend: str = "auto", return_attention: bool = False) -> tuple[torch.Tensor, list[AttentionResult]]:
        """Returns ``(states [B, N, d_model], [AttentionResult per layer])``; the box values are
        validated by the first layer only (one host synchronisation per forward, not per layer)."""
        stats = []
        for i, layer in enumerate(self.layers):
            if i == 0:
                x, s = layer(x, boxes, attention_mask, backend=backend, return_attention=return_attention)
            else:
                with value_checks(False):
                    x, s = layer(x, boxes, attention_mask, backend=backend, return_attention=return_attention)
            stats.append(s)
        return self.norm(x), stats
