"""``geocap prepro``: build the feature store and the captions directory from public files.

    geocap prepro features --from tsv FILE... --out features.h5 [--dtype float16|float32]
                           [--on-error raise|skip] [--label-names TXT]
    geocap prepro features --from npz-dir FEATURE_DIR BOX_DIR --box-units pixel|relative
                           [--sizes COCO_JSON...] --out features.h5
    geocap prepro features --from m2-h5 FILE --sizes COCO_JSON... --out features.h5
    geocap prepro features --from store STORE... --out features.h5      (copy, merge, change dtype)
    geocap prepro captions (--karpathy FILE | --coco FILE... | --cocotalk JSON LABEL_H5) --out DIR
                           [--min-count 5] [--max-len 16] [--vocab-split train|all]

``--coco`` refuses a file given twice (by resolved path) and an annotation (image id and
annotation id) found in two of the files, naming both files and the image, instead of
doubling captions.

:func:`prepro_features` and :func:`prepro_captions` do the work and return what was written (the
command line, :mod:`geocap.cli.prepro`, prints it); both raise ``DataError`` (a ValueError) for
bad input.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from geocap.data.items import CaptionSet, DataError

SOURCES = ("tsv", "npz-dir", "m2-h5", "store")


# ---------------------------------------------------------------------------- features


def _read_lines(path) -> list:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip()]
    except OSError as err:
        raise DataError(f"{path}: cannot read label names ({err})") from None


def _sizes(paths):
    if not paths:
        return None
    from geocap.data.readers import read_image_sizes
    sizes = {}
    for path in paths:
        sizes.update(read_image_sizes(path))
    return sizes


def _feature_source(source: str, inputs, *, on_error: str, sizes, box_units, stats):
    """(iterable of ImageFeatures, number of images or None, label names or None)."""
    if source == "store":
        from geocap.data.store import FeatureStore
        stores = [FeatureStore(p) for p in inputs]
        names = [s.label_names for s in stores]
        return itertools.chain.from_iterable(stores), sum(len(s) for s in stores), (
            names[0] if all(n == names[0] for n in names) else None)
    from geocap.data import readers
    if source == "tsv":
        streams = (readers.read_bottom_up_tsv(p, on_error=on_error, stats=stats) for p in inputs)
        return itertools.chain.from_iterable(streams), None, None
    if source == "npz-dir":
        if len(inputs) != 2 or box_units is None:
            raise DataError("--from npz-dir takes FEATURE_DIR BOX_DIR and --box-units pixel|relative")
        stream = readers.read_npz_dir(inputs[0], inputs[1], box_units=box_units, sizes=_sizes(sizes),
                                      on_error=on_error, stats=stats)
        return stream, None, None
    if source != "m2-h5":
        raise DataError(f"--from: expected one of {', '.join(SOURCES)}, got {source!r}")
    sizes = _sizes(sizes)
    if sizes is None:
        raise DataError("--from m2-h5 has boxes in pixels: give the image sizes with --sizes COCO_JSON...")
    streams = (readers.read_m2_hdf5(p, sizes=sizes, on_error=on_error, stats=stats) for p in inputs)
    return itertools.chain.from_iterable(streams), None, None


@dataclass
class FeaturesSummary:
    """What :func:`prepro_features` wrote: the store's ``result`` (:class:`geocap.data.store.StoreResult`),
    ``clipped_boxes`` (boxes clipped to their image), ``n_skipped`` images left out (``on_error="skip"``)
    and the reasons, first ones first."""
    result: object
    clipped_boxes: int = 0
    n_skipped: int = 0
    skipped: list = field(default_factory=list)

    def lines(self) -> list:
        """The report printed on stdout."""
        r = self.result
        lines = [f"wrote {r.n_images} images ({r.n_boxes} boxes, D={r.feature_dim}, {r.feature_dtype}"
                 f"{', labels' if r.has_labels else ''}) to {r.path}: {r.file_bytes / 1e6:.1f} MB "
                 f"in {r.seconds:.1f} s"]
        if self.clipped_boxes:
            lines.append(f"clipped {self.clipped_boxes} boxes reaching outside their image")
        return lines

    def warnings(self, first: int = 10) -> list:
        """The skipped images (a count, then the first reasons), for stderr; empty when none."""
        if not self.n_skipped:
            return []
        return [f"skipped {self.n_skipped} images; the first reasons:"] + [f"  {m}" for m in self.skipped[:first]]


def prepro_features(source: str, inputs, out, *, dtype: str = "float16", on_error: str = "raise",
                    label_names=None, sizes=None, box_units=None, progress: bool = True) -> FeaturesSummary:
    """Stream ``inputs`` (of format ``source``, one of :data:`SOURCES`) into one feature store
    ``out``. ``label_names``: a text file of detector class names (one per line); ``sizes``: COCO
    JSON files with the image sizes (pixel boxes); ``box_units``: npz-dir's box units."""
    from geocap.data.store import write_store
    stats = None
    if source != "store":
        from geocap.data.readers import ReadStats
        stats = ReadStats()
    try:
        records, n_images, names = _feature_source(source, inputs, on_error=on_error, sizes=sizes,
                                                   box_units=box_units, stats=stats)
        if label_names:
            names = _read_lines(label_names)
        result = write_store(out, records, feature_dtype=dtype, label_names=names,
                             n_images=n_images, on_error=on_error, progress=progress)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    skipped = [msg for _, msg in result.skipped]
    if stats is None:
        return FeaturesSummary(result, 0, result.n_skipped, skipped)
    return FeaturesSummary(result, stats.clipped_boxes, stats.skipped_images + result.n_skipped,
                           list(stats.errors) + skipped)


