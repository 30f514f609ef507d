"""The on-disk format of attention dumps (``geocap dump``), and its reader :func:`open_dump`.

numpy and h5py only (the data layer): analyses and viewers read dumps without the model. It is
the contract between the writer (:mod:`geocap.dump`, which sits on the model) and the readers
(analyses, the viewer, exports), so it lives below both and each imports it downward; beside its
writer it would make every reader depend on the model's layer (guarded by
``tests/test_dump.py::test_dump_readers_import_nothing_of_the_model_layer``).

Layout (format ``geocap-dump`` version 1). A dump is a directory::

    DUMP/manifest.json           the dump's description and the list of completed shards
    DUMP/manifest.lock           empty; writers take an exclusive ``flock`` on it to update the manifest
    DUMP/shard-00000.h5 ...      one HDF5 file per shard (shard k covers a fixed range of the
                                 split's images, in the split's order)
    DUMP/shard-00007.h5.tmp-PID  a shard being written (renamed to its final name when complete)

``manifest.json`` (written atomically: temporary file, then rename)::

    format "geocap-dump", format_version 1,
    metadata      dict fixed when the dump starts: model config (``model_config``: the model's
                  settings, ORTConfig's fields, among them ``geometry`` and the box
                  ``embedding``, "ort" or "signed"; :func:`box_embedding` reads it), checkpoint path and sha256,
                  geocap version, data dir, split, mode, what, options, image-list digest,
                  clusters (source and, for k-means, the centroids), ``label_names`` (the
                  labels' names: a list indexed by label id, or a dict {str(id): name}; None or
                  absent when unknown) ...
    metadata_sha256  SHA-256 of the canonical JSON of ``metadata`` (every shard carries it)
    n_shards, n_images, shard_images   shard k holds images [k * shard_images, (k+1) * shard_images)
    shards        completed shards, ascending index: {index, file, images, records, bytes,
                  sha256 (of the whole file), rank, seconds, writer_seconds, and
                  writer_child_seconds with the writer process}

A dump is complete when ``shards`` lists all ``n_shards``; the records are the shards' records
in shard order.

Each shard (attributes ``format`` "geocap-dump-shard", ``format_version`` 1, ``index``,
``n_images``, ``n_records``, ``metadata_sha256``, ``checkpoint_sha256``, ``maps`` (JSON list of
the map kinds stored), ``entropies`` (JSON list of the map kinds whose entropies are stored),
``encoder_lh`` / ``decoder_lh`` ([L, H] of the encoder / decoder maps), ``has_labels``,
``has_clusters``, ``has_features``, ``stats_only``). M images, R records, sums over them::

    vocab                    [V]            UTF-8 words; tokens are stored as indices into it
    images/image_id          [M]            int64
    images/n_objects         [M]            int32 (N of each image; objects are per image)
    images/width             [M]            int32 pixels, -1 where unknown (see "Older dumps")
    images/height            [M]            int32 pixels, -1 where unknown
    objects/boxes            [sum N, 4]     float32
    objects/labels           [sum N]        int32 (when has_labels)
    objects/clusters         [sum N]        int32 (when has_clusters)
    objects/features         [sum N, D]     float16 (when has_features)
    records/image            [R]            int32, the record's image (index into images/)
    records/caption_id       [R]            int64 (-1 for generated captions)
    records/kind             [R]            uint8, index into attention_record.KINDS
    records/n_tokens         [R]            int32 (T of each record)
    records/has_referents    [R]            bool
    records/has_source_referents [R]        bool
    tokens/ids               [sum T]        int32, indices into vocab
    tokens/referents         [sum T]        int32 (-1 where none or unknown)
    tokens/source_referents  [sum T]        int32
    maps/encoder_self        [sum L H N N]  float16, one map per *image* (the encoder does not see
                                            the caption: every record of an image shares it)
    maps/decoder_self        [sum L H T T]  float16, one per record
    maps/cross               [sum L H T N]  float16, one per record
    entropy/encoder_self     [sum L H N]    float32, per image (float16 in stats-only shards, read back
                                            as float32: :data:`ENTROPY_DTYPE_STATS_ONLY`)
    entropy/decoder_self     [sum L H T]    float32, per record (float16 in stats-only shards)
    entropy/cross            [sum L H T]    float32, per record (float16 in stats-only shards)
    stats/00000 ...          the shard's analysis-collector state (stats-only dumps): one dataset per
                             state entry, numbered in key order, its key in the attribute ``key``

Ragged without padding: each map kind is one flat array; a record's slice starts at the sum of
the sizes before it (computed from ``n_objects`` / ``n_tokens`` when a shard is first read) and
is reshaped to ``[L, H, rows, cols]``. Maps and entropies are chunked to about one record's
size (the read pattern: one record at a time) and compressed (HDF5 filters, so any HDF5 reader
decodes them: lzf by default, gzip (level 1) with the shuffle filter, or none; the shard attribute
``compression`` names it).

Checksums: two layers. (1) Every dataset of a shard except the string datasets and 0-d
``stats/`` entries carries HDF5's Fletcher-32 filter, applied after compression, so HDF5 checks
each chunk's stored bytes on every read by any reader, at little cost; a damaged chunk is a
:class:`DumpError` naming the shard when read. The string datasets (``vocab``,
``images/file_name``: variable-length UTF-8 takes no HDF5 filter) carry the attribute ``crc32``
instead, the CRC-32 of their strings (:func:`strings_crc32`), which geocap checks whenever it
reads them (older shards without it: not checked). (2) Each manifest entry
records the SHA-256 of the whole shard file, which also covers what Fletcher-32 does not
(attributes, the vocabulary, HDF5's own metadata). A resumed dump hashes every shard it would
skip and writes again any that differ; readers hash them with ``open_dump(path, verify=True)``
(a whole read of every file, ~1 GB/s; off by default since the data are checked on read).

Sameness: shard files are not byte-reproducible. The same records written twice (a dump killed
and resumed, or run again) may give shard files of other SHA-256s (lzf's output depends on the
chunk boundaries HDF5 flushes at; 6 of 40 shards differed in one kill-and-resume check), so the
file digests of the manifest check a shard against *itself*, never two dumps against each other.
To compare two dumps, compare their records: :func:`content_sha256`.

Records: a record's ``extra`` holds ``"width"`` and ``"height"`` (ints, pixels) when both are
known for its image, and the image's optional fields (:mod:`geocap.data.attention_record`:
``special_objects``, ``patch_grid``, ``file_name``, ``referent_objects``) when it has them, from::

    objects/special          [sum N]        bool, the special (non-region) objects
    images/patch_grid        [M, 2]         int32 [rows, cols]; [0, 0] when the objects are no grid
    images/file_name         [M]            UTF-8, "" when unknown
    images/n_regions         [M]            int32 referent regions per image (0: referents are objects)
    regions/n_objects        [sum K]        int32 objects per region
    regions/objects          [sum sizes]    int32 the regions' object indices

Dumps written before these fields have none of these datasets; their records read without them.

Older dumps: version-1 dumps written before image sizes and label names were stored have no
``images/width`` / ``images/height`` and no ``label_names``; they read as before, every size
unknown (empty ``extra``), names unknown. Dumps written before checksums have no ``sha256`` in
their manifest entries and no Fletcher-32 filters: they read as before, with a warning that damage
inside their shards may go undetected (a resume checks their size only). The additions are
optional datasets, filters and keys (older readers ignore them), so the format version stays 1.
Dumps written before models had a choice of box embedding have no ``embedding`` in their
``model_config``: their model used ORT's, and :func:`box_embedding` reads them as "ort".

Compact encoder maps (``geocap dump --encoder-top-k K``; shard attribute ``encoder_top_k`` = K):
instead of ``maps/encoder_self`` a shard holds each encoder map row's K largest weights
(:mod:`geocap.data.top_k_rows`; k = min(K, N) per image)::

    maps/encoder_self_topk          [sum L H N k]  float16 the kept weights
    maps/encoder_self_topk_index    [sum L H N k]  uint16 their columns, ascending within a row
    maps/encoder_self_topk_missing  [sum L H N]    float32 each row's lost weight (1 - its kept sum)

and the attribute ``encoder_top_k_missing``, the shard's largest lost weight. Records read back
dense, the dropped weights 0 (:meth:`Dump.encoder_missing` states the error); the encoder
entropies are those of the whole maps. Readers older than this field refuse such shards
("dataset maps/encoder_self missing").

Stats-only dumps store every field except the three maps (entropies included), plus
``stats/``; their records have ``encoder_self`` = ``decoder_self`` = ``cross`` = None.

Errors: every problem with a dump (no manifest, another format or version, an unfinished dump,
a missing, truncated or corrupt shard, a shard of another dump or model) raises
:class:`DumpError`, a ValueError naming the file.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
import zlib
from collections import OrderedDict
from typing import Iterator, Optional, Sequence

import numpy as np

from geocap.data.attention_record import ENTROPY_NAMES, KINDS, MAP_NAMES, Record
from geocap.data.file_digest import file_sha256
from geocap.data.hdf5_errors import open_hdf5
from geocap.data.top_k_rows import expand_top_k
from geocap.errors import DumpError, UsageError

FORMAT, SHARD_FORMAT, FORMAT_VERSION = "geocap-dump", "geocap-dump-shard", 1
MANIFEST, LOCK = "manifest.json", "manifest.lock"
CACHE_BYTES = 16 << 20          # HDF5 chunk cache per open shard (a few records' chunks)
OPEN_SHARDS = 8                 # shards a Dump keeps open at once (least recently used closed first)
# the datasets of encoder maps kept as each row's top k (shard attribute ``encoder_top_k``)
TOP_K_VALUES, TOP_K_INDEX, TOP_K_MISSING = "encoder_self_topk", "encoder_self_topk_index", "encoder_self_topk_missing"
# row entropies of stats-only shards: float16 (the analyses take their statistics from the shard's stats/, summed
# from the float32 values while dumping; the stored rows only feed record readers such as geocap view, for which
# float16's relative error of at most 2**-11 is far below what they show). Full dumps store float32.
ENTROPY_DTYPE_STATS_ONLY = np.float16

__all__ = ["CACHE_BYTES", "Dump", "DumpError", "ENTROPY_DTYPE_STATS_ONLY", "FORMAT", "FORMAT_VERSION", "LOCK",
           "MANIFEST", "SHARD_FORMAT",
           "box_embedding", "content_sha256", "metadata_digest", "open_dump", "read_manifest", "read_strings",
           "TOP_K_INDEX", "TOP_K_MISSING", "TOP_K_VALUES", "check_top_k", "shard_name", "shard_problem",
           "strings_crc32"]




def content_sha256(dump: "Dump") -> str:
    """SHA-256 of a dump's *records* (ids, kind, tokens, every array with its dtype and shape, and
    ``extra``, in record order): equal for two dumps of the same content however their shards
    were compressed and flushed (which file digests are not: see "Sameness" above)."""
    from dataclasses import fields

    digest = hashlib.sha256()
    for chunk in dump.iter_chunks(256, progress=False):
        for record in chunk:
            for f in fields(record):
                value = getattr(record, f.name)
                digest.update(f.name.encode())
                if isinstance(value, np.ndarray):
                    digest.update(f"{value.dtype.str}{value.shape}".encode())
                    digest.update(np.ascontiguousarray(value).tobytes())
                else:
                    digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def check_top_k(k) -> int:
    """``k`` of ``encoder_top_k`` (weights kept per encoder map row) as an int; UsageError (a
    ValueError) naming the option unless a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"encoder_top_k must be a positive int (weights kept per encoder map row), got {k!r}")
    return int(k)


