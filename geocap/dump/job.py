"""The dump job: record a checkpoint's attention over every image of a split into shards.

Determinism and resume:

* The split's images (ascending image id, the first ``limit`` when given) are cut into shards of
  ``shard_images`` consecutive images; shard k is written by rank ``k % world_size``, in batches
  of ``batch_size`` images that never cross a shard boundary. So the records of shard k never
  depend on who writes it or when.
* A shard is written under a temporary name and renamed when complete; then its entry is added
  to ``manifest.json`` under an exclusive lock (``flock`` on ``manifest.lock``), by re-reading
  the manifest and rewriting it atomically, so concurrent ranks never lose an entry.
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
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from geocap.data.atomic import write_text_atomic
from geocap.data.dump_format import (FORMAT, FORMAT_VERSION, LOCK, MANIFEST, DumpError, metadata_digest,
                                     read_manifest, shard_name, shard_problem)
from geocap.dump.writer import COMPRESSIONS
from geocap.out_dir import check_out_dir

MODES = ("teacher-forced", "generated")
WRITERS = ("process", "inline")     # the shard writer in a child process (default) or in this one
WHAT_NAMES = ("encoder", "decoder", "cross")
UNCHECKED = ("checkpoint", "data")          # metadata keys a rerun may change (paths)

__all__ = ["DumpResult", "MODES", "WHAT_NAMES", "WRITERS", "dump", "summarize"]


@dataclass
class DumpResult:
    """What one call of :func:`dump` did (this rank): shards written and skipped (and
    ``shards_redone``: listed in the manifest but missing or of the wrong size), images and
    records written, wall ``seconds``, ``writer_seconds`` the time this process spent on writing
    (in the shard writer, or with ``writer="process"`` handing records to the writer process and
    waiting for it), ``writer_child_seconds`` the writer process's own time (0 inline), ``bytes``
    written; ``complete`` whether the manifest lists every shard now, ``dump_bytes`` /
    ``dump_images`` the whole dump's totals over the listed shards."""
    path: str
    rank: int
    world_size: int
    shards_written: list = field(default_factory=list)
    shards_skipped: list = field(default_factory=list)
    shards_redone: list = field(default_factory=list)
    images: int = 0
    records: int = 0
    seconds: float = 0.0
    writer_seconds: float = 0.0
    writer_child_seconds: float = 0.0
    bytes: int = 0
    complete: bool = False
    dump_bytes: int = 0
    dump_images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.dump_bytes / self.dump_images if self.dump_images else 0.0

    def lines(self) -> list:
        share = 100.0 * self.writer_seconds / self.seconds if self.seconds > 0 else 0.0
        out = [f"rank {self.rank}/{self.world_size}: wrote {len(self.shards_written)} shards "
               f"({self.images} images, {self.records} records, {self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s "
               f"({self.images_per_s:.1f} images/s; writer {share:.0f}% of the time"
               + (f", writer process busy {100.0 * self.writer_child_seconds / self.seconds:.0f}%"
                  if self.writer_child_seconds and self.seconds > 0 else "") + "); "
               f"{len(self.shards_skipped)} shards already done"
               + (f"; redid {len(self.shards_redone)} listed shards whose files were missing or damaged"
                  if self.shards_redone else "")]
        if self.complete:
            out.append(f"dump complete: {self.path}: {self.dump_images} images, "
                       f"{self.dump_bytes / 2**20:.1f} MiB, {self.bytes_per_image / 1024:.1f} KiB per image")
        else:
            out.append(f"dump not complete yet: {self.path} (other ranks still writing, or rerun to resume)")
        return out


@contextlib.contextmanager
def manifest_lock(path: str):
    """An exclusive ``flock`` on ``path/manifest.lock`` (blocks until free)."""
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_manifest(path: str, manifest: dict) -> None:
    write_text_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _rank_world(rank, world_size):
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    _check_int("world_size", world_size, 1)
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


