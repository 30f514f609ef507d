"""Write the static attention viewer for any iterable of attention records.

Layout of the site (open ``index.html`` from disk or from any static server; nothing is fetched
from the network):

- ``index.html``, ``image.html`` and ``static/`` (the scripts and styles, copied from
  ``geocap/view/static``);
- ``data/manifest.js``: totals, the index pages' id ranges, the word-bucket count, label and
  report information, the colour of each attention kind
  (``geocap.analysis.plotting.ATTENTION_COLOURS``, as the report draws them);
- ``data/index/pNNNNN.js``: one index page (``page_size`` images, sorted by id): per image its
  id, object count (and, for a patch encoder, ``patches``: [patches, special tokens]), captions
  (sub-word pieces joined into words) and whether an image file is known;
- ``data/words/bNNNN.js``: one bucket of the word index, ``{word: delta-encoded sorted image ids}``;
- ``data/img/<id % 1000 as 3 digits>/<id>.js``: everything the image page shows for one image
  (all its records as ``geocap.view.encode.encode_record`` encodes them, with a patch encoder's
  ``patch_grid`` and ``special_objects`` from each record's extra; an encoder map shared by
  several records is stored once); the page draws a record with a ``patch_grid`` as grid lines
  and a heat map over the patch cells, its special tokens' weights as numbers beside the image;
- ``images/<id>.<ext>``: the image files found in ``images_dir`` (hard links when possible,
  else copies).

Every data file is a small script calling ``geocapData(key, value)``, loaded on demand by adding
a ``<script>`` tag: ``fetch()`` of local JSON is refused on ``file://`` pages in Chromium, script
tags work from disk and from a server alike, so the site has a single loading path. The value is
JSON (written by ``json.dumps``) and is read back only as JSON (never executed) when the builder
merges records of an image that arrive apart.

The site is built in a temporary folder beside ``out_dir`` and renamed into place when complete;
an existing ``out_dir`` is replaced only when it is empty or an earlier viewer site.
"""
from __future__ import annotations

import array
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geocap import stop
from geocap.data.atomic import remove_stale_temporary_folders, replace_folder, temporary_folder, write_text_atomic
from geocap.data.dump_format import box_embedding, check_top_k
from geocap.data.image_files import IMAGE_EXTENSIONS, image_id_from_name
from geocap.out_dir import check_out_dir
from geocap.progress import progress_bar
from geocap.analysis.plotting import ATTENTION_COLOURS
from geocap.view.encode import caption_text, encode_record, kind_order, label_names_from, word_bucket, words_of
from geocap.errors import DataError, UsageError

STATIC_DIR = Path(__file__).with_name("static")
HTML_PAGES = ("index.html", "image.html")
MARKER = "geocap-view.json"
FORMAT_VERSION = 3        # 2: entropies normalised (1 = uniform), colours in the manifest; 3: patch grids
DEFAULT_PAGE_SIZE = 100
_CALL = "geocapData("


@dataclass
class SiteSummary:
    """What :func:`build_site` wrote."""

    out_dir: Path
    images: int
    records: int
    images_with_file: int
    bytes: int
    files: int
    seconds: float
    missing: dict        # map name -> number of records without it


def image_data_key(image_id: int) -> str:
    """Path of an image's data file under ``data/`` (as ``Geocap.imageKey`` in static/common.js)."""
    return f"img/{image_id % 1000:03d}/{image_id}.js"


def find_images(images_dir) -> dict:
    """``{image id: path}`` for the files of ``images_dir`` whose names end in ``<digits>.<ext>``
    (COCO's ``COCO_val2014_000000391895.jpg`` and ``000000391895.jpg`` alike)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UsageError(f"--images: {images_dir} is not a folder")
    found = {}
    for entry in sorted(os.scandir(images_dir), key=lambda e: e.name):
        image_id = image_id_from_name(entry.name) if entry.name.lower().endswith(IMAGE_EXTENSIONS) else None
        if image_id is not None and entry.is_file():
            found.setdefault(image_id, Path(entry.path))
    return found


def _write_js(path: Path, key: str, value) -> int:
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return _write_text(path, f"{_CALL}{json.dumps(key)},{text});\n")


def _write_text(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text)


def _read_js(path: Path):
    """The JSON value of a data file this module wrote (parsed as JSON, never run)."""
    text = path.read_text(encoding="utf-8")
    start = text.index(",", len(_CALL)) + 1
    return json.loads(text[start:text.rindex(");")])


def _pack_image(image_id: int, records: list, size, image_href) -> dict:
    """The image file's value: records sorted (kind, caption id, arrival), encoders de-duplicated."""
    records = sorted(records, key=lambda r: (kind_order(r["kind"]), r["caption_id"]))
    encoders, packed = [], []
    for rec in records:
        rec = dict(rec, maps=dict(rec["maps"]))
        enc = rec["maps"]["encoder_self"]
        if isinstance(enc, dict):
            for k, seen in enumerate(encoders):
                if seen == enc:
                    rec["maps"]["encoder_self"] = k
                    break
            else:
                encoders.append(enc)
                rec["maps"]["encoder_self"] = len(encoders) - 1
        packed.append(rec)
    width, height = size if size else (None, None)
    return {"id": image_id, "width": width, "height": height, "image": image_href,
            "encoders": encoders, "records": packed}


