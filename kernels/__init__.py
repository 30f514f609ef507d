"""geocap.kernels: geometry-biased attention and streaming attention entropy.

Each op has a Triton kernel (CUDA, or the Triton CPU interpreter) and a PyTorch path with the
same semantics; ``backend="auto"`` picks Triton for CUDA tensors and PyTorch elsewhere.
"""
from .attention import AttentionResult, attention, geo_attention
from .entropy import attention_entropy
from .geometry import box_relation_embedding, geometry_log_bias
from .validation import value_checks

__all__ = ["AttentionResult", "attention", "attention_entropy", "box_relation_embedding", "geo_attention",
           "geometry_log_bias", "value_checks"]
