"""Building blocks of the Object Relation Transformer: ORT's LayerNorm, sinusoidal positions,
the feed-forward block and multi-head attention on geocap.kernels.

Every attention here calls :func:`geocap.kernels.geo_attention` or :func:`geocap.kernels.attention`,
so it runs the Triton kernels on CUDA tensors and the PyTorch path elsewhere (``backend`` is passed
straight through: ``"auto"``, ``"triton"`` or ``"torch"``).

Shapes: sequences are ``[B, N, d_model]``; per-head tensors are ``[B, H, N, d_model // H]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from geocap.kernels import AttentionResult, attention, geo_attention
from geocap.kernels.deprecation import renamed_argument
from geocap.kernels.geometry import DIM_G
from geocap.kernels.validation import check_embedding


class LayerNorm(nn.Module):
    """ORT's layer norm, exactly: ``a_2 * (x - mean) / (std + eps) + b_2`` over the last dim,
    with torch's *unbiased* std (divides by n - 1) and ``eps`` added to the std, not the variance.

    This is not ``nn.LayerNorm`` (biased variance, eps inside the square root); keeping ORT's form
    lets ORT weights reproduce ORT's outputs. Parameters are named as in ORT (``a_2``, ``b_2``).

    The std is computed from the centred values (two passes, as accurate as ``Tensor.std``):
    on CPU, torch's ``std`` over the last dimension took 4-7x the time of these four operations
    (1087 vs 150 us forward at [50, 16, 128], 18 % of a dump's model forward).
    """

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(size))
        self.b_2 = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        std = (centred * centred).sum(-1, keepdim=True).div(x.shape[-1] - 1).sqrt()     # unbiased
        return self.a_2 * centred / (std + self.eps) + self.b_2


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """``[max_len, d_model]``: row p holds sin(p w_i) in even and cos(p w_i) in odd columns,
    with w_i = 10000^(-2i / d_model) for column pair i (the Transformer's encoding)."""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    rates = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * rates)
    table[:, 1::2] = torch.cos(position * rates)[:, : d_model // 2]
    return table.float()


class FeedForward(nn.Module):
    """``Linear(d_model -> d_ff) -> ReLU -> Dropout -> Linear(d_ff -> d_model)`` (ORT's w_1, w_2)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(torch.relu(self.w_1(x))))


class MultiHeadAttention(nn.Module):
    """Multi-head attention with q/k/v/out projections ``Linear(d_model -> d_model)``
    (ORT's ``linears[0..3]``), attention dropout ``dropout`` in training.

    With ``geometry=True`` it is ORT's box attention (the encoder's self-attention): the geometry
    weights of ORT's per-head ``WGs[h] = Linear(64 -> 1)`` are stored as one pair,
    ``wg_weight [H, 64]`` and ``wg_bias [H]``, where ``wg_weight[h] = WGs[h].weight[0]`` and
    ``wg_bias[h] = WGs[h].bias[0]`` (what a checkpoint importer must copy, row by row).

    ``legacy_extra_skip=True`` reproduces ORT's optional extra skip in its box attention:
    before the output projection ORT does ``x = input_value + x``, i.e. the attention's *value
    input* (here the normalised sequence the sublayer received) is added to the merged heads, so
    an encoder sublayer becomes ``x + dropout(out_proj(norm(x) + heads(norm(x))))``. It applies to self-attention
    (:meth:`forward`) with or without geometry, so the geometry ablation changes nothing else.

    ``embedding`` is the box embedding passed to ``geo_attention`` ("ort" or "signed").
    """

    def __init__(self, d_model: int, heads: int, dropout: float, *, geometry: bool = False,
                 legacy_extra_skip: bool = False, embedding: str = "ort"):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.legacy_extra_skip = legacy_extra_skip
        self.embedding = check_embedding(embedding)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        if geometry:
            self.wg_weight = nn.Parameter(torch.empty(heads, DIM_G))
            self.wg_bias = nn.Parameter(torch.empty(heads))
            self.reset_geometry_parameters()
        else:
            self.register_parameter("wg_weight", None)
            self.register_parameter("wg_bias", None)

    @property
    def geometry(self) -> bool:
        return self.wg_weight is not None

    def reset_geometry_parameters(self) -> None:
        """Initialise each head's row as ORT initialises its ``Linear(64 -> 1)``: the weight
        xavier-uniform for a ``[1, 64]`` matrix, the bias torch's default ``U(-1/8, 1/8)``."""
        bound = math.sqrt(6.0 / (DIM_G + 1))
        with torch.no_grad():
            self.wg_weight.uniform_(-bound, bound)
            self.wg_bias.uniform_(-1.0 / math.sqrt(DIM_G), 1.0 / math.sqrt(DIM_G))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, d_model] -> [B, H, N, d_model // H]``."""
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, d] -> [B, N, H * d]``."""
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values of ``x [B, N, d_model]``, each ``[B, H, N, d_model // H]``."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    @renamed_argument("key_padding_mask", "attention_mask")
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor],
               *, causal: bool = False, backend: str = "auto", return_attention: bool = False) -> AttentionResult:
        """Plain attention (decoder self- and cross-attention) of projected, split queries
        ``q [B, H, Nq, d]`` over projected ``k``, ``v`` ``[B, H, Nk, d]``, without the output
        projection (the caller applies ``out_proj(merge_heads(.out))``, so a packed decoder can pack
        in between). ``attention_mask [B, Nk]`` bool, True = attend to this key (a real one), False =
        padding (``key_padding_mask`` is its deprecated alias); ``causal`` is bottom-right aligned
        (the last query sees every key). Returns the ``AttentionResult``: ``out [B, H, Nq, d]``,
        entropy ``[B, H, Nq]`` and probs ``[B, H, Nq, Nk]`` filled when ``return_attention``."""
        return attention(q, k, v, attention_mask, causal=causal, dropout_p=self._dropout_p(),
                         return_entropy=return_attention, return_probs=return_attention, backend=backend)

    @renamed_argument("key_padding_mask", "attention_mask")
    def forward(self, x: torch.Tensor, boxes: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                *, backend: str = "auto", return_attention: bool = False) -> tuple[torch.Tensor, AttentionResult]:
        """Self-attention of ``x [B, N, d_model]`` (the encoder's): ORT's box attention with
        ``boxes [B, N, 4]`` when this module has geometry weights, else plain attention (boxes
        ignored). ``attention_mask [B, N]`` bool, True = real box (attended to), False = padding
        (``key_padding_mask`` is its deprecated alias). Returns ``(out [B, N, d_model],
        AttentionResult)``, its entropy and probs filled when ``return_attention``."""
        q = self.split_heads(self.q_proj(x))
        k, v = self.keys_values(x)
        if self.geometry:
            r = geo_attention(q, k, v, boxes, self.wg_weight, self.wg_bias, attention_mask,
                              dropout_p=self._dropout_p(), return_entropy=return_attention,
                              return_probs=return_attention, backend=backend, embedding=self.embedding)
        else:
            r = attention(q, k, v, attention_mask, dropout_p=self._dropout_p(), return_entropy=return_attention,
                          return_probs=return_attention, backend=backend)
        merged = self.merge_heads(r.out)
        if self.legacy_extra_skip:
            merged = x + merged  # ORT: `x = input_value + x`, then `linears[-1](x)`
        return self.out_proj(merged), r
