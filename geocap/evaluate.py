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

if TYPE_CHECKING:
    from geocap.metrics.relations import RelationAccuracy

__all__ = ["EVALUATION_FORMAT", "EvaluationResult", "evaluate", "format_report"]

EVALUATION_FORMAT, EVALUATION_VERSION = "geocap-evaluation", 1
TOKENIZERS = ("auto", "java", "python")


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


def _positive_int(name: str, value, *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if zero_ok else "a positive"
        raise UsageError(f"{name} must be {kind} int, got {value!r}")
    return value


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


def evaluate(checkpoint: Union[str, os.PathLike], data_dir: Union[str, os.PathLike], split: str = "test", *,
             beam_size: int = 3, max_len: int = 20, batch_size: int = 50,
             out_dir: Union[str, os.PathLike, None] = None, limit: int = 0, meteor: bool = True,
             spice: bool = True, tokenizer: str = "auto", features: str = "features.h5", captions: str = "caps",
             ground_truth: str = "ground_truth.json",
             device: Union[str, torch.device, None] = None, workers: int = 0, progress: bool = True,
             meteor_timeout_s: float = 600.0) -> EvaluationResult:
    """Caption the ``split`` images of ``data_dir`` with ``checkpoint``, score them, write the
    results and metrics files (see the module doc for every convention) and return them.

    ``device`` None/"auto": CUDA when available, else CPU. ``workers``: DataLoader worker
    processes (0: load in this process). ``progress``: a bar on stderr (a line every
    ``GEOCAP_PROGRESS_INTERVAL`` s when stderr is not a terminal: :mod:`geocap.progress`).
    ``ground_truth``: the synthetic ground-truth file inside ``data_dir`` for the relation-word
    accuracy (skipped when the file is absent).
    """
    from geocap import __version__
    from geocap.captioner import Captioner
    from geocap.checkpoint import file_sha256, load_checkpoint
    from geocap.data.dataset import collate
    from geocap.progress import progress_bar
    from geocap.data.atomic import write_text_atomic
    from geocap.metrics import (caption_metrics, load_relation_truth, relation_accuracy, require_pycocoevalcap,
                                write_results)

    # -- arguments ---------------------------------------------------------------------------
    require_pycocoevalcap("geocap evaluate's metrics")     # before minutes of captioning
    _positive_int("beam_size", beam_size)
    _positive_int("max_len", max_len)
    _positive_int("batch_size", batch_size)
    _positive_int("limit", limit, zero_ok=True)
    _positive_int("workers", workers, zero_ok=True)
    if tokenizer not in TOKENIZERS:
        raise UsageError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if not isinstance(split, str) or not split:
        raise UsageError(f"split must be a split name, got {split!r}")
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    if not os.path.isfile(checkpoint):
        raise DataError(f"checkpoint: {checkpoint}: no such file")
    data_dir = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(data_dir):
        raise DataError(f"data: {data_dir}: no such directory")
    out_dir = Path(os.path.dirname(checkpoint) if out_dir is None else os.fspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"out: {out_dir} exists and is not a directory")
    device = resolve_device(device)

    # -- model and data ----------------------------------------------------------------------
    sha256 = file_sha256(checkpoint)       # of the bytes that are then loaded
    ckpt = load_checkpoint(checkpoint, map_location="cpu")   # safe: weights_only
    features_path = os.path.join(data_dir, features)
    captions_dir = os.path.join(data_dir, captions)
    dataset = _open_dataset(features_path, captions_dir, split)
    truth_path = os.path.join(data_dir, ground_truth)
    # read before captioning: a malformed file fails before any work is done or anything written
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
    if max_len > ckpt.config.max_len:
        raise UsageError(f"max_len must be at most the model's config.max_len = {ckpt.config.max_len}, "
                         f"got {max_len}")
    step = ckpt.step
    captioner = Captioner(ckpt.build_model(device).eval(), ckpt.vocab)
    del ckpt  # the model holds its own copy of the weights

    n = len(dataset) if limit == 0 else min(limit, len(dataset))
    items = dataset if n == len(dataset) else Subset(dataset, range(n))
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers)

    # -- caption -----------------------------------------------------------------------------
    res: dict = {}
    bar = progress_bar(enabled=progress, total=n, unit="img", desc=f"captioning {split}")
    try:
        with torch.no_grad():
            for batch in loader:
                stop.check()
                texts = captioner.caption(batch.features, batch.boxes, batch.box_mask,
                                          beam_size=beam_size, max_len=max_len)
                for image_id, text in zip(batch.image_ids.tolist(), texts):
                    if image_id in res:  # a dataset invariant; guard the "once per image" promise
                        raise RuntimeError(f"image {image_id} captioned twice")
                    res[image_id] = text
                bar.update(len(texts))
    finally:
        bar.close()
    if len(res) != n:
        raise RuntimeError(f"captioned {len(res)} images, expected {n}")
    res = dict(sorted(res.items()))
    gts = {image_id: list(dataset.captions.references(image_id)) for image_id in res}

    # -- score and write ---------------------------------------------------------------------
    metrics, skipped = caption_metrics(gts, res, tokenizer=tokenizer, meteor=meteor, spice=spice,
                                       meteor_timeout_s=meteor_timeout_s)
    tokenizer_note = skipped.pop("tokenizer", None)
    relations, relation_note, relation_counts = None, None, None
    if truth is None:
        relation_note = f"no {ground_truth} in {data_dir} (relation-word accuracy needs synthetic data)"
    else:
        relations = relation_accuracy(res, truth)
        relation_counts = {**relations.as_dict(), "ground_truth": truth_path}
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
        "checkpoint": checkpoint, "checkpoint_sha256": sha256,
        "checkpoint_step": step, "data": data_dir, "split": split, "beam_size": beam_size, "max_len": max_len,
        "limit": limit, "n_images": n, "geocap_version": __version__, "results_file": results_path.name,
        "relation_accuracy": relations.accuracy if relations is not None else None,
        "relation_counts": relation_counts, "relation_note": relation_note,
    }
    write_text_atomic(metrics_path, json.dumps(record, indent=2) + "\n")
    return EvaluationResult(metrics=metrics, skipped=skipped, captions=res, split=split, n_images=n,
                            beam_size=beam_size, tokenizer=used, tokenizer_note=tokenizer_note,
                            checkpoint=checkpoint, checkpoint_sha256=sha256, results_path=results_path,
                            metrics_path=metrics_path, record=record, relations=relations,
                            relation_note=relation_note)


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