def strings_crc32(values) -> int:
    """CRC-32 (zlib's) of a string dataset's values: of the UTF-8 JSON list of the strings, so
    that the checksum also covers their boundaries. Stored as the dataset's ``crc32`` attribute."""
    return zlib.crc32(json.dumps([str(v) for v in values], ensure_ascii=False).encode("utf-8"))


def read_strings(h5, name: str, where: str) -> list:
    """The strings of dataset ``name`` of the open shard ``h5``; DumpError naming ``where`` and
    the dataset when its ``crc32`` attribute (when there is one) does not match them."""
    dataset = h5[name]
    values = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in dataset[()]]
    stored = dataset.attrs.get("crc32")
    if stored is not None and int(stored) != strings_crc32(values):
        raise DumpError(f"{where}: dataset {name} is damaged (its CRC-32 does not match its strings)")
    return values


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def box_embedding(metadata: dict) -> Optional[str]:
    """The box embedding of the model whose attention a dump holds, from its ``metadata``: "ort"
    or "signed"; "none" for a model without geometry; None when the metadata carry no model
    config (records that are not a dump's). A dump written before the choice existed reads as "ort"."""
    config = (metadata or {}).get("model_config")
    if not isinstance(config, dict):
        return None
    if config.get("geometry", True) is False:
        return "none"
    return str(config.get("embedding", "ort"))


