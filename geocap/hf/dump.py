"""``geocap dump --hf MODEL``: a Hugging Face captioner's attention over a folder of images, into
the same sharded, resumable HDF5 dumps as a geocap checkpoint's (:mod:`geocap.dump.job`: the
same manifest, shard writer, settings check on resume, torchrun sharding and progress).

What is recorded per image (:func:`geocap.hf.record_captions`): its reference captions
(``mode="teacher-forced"``, from the COCO captions file) or the model's own caption
(``mode="generated"``: the model's own ``generate()``, following its saved ``generation_config``
unless ``beam_size`` (``num_beams``) or ``max_len`` (``max_new_tokens``) are given),
teacher-forced. Objects are the encoder's image tokens (class/register tokens flagged in
``extra["special_objects"]``, then the patch grid, ``extra["patch_grid"]``); ``extra`` also holds
the image's ``file_name`` and its size in pixels (the file's, upright by its EXIF orientation,
not the processor's). The patches' boxes are in the original image's normalised coordinates:
over the whole image, or, for a processor that centre-crops (DeiT, CLIP), over the window it
kept (:mod:`geocap.hf.crop`; the patch boxes' bounding box), and referents are computed there; a
processor whose geometry geocap cannot map (padding, ``longest_edge``) is refused.
With an instances file, captions' nouns get referents: regions of patches
(:mod:`geocap.hf.referents`, ``extra["referent_objects"]``). No labels, no clusters (patches have
no category; the thematic analysis reports them missing), no hypothetical captions.

Tokens are the tokenizer's token strings (the end token written ``"<eos>"``); each shard's
vocabulary is the tokenizer's whole vocabulary in id order, so ``tokens/ids`` are the model's
token ids. The model folder is loaded with ``from_pretrained(..., use_safetensors=True)`` (weights
only, never pickled code) and identified in the manifest by the SHA-256 of its files.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from geocap.data.attention_record import MAP_NAMES
from geocap.data.dump_format import MANIFEST
from geocap.data.file_digest import update_with_file
from geocap.dump.manifest import add_skipped
from geocap.dump.plan import DumpOptions, assign_shards, check_rank, resolve_options
from geocap.dump.record_builder import WHAT
from geocap.dump.result import DumpResult, summarize
from geocap.out_dir import check_out_dir

from .crop import processor_window
from .images import ImageSet, load_image_set, read_image
from .models import SUPPORTED, UnsupportedModel, captioner_for, import_transformers
from .patches import PatchGrid
from .record import record_captions
from .referents import CategoryWords, caption_referents, category_regions
from geocap.errors import DataError, UsageError

__all__ = ["HFDumpPlan", "dump_hf", "load_captioner", "model_digest"]


def model_digest(folder: str) -> str:
    """SHA-256 over the model folder's files (names and contents, in name order; subfolders too)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode("utf-8") + b"\0")
            update_with_file(digest, path)
    return digest.hexdigest()


def _model_class(folder: str) -> str:
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise DataError(f"--hf: {folder}: no config.json (a folder written by save_pretrained)")
    try:
        with open(config, encoding="utf-8") as fh:
            architectures = json.load(fh).get("architectures") or []
    except (OSError, ValueError) as err:
        raise DataError(f"--hf: {config}: unreadable ({err})") from None
    known = [a for a in architectures if a in SUPPORTED]
    if not known:
        raise UnsupportedModel(f"--hf: {folder}: model class {', '.join(architectures) or '(none in config.json)'} "
                               f"is not supported by geocap.hf; supported: {', '.join(SUPPORTED)}")
    return known[0]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _check_parts(folder: str) -> None:
    """ValueError naming the folder when its tokenizer or image processor was not saved in it
    (transformers would otherwise guess at conversions and ask for unrelated packages)."""
    for what, names, call in (("tokenizer", TOKENIZER_FILES, "tokenizer.save_pretrained(MODEL_DIR)"),
                              ("image processor", PROCESSOR_FILES, "image_processor.save_pretrained(MODEL_DIR)")):
        if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
            raise DataError(f"--hf: {folder}: no {what} saved there (none of {', '.join(names)}); save it beside "
                             f"the model with {call}")


