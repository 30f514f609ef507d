"""ORTConfig: the hyper-parameters of the Object Relation Transformer, JSON-safe for checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from geocap.kernels.geometry import EMBEDDINGS

BOX_FEATURES = 5  # x1, y1, x2, y2, area: what box_features appends to each object's features


@dataclass(frozen=True)
class ORTConfig:
    """Hyper-parameters of :class:`~geocap.model.ObjectRelationTransformer`.

    ``vocab_size`` V words (ids ``pad_id``, ``bos_id``, ``eos_id`` as in geocap.data.vocab);
    ``feature_dim`` D of the region features ``[B, N, D]``; ``layers`` encoder layers and as many
    decoder layers; ``d_model`` split over ``heads`` heads (``d_model % heads == 0``); ``d_ff`` the
    feed-forward width; ``dropout`` everywhere (embeddings, sublayers, attention weights).

    ``geometry=False`` makes the encoder's self-attention plain scaled-dot-product attention (no
    box term, no ``wg_weight``/``wg_bias``): the ablation of ORT's geometry. ``legacy_extra_skip``
    reproduces ORT's optional extra skip inside the encoder's attention (see
    :class:`~geocap.model.layers.MultiHeadAttention`). ``embedding`` is the box embedding of the
    geometry term: ``"ort"`` (ORT's, |offset| between centres) or ``"signed"`` (signed offsets, so
    mirror images differ; ``geocap.kernels.geometry``); it has no weights of its own, and a config
    saved before it existed reads as ``"ort"``. ``max_len`` is the number of sinusoidal
    positions precomputed (captions are at most that long; ORT uses 5000).

    ``box_features=True`` appends each object's normalised box and area ``(x1, y1, x2, y2, (x2 -
    x1)(y2 - y1))`` to its ``feature_dim`` features before the feature embedding (whose input is
    then ``feature_dim + 5`` wide, :attr:`input_dim`): the usual way captioners are given absolute
    positions (the study's ``absolute`` variant, with ``geometry=False``). A config saved before it
    existed reads as False.
    """

    vocab_size: int
    feature_dim: int = 2048
    layers: int = 6
    d_model: int = 512
    heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    geometry: bool = True
    legacy_extra_skip: bool = False
    embedding: str = "ort"
    box_features: bool = False
    max_len: int = 5000
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "feature_dim", "layers", "d_model", "heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ORTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"ORTConfig.d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"ORTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("geometry", "legacy_extra_skip", "box_features"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ORTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"ORTConfig.embedding must be one of {', '.join(map(repr, EMBEDDINGS))}, "
                             f"got {self.embedding!r}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"ORTConfig.{name} must be an id in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def input_dim(self) -> int:
        """Width of the feature embedding's input: ``feature_dim``, + 5 with ``box_features``."""
        return self.feature_dim + (BOX_FEATURES if self.box_features else 0)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: int | float | bool}``, JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ORTConfig":
        """Inverse of :meth:`to_dict`; missing fields take their defaults, unknown ones raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ORTConfig fields: {', '.join(unknown)}")
        return cls(**data)