def _unpack_records(value: dict) -> list:
    out = []
    for rec in value["records"]:
        rec = dict(rec, maps=dict(rec["maps"]))
        if isinstance(rec["maps"]["encoder_self"], int):
            rec["maps"]["encoder_self"] = value["encoders"][rec["maps"]["encoder_self"]]
        out.append(rec)
    return out


def _size_from(extra: dict):
    try:
        width, height = float(extra.get("width")), float(extra.get("height"))
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 and math.isfinite(width * height) else None


WORD_PAIRS_IN_MEMORY = 1 << 19   # (word, image) pairs grouped at once (~35 MB) when the word index is written


class _Builder:
    """Writes each image's data file as its records come, and keeps what the index pages and the
    word index need at the end on disk, not in memory: the per-image index entries in a spool
    file (``_entries``: image id -> (offset, length), ~120 bytes per image) and the (word, image)
    pairs in another, grouped a few buckets at a time at the end (at most
    :data:`WORD_PAIRS_IN_MEMORY` pairs, or one bucket's when it holds more: a word found in every
    image's captions has a pair per image, and its bucket file lists them all)."""

    def __init__(self, root: Path, images_dir, label_names: dict):
        self.root, self.label_names = root, label_names
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.images = find_images(images_dir) if images_dir is not None else {}
        spool = root.parent               # beside the site: the same disk as the output
        self._entry_file = tempfile.TemporaryFile(dir=spool)
        self._entries = {}               # image id -> (offset, length) of its index entry in _entry_file
        self._pair_file = tempfile.TemporaryFile("w+", encoding="utf-8", dir=spool)
        self._word_pairs = {}            # word -> number of (word, image) pairs spooled
        self.records = 0
        self.missing = {"encoder_self": 0, "decoder_self": 0, "cross": 0}
        self.with_file = 0

    def _image_href(self, image_id: int, extras: list):
        path = self.images.get(image_id)
        if path is None and self.images_dir is not None:
            for extra in extras:
                name = extra.get("file_name")
                if isinstance(name, str) and name and (self.images_dir / name).is_file():
                    path = self.images_dir / name
                    break
        if path is None:
            return None
        target = self.root / "images" / f"{image_id}{path.suffix.lower()}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
            self.with_file += 1
        return f"images/{target.name}"

    def flush(self, image_id: int, encoded: list, extras: list) -> None:
        key = image_data_key(image_id)
        path = self.root / "data" / key
        size = next((s for s in map(_size_from, extras) if s), None)
        if image_id in self._entries:            # records of this image arrived apart: merge
            old = _read_js(path)
            encoded = _unpack_records(old) + encoded
            if size is None and old["width"]:
                size = (old["width"], old["height"])
        href = self._image_href(image_id, extras)
        value = _pack_image(image_id, encoded, size, href)
        _write_js(path, key, value)
        captions = [[rec["kind"], caption_text(rec["tokens"])] for rec in value["records"]]
        first = value["records"][0]
        summary = {"id": image_id, "n": first["num_objects"], "caps": captions, "img": href is not None}
        if first.get("patch_grid"):             # a patch encoder's tokens: patches and special tokens
            summary["patches"] = [first["patch_grid"][0] * first["patch_grid"][1],
                                  len(first.get("special_objects", []))]
        entry = json.dumps(summary, separators=(",", ":")).encode("utf-8")
        self._entry_file.seek(0, os.SEEK_END)
        self._entries[image_id] = (self._entry_file.tell(), len(entry))
        self._entry_file.write(entry)
        words = {word for _, text in captions for word in words_of(text)}
        self._pair_file.writelines(f"{word}\t{image_id}\n" for word in sorted(words))
        for word in words:
            self._word_pairs[word] = self._word_pairs.get(word, 0) + 1

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._entries

    def __len__(self) -> int:
        """Images written so far."""
        return len(self._entries)

    def _entry(self, image_id: int) -> dict:
        offset, length = self._entries[image_id]
        self._entry_file.seek(offset)
        return json.loads(self._entry_file.read(length))

    def _word_index(self, buckets: int):
        """(bucket, {word: sorted unique image ids, int64}) for every bucket in order, from the
        spooled pairs, reading them once per group of buckets holding at most
        WORD_PAIRS_IN_MEMORY pairs (8 bytes each while grouped)."""
        bucket_of = {word: word_bucket(word, buckets) for word in self._word_pairs}
        per_bucket = [0] * buckets
        for word, count in self._word_pairs.items():
            per_bucket[bucket_of[word]] += count
        start = 0
        while start < buckets:
            stop, held = start + 1, per_bucket[start]
            while stop < buckets and held + per_bucket[stop] <= WORD_PAIRS_IN_MEMORY:
                held += per_bucket[stop]
                stop += 1
            groups = [{} for _ in range(start, stop)]
            self._pair_file.seek(0)
            for line in self._pair_file:
                word, image_id = line.rstrip("\n").split("\t")
                b = bucket_of[word]
                if start <= b < stop:
                    group = groups[b - start]
                    ids = group.get(word)
                    if ids is None:
                        ids = group[word] = array.array("q")
                    ids.append(int(image_id))
            for k, group in enumerate(groups):
                yield start + k, {word: np.unique(np.frombuffer(ids, np.int64)) for word, ids in group.items()}
                groups[k] = None
            start = stop

    def close(self) -> None:
        self._entry_file.close()
        self._pair_file.close()

    def count(self, enc: dict) -> None:
        self.records += 1
        for name, value in enc["maps"].items():
            if value is None:
                self.missing[name] += 1

    def finish(self, page_size: int, title: str, report_href, embedding) -> None:
        ids = sorted(self._entries)
        pages = []
        for start in range(0, len(ids), page_size):
            chunk = ids[start:start + page_size]
            key = f"index/p{len(pages):05d}.js"
            _write_js(self.root / "data" / key, key, [self._entry(i) for i in chunk])
            pages.append([chunk[0], chunk[-1], len(chunk)])
        buckets = max(1, min(4096, math.ceil(len(self._word_pairs) / 64)))
        for k, group in self._word_index(buckets):
            key = f"words/b{k:04d}.js"
            # the text json.dumps gives for {word: delta-encoded ids}, one word's list at a time
            entries = ",".join(f"{json.dumps(word)}:[{','.join(map(str, np.diff(ids, prepend=0).tolist()))}]"
                               for word, ids in group.items())
            _write_text(self.root / "data" / key, f"{_CALL}{json.dumps(key)},{{{entries}}});\n")
        manifest = {
            "version": FORMAT_VERSION, "title": str(title), "images": len(ids), "records": self.records,
            "page_size": page_size, "pages": pages, "word_buckets": buckets,
            "missing": self.missing, "report_href": report_href,
            "label_names_known": bool(self.label_names), "colours": ATTENTION_COLOURS,
            "box_embedding": embedding,
        }
        _write_js(self.root / "data" / "manifest.js", "manifest.js", manifest)


