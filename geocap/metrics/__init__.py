"""Caption metrics: vectorised CIDEr-D for training rewards, PTB tokenisation, and the COCO
caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) through pycocoevalcap.

``evaluate`` imports pycocoevalcap lazily, so ``CiderD`` and the tokenizer fallback work
without it.
"""

from .cider import CiderD, cider_d
from .evaluate import METRIC_NAMES, caption_metrics, spice_models_present, write_results
from .tokenize import java_available, python_ptb_tokenize, tokenize_captions

__all__ = ["CiderD", "cider_d", "METRIC_NAMES", "caption_metrics", "spice_models_present",
           "write_results", "java_available", "python_ptb_tokenize", "tokenize_captions"]
