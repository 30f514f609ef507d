"""The shard writer: appends an image's records to one dump shard (layout in
:mod:`geocap.data.dump_format`), under a temporary name renamed when the shard is complete.

Maps, entropies and features are buffered and appended to resizable HDF5 datasets about every
``flush_bytes``, chunked to about one record's size (measured on the first flush: the mean size
of the buffered items, within 4K..256K elements) and compressed with ``compression``:

- ``"lzf"`` (the default): h5py's filter, run in the calling thread;
- ``"gzip"``: the shuffle filter then zlib level 1. The writer shuffles and deflates each chunk
  itself in a thread pool of ``threads`` workers (default min(8, cores); zlib releases the GIL)
  and stores it with ``write_direct_chunk``, so the file is an ordinary gzip+shuffle HDF5
  dataset that any HDF5 reader decodes;
- ``"none"``.

lzf is the default: much cheaper to read back (analyses read a dump many times) and to write on
few cores; gzip when disk space matters (18-24 % smaller than lzf). Measured sizes, writer shares and
read rates: see bench/RESULTS.md, "Attention dumps".

A dump runs this writer in a child process by default (:mod:`geocap.dump.writer_process`).

The small per-record arrays (ids, counts, image sizes, tokens, referents, boxes, labels) are kept in memory
and written uncompressed when the shard is closed.

Checksums: every dataset but the string ones (variable-length strings take no HDF5 filter: they
carry a ``crc32`` attribute instead, :func:`~geocap.data.dump_format.strings_crc32`) and
0-d statistics carries HDF5's Fletcher-32 filter (after compression: it checks the stored bytes),
so every read of a damaged chunk fails in HDF5 itself, whatever reads the shard. The gzip path
appends the checksum to the chunks it compresses (:func:`fletcher32`, HDF5's algorithm). At
close the writer also takes the SHA-256 of the whole file (``sha256``), which the dump's
manifest records; it also covers the attributes, the vocabulary and HDF5's own metadata.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import h5py
import numpy as np

from geocap import stop
from geocap.data.attention_record import ENTROPY_NAMES, KINDS, Record
from geocap.data.dump_format import (ENTROPY_DTYPE_STATS_ONLY, FORMAT_VERSION, SHARD_FORMAT, TOP_K_INDEX,
                                     TOP_K_MISSING, TOP_K_VALUES, check_top_k, strings_crc32)
from geocap.data.file_digest import file_sha256
from geocap.data.top_k_rows import keep_top_k
from geocap.errors import DataError, UsageError

COMPRESSIONS = ("lzf", "gzip", "none")
GZIP_LEVEL = 1                 # measured: 2% larger than level 4 on shuffled float16 maps, ~35% less CPU
FLUSH_BYTES = 32 << 20
PENDING_BYTES = 128 << 20        # uncompressed bytes queued for the compression threads at most
MIN_CHUNK, MAX_CHUNK = 1 << 12, 1 << 18      # elements per map / entropy chunk

__all__ = ["COMPRESSIONS", "ShardWriter", "fletcher32"]


def _regions(rec: Record) -> list:
    """``rec.extra["referent_objects"]`` as a list of lists of ints ([] when absent)."""
    return [[int(i) for i in region] for region in (rec.extra or {}).get("referent_objects", [])]

_FLETCHER_BLOCK = 360            # 16-bit words HDF5 sums between two reductions
_FLETCHER_WEIGHTS = np.arange(_FLETCHER_BLOCK, 0, -1, dtype=np.uint64)


def _create_strings(h5, name: str, values: list) -> None:
    """A variable-length UTF-8 dataset ``name`` of ``values`` with its ``crc32`` attribute (such
    datasets take no HDF5 filter, so no Fletcher-32; the reader checks the CRC instead)."""
    ds = h5.create_dataset(name, data=np.array(values, dtype=object).reshape(len(values)),
                           dtype=h5py.string_dtype("utf-8"))
    ds.attrs["crc32"] = np.uint32(strings_crc32(values))


def fletcher32(data: bytes) -> int:
    """HDF5's Fletcher-32 checksum of ``data`` (``H5_checksum_fletcher32``, bit for bit: big-endian
    16-bit words, the sums reduced every 360 words and wrapping at 32 bits, an odd last byte as
    the high byte of a word). Each block's two sums come from numpy; only the reductions loop."""
    words = np.frombuffer(data, np.uint8, count=len(data) // 2 * 2).view(">u2").astype(np.uint64)
    full = len(words) // _FLETCHER_BLOCK * _FLETCHER_BLOCK
    blocks = words[:full].reshape(-1, _FLETCHER_BLOCK)
    sums = [(_FLETCHER_BLOCK, int(a), int(b)) for a, b in zip(blocks.sum(1), blocks @ _FLETCHER_WEIGHTS)]
    if len(words) > full:
        tail = words[full:]
        sums.append((len(tail), int(tail.sum()), int(tail @ _FLETCHER_WEIGHTS[-len(tail):])))
    if len(data) % 2:
        sums.append((1, data[-1] << 8, data[-1] << 8))
    sum1 = sum2 = 0
    for n, words_sum, weighted_sum in sums:      # sum2 gains sum1 after each word: n * sum1 + weighted
        sum2 = (sum2 + n * sum1 + weighted_sum) & 0xFFFFFFFF
        sum1 = (sum1 + words_sum) & 0xFFFFFFFF
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def _shuffle_deflate(chunk: np.ndarray) -> bytes:
    """One chunk as HDF5's shuffle + deflate + Fletcher-32 filters store it: the elements' bytes
    regrouped by byte position, then zlib (which releases the GIL, so chunks compress in parallel
    threads), then the checksum of the compressed bytes (4 bytes, little-endian)."""
    raw = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1, chunk.dtype.itemsize)
    packed = zlib.compress(np.ascontiguousarray(raw.T).tobytes(), GZIP_LEVEL)
    return packed + fletcher32(packed).to_bytes(4, "little")


