"""``geocap evaluate``: caption every image of a split with a trained checkpoint and score the
captions with the COCO caption metrics.

Usage::

    geocap evaluate --checkpoint RUN/checkpoint-best.pt --data DIR --split test \\
        [--beam-size 3] [--max-len 20] [--batch-size 50] [--out RESULTS_DIR] [--limit N] \\
        [--no-meteor] [--no-spice] [--tokenizer auto|java|python] [--ground-truth FILE]

Conventions:

* Data layout as for ``geocap train``: ``DIR/features.h5`` (the feature store) and ``DIR/caps/``
  (``vocab.json``, ``captions.h5``); ``features``/``captions`` name them relative to DIR.
* Images: every image of the split that has captions, in ascending image id; ``limit`` N > 0
  keeps the first N of them (0 = all). Each image is captioned once (beam size 1 = greedy).
* References: the split's untruncated reference strings stored in ``captions.h5`` (all of an
  image's captions), never the decoded word ids, so <unk> and the training max length do not
  leak into the scores.
* Metrics: :func:`geocap.metrics.caption_metrics`: BLEU-1..4, ROUGE-L and CIDEr-D always;
  METEOR when Java is on the PATH (unless switched off); SPICE only when its Stanford CoreNLP
  jars are already installed (never downloaded). Values are pycocoevalcap's raw values
  (fractions; CIDEr-D on its x10 scale).
* Relation-word accuracy (synthetic data only): when ``DIR/ground_truth.json`` (``ground_truth``,
  relative to DIR; written by ``geocap synth``) exists, the generated captions' relation phrases
  are judged against the scenes' boxes by :func:`geocap.metrics.relation_accuracy` (see
  :mod:`geocap.metrics.relations`); otherwise it is skipped, with the reason in
  ``relation_note``.
* Outputs, in ``out_dir`` (default: the checkpoint's folder), each written atomically:
  ``captions_<split>.json`` -- COCO results ``[{"image_id": int, "caption": str}, ...]`` in
  ascending image id -- and ``metrics_<split>.json`` -- a JSON object with ``format``
  ("geocap-evaluation"), ``format_version`` (1), ``metrics``, ``skipped`` (metric -> reason),
  ``tokenizer`` ("java" or "python", the one that ran) and ``tokenizer_note`` (why the Python
  fallback ran, else null), ``checkpoint`` (absolute path), ``checkpoint_sha256``,
  ``checkpoint_step``, ``data``, ``split``, ``beam_size``, ``max_len``, ``limit``, ``n_images``,
  ``geocap_version``, ``results_file``, and ``relation_accuracy`` (correct relation uses / uses;
  null when skipped or when no caption uses a relation phrase), ``relation_counts`` (null when
  skipped, else :meth:`geocap.metrics.RelationAccuracy.as_dict` plus ``ground_truth``, the file's
  absolute path) and ``relation_note`` (why the accuracy is null, else null).
* Errors: bad arguments, a missing checkpoint or data file, an unknown split, a checkpoint whose
  vocabulary (or feature dimension) differs from the data's raise UsageError or DataError (ValueErrors,
  :mod:`geocap.errors`) naming the argument or the file (``geocap`` prints them as one line, exit status 2).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch.utils.data import DataLoader, Subset

from geocap import stop
from geocap.distributed import resolve_device
from geocap.errors import DataError, UsageError
from geocap.metrics.tokenize import TOKENIZERS
from geocap.options import check_int

if TYPE_CHECKING:
    from geocap.metrics.relations import RelationAccuracy

__all__ = ["EVALUATION_FORMAT", "EvaluationOptions", "EvaluationResult", "evaluate", "format_report"]

EVALUATION_FORMAT, EVALUATION_VERSION = "geocap-evaluation", 1


@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed and wrote.

    ``metrics``: metric name -> value; ``skipped``: metric name -> why it was not computed;
    ``captions``: image id -> generated caption (ascending image id); ``tokenizer``: the
    tokenizer that ran ("java" or "python"), with ``tokenizer_note`` saying why when the Python
    fallback replaced PTBTokenizer; ``record``: the metrics file's JSON object; ``relations``:
    the relation-word accuracy counts (None when skipped), ``relation_note`` why its accuracy is
    undefined (no ground truth, or no relation phrase used), else None.
    """
    metrics: dict
    skipped: dict
    captions: dict
    split: str
    n_images: int
    beam_size: int
    tokenizer: str
    tokenizer_note: Optional[str]
    checkpoint: str
    checkpoint_sha256: str
    results_path: Path
    metrics_path: Path
    record: dict = field(default_factory=dict)
    relations: Optional[RelationAccuracy] = None
    relation_note: Optional[str] = None


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"word {i} is {x!r} in the checkpoint, {y!r} in the captions dir"
    return f"the checkpoint has {len(a)} words, the captions dir {len(b)}"