def _parse_what(what) -> tuple:
    if isinstance(what, str):
        what = [w.strip() for w in what.split(",") if w.strip()]
    what = tuple(what)
    bad = [w for w in what if w not in WHAT_NAMES]
    if bad or not what:
        raise ValueError(f"what must be a non-empty subset of {','.join(WHAT_NAMES)}, got {','.join(what) or '(none)'}")
    return tuple(w for w in WHAT_NAMES if w in what)


def _resolve_device(device, rank_local: int) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank_local % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: not a torch device ({device!r}: {err})") from None


def _open_manifest(out: str, metadata: dict, n_images: int, shard_images: int) -> dict:
    """Create the manifest, or check a rerun's ``metadata`` against it; the manifest (under the lock)."""
    with manifest_lock(out):
        manifest = read_manifest(out)
        if manifest is None:
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": metadata,
                        "metadata_sha256": metadata_digest(metadata), "n_images": n_images,
                        "shard_images": shard_images, "n_shards": math.ceil(n_images / shard_images), "shards": []}
            _write_manifest(out, manifest)
            return manifest
        old = manifest["metadata"]
        adopted = dict(metadata, **{k: old[k] for k in UNCHECKED if k in old})
        if "cluster_centroids" in old and metadata.get("clusters") == "kmeans":
            adopted["cluster_centroids"] = old["cluster_centroids"]      # the first run's fit
        differ = sorted(k for k in set(old) | set(adopted) if old.get(k) != adopted.get(k))
        if differ:
            shown = "; ".join(f"{k}: {_short(old.get(k))} in the dump, {_short(adopted.get(k))} now"
                              for k in differ[:4])
            raise DumpError(f"{os.path.join(out, MANIFEST)}: the existing dump was written with other settings "
                            f"({shown}); use another --out or the same settings to resume")
        return manifest


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _add_shard(out: str, entry: dict) -> dict:
    with manifest_lock(out):
        manifest = read_manifest(out)
        shards = [e for e in manifest["shards"] if e["index"] != entry["index"]] + [entry]
        manifest["shards"] = sorted(shards, key=lambda e: e["index"])
        _write_manifest(out, manifest)
        return manifest


def _drop_lost_shards(out: str, entries: list) -> list:
    """Indices of the listed ``entries`` whose file is missing, damaged or replaced (not of the
    recorded size or SHA-256; shards listed without a digest, by geocap before checksums, are
    checked by size alone, with a warning); they are removed from the manifest (under the lock)
    so that they are written again."""
    lost = [e["index"] for e in entries if shard_problem(os.path.join(out, e["file"]), e, digest=True)]
    unchecked = [e["file"] for e in entries if "sha256" not in e and e["index"] not in lost]
    if unchecked:
        warnings.warn(f"{out}: {len(unchecked)} listed shards (first: {unchecked[0]}) were written without a "
                      f"checksum (by an older geocap): resuming checks their size only", stacklevel=3)
    if lost:
        with manifest_lock(out):
            manifest = read_manifest(out)
            manifest["shards"] = [e for e in manifest["shards"] if e["index"] not in lost]
            _write_manifest(out, manifest)
    return lost