def _filters(compression: str) -> dict:
    if compression == "lzf":
        return {"compression": "lzf", "fletcher32": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True, "fletcher32": True}
    if compression == "none":
        return {"fletcher32": True}
    raise UsageError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


class ShardWriter:
    """Write shard ``index`` to ``path`` (through ``<path>.tmp-<pid>``).

    ``maps``: the map kinds whose maps are stored (none for stats-only dumps); ``entropies``:
    those whose entropies are stored; ``encoder_lh``/``decoder_lh``: [L, H] of the model;
    ``vocab``: the words tokens index; ``has_labels``/``has_clusters``/``has_features``: whether
    every record carries them (ValueError naming the image when one does not);
    ``encoder_top_k``: store each encoder map row as its k largest weights
    (:mod:`geocap.data.top_k_rows`; the layout in :mod:`geocap.data.dump_format`), None: whole.
    ``encoder_missing`` is then the most weight a stored row lost so far.
    Use :meth:`add_image` per image, then :meth:`close` (renames) or :meth:`abort` (removes).
    ``seconds`` accumulates the time spent in the writer; ``sha256`` is the closed file's digest.
    """

    def __init__(self, path, *, index: int, metadata_sha256: str, checkpoint_sha256: str, vocab: Sequence[str],
                 maps: Sequence[str], entropies: Sequence[str], encoder_lh, decoder_lh, has_labels: bool,
                 has_clusters: bool, has_features: bool, stats_only: bool, compression: str = "lzf",
                 flush_bytes: int = FLUSH_BYTES, threads: Optional[int] = None,
                 encoder_top_k: Optional[int] = None):
        t0 = time.perf_counter()
        if encoder_top_k is not None:
            check_top_k(encoder_top_k)
        self.encoder_top_k = encoder_top_k if "encoder_self" in maps else None
        self.encoder_missing = 0.0
        self.filters = _filters(compression)
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self.maps, self.entropies = tuple(maps), tuple(entropies)
        self.entropy_dtype = ENTROPY_DTYPE_STATS_ONLY if stats_only else np.float32
        self.flags = {"has_labels": bool(has_labels), "has_clusters": bool(has_clusters),
                      "has_features": bool(has_features)}
        self.word_id = {w: i for i, w in enumerate(vocab)}
        self.flush_bytes = flush_bytes
        self.h5 = h5py.File(self.tmp, "w", locking=False)
        _create_strings(self.h5, "vocab", list(vocab))
        self.h5.attrs.update({
            "format": SHARD_FORMAT, "format_version": FORMAT_VERSION, "index": int(index),
            "metadata_sha256": metadata_sha256, "checkpoint_sha256": checkpoint_sha256,
            "maps": json.dumps(self.maps), "entropies": json.dumps(self.entropies),
            "encoder_lh": np.asarray(encoder_lh, dtype=np.int64), "decoder_lh": np.asarray(decoder_lh, dtype=np.int64),
            "stats_only": bool(stats_only), "compression": compression, **self.flags})
        if self.encoder_top_k is not None:
            self.h5.attrs["encoder_top_k"] = int(self.encoder_top_k)
        self.n_images = self.n_records = 0
        self.sha256: Optional[str] = None
        self._buf: dict = {}
        self._buf_bytes = 0
        # gzip: chunks are shuffled and deflated by a thread pool and stored with write_direct_chunk
        threads = min(8, os.cpu_count() or 1) if threads is None else threads
        self._pool = ThreadPoolExecutor(threads) if compression == "gzip" and threads > 0 else None
        self._max_pending_bytes = PENDING_BYTES
        self._pending_bytes = 0
        self._pending: deque = deque()
        self._datasets: dict = {}
        self._tail: dict = {}
        self._length: dict = {}
        self._next_chunk: dict = {}
        self.seconds = time.perf_counter() - t0

    # -- buffering
    def _put(self, name: str, array: np.ndarray) -> None:
        self._buf.setdefault(name, []).append(array)
        if self._streamed(name):
            self._buf_bytes += array.nbytes

    def add_image(self, records: Sequence[Record]) -> None:
        """Append one image's records (at least one; all of the same image, sharing its boxes and
        encoder map, which are taken from the first, as are its size: ``extra["width"]`` /
        ``extra["height"]`` in pixels, stored as -1 when absent; ValueError naming the image when
        not a positive int)."""
        t0 = time.perf_counter()
        if not records:
            raise ValueError("add_image needs at least one record")
        first = records[0]
        where = f"image {first.image_id}"
        n = first.num_objects
        image = self.n_images
        width, height = self._size(first, "width"), self._size(first, "height")
        self._put("images/image_id", np.array([first.image_id], np.int64))
        self._put("images/n_objects", np.array([n], np.int32))
        self._put("images/width", np.array([width], np.int32))
        self._put("images/height", np.array([height], np.int32))
        self._put("objects/boxes", np.asarray(first.boxes, np.float32).reshape(n, 4))
        self._put_image_extra(first, n)
        for flag, name, dtype in (("has_labels", "labels", np.int32), ("has_clusters", "clusters", np.int32),
                                  ("has_features", "features", np.float16)):
            if self.flags[flag]:
                value = getattr(first, name)
                if value is None:
                    raise DataError(f"{where}: {name} missing but the shard stores them")
                self._put(f"objects/{name}", np.asarray(value, dtype))
        if "encoder_self" in self.maps:
            self._put_encoder_map(first)
        if "encoder_self" in self.entropies:
            self._put("entropy/encoder_self", self._field(first, "encoder_entropy", self.entropy_dtype))
        for rec in records:
            rec.validate()
            if rec.image_id != first.image_id or rec.num_objects != n:
                raise DataError(f"{where}: add_image got a record of image {rec.image_id} ({rec.num_objects} objects)")
            if _regions(rec) != _regions(first):
                raise DataError(f"{where}: its records carry different extra['referent_objects'] (the regions are "
                                 f"the image's, shared by all its records)")
            t = rec.num_tokens
            try:
                ids = np.array([self.word_id[w] for w in rec.tokens], np.int32)
            except KeyError as err:
                raise DataError(f"{where} caption {rec.caption_id}: token {err.args[0]!r} is not in the vocabulary")\
                    from None
            self._put("records/image", np.array([image], np.int32))
            self._put("records/caption_id", np.array([rec.caption_id], np.int64))
            self._put("records/kind", np.array([KINDS.index(rec.kind)], np.uint8))
            self._put("records/n_tokens", np.array([t], np.int32))
            self._put("tokens/ids", ids)
            for name in ("referents", "source_referents"):
                value = getattr(rec, name)
                self._put(f"records/has_{name}", np.array([value is not None]))
                self._put(f"tokens/{name}", np.full(t, -1, np.int32) if value is None else np.asarray(value, np.int32))
            for name in ("decoder_self", "cross"):
                if name in self.maps:
                    self._put(f"maps/{name}", self._field(rec, name, np.float16))
                if name in self.entropies:
                    self._put(f"entropy/{name}", self._field(rec, ENTROPY_NAMES[name], self.entropy_dtype))
            self.n_records += 1
        self.n_images += 1
        if self._buf_bytes >= self.flush_bytes:
            self._flush()
        self.seconds += time.perf_counter() - t0

    def _put_encoder_map(self, first: Record) -> None:
        """The image's encoder map: whole, or its rows' top k (values, column indices, lost weight)."""
        value = self._field(first, "encoder_self", np.float16)
        if self.encoder_top_k is None:
            self._put("maps/encoder_self", value)
            return
        n = first.num_objects
        kept = keep_top_k(value.reshape(-1, n), self.encoder_top_k)
        self._put(f"maps/{TOP_K_VALUES}", kept.values.reshape(-1))
        self._put(f"maps/{TOP_K_INDEX}", kept.index.reshape(-1))
        self._put(f"maps/{TOP_K_MISSING}", kept.missing)
        if kept.missing.size:
            self.encoder_missing = max(self.encoder_missing, float(kept.missing.max()))

    def _put_image_extra(self, first: Record, n: int) -> None:
        """The image's optional ``extra`` (attention_record's conventions): its special objects
        (``objects/special``), patch grid (``images/patch_grid``, [0, 0] for none), file name
        (``images/file_name``, "" for none) and referent regions (``images/n_regions``,
        ``regions/n_objects``, ``regions/objects``)."""
        extra = first.extra or {}
        special = np.zeros(n, np.bool_)
        special[np.asarray(extra.get("special_objects", []), np.int64)] = True
        self._put("objects/special", special)
        grid = extra.get("patch_grid")
        self._put("images/patch_grid", np.array([[0, 0] if grid is None else [int(g) for g in grid]], np.int32))
        name = extra.get("file_name")
        if name is not None and not (isinstance(name, str) and name):
            raise DataError(f"image {first.image_id}: extra['file_name'] must be a non-empty str, got {name!r}")
        self._put("images/file_name", np.array([name or ""], dtype=object))
        regions = _regions(first)
        self._put("images/n_regions", np.array([len(regions)], np.int32))
        self._put("regions/n_objects", np.array([len(r) for r in regions], np.int32))
        self._put("regions/objects", np.array([i for r in regions for i in r], np.int32))

    @staticmethod
    def _size(rec: Record, name: str) -> int:
        """``rec.extra[name]`` ("width" / "height", pixels) as a positive int; -1 when absent or None."""
        value = (rec.extra or {}).get(name)
        if value is None:
            return -1
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 < value < 2**31:
            raise DataError(f"image {rec.image_id}: extra[{name!r}] must be a positive int (pixels) or None, "
                             f"got {value!r}")
        return int(value)

    @staticmethod
    def _field(rec: Record, name: str, dtype) -> np.ndarray:
        value = getattr(rec, name)
        if value is None:
            raise DataError(f"image {rec.image_id} caption {rec.caption_id}: {name} missing but the shard stores it")
        return np.ascontiguousarray(value, dtype=dtype).reshape(-1)

    @staticmethod
    def _streamed(name: str) -> bool:
        """Big datasets (maps, entropies, features) are appended as they come, chunked and
        compressed; the small per-record ones are kept in memory and written contiguously at close."""
        return name.startswith(("maps/", "entropy/")) or name == "objects/features"

    def _flush(self, final: bool = False) -> None:
        h5 = self.h5
        for name in list(self._buf):
            if not (final or self._streamed(name)):
                continue
            parts = self._buf.pop(name)
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if not self._streamed(name):
                if data.dtype == object:         # strings: variable-length UTF-8 takes no HDF5 filter
                    _create_strings(h5, name, data.tolist())
                else:
                    h5.create_dataset(name, data=data, fletcher32=True)
                continue
            if name not in h5:
                per_item = max(1, data[:1].nbytes if data.ndim > 1 else data.shape[0] // max(1, len(parts)))
                if data.ndim > 1:       # features: whole rows, ~256 KiB per chunk
                    chunks = (max(1, (1 << 18) // max(1, data[:1].nbytes)),) + data.shape[1:]
                else:
                    chunks = (int(min(MAX_CHUNK, max(MIN_CHUNK, per_item))),)
                h5.create_dataset(name, shape=(0,) + data.shape[1:], maxshape=(None,) + data.shape[1:],
                                  dtype=data.dtype, chunks=chunks, **self.filters)
            if self._pool is not None:
                self._submit(name, data)
            else:
                ds = h5[name]
                start = ds.shape[0]
                ds.resize(start + data.shape[0], axis=0)
                ds[start:] = data
        if final and self._pool is not None:
            for name, tail in list(self._tail.items()):
                if len(tail):            # the last, partial chunk: padded with zeros, cut by the final shape
                    c = self.h5[name].chunks[0]
                    padded = np.zeros((c,) + tail.shape[1:], tail.dtype)
                    padded[:len(tail)] = tail
                    self._submit_chunk(name, padded)
                    self._tail[name] = tail[:0]
            self._drain(block=True)
            for name, length in self._length.items():
                self.h5[name].resize(length, axis=0)
        self._buf_bytes = 0

    def _submit(self, name: str, data: np.ndarray) -> None:
        """Append ``data`` to the compressed stream of dataset ``name``: full chunks go to the pool."""
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self.h5[name]
        c = ds.chunks[0]
        self._length[name] = self._length.get(name, 0) + len(data)
        tail = self._tail.get(name)
        if tail is not None and len(tail):
            data = np.concatenate([tail, data])
        full = (len(data) // c) * c
        for off in range(0, full, c):
            self._submit_chunk(name, data[off:off + c])
        self._tail[name] = data[full:].copy()
        self._drain(block=False)

    def _submit_chunk(self, name: str, chunk: np.ndarray) -> None:
        k = self._next_chunk.get(name, 0)
        self._next_chunk[name] = k + 1
        self._pending.append((name, k, chunk.nbytes, self._pool.submit(_shuffle_deflate, chunk)))
        self._pending_bytes += chunk.nbytes

    def _drain(self, block: bool) -> None:
        """Store the compressed chunks that are ready, in order (all of them when ``block``; the
        oldest while more than ``PENDING_BYTES`` wait, which bounds the memory held)."""
        while self._pending and (block or self._pending[0][3].done()
                                 or self._pending_bytes > self._max_pending_bytes):
            name, k, nbytes, future = self._pending.popleft()
            self._pending_bytes -= nbytes
            ds = self._datasets.get(name)
            if ds is None:
                ds = self._datasets[name] = self.h5[name]
            c = ds.chunks[0]
            if ds.shape[0] < (k + 1) * c:
                ds.resize((k + 1) * c, axis=0)
            ds.id.write_direct_chunk((k * c,) + (0,) * (ds.ndim - 1), future.result(), filter_mask=0)

    def _ensure_all(self) -> None:
        """Create the datasets an empty or partial shard never flushed (so every shard has them)."""
        shapes = {"images/image_id": ((0,), np.int64), "images/n_objects": ((0,), np.int32),
                  "images/width": ((0,), np.int32), "images/height": ((0,), np.int32),
                  "objects/boxes": ((0, 4), np.float32), "records/image": ((0,), np.int32),
                  "records/caption_id": ((0,), np.int64), "records/kind": ((0,), np.uint8),
                  "records/n_tokens": ((0,), np.int32), "records/has_referents": ((0,), np.bool_),
                  "records/has_source_referents": ((0,), np.bool_), "tokens/ids": ((0,), np.int32),
                  "tokens/referents": ((0,), np.int32), "tokens/source_referents": ((0,), np.int32),
                  "objects/special": ((0,), np.bool_), "images/patch_grid": ((0, 2), np.int32),
                  "images/n_regions": ((0,), np.int32), "regions/n_objects": ((0,), np.int32),
                  "regions/objects": ((0,), np.int32)}
        for name in self.maps:
            if name == "encoder_self" and self.encoder_top_k is not None:
                shapes.update({f"maps/{TOP_K_VALUES}": ((0,), np.float16), f"maps/{TOP_K_INDEX}": ((0,), np.uint16),
                               f"maps/{TOP_K_MISSING}": ((0,), np.float32)})
            else:
                shapes[f"maps/{name}"] = ((0,), np.float16)
        for name in self.entropies:
            shapes[f"entropy/{name}"] = ((0,), self.entropy_dtype)
        for name, (shape, dtype) in shapes.items():
            if name not in self.h5:
                self.h5.create_dataset(name, shape=shape, dtype=dtype, fletcher32=True)
        if "images/file_name" not in self.h5:
            _create_strings(self.h5, "images/file_name", [])

    # -- finishing
    def close(self, stats_state: Optional[dict] = None) -> int:
        """Flush, store ``stats_state`` (``dict[str, array]``) under ``stats/``, close, take the
        file's SHA-256 (``sha256``) and rename to the final name; returns the file's size in bytes."""
        t0 = time.perf_counter()
        try:
            self._flush(final=True)
            self._ensure_all()
            if stats_state is not None:
                group = self.h5.create_group("stats")   # keys may hold "/": datasets by number
                for i, (key, value) in enumerate(sorted(stats_state.items())):
                    value = np.asarray(value)     # 0-d arrays take no filter: the file digest covers them
                    ds = group.create_dataset(f"{i:05d}", data=value, fletcher32=value.ndim > 0)
                    ds.attrs["key"] = str(key)
            if self.encoder_top_k is not None:
                self.h5.attrs["encoder_top_k_missing"] = self.encoder_missing
            self.h5.attrs["n_images"] = self.n_images
            self.h5.attrs["n_records"] = self.n_records
            self.h5.close()
            self._stop_pool()
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            self.sha256 = file_sha256(self.tmp)
            stop.check()            # a stop request lost as an exception replaces nothing
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.seconds += time.perf_counter() - t0
        return os.path.getsize(self.path)

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()
            self._pending_bytes = 0

    def abort(self) -> None:
        """Close and remove the temporary file (nothing is renamed)."""
        self._stop_pool()
        with contextlib.suppress(Exception):
            self.h5.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)