def _open_dataset(features_path: str, captions_dir: str, split: str):
    from geocap.data.dataset import CaptionDataset
    from geocap.data.items import DataError
    from geocap.data.vocab import load_captions

    if not os.path.isfile(features_path):
        raise DataError(f"features: {features_path}: feature store missing")
    if not os.path.isdir(captions_dir):
        raise DataError(f"captions: {captions_dir}: captions directory missing")
    if split == "all":
        raise UsageError("split must name one split of the captions directory, not 'all'")
    try:
        # one caption per item: only the features are used, references come from the strings
        return CaptionDataset(features_path, captions_dir, split, per_image=True, captions_per_image=1)
    except DataError:
        names = load_captions(captions_dir).split_names  # raises its own DataError for a bad dir
        if split not in names:
            raise UsageError(f"split {split!r}: not a split of {captions_dir} "
                             f"(its splits: {', '.join(names)})") from None
        raise


@dataclass
class EvaluationOptions:
    """How :func:`evaluate` captions and scores (every field but the checkpoint and the data folder).

    ``split``: a split of the captions directory; ``beam_size`` (1: greedy), ``max_len`` (words per
    caption, at most the model's ``config.max_len``), ``batch_size`` (images), ``limit`` (the first N
    images; 0 = all); ``out_dir``: where the two files go (None: the checkpoint's folder);
    ``meteor``/``spice``/``tokenizer``/``meteor_timeout_s``: see
    :func:`geocap.metrics.caption_metrics`; ``features``, ``captions``, ``ground_truth``: names
    inside the data folder (the relation-word accuracy is skipped when ``ground_truth`` is absent);
    ``device`` None/"auto": CUDA when available, else CPU; ``workers``: DataLoader worker processes
    (0: load in this process); ``progress``: a bar on stderr (a line every
    ``GEOCAP_PROGRESS_INTERVAL`` s when stderr is not a terminal: :mod:`geocap.progress`).
    """
    split: str = "test"
    beam_size: int = 3
    max_len: int = 20
    batch_size: int = 50
    out_dir: Union[str, os.PathLike, None] = None
    limit: int = 0
    meteor: bool = True
    spice: bool = True
    tokenizer: str = "auto"
    features: str = "features.h5"
    captions: str = "caps"
    ground_truth: str = "ground_truth.json"
    device: Union[str, torch.device, None] = None
    workers: int = 0
    progress: bool = True
    meteor_timeout_s: float = 600.0

    def validate(self) -> None:
        """UsageError (a ValueError) naming the first bad option."""
        check_int("beam_size", self.beam_size, 1)
        check_int("max_len", self.max_len, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("limit", self.limit, 0)
        check_int("workers", self.workers, 0)
        if self.tokenizer not in TOKENIZERS:
            raise UsageError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if not isinstance(self.split, str) or not self.split:
            raise UsageError(f"split must be a split name, got {self.split!r}")


@dataclass
class _Loaded:
    """What :func:`_load` read: the checkpoint's path, SHA-256 and step, the captioner, the dataset,
    and the relation ground truth (None when its file is absent) with its path."""
    checkpoint: str
    sha256: str
    step: int
    captioner: object
    dataset: object
    truth: object
    truth_path: str


def evaluate(checkpoint: Union[str, os.PathLike], data_dir: Union[str, os.PathLike], split: Optional[str] = None,
             *, options: Optional[EvaluationOptions] = None, **fields) -> EvaluationResult:
    """Caption the ``split`` images of ``data_dir`` with ``checkpoint``, score them, write the
    results and metrics files (see the module doc for every convention) and return them.

    ``options``: an :class:`EvaluationOptions` (default: its defaults); ``split`` and keyword
    ``fields`` (any of its fields, e.g. ``beam_size=1``) replace the options' values, so
    ``evaluate(ckpt, data, "test", beam_size=1)`` works as it always has. Steps: check the
    options and paths, load the model and data (:func:`_load`), caption (:func:`_caption`),
    score and write (:func:`_score_and_write`).
    """
    from geocap.metrics import require_pycocoevalcap

    if split is not None:
        fields["split"] = split
    options = dataclasses.replace(options or EvaluationOptions(), **fields)
    require_pycocoevalcap("geocap evaluate's metrics")     # before minutes of captioning
    options.validate()
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    if not os.path.isfile(checkpoint):
        raise DataError(f"checkpoint: {checkpoint}: no such file")
    data_dir = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(data_dir):
        raise DataError(f"data: {data_dir}: no such directory")
    out_dir = Path(os.path.dirname(checkpoint) if options.out_dir is None else os.fspath(options.out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"out: {out_dir} exists and is not a directory")
    device = resolve_device(options.device)
    loaded = _load(checkpoint, data_dir, options, device)
    captions = _caption(loaded, options)
    return _score_and_write(loaded, captions, data_dir, out_dir, options)


def _load(checkpoint: str, data_dir: str, options: EvaluationOptions, device: torch.device) -> _Loaded:
    """The checkpoint's captioner on ``device`` and the split's dataset, checked against each
    other (vocabulary, feature dimension, ``max_len``), and the relation ground truth: all read
    before captioning, so a bad file fails before any work is done or anything written."""
    from geocap.captioner import Captioner
    from geocap.checkpoint import file_sha256, load_checkpoint
    from geocap.metrics import load_relation_truth

    sha256 = file_sha256(checkpoint)       # of the bytes that are then loaded
    ckpt = load_checkpoint(checkpoint, map_location="cpu")   # safe: weights_only
    features_path = os.path.join(data_dir, options.features)
    captions_dir = os.path.join(data_dir, options.captions)
    dataset = _open_dataset(features_path, captions_dir, options.split)
    truth_path = os.path.join(data_dir, options.ground_truth)
    truth = load_relation_truth(truth_path) if os.path.isfile(truth_path) else None
    data_vocab = dataset.vocab
    if ckpt.vocab.words != data_vocab.words:
        raise DataError(f"checkpoint {checkpoint} and captions dir {captions_dir} have different vocabularies "
                         f"(sha1 {ckpt.vocab.sha1[:12]} vs {data_vocab.sha1[:12]}; "
                         f"{_first_difference(ckpt.vocab.words, data_vocab.words)})")
    store_dim = dataset.store.feature_dim
    if ckpt.config.feature_dim != store_dim:
        raise DataError(f"checkpoint {checkpoint} expects {ckpt.config.feature_dim}-dimensional features but "
                         f"the feature store {features_path} holds {store_dim}-dimensional ones")
    if options.max_len > ckpt.config.max_len:
        raise UsageError(f"max_len must be at most the model's config.max_len = {ckpt.config.max_len}, "
                         f"got {options.max_len}")
    captioner = Captioner(ckpt.build_model(device).eval(), ckpt.vocab)
    return _Loaded(checkpoint=checkpoint, sha256=sha256, step=ckpt.step, captioner=captioner, dataset=dataset,
                   truth=truth, truth_path=truth_path)


def _caption(loaded: _Loaded, options: EvaluationOptions) -> dict:
    """``{image_id: caption}`` (ascending id) of the first ``limit`` (0: all) images of the split,
    each captioned once."""
    from geocap.data.dataset import collate
    from geocap.progress import progress_bar

    dataset = loaded.dataset
    n = len(dataset) if options.limit == 0 else min(options.limit, len(dataset))
    items = dataset if n == len(dataset) else Subset(dataset, range(n))
    loader = DataLoader(items, batch_size=options.batch_size, shuffle=False, collate_fn=collate,
                        num_workers=options.workers)
    res: dict = {}
    bar = progress_bar(enabled=options.progress, total=n, unit="img", desc=f"captioning {options.split}")
    try:
        with torch.no_grad():
            for batch in loader:
                stop.check()
                texts = loaded.captioner.caption(batch.features, batch.boxes, batch.attention_mask,
                                                 beam_size=options.beam_size, max_len=options.max_len)
                for image_id, text in zip(batch.image_ids.tolist(), texts):
                    if image_id in res:  # a dataset invariant; guard the "once per image" promise
                        raise RuntimeError(f"image {image_id} captioned twice")
                    res[image_id] = text
                bar.update(len(texts))
    finally:
        bar.close()
    if len(res) != n:
        raise RuntimeError(f"captioned {len(res)} images, expected {n}")
    return dict(sorted(res.items()))


def _score_and_write(loaded: _Loaded, res: dict, data_dir: str, out_dir: Path,
                     options: EvaluationOptions) -> EvaluationResult:
    """Score ``res`` against the split's references (caption metrics, relation-word accuracy) and
    write the results and metrics files (atomically) in ``out_dir``."""
    from geocap import __version__
    from geocap.data.atomic import write_text_atomic
    from geocap.metrics import caption_metrics, relation_accuracy, write_results

    split = options.split
    gts = {image_id: list(loaded.dataset.captions.references(image_id)) for image_id in res}
    metrics, skipped = caption_metrics(gts, res, tokenizer=options.tokenizer, meteor=options.meteor,
                                       spice=options.spice, meteor_timeout_s=options.meteor_timeout_s)
    tokenizer_note = skipped.pop("tokenizer", None)
    relations, relation_note, relation_counts = None, None, None
    if loaded.truth is None:
        relation_note = f"no {options.ground_truth} in {data_dir} (relation-word accuracy needs synthetic data)"
    else:
        relations = relation_accuracy(res, loaded.truth)
        relation_counts = {**relations.as_dict(), "ground_truth": loaded.truth_path}
        if relations.accuracy is None:
            relation_note = "no generated caption uses a relation phrase"
    used = "python" if tokenizer_note is not None else "java"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"captions_{split}.json"
    metrics_path = out_dir / f"metrics_{split}.json"
    write_results(results_path, res)
    record = {
        "format": EVALUATION_FORMAT, "format_version": EVALUATION_VERSION,
        "metrics": metrics, "skipped": skipped, "tokenizer": used, "tokenizer_note": tokenizer_note,
        "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.sha256,
        "checkpoint_step": loaded.step, "data": data_dir, "split": split, "beam_size": options.beam_size,
        "max_len": options.max_len, "limit": options.limit, "n_images": len(res), "geocap_version": __version__,
        "results_file": results_path.name,
        "relation_accuracy": relations.accuracy if relations is not None else None,
        "relation_counts": relation_counts, "relation_note": relation_note,
    }
    write_text_atomic(metrics_path, json.dumps(record, indent=2) + "\n")
    return EvaluationResult(metrics=metrics, skipped=skipped, captions=res, split=split, n_images=len(res),
                            beam_size=options.beam_size, tokenizer=used, tokenizer_note=tokenizer_note,
                            checkpoint=loaded.checkpoint, checkpoint_sha256=loaded.sha256,
                            results_path=results_path, metrics_path=metrics_path, record=record,
                            relations=relations, relation_note=relation_note)


def format_report(result: EvaluationResult) -> str:
    """A small plain-text table of ``result``'s metrics, then the skipped metrics with reasons
    and the files written."""
    lines = [f"split {result.split}: {result.n_images} images, beam size {result.beam_size}, "
             f"tokenizer {result.tokenizer}"]
    width = max([len("metric")] + [len(k) for k in result.metrics])
    lines.append(f"{'metric':<{width}}  value")
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in result.metrics.items()]
    for name, reason in result.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    rel = result.relations
    if rel is not None and rel.accuracy is not None:
        lines.append(f"relation-word accuracy {rel.accuracy:.4f}: {rel.correct} of {rel.uses} relation uses correct "
                     f"({rel.unresolved} unresolved), in {rel.captions_with_relation} of {rel.captions} captions")
    else:
        lines.append(f"skipped relation-word accuracy: {result.relation_note}")
    if result.tokenizer_note:
        lines.append(f"note: {result.tokenizer_note}")
    lines.append(f"wrote {result.results_path} and {result.metrics_path}")
    return "\n".join(lines)
