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

``add_prepro_parser(subparsers)`` registers ``prepro`` on an argparse subparsers object; each
handler returns the exit status and raises ``DataError`` (a ValueError) for bad input.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

from geocap.data.items import CaptionSet, DataError

SOURCES = ("tsv", "npz-dir", "m2-h5", "store")


def add_prepro_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``prepro features`` and ``prepro captions`` to ``subparsers``; returns the ``prepro`` parser."""
    prepro = subparsers.add_parser("prepro", help="build the feature store and the captions directory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = prepro.add_subparsers(dest="prepro_command", required=True)

    feat = sub.add_parser("features", help="detector features -> one feature store (HDF5)")
    feat.add_argument("--from", dest="source", choices=SOURCES, required=True,
                      help="input format: bottom-up TSV file(s); ORT npz folder + box folder; "
                           "meshed-memory HDF5; geocap feature store(s)")
    feat.add_argument("inputs", nargs="+", metavar="INPUT")
    feat.add_argument("--out", required=True, help="the feature store to write (replaced atomically)")
    feat.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    feat.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                      help="bad image: stop with an error naming it, or leave it out and count it")
    feat.add_argument("--label-names", metavar="TXT", help="detector class names, one per line (label id = line)")
    feat.add_argument("--sizes", nargs="+", metavar="JSON", default=None,
                      help="JSON files whose 'images' carry width/height (COCO annotations): needed for "
                           "pixel boxes (m2-h5, npz-dir --box-units pixel)")
    feat.add_argument("--box-units", choices=("pixel", "relative"), help="npz-dir: units of the box folder")
    feat.add_argument("--no-progress", dest="progress", action="store_false")
    feat.set_defaults(func=run_features)

    caps = sub.add_parser("captions", help="caption annotations -> vocab.json + captions.h5")
    src = caps.add_mutually_exclusive_group(required=True)
    src.add_argument("--karpathy", metavar="FILE", help="Karpathy's dataset_coco.json (tokens and splits)")
    src.add_argument("--coco", nargs="+", metavar="FILE",
                     help="COCO caption annotations (no splits: 'none'); each file once, each annotation in "
                          "one file only")
    src.add_argument("--cocotalk", nargs=2, metavar=("JSON", "LABEL_H5"),
                     help="ORT / self-critical cocotalk.json and cocotalk_label.h5 (their words and splits; "
                          "the vocabulary is rebuilt with --min-count)")
    caps.add_argument("--out", required=True, metavar="DIR")
    caps.add_argument("--min-count", type=int, default=5, help="words seen fewer times become <unk>")
    caps.add_argument("--max-len", type=int, default=16, help="words kept per caption")
    caps.add_argument("--vocab-split", choices=("train", "all"), default="train",
                      help="count words over the train split only (default, when the source has splits) "
                           "or over every caption")
    caps.add_argument("--no-progress", dest="progress", action="store_false")
    caps.set_defaults(func=run_captions)
    return prepro


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


def _feature_source(args, stats):
    """(iterable of ImageFeatures, number of images or None, label names or None)."""
    inputs = args.inputs
    if args.source == "store":
        from geocap.data.store import FeatureStore
        stores = [FeatureStore(p) for p in inputs]
        names = [s.label_names for s in stores]
        return itertools.chain.from_iterable(stores), sum(len(s) for s in stores), (
            names[0] if all(n == names[0] for n in names) else None)
    from geocap.data import readers
    if args.source == "tsv":
        streams = (readers.read_bottom_up_tsv(p, on_error=args.on_error, stats=stats) for p in inputs)
        return itertools.chain.from_iterable(streams), None, None
    if args.source == "npz-dir":
        if len(inputs) != 2 or args.box_units is None:
            raise DataError("--from npz-dir takes FEATURE_DIR BOX_DIR and --box-units pixel|relative")
        stream = readers.read_npz_dir(inputs[0], inputs[1], box_units=args.box_units, sizes=_sizes(args.sizes),
                                      on_error=args.on_error, stats=stats)
        return stream, None, None
    sizes = _sizes(args.sizes)
    if sizes is None:
        raise DataError("--from m2-h5 has boxes in pixels: give the image sizes with --sizes COCO_JSON...")
    streams = (readers.read_m2_hdf5(p, sizes=sizes, on_error=args.on_error, stats=stats) for p in inputs)
    return itertools.chain.from_iterable(streams), None, None


def run_features(args) -> int:
    """``geocap prepro features``: stream the inputs into one feature store."""
    from geocap.data.store import write_store
    stats = None
    if args.source != "store":
        from geocap.data.readers import ReadStats
        stats = ReadStats()
    try:
        records, n_images, label_names = _feature_source(args, stats)
        if args.label_names:
            label_names = _read_lines(args.label_names)
        result = write_store(args.out, records, feature_dtype=args.dtype, label_names=label_names,
                             n_images=n_images, on_error=args.on_error, progress=args.progress)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    print(f"wrote {result.n_images} images ({result.n_boxes} boxes, D={result.feature_dim}, {result.feature_dtype}"
          f"{', labels' if result.has_labels else ''}) to {result.path}: {result.file_bytes / 1e6:.1f} MB "
          f"in {result.seconds:.1f} s")
    skipped = [msg for _, msg in result.skipped]
    if stats is not None:
        if stats.clipped_boxes:
            print(f"clipped {stats.clipped_boxes} boxes reaching outside their image")
        skipped = list(stats.errors) + skipped
        n_skipped = stats.skipped_images + result.n_skipped
    else:
        n_skipped = result.n_skipped
    if n_skipped:
        print(f"skipped {n_skipped} images; the first reasons:", file=sys.stderr)
        for msg in skipped[:10]:
            print(f"  {msg}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- captions


def _source_name(args) -> str:
    return args.karpathy or ", ".join(args.coco or args.cocotalk)


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


def _read_captions(args) -> CaptionSet:
    from geocap.data import readers
    if args.karpathy:
        return readers.read_karpathy(args.karpathy)
    if args.cocotalk:
        return readers.read_cocotalk(*args.cocotalk).captions
    return _read_coco_files(args.coco)


def run_captions(args) -> int:
    """``geocap prepro captions``: tokenise, build the vocabulary, encode, write DIR."""
    from geocap.data.vocab import UNK, build_vocab, encode_captions, write_captions
    if args.min_count < 1 or args.max_len < 1:
        raise DataError("--min-count and --max-len must be at least 1")
    started = time.perf_counter()
    try:
        captions = _read_captions(args)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    if not captions.captions:
        raise DataError(f"{_source_name(args)}: no captions")
    counted = captions.captions
    if args.vocab_split == "train" and captions.splits:
        counted = [c for c in captions.captions if captions.splits.get(int(c.image_id)) == "train"]
        if not counted:
            raise DataError("no train captions to build the vocabulary from (use --vocab-split all)")
    vocab = build_vocab(counted, min_count=args.min_count)
    encoded = encode_captions(captions, vocab, args.max_len, progress=args.progress)
    write_captions(args.out, encoded)
    n_words = sum(len(r.split()) for r in encoded.reference)
    unk = int((encoded.tokens == UNK).sum())
    truncated = sum(len(r.split()) > args.max_len for r in encoded.reference)
    per_split = {name: int((encoded.split == k).sum()) for k, name in enumerate(encoded.split_names)}
    print(f"wrote {len(encoded)} captions of {len(set(encoded.image_id.tolist()))} images to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    print(f"vocabulary: {len(vocab)} words (min count {args.min_count}, counted over "
          f"{'train' if counted is not captions.captions else 'all'} captions); "
          f"<unk>: {unk / max(1, int(encoded.length.sum())):.2%} of kept words; "
          f"truncated to {args.max_len}: {truncated / len(encoded):.2%} of captions ({n_words} words in all)")
    print("captions per split: " + ", ".join(f"{k} {v}" for k, v in per_split.items()))
    return 0