def metadata_digest(metadata: dict) -> str:
    """SHA-256 of ``metadata``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(path) -> Optional[dict]:
    """The manifest of the dump directory ``path`` (None when there is none yet); DumpError
    naming the file when it is unreadable or of another format or version."""
    file = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        raise DumpError(f"{file}: unreadable dump manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DumpError(f"{file}: not a geocap dump manifest (format {found!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DumpError(f"{file}: dump format version {manifest.get('format_version')!r}; this geocap reads "
                        f"version {FORMAT_VERSION}")
    for key in ("metadata", "metadata_sha256", "n_shards", "n_images", "shard_images", "shards"):
        if key not in manifest:
            raise DumpError(f"{file}: incomplete dump manifest, missing {key!r}")
    if metadata_digest(manifest["metadata"]) != manifest["metadata_sha256"]:
        raise DumpError(f"{file}: the manifest's metadata does not match its metadata_sha256 (edited or corrupt)")
    return manifest


def shard_problem(path: str, entry: dict, *, digest: bool) -> Optional[str]:
    """What is wrong with the shard file ``path`` that the manifest ``entry`` lists, as an error
    message naming the file (None when nothing): missing, not of the recorded size, or (with
    ``digest``, when the entry records one) not of the recorded SHA-256."""
    if not os.path.isfile(path):
        return f"{path}: shard {entry['index']} listed in the manifest is missing"
    size = os.path.getsize(path)
    if "bytes" in entry and size != entry["bytes"]:
        return f"{path}: shard file has {size} bytes, the manifest recorded {entry['bytes']} (truncated or replaced)"
    if digest and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return f"{path}: shard file's SHA-256 differs from the one the manifest recorded (damaged or replaced)"
    return None


def _json_attr(attrs, name):
    value = attrs.get(name)
    return json.loads(value) if isinstance(value, (str, bytes)) else value


class _Shard:
    """One open shard: its small per-record arrays in memory, maps read on demand."""

    def __init__(self, path: str, entry: dict, manifest: dict, *, verify: bool = False):
        self.path = path
        problem = shard_problem(path, entry, digest=verify)
        if problem:
            raise DumpError(problem)
        self.h5 = open_hdf5(path, "HDF5 shard (corrupt or truncated?)", DumpError, locking=False,
                            rdcc_nbytes=CACHE_BYTES, rdcc_nslots=10007)
        try:
            self._load(entry, manifest)
        except DumpError:
            self.h5.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            self.h5.close()
            raise DumpError(f"{path}: corrupt dump shard ({type(err).__name__}: {err})") from None

    def _load(self, entry, manifest):
        a, path = self.h5.attrs, self.path
        if a.get("format") != SHARD_FORMAT:
            raise DumpError(f"{path}: not a geocap dump shard (format {a.get('format')!r})")
        if a.get("format_version") != FORMAT_VERSION:
            raise DumpError(f"{path}: dump shard format version {a.get('format_version')!r}; this geocap reads "
                            f"version {FORMAT_VERSION}")
        ckpt = manifest["metadata"].get("checkpoint_sha256")
        if a.get("checkpoint_sha256") != ckpt:
            raise DumpError(f"{path}: written by another model (checkpoint sha256 "
                            f"{str(a.get('checkpoint_sha256'))[:12]}) than the manifest's ({str(ckpt)[:12]}): "
                            f"a shard of another dump")
        if a.get("metadata_sha256") != manifest["metadata_sha256"]:
            raise DumpError(f"{path}: written with other dump settings (metadata sha256 differs from the manifest's):"
                            f" a shard of another dump")
        if int(a["index"]) != entry["index"] or int(a["n_records"]) != entry["records"]:
            raise DumpError(f"{path}: shard index/records {int(a['index'])}/{int(a['n_records'])} differ from the "
                            f"manifest's {entry['index']}/{entry['records']}")
        self.maps = tuple(_json_attr(a, "maps"))
        self.entropies = tuple(_json_attr(a, "entropies"))
        self.lh = {"encoder_self": tuple(int(x) for x in a["encoder_lh"]),
                   "decoder_self": tuple(int(x) for x in a["decoder_lh"]),
                   "cross": tuple(int(x) for x in a["decoder_lh"])}
        self.flags = {k: bool(a[k]) for k in ("has_labels", "has_clusters", "has_features")}
        self.top_k = int(a["encoder_top_k"]) if "encoder_top_k" in a else None
        self.top_k_missing = float(a.get("encoder_top_k_missing", 0.0))
        h = self.h5
        self.vocab = read_strings(h, "vocab", self.path)
        self.image_id = h["images/image_id"][()]
        self.n_objects = h["images/n_objects"][()].astype(np.int64)
        self.sizes = {}          # "width" / "height" -> [M] int64, -1 unknown (absent in older shards)
        for name in ("width", "height"):
            key = f"images/{name}"
            self.sizes[name] = (h[key][()].astype(np.int64) if key in h
                                else np.full(len(self.n_objects), -1, np.int64))
        self.extra_fields = self._image_extras(h, len(self.n_objects))
        self.rec_image = h["records/image"][()].astype(np.int64)
        self.caption_id = h["records/caption_id"][()]
        self.kind = h["records/kind"][()]
        self.n_tokens = h["records/n_tokens"][()].astype(np.int64)
        self.has_ref = h["records/has_referents"][()]
        self.has_src = h["records/has_source_referents"][()]
        n_images, n_records = len(self.image_id), len(self.rec_image)
        if n_records != entry["records"] or n_images != int(a["n_images"]):
            raise DumpError(f"{path}: holds {n_records} records / {n_images} images, its attributes say "
                            f"{entry['records']} / {int(a['n_images'])}")
        if n_records and (self.rec_image.min() < 0 or self.rec_image.max() >= n_images):
            raise DumpError(f"{path}: records/image points outside the shard's {n_images} images")
        if self.kind.size and self.kind.max() >= len(KINDS):
            raise DumpError(f"{path}: records/kind holds an unknown kind {int(self.kind.max())}")
        self.obj_off = np.concatenate([[0], np.cumsum(self.n_objects)])
        self.tok_off = np.concatenate([[0], np.cumsum(self.n_tokens)])
        rec_n = self.n_objects[self.rec_image]
        t = self.n_tokens
        le, he = self.lh["encoder_self"]
        ld, hd = self.lh["decoder_self"]
        columns = self.n_objects if self.top_k is None else np.minimum(self.n_objects, self.top_k)
        sizes = {  # per image / per record element counts of each map kind and its entropies
            "encoder_self": (le * he * self.n_objects * columns, le * he * self.n_objects),
            "decoder_self": (ld * hd * t * t, ld * hd * t),
            "cross": (ld * hd * t * rec_n, ld * hd * t),
        }
        self.map_off = {k: np.concatenate([[0], np.cumsum(s[0])]) for k, s in sizes.items()}
        self.ent_off = {k: np.concatenate([[0], np.cumsum(s[1])]) for k, s in sizes.items()}
        expected = {"objects/boxes": (int(self.obj_off[-1]), 4), "tokens/ids": (int(self.tok_off[-1]),)}
        for name in ("width", "height"):
            if f"images/{name}" in h:
                expected[f"images/{name}"] = (n_images,)
        for name in self.maps:
            for dataset in self._map_datasets(name):
                rows = dataset == f"maps/{TOP_K_MISSING}"
                expected[dataset] = (int((self.ent_off if rows else self.map_off)[name][-1]),)
        for name in self.entropies:
            expected[f"entropy/{name}"] = (int(self.ent_off[name][-1]),)
        for name, shape in expected.items():
            if name not in h:
                raise DumpError(f"{path}: dataset {name} missing")
            if tuple(h[name].shape) != shape:
                raise DumpError(f"{path}: dataset {name} has shape {tuple(h[name].shape)}, its records need {shape}")
        self.n_records = n_records

    def _map_datasets(self, name: str) -> tuple:
        """The datasets holding map kind ``name``: ``maps/<name>``, or the three top-k ones."""
        if name == "encoder_self" and self.top_k is not None:
            return tuple(f"maps/{d}" for d in (TOP_K_VALUES, TOP_K_INDEX, TOP_K_MISSING))
        return (f"maps/{name}",)

    def _image_extras(self, h, n_images: int) -> list:
        """Per image the optional ``extra`` of its records (special objects, patch grid, file name,
        referent regions; attention_record's conventions), from the datasets that hold them (absent
        in older shards: empty dicts)."""
        extras = [{} for _ in range(n_images)]
        if "images/n_regions" not in h:
            return extras
        special = h["objects/special"][()]
        grid = h["images/patch_grid"][()]
        names = read_strings(h, "images/file_name", self.path)
        n_regions = h["images/n_regions"][()].astype(np.int64)
        region_sizes = h["regions/n_objects"][()].astype(np.int64)
        members = h["regions/objects"][()].astype(np.int64)
        lengths = {"objects/special": int(self.n_objects.sum()), "images/patch_grid": n_images,
                   "images/file_name": n_images, "images/n_regions": n_images,
                   "regions/n_objects": int(n_regions.sum()), "regions/objects": int(region_sizes.sum())}
        for name, length in lengths.items():
            if len(h[name]) != length:
                raise DumpError(f"{self.path}: dataset {name} has {len(h[name])} entries, its images need {length}")
        obj_off = np.concatenate([[0], np.cumsum(self.n_objects)])
        region_off = np.concatenate([[0], np.cumsum(n_regions)])
        member_off = np.concatenate([[0], np.cumsum(region_sizes)])
        for m, extra in enumerate(extras):
            flagged = np.flatnonzero(special[obj_off[m]:obj_off[m + 1]])
            if flagged.size:
                extra["special_objects"] = flagged.tolist()
            if grid[m, 0] > 0:
                extra["patch_grid"] = [int(grid[m, 0]), int(grid[m, 1])]
            if names[m]:
                extra["file_name"] = names[m]
            if n_regions[m]:
                extra["referent_objects"] = [members[member_off[r]:member_off[r + 1]].tolist()
                                             for r in range(region_off[m], region_off[m + 1])]
        return extras

    def close(self):
        try:
            self.h5.close()
        except Exception:  # pragma: no cover - best effort
            pass

    def _read(self, name: str, lo: int, hi: int) -> np.ndarray:
        try:
            return self.h5[name][lo:hi]
        except (OSError, KeyError, ValueError) as err:
            raise DumpError(f"{self.path}: cannot read {name}[{lo}:{hi}] (corrupt shard: {err})") from None

    def records(self, lo: int, hi: int) -> list:
        """Records ``lo:hi`` of this shard, each dataset read in one slice."""
        if hi <= lo:
            return []
        imgs = self.rec_image[lo:hi]
        i0, i1 = int(imgs.min()), int(imgs.max()) + 1
        o0, o1 = int(self.obj_off[i0]), int(self.obj_off[i1])
        t0, t1 = int(self.tok_off[lo]), int(self.tok_off[hi])
        obj = {"boxes": self._read("objects/boxes", o0, o1)}
        for flag, name in (("has_labels", "labels"), ("has_clusters", "clusters"), ("has_features", "features")):
            if self.flags[flag]:
                obj[name] = self._read(f"objects/{name}", o0, o1)
        tok = {name: self._read(f"tokens/{name}", t0, t1) for name in ("ids", "referents", "source_referents")}
        blocks = {}
        for name in MAP_NAMES:
            per_image = name == "encoder_self"
            a, b = (i0, i1) if per_image else (lo, hi)
            if name in self.maps and name == "encoder_self" and self.top_k is not None:
                off = self.map_off[name]
                blocks[name] = (int(off[a]), (self._read(f"maps/{TOP_K_VALUES}", int(off[a]), int(off[b])),
                                              self._read(f"maps/{TOP_K_INDEX}", int(off[a]), int(off[b]))))
            elif name in self.maps:
                off = self.map_off[name]
                blocks[name] = (int(off[a]), self._read(f"maps/{name}", int(off[a]), int(off[b])))
            if name in self.entropies:
                off = self.ent_off[name]
                rows = self._read(f"entropy/{name}", int(off[a]), int(off[b]))   # float16 in stats-only shards
                blocks[ENTROPY_NAMES[name]] = (int(off[a]), rows.astype(np.float32, copy=False))
        def maps_of(names, index: int, n: int, t: int, m: int, fields: dict) -> None:
            """The maps and entropies ``names`` of record (or, for the encoder, image) ``index`` into ``fields``."""
            tails = {"encoder_self": (n, n), "decoder_self": (t, t), "cross": (t, n)}
            for name in names:
                layers, heads = self.lh[name]
                tail = tails[name]
                for key, off, shape in ((name, self.map_off, tail), (ENTROPY_NAMES[name], self.ent_off, tail[:1])):
                    if key in blocks:
                        base, data = blocks[key]
                        s, e = int(off[name][index]) - base, int(off[name][index + 1]) - base
                        if isinstance(data, tuple):         # encoder map rows kept as their top k
                            k = min(n, self.top_k)
                            values, columns = (part[s:e].reshape(layers, heads, n, k) for part in data)
                            fields[key] = self._expand(values, columns, n, m)
                        else:
                            fields[key] = data[s:e].reshape(layers, heads, *shape)

        # the fields of an image (objects, extra, encoder maps) are built once and shared by all its
        # records, as the writer's records share them: analyses compare them by identity, and a
        # top-k encoder map is expanded once per image, not once per record
        images: dict = {}
        out = []
        for j in range(lo, hi):
            m = int(self.rec_image[j])
            n, t = int(self.n_objects[m]), int(self.n_tokens[j])
            image = images.get(m)
            if image is None:
                oa, ob = int(self.obj_off[m]) - o0, int(self.obj_off[m + 1]) - o0
                width, height = int(self.sizes["width"][m]), int(self.sizes["height"][m])
                image = {"boxes": obj["boxes"][oa:ob],
                         "extra": {"width": width, "height": height} if width > 0 and height > 0 else {}}
                image["extra"].update(self.extra_fields[m])
                for name in ("labels", "clusters"):
                    if name in obj:
                        image[name] = obj[name][oa:ob].astype(np.int64)
                if "features" in obj:
                    image["features"] = obj["features"][oa:ob]
                maps_of(("encoder_self",), m, n, t, m, image)
                images[m] = image
            fields = dict(image)
            ta, tb = int(self.tok_off[j]) - t0, int(self.tok_off[j + 1]) - t0
            if self.has_ref[j]:
                fields["referents"] = tok["referents"][ta:tb].astype(np.int64)
            if self.has_src[j]:
                fields["source_referents"] = tok["source_referents"][ta:tb].astype(np.int64)
            maps_of(("decoder_self", "cross"), j, n, t, m, fields)
            ids = tok["ids"][ta:tb]
            out.append(Record(image_id=int(self.image_id[m]), tokens=[self.vocab[int(k)] for k in ids],
                              kind=KINDS[int(self.kind[j])], caption_id=int(self.caption_id[j]), **fields))
        return out

    def _expand(self, values, columns, n: int, image: int) -> np.ndarray:
        try:
            return expand_top_k(values, columns, n)
        except ValueError as err:
            raise DumpError(f"{self.path}: image {int(self.image_id[image])}: corrupt top-k encoder map ({err})") \
                from None

    def stats_state(self) -> dict:
        if "stats" not in self.h5:
            raise DumpError(f"{self.path}: no analysis statistics stored (not a stats-only dump)")
        group = self.h5["stats"]
        try:
            return {str(group[name].attrs["key"]): group[name][()] for name in group}
        except (OSError, KeyError) as err:
            raise DumpError(f"{self.path}: corrupt statistics ({err})") from None


class Dump(Sequence):
    """The records of a complete dump, in shard order, read on demand (see :func:`open_dump`).

    ``len(dump)``; ``dump[i]`` -> :class:`Record`; ``dump[a:b]`` -> list of Records;
    ``iter(dump)`` / :meth:`iter_chunks` stream them; ``metadata`` is the manifest's metadata
    dict; :meth:`stats` merges the stats-only shards' collector states. Shards are opened on
    first use (and reopened after a ``fork``); :meth:`close` closes them. With ``verify`` each
    shard file's SHA-256 is checked against the manifest when it is first opened.
    """

    def __init__(self, path, manifest: dict, *, progress: bool = True, verify: bool = False):
        self.path = os.fspath(path)
        self.manifest = manifest
        self.metadata = manifest["metadata"]
        self.progress = progress
        self.verify = verify
        self._verified: set = set()
        self._entries = sorted(manifest["shards"], key=lambda e: e["index"])
        counts = [int(e["records"]) for e in self._entries]
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        self._shards: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    # -- shards
    def _shard(self, k: int) -> _Shard:
        """Shard k, opened on first use; at most OPEN_SHARDS stay open (least recently used closed)."""
        if self._pid != os.getpid():      # inherited through fork: reopen in this process
            self._shards, self._pid = OrderedDict(), os.getpid()
        shard = self._shards.get(k)
        if shard is None:
            entry = self._entries[k]
            verify = self.verify and k not in self._verified
            shard = _Shard(os.path.join(self.path, entry["file"]), entry, self.manifest, verify=verify)
            if verify:
                self._verified.add(k)
            self._shards[k] = shard
            while len(self._shards) > OPEN_SHARDS:
                self._shards.popitem(last=False)[1].close()
        else:
            self._shards.move_to_end(k)
        return shard

    def check(self) -> "Dump":
        """Open every shard once (validating its attributes and dataset shapes); returns self."""
        for k in range(len(self._entries)):
            self._shard(k)
        return self

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = OrderedDict()

    def __enter__(self) -> "Dump":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest, "progress": self.progress, "verify": self.verify}

    def __setstate__(self, state):
        self.__init__(state["path"], state["manifest"], progress=state["progress"],
                      verify=state.get("verify", False))

    def __repr__(self) -> str:
        return f"Dump({self.path!r}, {len(self)} records, {len(self._entries)} shards)"

    # -- sequence
    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple:
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return self._range(start, stop)
        n = len(self)
        try:
            i = int(i) if not isinstance(i, (bool, np.bool_)) else None
        except TypeError:
            i = None
        if i is None:
            raise TypeError("dump indices must be integers or slices")
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records in {self.path}")
        k, j = self._locate(i % n)
        return self._shard(k).records(j, j + 1)[0]

    def _range(self, start: int, stop: int) -> list:
        out = []
        while start < stop:
            k, j = self._locate(start)
            take = min(stop - start, self._starts[k + 1] - start)
            out += self._shard(k).records(j, j + take)
            start += take
        return out

    def iter_chunks(self, size: int = 256, *, progress: Optional[bool] = None) -> Iterator[list]:
        """Lists of up to ``size`` consecutive records (never across shards), each read with one
        slice per dataset; a progress bar (records) when ``progress`` (default: the dump's)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        show = self.progress if progress is None else progress
        bar = None
        if show:
            from geocap.progress import progress_bar
            bar = progress_bar(total=len(self), unit="rec", desc=f"reading {os.path.basename(self.path)}")
        try:
            for k in range(len(self._entries)):
                shard = self._shard(k)
                for lo in range(0, shard.n_records, size):
                    chunk = shard.records(lo, min(lo + size, shard.n_records))
                    if bar is not None:
                        bar.update(len(chunk))
                    yield chunk
        finally:
            if bar is not None:
                bar.close()

    def __iter__(self) -> Iterator[Record]:
        """Every record in order (read in chunks of 256; a progress bar when the dump has one)."""
        for chunk in self.iter_chunks():
            yield from chunk

    def encoder_top_k(self) -> Optional[int]:
        """k when the encoder maps were stored as each row's top k weights (``geocap dump
        --encoder-top-k``), else None (whole maps, or none stored)."""
        return self._shard(0).top_k if self._entries else None

    def encoder_missing(self) -> float:
        """The most weight any stored encoder map row lost to ``encoder_top_k`` (0.0 for whole maps):
        a top-k record's encoder rows sum to at least 1 minus this."""
        return max((self._shard(k).top_k_missing for k in range(len(self._entries))), default=0.0)

    # -- statistics
    def shard_states(self) -> list:
        """Each shard's stored collector state (``dict[str, ndarray]``), in shard order;
        DumpError when the dump is not stats-only."""
        if not self.metadata.get("stats_only"):
            raise DumpError(f"{self.path}: not a stats-only dump (written without --stats-only): no statistics stored")
        return [self._shard(k).stats_state() for k in range(len(self._entries))]

    def stats(self, collector_class):
        """The merged analysis statistics of a stats-only dump: a ``collector_class`` (e.g.
        ``geocap.analysis.StatsCollector``: passed in, since the data layer never imports the
        analyses) built ``from_state`` of each shard and merged in shard order."""
        if not self.metadata.get("stats_only"):
            raise DumpError(f"{self.path}: not a stats-only dump (written without --stats-only): no statistics stored")
        total = None
        for k in range(len(self._entries)):      # one shard's state in memory at a time
            part = collector_class.from_state(self._shard(k).stats_state())
            if total is None:
                total = part
            else:
                merged = total.merge(part)          # in place (returns None) or a new collector
                total = total if merged is None else merged
        return collector_class() if total is None else total


def open_dump(path, *, progress: bool = True, check: bool = True, verify: bool = False) -> Dump:
    """The records of the complete dump at ``path`` (a directory written by ``geocap dump``).

    Reads the manifest, refuses an unfinished dump (naming how many shards are missing) and,
    with ``check``, opens every shard once to validate it (missing, truncated, corrupt, or of
    another model or dump: :class:`DumpError` naming the file). With ``verify`` every shard
    file is hashed (SHA-256, whole file) when first opened and compared with the manifest's.
    No map is read until a record is asked for; every chunk read is checked by HDF5
    (Fletcher-32). A dump written before checksums reads with a warning. ``progress``: a
    progress bar when iterating in chunks.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DumpError(f"{path}: no such dump directory")
    manifest = read_manifest(path)
    if manifest is None:
        raise DumpError(f"{os.path.join(path, MANIFEST)}: dump manifest missing (not a dump, or one that never "
                        f"started)")
    done = {e["index"] for e in manifest["shards"]}
    missing = [k for k in range(manifest["n_shards"]) if k not in done]
    if missing:
        raise DumpError(f"{path}: unfinished dump: {len(missing)} of {manifest['n_shards']} shards missing "
                        f"(first: {shard_name(missing[0])}); run the same dump command again to finish it")
    unchecked = [e["file"] for e in manifest["shards"] if "sha256" not in e]
    if unchecked:
        warnings.warn(f"{path}: {len(unchecked)} of its shards (first: {unchecked[0]}) were written without "
                      f"checksums (by an older geocap): damage inside them may go undetected", stacklevel=2)
    dump = Dump(path, manifest, progress=progress, verify=verify)
    return dump.check() if check else dump
