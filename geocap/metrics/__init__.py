"""Caption metrics: vectorised CIDEr-D for training rewards, PTB tokenisation, the COCO
caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) through pycocoevalcap, and the
relation-word accuracy of captions of the synthetic scenes (``relations``).

``evaluate`` imports pycocoevalcap lazily, so ``CiderD`` and the tokenizer fallback work
without it.
"""

from .cider import CiderD, cider_d
from .evaluate import METRIC_NAMES, caption_metrics, require_pycocoevalcap, spice_models_present, write_results
from .relations import (RelationAccuracy, RelationTruth, find_relations, load_relation_truth,
                        relation_accuracy)
from .tokenize import java_available, python_ptb_tokenize, tokenize_captions

__all__ = ["CiderD", "cider_d", "METRIC_NAMES", "caption_metrics", "require_pycocoevalcap", "spice_models_present",
           "write_results", "java_available", "python_ptb_tokenize", "tokenize_captions",
           "RelationAccuracy", "RelationTruth", "find_relations", "load_relation_truth", "relation_accuracy"]