def load_captioner(folder, device="cpu") -> tuple:
    """``(model, image processor, tokenizer, class name)`` of a saved captioner folder: the model in
    eval mode with eager attention (so it returns its maps), safetensors weights only."""
    transformers = import_transformers()
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise DataError(f"--hf: {folder}: no such directory")
    name = _model_class(folder)
    _check_parts(folder)
    try:
        model = getattr(transformers, name).from_pretrained(folder, attn_implementation="eager",
                                                            use_safetensors=True)
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise DataError(f"--hf: {folder}: cannot load the model, its image processor and tokenizer ({err})") from None
    return model.to(device).eval(), image_processor, tokenizer, name


def _vocabulary(tokenizer, size: int, eos_id: int) -> list:
    """The token string of every id below ``size`` (``"<eos>"`` for the end token), as records
    write them; ValueError when two ids share a string (the shard stores strings)."""
    words = [w if w is not None else f"<id {i}>" for i, w in
             enumerate(tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer))))))]
    words += [f"<id {i}>" for i in range(len(words), size)]
    words[eos_id] = "<eos>"
    if len(set(words)) != len(words):
        twice = next(w for w, count in Counter(words).items() if count > 1)
        raise DataError(f"the tokenizer gives two ids the token string {twice!r}: a dump stores tokens as strings")
    return words


@dataclass
class HFDumpPlan:
    """A Hugging Face captioner's dump job: what :func:`geocap.dump.runner.run_shards` needs
    (``out``, ``split``, ``rank``, ``world_size``, ``options``, ``todo``, ``shard_range``,
    ``shard_args``) and the images, the model's vocabulary and its map sizes."""
    out: str
    split: str
    rank: int
    world_size: int
    options: DumpOptions
    images: ImageSet
    words: list
    model_sha256: str
    encoder_lh: tuple
    decoder_lh: tuple
    metadata: dict
    metadata_sha256: str
    todo: list
    skipped: list
    redone: list

    @property
    def n_images(self) -> int:
        return len(self.images.image_ids)

    def shard_range(self, k: int) -> tuple:
        size = self.options.shard_images
        return k * size, min(self.n_images, (k + 1) * size)

    def shard_args(self, k: int) -> dict:
        o = self.options
        return dict(index=k, metadata_sha256=self.metadata_sha256, checkpoint_sha256=self.model_sha256,
                    vocab=self.words, maps=o.stored_maps,
                    entropies=tuple(WHAT[w] for w in o.what), encoder_lh=self.encoder_lh, decoder_lh=self.decoder_lh,
                    has_labels=False, has_clusters=False, has_features=o.features, stats_only=o.stats_only,
                    compression=o.compression, encoder_top_k=o.encoder_top_k)


def _layers_heads(model, name: str) -> tuple:
    config = model.config
    if name == "VisionEncoderDecoderModel":
        encoder, decoder = config.encoder, config.decoder
    else:
        encoder, decoder = config.vision_config, config.text_config

    def lh(c):
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
        return int(layers), int(heads)
    return lh(encoder), lh(decoder)


def _check_mode(options: DumpOptions, images: ImageSet) -> None:
    if options.mode != "teacher-forced":
        return
    if images.captions is None:
        raise UsageError("mode teacher-forced needs reference captions (--captions COCO_JSON); without them use "
                         "--mode generated")
    bare = [k for k, texts in enumerate(images.captions) if not texts]
    if bare:
        k = bare[0]
        raise DataError(f"--captions: {images.captions_file}: image {int(images.image_ids[k])} ({images.files[k]}) "
                         f"has no caption ({len(bare)} such images): teacher-forced mode records reference captions; "
                         f"give it captions, leave it out of the images list, or use --mode generated")


