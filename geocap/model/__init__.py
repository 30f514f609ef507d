"""geocap.model: the Object Relation Transformer captioner on geocap.kernels."""
from .config import ORTConfig
from .decoder import DecoderCache
from .layers import LayerNorm, MultiHeadAttention, sinusoidal_positions
from .transformer import AttentionRecord, Memory, ObjectRelationTransformer

__all__ = ["AttentionRecord", "DecoderCache", "LayerNorm", "Memory", "MultiHeadAttention", "ORTConfig",
           "ObjectRelationTransformer", "sinusoidal_positions"]