def build_site(records, out_dir, *, images_dir=None, limit=None, metadata=None, report_href=None,
               progress=True, page_size: int = DEFAULT_PAGE_SIZE, title=None, grouped: bool = False,
               encoder_top_k=None) -> SiteSummary:
    """Write the viewer for ``records`` (any iterable of :class:`~geocap.data.attention_record.Record`,
    e.g. ``geocap.data.dump_format.open_dump(path)``) to ``out_dir``, atomically; returns a
    :class:`SiteSummary`.

    - Records are grouped by ``image_id``, in any order (an image's records need not be adjacent);
      on its page they are sorted reference, generated, hypothetical, then by caption id.
    - ``images_dir``: folder of image files named by id (COCO names; else a record's
      ``extra["file_name"]`` in that folder); images without a file are drawn on a blank canvas.
    - ``limit``: keep the first ``limit`` images in record order; None: all. The iterable is read
      to the end (for records of those images that come later) unless ``grouped``: the records of
      each image are adjacent (as in a geocap dump, written image by image), so reading stops at
      the first record of image ``limit + 1``.
    - ``metadata``: the dump's metadata (default ``records.metadata`` when present);
      ``metadata["label_names"]`` (a list indexed by label id, or a dict) names the boxes; the
      model's box embedding (``metadata["model_config"]``) is shown in the index header.
    - ``report_href``: link to the analysis report, relative to ``out_dir`` (None: no link).
    - ``title``: the name the pages show (default ``metadata["title"]``, else "attention dump").
    - ``page_size``: images per index page.
    - ``encoder_top_k``: keep only the k largest weights of each encoder self-attention row (a
      patch encoder's N x N maps dominate the site's size); the pages state the error
      (:func:`geocap.view.encode.encode_top_k`). None: whole maps.
    - Image sizes come from ``record.extra["width"]`` / ``["height"]``, else from the image file;
      without either the page draws a 4:3 canvas and says so.

    Raises ``ValueError`` for bad records (naming the image) or options; on any error the previous
    ``out_dir`` is left as it was and no temporary folder remains.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    _check_options(limit, page_size, encoder_top_k)
    check_out_dir(out, marker=MARKER, kind="geocap view site", verb="replace")
    if metadata is None:
        metadata = getattr(records, "metadata", None) or {}
    if images_dir is not None and not Path(images_dir).is_dir():
        raise UsageError(f"--images: {images_dir} is not a folder")
    tmp = _fresh_temporary_folder(out)
    builder = None
    try:
        _copy_static(tmp)
        builder = _Builder(tmp, images_dir, label_names_from(metadata))
        _add_records(builder, records, limit=limit, grouped=grouped, progress=progress, encoder_top_k=encoder_top_k)
        if not len(builder):
            raise DataError("no records to view (an empty dump, or --limit 0)")
        _finish(builder, tmp, metadata, page_size=page_size, title=title, report_href=report_href)
        files, size = _folder_size(tmp)
        images = len(builder)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if builder is not None:
            builder.close()
    return SiteSummary(out_dir=out, images=images, records=builder.records,
                       images_with_file=builder.with_file, bytes=size, files=files,
                       seconds=time.perf_counter() - started, missing=dict(builder.missing))


def _check_options(limit, page_size, encoder_top_k) -> None:
    """ValueError naming the first bad one of :func:`build_site`'s numeric options."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise UsageError(f"limit must be a non-negative integer or None, got {limit!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise UsageError(f"page_size must be a positive integer, got {page_size!r}")
    if encoder_top_k is not None:
        check_top_k(encoder_top_k)