def _remove_stale(out: str, index: int) -> None:
    for tmp in glob.glob(os.path.join(glob.escape(out), shard_name(index) + ".tmp-*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def dump(checkpoint: Union[str, os.PathLike], data: Union[str, os.PathLike], split: str,
         out: Union[str, os.PathLike], *, mode: str = "teacher-forced", what: Union[str, Sequence[str]] = WHAT_NAMES,
         stats_only: bool = False, hypothetical: Optional[bool] = None, features: bool = False,
         compression: str = "lzf", shard_images: int = 256, batch_size: int = 16, beam_size: int = 3,
         max_len: int = 20, limit: int = 0, clusters: int = 8, cluster_sample: int = 20000,
         features_file: str = "features.h5", captions: str = "caps", device=None, rank: Optional[int] = None,
         world_size: Optional[int] = None, progress: bool = True, stats_collector=None,
         writer: str = "process") -> DumpResult:
    """Dump ``checkpoint``'s attention over ``split`` of ``data`` into the directory ``out``
    (layout: :mod:`geocap.data.dump_format`; determinism and resume: this module's doc).

    ``mode`` "teacher-forced" | "generated"; ``what`` map kinds (subset of encoder, decoder,
    cross, or a comma list); ``stats_only``: update an analysis collector (``stats_collector``,
    default ``geocap.analysis.StatsCollector``) with every record and store its state per shard,
    no maps; ``hypothetical`` None = on when referents are known (teacher-forced only);
    ``features``: store each object's features (float16); ``clusters``: k-means clusters when
    the data has no ground truth (0: none); ``rank``/``world_size``: this process's share (None:
    from RANK / WORLD_SIZE, else 0 / 1); ``writer``: "process" (default: the shard writer runs in
    a child process of this rank, :mod:`geocap.dump.writer_process`) or "inline" (in this process);
    both write identical shards. Returns a :class:`DumpResult`.
    """
    from geocap import __version__
    from geocap.checkpoint import file_sha256, load_checkpoint
    from geocap.data.dataset import CaptionDataset
    from geocap.progress import progress_bar
    from geocap.dump import grounding
    from geocap.dump.records import generate_rows, record_batch
    from geocap.dump.source import SplitSource, kmeans_centroids
    from geocap.dump.writer import ShardWriter

    t_start = time.perf_counter()
    # -- arguments ---------------------------------------------------------------------------
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    what = _parse_what(what)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    for name, value, low in (("shard_images", shard_images, 1), ("batch_size", batch_size, 1),
                             ("beam_size", beam_size, 1), ("max_len", max_len, 1), ("limit", limit, 0),
                             ("clusters", clusters, 0), ("cluster_sample", cluster_sample, 1)):
        _check_int(name, value, low)
    if writer not in WRITERS:
        raise ValueError(f"writer must be one of {', '.join(WRITERS)}, got {writer!r}")
    rank, world_size = _rank_world(rank, world_size)
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    if not os.path.isfile(checkpoint):
        raise ValueError(f"checkpoint: {checkpoint}: no such file")
    data = os.path.abspath(os.fspath(data))
    if not os.path.isdir(data):
        raise ValueError(f"data: {data}: no such directory")
    out = os.path.abspath(os.fspath(out))
    check_out_dir(out, marker=MANIFEST, kind="geocap dump")        # a dump (resumed) or a new folder
    store_path, caps_dir = os.path.join(data, features_file), os.path.join(data, captions)
    if not os.path.isfile(store_path):
        raise ValueError(f"data: {store_path}: feature store missing")
    if not os.path.isdir(caps_dir):
        raise ValueError(f"data: {caps_dir}: captions directory missing")

    # -- model and data ----------------------------------------------------------------------
    sha256 = file_sha256(checkpoint)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    dataset = CaptionDataset(store_path, caps_dir, split, per_image=True, captions_per_image="all")
    vocab = ckpt.vocab
    if vocab.words != dataset.vocab.words:
        raise ValueError(f"checkpoint {checkpoint} and captions dir {caps_dir} have different vocabularies "
                         f"(sha1 {vocab.sha1[:12]} vs {dataset.vocab.sha1[:12]})")
    if ckpt.config.feature_dim != dataset.store.feature_dim:
        raise ValueError(f"checkpoint {checkpoint} expects {ckpt.config.feature_dim}-dimensional features but "
                         f"{store_path} holds {dataset.store.feature_dim}-dimensional ones")
    config = ckpt.config
    max_len = min(max_len, config.max_len)
    n_images = len(dataset.image_ids) if limit == 0 else min(limit, len(dataset.image_ids))
    image_ids = dataset.image_ids[:n_images]
    gt_path = os.path.join(data, grounding.GROUND_TRUTH)
    truth = grounding.GroundTruth(gt_path, image_ids.tolist()) if os.path.isfile(gt_path) else None
    if hypothetical is None:
        hypothetical = truth is not None and mode == "teacher-forced"
    if hypothetical and (truth is None or mode != "teacher-forced"):
        raise ValueError("hypothetical captions need referents (DIR/ground_truth.json) and mode teacher-forced")
    store = dataset.store
    has_labels = store.has_labels or truth is not None
    cluster_source = "ground_truth" if truth is not None else ("kmeans" if clusters > 0 else "none")
    centroids = None
    if cluster_source == "kmeans":
        centroids = kmeans_centroids(dataset, n_images, clusters, cluster_sample)

    maps = () if stats_only else tuple(_map(w) for w in what)
    label_names = store.label_names
    if label_names is None and truth is not None:
        label_names = truth.label_names()
    metadata = {
        "geocap_version": __version__, "checkpoint": checkpoint, "checkpoint_sha256": sha256,
        "checkpoint_step": ckpt.step, "model_config": config.to_dict(), "vocab_sha1": vocab.sha1,
        "data": data, "split": split, "mode": mode, "what": list(what), "maps": list(maps),
        "stats_only": bool(stats_only), "hypothetical": bool(hypothetical), "features": bool(features),
        "compression": compression, "shard_images": shard_images, "limit": limit,
        "beam_size": beam_size if mode == "generated" else None, "max_len": max_len if mode == "generated" else None,
        "n_images": n_images, "image_ids_sha256": hashlib.sha256(np.ascontiguousarray(image_ids, np.int64)
                                                                 .tobytes()).hexdigest(),
        "referents": truth is not None, "labels": bool(has_labels),
        "label_names": label_names, "clusters": cluster_source,
        "n_clusters": clusters if cluster_source == "kmeans" else None,
        "cluster_centroids": None if centroids is None else centroids.tolist(),
    }
    os.makedirs(out, exist_ok=True)
    manifest = _open_manifest(out, metadata, n_images, shard_images)
    metadata = manifest["metadata"]
    if metadata.get("cluster_centroids") is not None:
        centroids = np.asarray(metadata["cluster_centroids"], np.float32)
    digest = manifest["metadata_sha256"]
    n_shards = manifest["n_shards"]
    mine = [k for k in range(n_shards) if k % world_size == rank]
    lost = _drop_lost_shards(out, [e for e in manifest["shards"] if e["index"] in mine])
    done = {e["index"] for e in manifest["shards"]} - set(lost)
    todo = [k for k in mine if k not in done]
    result = DumpResult(path=out, rank=rank, world_size=world_size, shards_skipped=[k for k in mine if k in done],
                        shards_redone=lost)
    for k in todo:
        _remove_stale(out, k)

    collector_class = None
    if stats_only:
        if stats_collector is None:
            from geocap.analysis import StatsCollector as stats_collector
        collector_class = stats_collector

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = _resolve_device(device, local_rank)
    model = ckpt.build_model(dev).eval()
    del ckpt
    source = SplitSource(dataset, truth=truth, centroids=centroids, words=vocab.words, eos_id=config.eos_id,
                         max_len=config.max_len, hypothetical=hypothetical, has_labels=has_labels, features=features)
    lh_enc = (config.layers, config.heads)

    def rows_of(positions, batch):
        if mode == "generated":
            return lambda memory: generate_rows(model, memory, beam_size=beam_size, max_len=max_len)
        return lambda memory: source.reference_rows(positions, batch)

    todo_images = sum(min(n_images, (k + 1) * shard_images) - k * shard_images for k in todo)
    bar = progress_bar(enabled=progress, total=todo_images, unit="img",
                       desc=f"dump {split}" + (f" rank {rank}" if world_size > 1 else ""))
    child = None
    if todo and writer == "process":
        from geocap.dump.writer_process import WriterProcess
        t0 = time.perf_counter()
        child = WriterProcess()
        result.writer_seconds += time.perf_counter() - t0
    closing: dict = {}          # writer process: seq -> (k, lo, hi, t_shard, parent seconds) of shards closing

    def finish(k, lo, hi, t_shard, size, sha256, n_records, parent_seconds, child_seconds) -> None:
        """A shard is complete (renamed): count it and list it in the manifest."""
        result.writer_seconds += parent_seconds
        result.writer_child_seconds += child_seconds
        result.bytes += size
        result.records += n_records
        result.shards_written.append(k)
        entry = {"index": k, "file": shard_name(k), "images": hi - lo, "records": n_records, "bytes": size,
                 "sha256": sha256, "rank": rank, "seconds": round(time.perf_counter() - t_shard, 4),
                 "writer_seconds": round(parent_seconds, 4)}
        if child is not None:
            entry["writer_child_seconds"] = round(child_seconds, 4)
        _add_shard(out, entry)

    def collect(block: bool) -> None:
        t0 = time.perf_counter()
        for seq, size, n_records, child_seconds, sha256 in child.collect(block):
            k, lo, hi, t_shard, parent_seconds = closing.pop(seq)
            finish(k, lo, hi, t_shard, size, sha256, n_records, parent_seconds, child_seconds)
        result.writer_seconds += time.perf_counter() - t0

    try:
        for k in todo:
            t_shard = time.perf_counter()
            lo, hi = k * shard_images, min(n_images, (k + 1) * shard_images)
            shard_args = dict(index=k, metadata_sha256=digest, checkpoint_sha256=sha256, vocab=vocab.words, maps=maps,
                              entropies=tuple(_map(w) for w in what), encoder_lh=lh_enc,
                              decoder_lh=(config.layers, config.heads), has_labels=has_labels,
                              has_clusters=cluster_source != "none", has_features=features,
                              stats_only=stats_only, compression=compression)
            path = os.path.join(out, shard_name(k))
            shard = child if child is not None else ShardWriter(path, **shard_args)
            if child is not None:
                child.open(path, **shard_args)
            collector = collector_class() if collector_class is not None else None
            try:
                for b0 in range(lo, hi, batch_size):
                    positions = list(range(b0, min(hi, b0 + batch_size)))
                    batch = dataset.collate([dataset[i] for i in positions])
                    objects = source.objects(positions, batch)
                    per_image = record_batch(
                        model, batch.features.to(dev), batch.boxes.to(dev), batch.box_mask.to(dev),
                        rows_of(positions, batch), image_ids=[int(image_ids[i]) for i in positions], words=vocab.words,
                        what=what, objects=objects)
                    for recs in per_image:
                        if collector is not None:
                            for r in recs:
                                collector.update(r)
                                r.encoder_self = r.decoder_self = r.cross = None
                        shard.add_image(recs)
                    result.images += len(positions)
                    bar.update(len(positions))
                    if closing:
                        collect(block=False)        # list the shards the writer process finished meanwhile
                state = None if collector is None else collector.state()
                if child is None:
                    size = shard.close(state)
                else:                               # the child finishes it while the model goes on
                    seq = child.send_close(state)
                    closing[seq] = (k, lo, hi, t_shard, child.seconds)
            except BaseException:
                shard.abort()
                raise
            if child is None:
                finish(k, lo, hi, t_shard, size, shard.sha256, shard.n_records, shard.seconds, 0.0)
        while closing:
            collect(block=True)             # each shard listed as soon as the writer process renamed it
    finally:
        bar.close()
        if child is not None:
            t0 = time.perf_counter()
            child.stop()
            result.writer_seconds += time.perf_counter() - t0
    result.seconds = time.perf_counter() - t_start
    return summarize(result)


def summarize(result: DumpResult) -> DumpResult:
    """``result`` with ``complete``, ``dump_bytes`` and ``dump_images`` read from the manifest now
    (after the other ranks finished, under torchrun)."""
    manifest = read_manifest(result.path)
    result.complete = len(manifest["shards"]) == manifest["n_shards"]
    result.dump_bytes = sum(e["bytes"] for e in manifest["shards"])
    result.dump_images = sum(e["images"] for e in manifest["shards"])
    return result


def _map(what_name: str) -> str:
    from geocap.dump.records import WHAT
    return WHAT[what_name]
