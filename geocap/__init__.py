"""geocap: a geometry-aware image captioner (the Object Relation Transformer) built for
attention interpretability research.

Subpackages: ``geocap.kernels`` (geometry-biased attention and streaming entropy, Triton and
PyTorch) and ``geocap.analysis`` (attention analyses). ``geocap.demo`` is the kernel demo
behind ``geocap demo``; ``geocap.cli`` is the command line.
"""
__version__ = "0.1.0"