def _fresh_temporary_folder(out: Path) -> Path:
    """An empty temporary folder beside ``out`` (:func:`geocap.data.atomic.temporary_folder`), after
    removing what killed builds left there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporary_folders(out)         # what killed runs left
    tmp = Path(temporary_folder(out))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _copy_static(tmp: Path) -> None:
    """The pages and ``static/`` (scripts, styles) into the site folder ``tmp``."""
    shutil.copytree(STATIC_DIR, tmp / "static", ignore=shutil.ignore_patterns(".keep", *HTML_PAGES))
    for page in HTML_PAGES:
        shutil.copyfile(STATIC_DIR / page, tmp / page)


def _add_records(builder: "_Builder", records, *, limit, grouped: bool, progress: bool, encoder_top_k) -> None:
    """Encode ``records`` and hand them to ``builder`` image by image (an image's run of adjacent
    records at a time; :meth:`_Builder.flush` merges the runs of an image that arrive apart),
    keeping the first ``limit`` images (see :func:`build_site`)."""
    current, encoded, extras, cache = None, [], [], {}
    for record in progress_bar(records, enabled=progress, unit="record", desc="geocap view"):
        stop.check()
        image_id = int(getattr(record, "image_id", -1))
        if image_id != current:
            if current is not None:
                builder.flush(current, encoded, extras)
            current, encoded, extras, cache = None, [], [], {}
            if limit is not None and image_id not in builder and len(builder) >= limit:
                if grouped:
                    break
                continue
            current = image_id
        enc = encode_record(record, builder.label_names, cache, encoder_top_k=encoder_top_k)
        builder.count(enc)
        encoded.append(enc)
        extras.append(record.extra or {})
    if current is not None:
        builder.flush(current, encoded, extras)


def _finish(builder: "_Builder", tmp: Path, metadata: dict, *, page_size: int, title, report_href) -> None:
    """The index pages, word buckets and manifest (:meth:`_Builder.finish`), then the site's marker file."""
    embedding = box_embedding(metadata)
    if metadata.get("source") == "hf":          # a Hugging Face captioner: image tokens are patches
        embedding = "patches:" + str(metadata.get("model_class") or "Hugging Face captioner")
    builder.finish(page_size, title or metadata.get("title") or "attention dump", report_href, embedding)
    write_text_atomic(tmp / MARKER, json.dumps({"format": "geocap-view", "version": FORMAT_VERSION,
                                                "images": len(builder), "records": builder.records}) + "\n")


def _folder_size(folder: Path) -> tuple:
    """``(files, bytes)`` under ``folder``."""
    files, size = 0, 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.stat(os.path.join(dirpath, name)).st_size
    return files, size
