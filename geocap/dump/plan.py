"""The plan of a dump job: its options checked, the checkpoint and the split loaded, the
metadata fixed, the manifest created or checked, and this rank's shards assigned (shard k:
rank ``k % world_size``; those the manifest lists are skipped unless their files are damaged).
Determinism and resume: :mod:`geocap.dump.job`."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from geocap.data.dump_format import MANIFEST, check_top_k
from geocap.data.file_digest import file_sha256
from geocap.dump.manifest import drop_lost_shards, open_manifest, remove_stale
from geocap.dump.record_builder import WHAT
from geocap.dump.writer import COMPRESSIONS
from geocap.options import check_int
from geocap.out_dir import check_out_dir
from geocap.errors import DataError, UsageError

MODES = ("teacher-forced", "generated")
DEFAULT_BEAM_SIZE, DEFAULT_MAX_LEN = 3, 20     # a geocap checkpoint's decoding when not given
WRITERS = ("process", "inline")
ON_ERROR = ("raise", "skip")     # the shard writer in a child process (default) or in this one
WHAT_NAMES = ("encoder", "decoder", "cross")

__all__ = ["DumpOptions", "DumpPlan", "MODES", "ShardShares", "WHAT_NAMES", "WRITERS", "assign_shards", "check_rank",
           "plan_dump", "resolve_options"]



def _parse_what(what) -> tuple:
    if isinstance(what, str):
        what = [w.strip() for w in what.split(",") if w.strip()]
    what = tuple(what)
    bad = [w for w in what if w not in WHAT_NAMES]
    if bad or not what:
        raise UsageError(f"what must be a non-empty subset of {','.join(WHAT_NAMES)}, got {','.join(what) or '(none)'}")
    return tuple(w for w in WHAT_NAMES if w in what)


@dataclass(frozen=True)
class DumpOptions:
    """What a dump records and how (:func:`geocap.dump.job.dump` documents each option)."""
    mode: str = "teacher-forced"
    what: Union[str, Sequence[str]] = WHAT_NAMES
    maps: Union[None, str, Sequence[str]] = None      # kinds of `what` whose maps are kept (None: all); the
                                                      # others keep only their entropies
    stats_only: bool = False
    hypothetical: Optional[bool] = None
    features: bool = False
    compression: str = "lzf"
    shard_images: int = 256
    batch_size: int = 16
    beam_size: Optional[int] = None       # None: the model's own (a geocap checkpoint: DEFAULT_BEAM_SIZE; a
    max_len: Optional[int] = None         # Hugging Face captioner: its generation_config)
    limit: int = 0
    clusters: int = 8
    cluster_sample: int = 20000
    features_file: str = "features.h5"
    captions: str = "caps"
    writer: str = "process"
    on_error: str = "raise"           # a bad image (--hf dumps): "raise" stops naming it, "skip" leaves it out
    encoder_top_k: Optional[int] = None   # keep each encoder map row's k largest weights (None: whole maps)

    def checked(self) -> "DumpOptions":
        """These options with ``what`` as a tuple in canonical order; ValueError naming a bad one."""
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        what = _parse_what(self.what)
        maps = what if self.maps is None else _parse_what(self.maps)
        if not set(maps) <= set(what):
            raise UsageError(f"maps ({','.join(maps)}) must be among what ({','.join(what)}): a kind's maps come "
                             f"with its entropies")
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        for name, low in (("shard_images", 1), ("batch_size", 1), ("beam_size", 1), ("max_len", 1), ("limit", 0),
                          ("clusters", 0), ("cluster_sample", 1)):
            if getattr(self, name) is not None or name not in ("beam_size", "max_len"):
                check_int(name, getattr(self, name), low)
        if self.on_error not in ON_ERROR:
            raise UsageError(f"on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.writer not in WRITERS:
            raise UsageError(f"writer must be one of {', '.join(WRITERS)}, got {self.writer!r}")
        if self.encoder_top_k is not None:
            check_top_k(self.encoder_top_k)
            if self.stats_only or "encoder" not in maps:
                raise UsageError("encoder_top_k compacts the stored encoder maps, but this dump stores none "
                                 "(stats_only, or maps without encoder)")
        return dataclasses.replace(self, what=what, maps=maps)

    def top_k_metadata(self) -> dict:
        """``{"encoder_top_k": k}`` for the dump's metadata when the encoder maps are compacted; {}
        otherwise (so the metadata, and the digest resumed dumps are checked by, stay as before)."""
        return {} if self.encoder_top_k is None else {"encoder_top_k": int(self.encoder_top_k)}

    @property
    def stored_maps(self) -> tuple:
        """The record fields whose maps the shards store (none with ``stats_only``); call on
        :meth:`checked` options."""
        return () if self.stats_only else tuple(WHAT[w] for w in self.maps)


@dataclass
class DumpPlan:
    """A dump job's inputs and its share of the work (see :func:`plan_dump`). ``ckpt`` is the
    loaded checkpoint until :meth:`build_model` (then None); ``config`` and ``words`` its model
    config and vocabulary; ``max_len`` the decoding limit within the model's; ``todo`` this
    rank's shards to write, ``skipped`` those already done, ``redone`` those listed but damaged
    (now unlisted, so in ``todo``)."""
    out: str
    split: str
    rank: int
    world_size: int
    options: DumpOptions
    ckpt: object
    config: object
    words: list
    checkpoint_sha256: str
    dataset: object
    truth: object
    image_ids: np.ndarray
    n_images: int
    max_len: int
    hypothetical: bool
    has_labels: bool
    cluster_source: str
    centroids: Optional[np.ndarray]
    maps: tuple
    metadata: dict
    metadata_sha256: str
    todo: list
    skipped: list
    redone: list

    def build_model(self, device):
        """The checkpoint's model on ``device``, in eval mode; the checkpoint is dropped (its
        weights live in the model now)."""
        model = self.ckpt.build_model(device).eval()
        self.ckpt = None
        return model

    def shard_range(self, k: int) -> tuple:
        """Positions ``[lo, hi)`` (in the split's order) of shard k's images."""
        size = self.options.shard_images
        return k * size, min(self.n_images, (k + 1) * size)

    def shard_args(self, k: int) -> dict:
        """Shard k's :class:`~geocap.dump.writer.ShardWriter` arguments (all but the path)."""
        config = self.config
        o = self.options
        return dict(index=k, metadata_sha256=self.metadata_sha256, checkpoint_sha256=self.checkpoint_sha256,
                    vocab=self.words, maps=self.maps, entropies=tuple(WHAT[w] for w in o.what),
                    encoder_lh=(config.layers, config.heads), decoder_lh=(config.layers, config.heads),
                    has_labels=self.has_labels, has_clusters=self.cluster_source != "none",
                    has_features=o.features, stats_only=o.stats_only, compression=o.compression,
                    encoder_top_k=o.encoder_top_k)


def resolve_options(options: Optional[DumpOptions], option_values: dict, stats_collector, caller: str) -> DumpOptions:
    """The options of a dump call: ``options`` or its fields as keywords (not both); ValueError
    naming ``caller`` otherwise, or when ``stats_only`` comes without the collector class."""
    if options is None:
        options = DumpOptions(**option_values)
    elif option_values:
        raise ValueError(f"{caller}: pass the options either as DumpOptions or as keywords, not both "
                         f"({', '.join(sorted(option_values))})")
    if options.stats_only and stats_collector is None:
        raise ValueError("stats_only needs stats_collector, the analysis collector class "
                         "(e.g. geocap.analysis.StatsCollector)")
    return options


def check_rank(rank, world_size) -> tuple:
    """``(rank, world_size)``, None taken from RANK / WORLD_SIZE (else 0 / 1); ValueError when invalid."""
    from geocap.distributed import environment_rank

    env_rank, env_world_size = environment_rank()
    if world_size is None:
        world_size = env_world_size
    if rank is None:
        rank = env_rank
    check_int("world_size", world_size, 1)
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


def plan_dump(checkpoint, data, split: str, out, options: DumpOptions, *, rank: Optional[int] = None,
              world_size: Optional[int] = None) -> DumpPlan:
    """Check the arguments, load the checkpoint and ``split`` of ``data``, fix the metadata,
    create or check ``out``'s manifest and assign this rank's shards (removing its stale
    temporary files and unlisting its damaged shards). ValueError (DumpError for a dump of other
    settings) naming the bad argument or file.

    Steps: :func:`_plan_options`, :func:`check_rank`, :func:`_plan_paths`, :func:`_load_inputs`,
    :func:`_plan_referents`, :func:`_plan_metadata`, :func:`assign_shards`."""
    o = _plan_options(options)
    rank, world_size = check_rank(rank, world_size)
    checkpoint, data, out, store_path, caps_dir = _plan_paths(checkpoint, data, out, o)
    sha256, ckpt, dataset = _load_inputs(checkpoint, store_path, caps_dir, split)
    n_images = len(dataset.image_ids) if o.limit == 0 else min(o.limit, len(dataset.image_ids))
    image_ids = dataset.image_ids[:n_images]
    refs = _plan_referents(data, dataset, image_ids, o)
    max_len = min(o.max_len, ckpt.config.max_len)
    metadata = _plan_metadata(o, checkpoint=checkpoint, sha256=sha256, ckpt=ckpt, data=data, split=split,
                              max_len=max_len, image_ids=image_ids, refs=refs)
    shares = assign_shards(out, metadata, n_images, o.shard_images, rank, world_size)
    metadata = shares.manifest["metadata"]
    centroids = refs.centroids
    if metadata.get("cluster_centroids") is not None:   # a resumed dump: the centroids it started with
        centroids = np.asarray(metadata["cluster_centroids"], np.float32)
    return DumpPlan(out=out, split=split, rank=rank, world_size=world_size, options=o, ckpt=ckpt, config=ckpt.config,
                    words=ckpt.vocab.words, checkpoint_sha256=sha256, dataset=dataset, truth=refs.truth,
                    image_ids=image_ids, n_images=n_images, max_len=max_len, hypothetical=refs.hypothetical,
                    has_labels=refs.has_labels, cluster_source=refs.cluster_source, centroids=centroids,
                    maps=o.stored_maps, metadata=metadata, metadata_sha256=shares.manifest["metadata_sha256"],
                    todo=shares.todo, skipped=shares.skipped, redone=shares.redone)


def _plan_options(options: DumpOptions) -> DumpOptions:
    """``options`` checked, for a geocap checkpoint (``on_error`` "raise"), with the default beam
    size and maximum length filled in."""
    o = options.checked()
    if o.on_error != "raise":
        raise UsageError("on_error skip (--on-error skip) is for Hugging Face captioners' dumps (--hf); a geocap "
                         "checkpoint's dump reads a feature store (geocap prepro --on-error skips bad images)")
    return dataclasses.replace(o, beam_size=DEFAULT_BEAM_SIZE if o.beam_size is None else o.beam_size,
                               max_len=DEFAULT_MAX_LEN if o.max_len is None else o.max_len)


def _plan_paths(checkpoint, data, out, o: DumpOptions) -> tuple:
    """``(checkpoint, data, out, feature store, captions dir)`` as absolute paths, each checked
    (``out``: a dump to resume or a folder that may become one); ValueError naming the argument."""
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    if not os.path.isfile(checkpoint):
        raise DataError(f"checkpoint: {checkpoint}: no such file")
    data = os.path.abspath(os.fspath(data))
    if not os.path.isdir(data):
        raise DataError(f"data: {data}: no such directory")
    out = os.path.abspath(os.fspath(out))
    check_out_dir(out, marker=MANIFEST, kind="geocap dump")        # a dump (resumed) or a new folder
    store_path, caps_dir = os.path.join(data, o.features_file), os.path.join(data, o.captions)
    if not os.path.isfile(store_path):
        raise DataError(f"data: {store_path}: feature store missing")
    if not os.path.isdir(caps_dir):
        raise DataError(f"data: {caps_dir}: captions directory missing")
    return checkpoint, data, out, store_path, caps_dir


def _load_inputs(checkpoint: str, store_path: str, caps_dir: str, split: str) -> tuple:
    """``(checkpoint SHA-256, checkpoint, split dataset)``; ValueError when the checkpoint's
    vocabulary or feature width is not the data's."""
    from geocap.checkpoint import load_checkpoint
    from geocap.data.dataset import CaptionDataset

    sha256 = file_sha256(checkpoint)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    dataset = CaptionDataset(store_path, caps_dir, split, per_image=True, captions_per_image="all")
    vocab = ckpt.vocab
    if vocab.words != dataset.vocab.words:
        raise DataError(f"checkpoint {checkpoint} and captions dir {caps_dir} have different vocabularies "
                         f"(sha1 {vocab.sha1[:12]} vs {dataset.vocab.sha1[:12]})")
    if ckpt.config.feature_dim != dataset.store.feature_dim:
        raise DataError(f"checkpoint {checkpoint} expects {ckpt.config.feature_dim}-dimensional features but "
                         f"{store_path} holds {dataset.store.feature_dim}-dimensional ones")
    return sha256, ckpt, dataset


@dataclass
class _Referents:
    """What the dump knows of the objects: the synthetic ground truth (None without
    ``ground_truth.json``), whether captions are made hypothetical, whether boxes have labels
    and their names, where clusters come from ("ground_truth", "kmeans" or "none") and the
    k-means centroids (None unless "kmeans")."""
    truth: object
    hypothetical: bool
    has_labels: bool
    label_names: Optional[list]
    cluster_source: str
    centroids: Optional[np.ndarray]


def _plan_referents(data: str, dataset, image_ids: np.ndarray, o: DumpOptions) -> _Referents:
    """The ground truth of ``image_ids`` (when ``data`` has one), labels, and clusters; ValueError
    for hypothetical captions without referents or outside teacher forcing."""
    from geocap.dump import ground_truth
    from geocap.dump.source import kmeans_centroids

    gt_path = os.path.join(data, ground_truth.GROUND_TRUTH)
    truth = ground_truth.GroundTruth(gt_path, image_ids.tolist()) if os.path.isfile(gt_path) else None
    hypothetical = o.hypothetical
    if hypothetical is None:
        hypothetical = truth is not None and o.mode == "teacher-forced"
    if hypothetical and (truth is None or o.mode != "teacher-forced"):
        raise UsageError("hypothetical captions need referents (DIR/ground_truth.json) and mode teacher-forced")
    store = dataset.store
    cluster_source = "ground_truth" if truth is not None else ("kmeans" if o.clusters > 0 else "none")
    centroids = None
    if cluster_source == "kmeans":
        centroids = kmeans_centroids(dataset, len(image_ids), o.clusters, o.cluster_sample)
    label_names = store.label_names
    if label_names is None and truth is not None:
        label_names = truth.label_names()
    return _Referents(truth=truth, hypothetical=bool(hypothetical),
                      has_labels=bool(store.has_labels or truth is not None), label_names=label_names,
                      cluster_source=cluster_source, centroids=centroids)


def _plan_metadata(o: DumpOptions, *, checkpoint: str, sha256: str, ckpt, data: str, split: str, max_len: int,
                   image_ids: np.ndarray, refs: _Referents) -> dict:
    """The dump's metadata (the manifest's ``metadata``: what a rerun must match to resume)."""
    from geocap import __version__

    generated = o.mode == "generated"
    return {
        "geocap_version": __version__, "checkpoint": checkpoint, "checkpoint_sha256": sha256,
        "checkpoint_step": ckpt.step, "model_config": ckpt.config.to_dict(), "vocab_sha1": ckpt.vocab.sha1,
        "data": data, "split": split, "mode": o.mode, "what": list(o.what), "maps": list(o.stored_maps),
        **o.top_k_metadata(),
        "stats_only": bool(o.stats_only), "hypothetical": refs.hypothetical, "features": bool(o.features),
        "compression": o.compression, "shard_images": o.shard_images, "limit": o.limit,
        "beam_size": o.beam_size if generated else None, "max_len": max_len if generated else None,
        "n_images": len(image_ids), "image_ids_sha256": hashlib.sha256(np.ascontiguousarray(image_ids, np.int64)
                                                                       .tobytes()).hexdigest(),
        "referents": refs.truth is not None, "labels": refs.has_labels,
        "label_names": refs.label_names, "clusters": refs.cluster_source,
        "n_clusters": o.clusters if refs.cluster_source == "kmeans" else None,
        "cluster_centroids": None if refs.centroids is None else refs.centroids.tolist(),
    }


@dataclass
class ShardShares:
    """This rank's share of a dump: the ``manifest`` (created or checked), the shards ``todo``,
    those ``skipped`` (listed and intact) and ``redone`` (listed but damaged: unlisted, in todo)."""
    manifest: dict
    todo: list
    skipped: list
    redone: list


def assign_shards(out: str, metadata: dict, n_images: int, shard_images: int, rank: int,
                  world_size: int) -> ShardShares:
    """Create ``out`` and its manifest, or check a rerun's ``metadata`` against it (DumpError naming
    the differing keys), and assign this rank its shards (shard k: rank ``k % world_size``),
    removing its stale temporary files and unlisting its damaged shards."""
    os.makedirs(out, exist_ok=True)
    manifest = open_manifest(out, metadata, n_images, shard_images)
    mine = [k for k in range(manifest["n_shards"]) if k % world_size == rank]
    redone = drop_lost_shards(out, [e for e in manifest["shards"] if e["index"] in mine])
    done = {e["index"] for e in manifest["shards"]} - set(redone)
    todo = [k for k in mine if k not in done]
    for k in todo:
        remove_stale(out, k)
    return ShardShares(manifest=manifest, todo=todo, skipped=[k for k in mine if k in done], redone=redone)