def plan_hf_dump(model, tokenizer, name: str, model_dir: str, images: ImageSet, out, options: DumpOptions, *,
                 rank: Optional[int] = None, world_size: Optional[int] = None) -> HFDumpPlan:
    """Fix the dump's metadata, create or check ``out``'s manifest and assign this rank's shards."""
    from geocap import __version__

    o = options.checked()
    if o.hypothetical:
        raise UsageError("hypothetical captions are not made for Hugging Face captioners' dumps")
    _check_mode(o, images)
    rank, world_size = check_rank(rank, world_size)
    captioner = captioner_for(model)
    words = _vocabulary(tokenizer, captioner.vocab_size, captioner.eos_id)
    encoder_lh, decoder_lh = _layers_heads(model, name)
    sha256 = model_digest(model_dir)
    generated = o.mode == "generated"
    metadata = {
        "geocap_version": __version__, "source": "hf", "model_class": name, "checkpoint": model_dir,
        "checkpoint_sha256": sha256, "model_config": {"geometry": False, "hf_class": name,
                                                      "encoder_lh": list(encoder_lh), "decoder_lh": list(decoder_lh)},
        "data": images.folder, "split": "images", "captions_sha256": images.digests.get("captions"),
        "instances_sha256": images.digests.get("instances"), "mode": o.mode, "what": list(o.what),
        "maps": list(o.stored_maps), **o.top_k_metadata(), "stats_only": bool(o.stats_only),
        "hypothetical": False, "features": bool(o.features), "compression": o.compression,
        "shard_images": o.shard_images, "limit": o.limit, "beam_size": o.beam_size if generated else None,
        "max_len": o.max_len if generated else None, "n_images": len(images.image_ids),
        "image_ids_sha256": images.ids_sha256, "referents": bool(images.categories), "labels": False,
        "label_names": None, "clusters": "none", "n_clusters": None, "cluster_centroids": None,
        "categories": {str(k): v for k, v in sorted(images.categories.items())} or None,
    }
    shares = assign_shards(out, metadata, len(images.image_ids), o.shard_images, rank, world_size)
    return HFDumpPlan(out=out, split="images", rank=rank, world_size=world_size, options=o, images=images,
                      words=words, model_sha256=sha256, encoder_lh=encoder_lh, decoder_lh=decoder_lh,
                      metadata=shares.manifest["metadata"], metadata_sha256=shares.manifest["metadata_sha256"],
                      todo=shares.todo, skipped=shares.skipped, redone=shares.redone)


def generate_kwargs(options: DumpOptions) -> dict:
    """The arguments of ``generate()`` beyond the model's own ``generation_config``: ``num_beams``
    when ``beam_size`` is given, ``max_new_tokens`` when ``max_len`` is (with ``max_length=None``, so
    a ``max_length`` in the model's config neither competes nor warns at every image)."""
    kwargs = {}
    if options.beam_size is not None:
        kwargs["num_beams"] = options.beam_size
    if options.max_len is not None:
        kwargs.update(max_new_tokens=options.max_len, max_length=None)
    return kwargs