# ---------------------------------------------------------------------------- captions


def _source_name(karpathy, coco, cocotalk) -> str:
    return karpathy or ", ".join(coco or cocotalk)


def _read_coco_files(paths) -> CaptionSet:
    """The captions of several COCO annotation files; DataError for a file given twice or an
    annotation (image id, annotation id) in two files."""
    import os

    from geocap.data import readers
    seen_paths = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen_paths:
            raise DataError(f"--coco: {path} is given twice (also as {seen_paths[real]}): its captions would "
                            f"count double")
        seen_paths[real] = path
    merged = CaptionSet()
    owner = {}                                   # (image id, annotation id) -> file
    for path in paths:
        part = readers.read_coco_captions(path)
        for caption in part.captions:
            key = (caption.image_id, caption.caption_id)
            if key in owner:
                raise DataError(f"{path}: image {caption.image_id}: annotation {caption.caption_id} is also in "
                                f"{owner[key]} (the same captions in two --coco files?)")
            owner[key] = path
        merged.captions.extend(part.captions)
        merged.splits.update(part.splits)
    return merged


def _read_captions(karpathy, coco, cocotalk) -> CaptionSet:
    from geocap.data import readers
    if karpathy:
        return readers.read_karpathy(karpathy)
    if cocotalk:
        return readers.read_cocotalk(*cocotalk).captions
    if not coco:
        raise DataError("give one caption source: --karpathy FILE, --coco FILE... or --cocotalk JSON LABEL_H5")
    return _read_coco_files(coco)


@dataclass
class CaptionsSummary:
    """What :func:`prepro_captions` wrote: ``out``, the encoded captions' counts, the vocabulary's."""
    out: str
    captions: int
    images: int
    seconds: float
    vocab_size: int
    min_count: int
    counted_over: str          # "train" or "all"
    unk_share: float           # <unk> / kept words
    max_len: int
    truncated_share: float     # captions longer than max_len
    words: int
    per_split: dict

    def lines(self) -> list:
        """The report printed on stdout."""
        return [f"wrote {self.captions} captions of {self.images} images to {self.out} in {self.seconds:.1f} s",
                f"vocabulary: {self.vocab_size} words (min count {self.min_count}, counted over "
                f"{self.counted_over} captions); <unk>: {self.unk_share:.2%} of kept words; "
                f"truncated to {self.max_len}: {self.truncated_share:.2%} of captions ({self.words} words in all)",
                "captions per split: " + ", ".join(f"{k} {v}" for k, v in self.per_split.items())]


def prepro_captions(out, *, karpathy=None, coco=None, cocotalk=None, min_count: int = 5, max_len: int = 16,
                    vocab_split: str = "train", progress: bool = True) -> CaptionsSummary:
    """Read one caption source (``karpathy``: dataset_coco.json; ``coco``: COCO caption files;
    ``cocotalk``: (cocotalk.json, cocotalk_label.h5)), build the vocabulary (words seen at least
    ``min_count`` times over the train split, or over every caption with ``vocab_split="all"`` or
    when the source has no splits), encode (``max_len`` words kept) and write the captions
    directory ``out`` (vocab.json + captions.h5)."""
    from geocap.data.vocab import UNK, build_vocab, encode_captions, write_captions
    if min_count < 1 or max_len < 1:
        raise DataError("--min-count and --max-len must be at least 1")
    started = time.perf_counter()
    try:
        captions = _read_captions(karpathy, coco, cocotalk)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    if not captions.captions:
        raise DataError(f"{_source_name(karpathy, coco, cocotalk)}: no captions")
    counted = captions.captions
    if vocab_split == "train" and captions.splits:
        counted = [c for c in captions.captions if captions.splits.get(int(c.image_id)) == "train"]
        if not counted:
            raise DataError("no train captions to build the vocabulary from (use --vocab-split all)")
    vocab = build_vocab(counted, min_count=min_count)
    encoded = encode_captions(captions, vocab, max_len, progress=progress)
    write_captions(out, encoded)
    unk = int((encoded.tokens == UNK).sum())
    return CaptionsSummary(
        out=str(out), captions=len(encoded), images=len(set(encoded.image_id.tolist())),
        seconds=time.perf_counter() - started, vocab_size=len(vocab), min_count=min_count,
        counted_over="train" if counted is not captions.captions else "all",
        unk_share=unk / max(1, int(encoded.length.sum())), max_len=max_len,
        truncated_share=sum(len(r.split()) > max_len for r in encoded.reference) / len(encoded),
        words=sum(len(r.split()) for r in encoded.reference),
        per_split={name: int((encoded.split == k).sum()) for k, name in enumerate(encoded.split_names)})
