"""geocap.model: the Object Relation Transformer captioner on geocap.kernels."""
from .config import ORTConfig
from .decoder import DecoderCache
from .layers import LayerNorm, MultiHeadAttention, sinusoidal_positions
from .transformer import AttentionMaps, Memory, ObjectRelationTransformer

__all__ = ["AttentionMaps", "DecoderCache", "LayerNorm", "Memory", "MultiHeadAttention", "ORTConfig",
           "ObjectRelationTransformer", "sinusoidal_positions"]