def _read_and_process(plan: HFDumpPlan, positions: list, image_processor) -> tuple:
    """``(positions kept, pictures, pixel_values [B, 3, H, W] or None)``: each image read and
    processed alone; a bad one raises (ValueError naming it), or with ``on_error="skip"`` is left
    out and listed in the manifest's ``skipped_images`` with its reason."""
    images, kept, pictures, pixels, skipped = plan.images, [], [], [], {}
    for position in positions:
        image_id = int(images.image_ids[position])
        try:
            picture = read_image(images.path(position), image_id)
            try:
                pixels.append(image_processor(images=[picture], return_tensors="pt")["pixel_values"])
            except (ValueError, TypeError, OSError) as err:
                raise DataError(f"image {image_id}: {images.path(position)}: the image processor refused it "
                                 f"({err})") from None
        except ValueError as err:
            if plan.options.on_error != "skip":
                raise
            skipped[str(image_id)] = {"file": images.files[position], "reason": str(err),
                                      "shard": position // plan.options.shard_images}
            continue
        kept.append(position)
        pictures.append(picture)
    if skipped:
        add_skipped(plan.out, skipped)
    return kept, pictures, torch.cat(pixels) if pixels else None


def hf_recorder(plan: HFDumpPlan, model, image_processor, tokenizer, device):
    """``record_images(positions)``: the plan's images at those positions through the model, per
    image its list of Records (references or its own caption, referents from the instances); an
    image left out by ``on_error="skip"`` has no entry."""
    o, images = plan.options, plan.images
    category_words = CategoryWords(images.categories) if images.categories else None
    patch = captioner_for(model).patch

    def record_images(positions):
        positions, pictures, pixels = _read_and_process(plan, positions, image_processor)
        if not positions:
            return []
        pixels = pixels.to(device)
        ids = [int(images.image_ids[i]) for i in positions]
        if o.mode == "generated":
            per_image = record_captions(model, pixels, image_ids=ids, generate=True, tokenizer=tokenizer, what=o.what,
                                        generate_kwargs=generate_kwargs(o))
        else:
            per_image = record_captions(model, pixels, image_ids=ids, tokenizer=tokenizer, what=o.what,
                                        captions=[images.captions[i] for i in positions])
        for position, picture, records in zip(positions, pictures, per_image):
            image_id = int(images.image_ids[position])
            grid = _image_grid(image_processor, picture, records[0], patch, image_id)
            boxes = grid.boxes()
            regions = None
            if category_words is not None:
                regions = category_regions(grid, images.instances.get(image_id, []))
            for record in records:
                record.boxes = boxes
                record.extra.update(file_name=images.files[position], width=picture.width, height=picture.height)
                token_ids = record.extra.pop("token_ids")   # the shard's vocabulary is in id order: ids are kept
                if not o.features:
                    record.features = None
                for name in MAP_NAMES:             # kinds kept as entropies only (options.maps)
                    if not o.stats_only and name not in o.stored_maps:
                        setattr(record, name, None)
                if regions is not None:
                    order = list(regions)
                    record.extra["referent_objects"] = [regions[c] for c in order]
                    record.referents = caption_referents(token_ids, tokenizer, category_words,
                                                         {c: r for r, c in enumerate(order)})
                record.validate()
        return per_image

    return record_images


def _image_grid(image_processor, picture, record, patch: tuple, image_id: int) -> PatchGrid:
    """The patch grid of a record's image in the original image's coordinates: over the window its
    processor kept (:mod:`geocap.hf.crop`), cut to the whole patches the encoder saw."""
    (x1, y1, x2, y2), (height, width) = processor_window(image_processor, picture.width, picture.height)
    got = (record.extra["height"], record.extra["width"])
    if got != (height, width):
        raise DataError(f"image {image_id}: the image processor {type(image_processor).__name__} gave "
                         f"{got[0]}x{got[1]} pixels where its settings give {height}x{width}: geocap.hf cannot tell "
                         f"which part of the image the model saw")
    rows, cols = record.extra["patch_grid"]
    window = (x1, y1, x1 + (x2 - x1) * cols * patch[1] / width, y1 + (y2 - y1) * rows * patch[0] / height)
    return PatchGrid(rows, cols, prefix=len(record.extra["special_objects"]), window=window)


def dump_hf(model_dir, images_dir, out, options: Optional[DumpOptions] = None, *, captions=None, instances=None,
            device=None, rank: Optional[int] = None, world_size: Optional[int] = None, progress: bool = True,
            stats_collector=None, **option_values) -> DumpResult:
    """Dump the attention of the Hugging Face captioner saved in ``model_dir`` over the images of
    ``images_dir`` (with the COCO ``captions`` / ``instances`` files when given) into ``out``;
    the options are :func:`geocap.dump.job.dump`'s (``mode`` defaults to teacher-forced with
    captions, generated without). Returns a :class:`~geocap.dump.result.DumpResult`."""
    from geocap import distributed
    from geocap.dump.runner import run_shards

    t_start = time.perf_counter()
    if options is None:
        option_values.setdefault("mode", "teacher-forced" if captions is not None else "generated")
        option_values.setdefault("hypothetical", False)
    options = resolve_options(options, option_values, stats_collector, "dump_hf")
    out = os.path.abspath(os.fspath(out))
    check_out_dir(out, marker=MANIFEST, kind="geocap dump")
    images = load_image_set(images_dir, captions=captions, instances=instances, limit=options.limit)
    dev = distributed.resolve_device(device)
    model_dir = os.path.abspath(os.fspath(model_dir))
    model, image_processor, tokenizer, name = load_captioner(model_dir, dev)
    processor_window(image_processor, 640, 480)         # an image processor geocap cannot map: refused now
    plan = plan_hf_dump(model, tokenizer, name, model_dir, images, out, options, rank=rank, world_size=world_size)
    result = DumpResult(path=plan.out, rank=plan.rank, world_size=plan.world_size, shards_skipped=plan.skipped,
                        shards_redone=plan.redone)
    if images.unlisted:
        result.notes.append(f"{len(images.unlisted)} image files of {images.folder} are not in the captions file's "
                            f"images (first: {images.unlisted[0]}): left out")
    run_shards(plan, hf_recorder(plan, model, image_processor, tokenizer, dev), result,
               collector_class=stats_collector if options.stats_only else None, progress=progress)
    result.seconds = time.perf_counter() - t_start
    return summarize(result)
