"""Readers for the caption and feature files captioning research already has.

Captions (whole file -> :class:`~geocap.data.items.CaptionSet`):

- :func:`read_coco_captions` — COCO caption annotations (parsed and checked by
  :func:`read_coco_file`, the one COCO captions parser every module uses).
- :func:`read_karpathy` — Karpathy's ``dataset_coco.json`` (tokens and splits; restval = train).
- :func:`read_cocotalk` — ORT / self-critical ``cocotalk.json`` + ``cocotalk_label.h5``
  (decoded captions and the vocabulary).
- :func:`read_image_sizes` — {image_id: (width, height)} for readers of pixel boxes.

Features (lazy :class:`FeatureStream` of :class:`~geocap.data.items.ImageFeatures`):

- :func:`read_bottom_up_tsv` — bottom-up-attention TSV, 36 or 10-100 boxes, streamed by line.
- :func:`read_npz_dir` — ORT / self-critical ``<id>.npz`` features + ``<id>.npy`` boxes.
- :func:`read_m2_hdf5` — meshed-memory ``<id>_features`` / ``<id>_boxes`` HDF5.

Every feature reader keeps the boxes in the file's order (never sorted by area), normalises
them to [0, 1], clips boxes reaching outside the image (counted in ``ReadStats.clipped_boxes``)
and raises :class:`~geocap.data.items.DataError` naming the file and image id for bad input
— or, with ``on_error="skip"``, counts it in ``ReadStats`` and goes on.
"""
from ._common import FeatureStream, ReadStats
from .coco import CocoCaptionsFile, read_coco_captions, read_coco_file, read_image_sizes
from .karpathy import read_karpathy
from .m2 import read_m2_hdf5
from .ort import CocotalkCaptions, read_cocotalk, read_npz_dir
from .tsv import read_bottom_up_tsv

__all__ = [
    "CocoCaptionsFile", "CocotalkCaptions", "FeatureStream", "ReadStats", "read_bottom_up_tsv",
    "read_coco_captions", "read_coco_file", "read_cocotalk", "read_image_sizes", "read_karpathy", "read_m2_hdf5",
    "read_npz_dir",
]
