"""geocap.hf: attention records from Hugging Face image captioners (optional extra ``geocap[hf]``).

``record_captions(model, pixel_values, image_ids=..., captions=..., generate=...)`` gives the
same :class:`~geocap.data.attention_record.Record` s as ``geocap dump`` gives for ORT, so the
analyses and the viewer read them unchanged. Supported: ``VisionEncoderDecoderModel`` (with a
ViT-like encoder: patch tokens plus leading class/register tokens) and
``BlipForConditionalGeneration``; any other model is an :class:`UnsupportedModel` error.

``geocap.hf.tiny`` builds and trains a tiny ``VisionEncoderDecoderModel`` from random init on
the synthetic scenes drawn as images (``geocap hf-train-tiny``), to record without a download.

transformers is imported only when a model is recorded or built, so ``import geocap`` never needs it.
"""
from .patches import PatchGrid
from .record import SUPPORTED, UnsupportedModel, record_captions

__all__ = ["PatchGrid", "SUPPORTED", "UnsupportedModel", "record_captions"]
