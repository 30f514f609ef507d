"""geocap: a geometry-aware image captioner (the Object Relation Transformer) built for
attention interpretability research.

Layers, bottom up: ``geocap.kernels`` (geometry-biased attention and streaming entropy, Triton
and PyTorch) and ``geocap.data`` (readers, feature store, dataset, synthetic scenes); the model
``geocap.model`` on the kernels; ``geocap.decoding``, ``geocap.checkpoint`` and
``geocap.captioner`` on the model; ``geocap.metrics``; ``geocap.analysis``; the command line
``geocap.cli`` on top.

``from geocap import Captioner`` is the entry point for captioning and scoring captions.
"""
__version__ = "0.1.0"

__all__ = ["Captioner", "__version__"]


def __getattr__(name):
    # lazy: importing geocap.kernels alone must not pull in the model
    if name == "Captioner":
        from geocap.captioner import Captioner
        return Captioner
    raise AttributeError(f"module 'geocap' has no attribute {name!r}")
