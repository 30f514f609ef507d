"""The dump job: record a checkpoint's attention over every image of a split into shards.

Determinism and resume:

* The split's images (ascending image id, the first ``limit`` when given) are cut into shards of
  ``shard_images`` consecutive images; shard k is written by rank ``k % world_size``, in batches
  of ``batch_size`` images that never cross a shard boundary. So the records of shard k never
  depend on who writes it or when.
* A shard is written under a temporary name and renamed when complete; then its entry is added
  to ``manifest.json`` under an exclusive lock (``flock`` on ``manifest.lock``), by re-reading
  the manifest and rewriting it atomically, so concurrent ranks never lose an entry
  (:mod:`geocap.dump.manifest`).
* Rerunning the same command skips the shards the manifest lists, deletes this rank's stale
  temporary files, rewrites any shard that was renamed but not yet listed, and rewrites (and
  reports) any of its listed shards whose file is missing, not of the recorded size or not of
  the recorded SHA-256 (every listed shard of this rank is hashed: ~1 GB/s). Killing the job
  at any moment (SIGKILL included) therefore loses at most the shards in progress, and the
  finished dump holds exactly the records of an uninterrupted run.
* The manifest's ``metadata`` is fixed by the first run; a rerun whose metadata differs (another
  checkpoint, split, mode, map kinds or options, another image list, another geocap version)
  raises ValueError naming the differing keys. Only ``checkpoint`` and ``data`` (paths) may
  differ (the files may have moved; their content is checked by hash / image list).
* The shard writer (compression, HDF5) runs in a child process of each rank by default
  (:mod:`geocap.dump.writer_process`; ``writer="inline"`` keeps it in the model's process; the
  shards are identical). A shard's close is queued and the model goes on with the next shard;
  the shard is listed in the manifest as soon as the child reports it renamed. The child dies
  with its rank (SIGKILL included), so a rerun never races a leftover writer.

Records per image: ``teacher-forced``: its reference captions (in caption order), then, when
referents are known and ``hypothetical`` is on, one hypothetical caption per reference that
has a noun to swap; ``generated``: the model's own caption (beam search). Labels come from the
feature store (else the ground truth), their names (``metadata["label_names"]``, indexed by label
id; None when unknown) from the store's ``label_names``, else the ground truth's category names;
each image's width and height (pixels, in every record's ``extra``) from the store's
``image_sizes``; clusters from the ground truth's categories, else from k-means on the split's
features (``clusters`` centroids fitted once on a fixed sample of up to ``cluster_sample``
objects, stored in the metadata, so every rank and every rerun uses the same).

The job is a plan (:mod:`geocap.dump.plan`: options, checkpoint and data, metadata, manifest,
this rank's shards) and a shard runner (:mod:`geocap.dump.runner`). The stats-only collector is
passed in (the command line passes ``geocap.analysis.StatsCollector``): the dump sits below the
analyses and never imports them.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Union

from geocap.dump.plan import MODES, WHAT_NAMES, WRITERS, DumpOptions, plan_dump, resolve_options
from geocap.dump.result import DumpResult, summarize

__all__ = ["DumpOptions", "DumpResult", "MODES", "WHAT_NAMES", "WRITERS", "dump", "ort_recorder", "summarize"]


def ort_recorder(plan, model, source, device):
    """``record_images(positions)`` of a geocap checkpoint's dump: the plan's images at those
    positions collated into one batch, run through ``model`` on ``device`` with the caption rows
    of ``plan.options.mode`` (the references and hypothetical captions of ``source``, or the
    model's own beam-search captions); per image its list of Records."""
    from geocap.dump.record_builder import generate_rows, record_batch

    o, dataset = plan.options, plan.dataset

    def record_images(positions):
        batch = dataset.collate([dataset[i] for i in positions])
        if o.mode == "generated":
            rows = lambda memory: generate_rows(model, memory, beam_size=o.beam_size, max_len=plan.max_len)  # noqa: E731
        else:
            rows = lambda memory: source.reference_rows(positions, batch)  # noqa: E731
        return record_batch(model, batch.features.to(device), batch.boxes.to(device), batch.attention_mask.to(device),
                            rows, image_ids=[int(plan.image_ids[i]) for i in positions], words=plan.words,
                            what=o.what, objects=source.objects(positions, batch))

    return record_images


def dump(checkpoint: Union[str, os.PathLike], data: Union[str, os.PathLike], split: str,
         out: Union[str, os.PathLike], options: Optional[DumpOptions] = None, *, device=None,
         rank: Optional[int] = None, world_size: Optional[int] = None, progress: bool = True,
         stats_collector=None, **option_values) -> DumpResult:
    """Dump ``checkpoint``'s attention over ``split`` of ``data`` into the directory ``out``
    (layout: :mod:`geocap.data.dump_format`; determinism and resume: this module's doc).

    The options are a :class:`~geocap.dump.plan.DumpOptions` or its fields as keywords:
    ``mode`` "teacher-forced" | "generated"; ``what`` map kinds (subset of encoder, decoder,
    cross, or a comma list); ``stats_only``: update an analysis collector with every record and
    store its state per shard, no maps; ``hypothetical`` None = on when referents are known
    (teacher-forced only); ``features``: store each object's features (float16); ``compression``
    lzf | gzip | none; ``shard_images``, ``batch_size``; ``beam_size``, ``max_len`` (generated
    mode; None: 3 and 20 for a geocap checkpoint, a Hugging Face model's own
    ``generation_config``); ``limit`` the first images only (0: all); ``clusters``: k-means
    clusters when the data has no ground truth (0: none), fitted on up to ``cluster_sample``
    objects; ``on_error`` "raise" (only Hugging Face dumps take "skip"); ``features_file``,
    ``captions``: the store and captions folder inside ``data``; ``writer``: "process" (default:
    the shard writer runs in a child process of this rank, :mod:`geocap.dump.writer_process`) or
    "inline" (in this process); both write identical shards; ``encoder_top_k``: store each encoder
    map row as its k largest weights (float16 values, uint16 columns, each row's lost weight;
    :mod:`geocap.data.dump_format`), None: whole maps.

    ``stats_collector``: the collector class stats-only dumps need (``update(record)``,
    ``state()``, e.g. ``geocap.analysis.StatsCollector``); ``device``: None / "auto" (see
    :func:`geocap.distributed.resolve_device`) or a device; ``rank``/``world_size``: this process's
    share (None: from RANK / WORLD_SIZE, else 0 / 1). Returns a :class:`DumpResult`.
    """
    from geocap import distributed
    from geocap.dump.runner import run_shards
    from geocap.dump.source import SplitSource

    t_start = time.perf_counter()
    options = resolve_options(options, option_values, stats_collector, "dump")
    plan = plan_dump(checkpoint, data, split, out, options, rank=rank, world_size=world_size)
    result = DumpResult(path=plan.out, rank=plan.rank, world_size=plan.world_size, shards_skipped=plan.skipped,
                        shards_redone=plan.redone)
    dev = distributed.resolve_device(device)
    model = plan.build_model(dev)
    source = SplitSource(plan.dataset, truth=plan.truth, centroids=plan.centroids, words=plan.words,
                         eos_id=plan.config.eos_id, max_len=plan.config.max_len, hypothetical=plan.hypothetical,
                         has_labels=plan.has_labels, features=plan.options.features)
    run_shards(plan, ort_recorder(plan, model, source, dev), result,
               collector_class=stats_collector if options.stats_only else None, progress=progress)
    result.seconds = time.perf_counter() - t_start
    return summarize(result)
