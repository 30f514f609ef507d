"""A tiny Hugging Face captioner trained from random initialisation: a ``VisionEncoderDecoderModel``
(a ViT encoder and a GPT-2 decoder with cross-attention, eager attention) on images of the
synthetic scenes (``geocap synth-images``), so that a patch captioner's attention can be
recorded (:func:`geocap.hf.record_captions`) and compared with ORT's on the same scenes, with no
download. The ``geocap hf-train-tiny`` command.

- :func:`build_tiny_captioner` gives ``(model, image_processor, tokenizer)``. The tokenizer is
  word-level, built here with the ``tokenizers`` library: lower-cased, split on whitespace and
  punctuation (``tokenizers``' ``Whitespace`` pre-tokenizer: "a cup." -> "a", "cup", "."); ids
  0..3 are ``[PAD]``, ``[BOS]``, ``[EOS]``, ``[UNK]`` (:data:`PAD`, :data:`BOS`, :data:`EOS`,
  :data:`UNK`), then the words in the order given. ``tokenizer(text)`` appends ``[EOS]``
  (``add_special_tokens=False``: the words only). The model's decoder starts from ``[BOS]``
  (``decoder_start_token_id``), ends with ``[EOS]`` and pads with ``[PAD]``, in its config and
  its generation config (greedy, ``max_length`` = the decoder's positions, ``[PAD]`` and
  ``[BOS]`` never generated), so ``model.generate(pixel_values=...)`` gives ``[BOS] words
  [EOS]``. The image processor is a ViT one: resize to ``image_size`` square (bilinear), scale
  to [0, 1], normalise with mean and std 0.5.
- :func:`train_tiny_captioner` trains one on a COCO captions file and its images (as
  ``render_images`` writes them): AdamW, cross-entropy with teacher forcing (the model's own
  ``labels`` loss: each caption's tokens then ``[EOS]``, the decoder fed ``[BOS]`` and the
  caption), linear warm-up over the first 10 % of steps (at most 100) and linear decay to 10 % of
  ``lr``, gradient norm clipped at 1. A step takes ``batch_size`` images, each with all its
  captions (the encoder runs once per image); images are drawn in a random order per epoch from
  the seed. The vocabulary is every word of the captions of the file's images (:func:`caption_words`). The
  whole run is deterministic for a seed on one machine and thread count (CPU).
- The output folder (written under a temporary name, then swapped into place) loads with
  ``VisionEncoderDecoderModel.from_pretrained(DIR, attn_implementation="eager")``,
  ``AutoTokenizer.from_pretrained(DIR)`` and ``AutoImageProcessor.from_pretrained(DIR)``, offline;
  ``train_log.json`` holds the options, the sizes, the loss of every step and the wall time.

transformers and tokenizers are imported only when a model is built (``import geocap.cli``
needs neither).
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import time
from typing import Iterable

import torch

from geocap import stop
from geocap.data.atomic import remove_stale_temporary_folders, replace_folder, temporary_folder, write_text_atomic
from geocap.data.readers.coco import read_coco_file
from geocap.options import check_int
from geocap.out_dir import check_out_dir
from geocap.progress import progress_bar

from .models import import_transformers
from geocap.errors import DataError, UsageError

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD, BOS, EOS, UNK = range(4)
TRAIN_LOG = "train_log.json"
DEFAULT_SIZES = dict(image_size=64, patch_size=8, d_model=64, layers=2, heads=4, max_length=32, dropout=0.0)


def _pre_tokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Whitespace()


def caption_words(captions: Iterable[str]) -> list:
    """The words of ``captions`` as the tokenizer splits them (lower-cased, whitespace and
    punctuation), most frequent first, ties alphabetically."""
    split = _pre_tokenizer()
    counts = collections.Counter(w for text in captions for w, _ in split.pre_tokenize_str(str(text).lower()))
    return sorted(counts, key=lambda w: (-counts[w], w))


def build_tokenizer(words: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast``: the special tokens (ids 0..3), then ``words``
    (lower-cased, first occurrence kept) in order; unknown words are ``[UNK]``."""
    transformers = import_transformers()
    from tokenizers import Tokenizer, models, normalizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise DataError(f"words must be non-empty strings without surrounding spaces, got {word!r}")
        vocab.setdefault(word.lower(), len(vocab))
    if len(vocab) == len(SPECIAL_TOKENS):
        raise DataError("words is empty: the tokenizer needs at least one word besides the special tokens")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", EOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[UNK]")


def build_image_processor(image_size: int):
    """A ViT image processor to ``image_size`` x ``image_size`` (the PIL one: no torchvision)."""
    transformers = import_transformers()
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True,
               do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])



def check_sizes(**sizes) -> dict:
    """``sizes`` (keywords of :data:`DEFAULT_SIZES`) completed with the defaults; ValueError
    naming the argument for an unknown name or a bad value."""
    unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
    if unknown:
        raise UsageError(f"unknown size argument {unknown[0]!r}; known: {', '.join(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **sizes}
    for name, low in (("image_size", 8), ("patch_size", 1), ("d_model", 8), ("layers", 1), ("heads", 1),
                      ("max_length", 2)):
        check_int(name, sizes[name], low)
    if sizes["image_size"] % sizes["patch_size"]:
        raise UsageError(f"image_size ({sizes['image_size']}) must be a multiple of patch_size ({sizes['patch_size']})")
    if sizes["d_model"] % sizes["heads"]:
        raise UsageError(f"d_model ({sizes['d_model']}) must be a multiple of heads ({sizes['heads']})")
    dropout = sizes["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"dropout must be in [0, 1), got {dropout!r}")
    return sizes


def build_tiny_captioner(words, *, image_size: int = 64, patch_size: int = 8, d_model: int = 64, layers: int = 2,
                         heads: int = 4, seed: int = 0, max_length: int = 32, dropout: float = 0.0):
    """``(model, image_processor, tokenizer)``: a randomly initialised ``VisionEncoderDecoderModel``
    (ViT encoder and GPT-2 decoder, each ``layers`` layers of width ``d_model`` with ``heads``
    heads and a 4 ``d_model`` feed-forward; ``image_size / patch_size`` patches per side plus the
    class token; the decoder's ``max_length`` positions; output layer tied to the word
    embeddings; ``dropout`` everywhere; eager attention), in eval mode, and its processor and
    tokenizer (module docstring). Initialised from ``seed`` without touching the global RNG.
    ValueError naming the argument for bad sizes."""
    check_sizes(image_size=image_size, patch_size=patch_size, d_model=d_model, layers=layers, heads=heads,
                max_length=max_length, dropout=dropout)
    check_int("seed", seed, 0)
    transformers = import_transformers()
    tokenizer = build_tokenizer(words)
    encoder = transformers.ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=d_model,
                                     num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * d_model,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    decoder = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=max_length, n_embd=d_model, n_layer=layers,
                                      n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                      add_cross_attention=True, is_decoder=True, bos_token_id=BOS, eos_token_id=EOS,
                                      pad_token_id=PAD, decoder_start_token_id=BOS)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = BOS, PAD, EOS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.VisionEncoderDecoderModel._from_config(config, attn_implementation="eager")
    generation = model.generation_config
    generation.decoder_start_token_id, generation.bos_token_id = BOS, BOS
    generation.eos_token_id, generation.pad_token_id = EOS, PAD
    generation.max_length, generation.do_sample, generation.num_beams = max_length, False, 1
    generation.suppress_tokens = [PAD, BOS]
    return model.eval(), build_image_processor(image_size), tokenizer


# ----------------------------------------------------------------------------- data


def load_captioned_images(images_dir, captions_json, image_processor, *, progress: bool = True):
    """The images of a COCO captions file and their captions: ``(image_ids [N], pixel_values
    [N, 3, S, S] float32 from image_processor, captions [N] lists of str)``, in the file's image
    order; images without captions are left out. ValueError naming the file (and image id) for a
    missing or unreadable file or image, or a file without captions."""
    from PIL import Image, UnidentifiedImageError

    images_dir, captions_json = os.fspath(images_dir), os.fspath(captions_json)
    coco = read_coco_file(captions_json)
    if not os.path.isdir(images_dir):
        raise DataError(f"images_dir: {images_dir} is not a folder")
    captions = {image_id: [ann["caption"] for ann in anns] for image_id, anns in coco.captions_by_image().items()}
    files = {image_id: coco.file_name(image_id) for image_id in coco.images}
    image_ids = [i for i in files if captions.get(i)]
    if not image_ids:
        raise DataError(f"{captions_json}: no captioned images")
    pixels, chunk = [], 256
    bar = progress_bar(total=len(image_ids), unit="img", desc="load images", enabled=progress)
    try:
        for start in range(0, len(image_ids), chunk):
            batch = []
            for image_id in image_ids[start:start + chunk]:
                path = os.path.join(images_dir, files[image_id])
                try:
                    with Image.open(path) as im:
                        batch.append(im.convert("RGB"))
                except (OSError, UnidentifiedImageError) as err:
                    raise DataError(f"{path}: image {image_id} of {captions_json} is missing or unreadable "
                                     f"({err})") from None
            pixels.append(image_processor(images=batch, return_tensors="pt")["pixel_values"].float())
            bar.update(len(batch))
    finally:
        bar.close()
    return image_ids, torch.cat(pixels), [captions[i] for i in image_ids]


def _labels(captions: list, tokenizer, max_length: int):
    """Per image the ``[k, T]`` label rows of its captions (tokens then [EOS], padded with -100,
    cut to ``max_length``) and how many captions were cut."""
    out, cut = [], 0
    for texts in captions:
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        cut += sum(len(row) > max_length for row in ids)
        ids = [row[:max_length] for row in ids]
        width = max(len(row) for row in ids)
        out.append(torch.tensor([row + [-100] * (width - len(row)) for row in ids], dtype=torch.long))
    return out, cut


def _batch_labels(rows: list) -> torch.Tensor:
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=-100) for r in rows])


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, steps: int) -> float:
    """Warm-up over the first 10 % of steps (at most 100), then linear decay to 0.1."""
    warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup)


def train_tiny_captioner(images_dir, captions_json, out_dir, *, steps: int = 1000, batch_size: int = 16,
                         lr: float = 2e-3, seed: int = 0, progress: bool = True, **sizes) -> dict:
    """Train :func:`build_tiny_captioner` (``sizes``: any of its keyword sizes, defaults
    :data:`DEFAULT_SIZES`) from random init on ``captions_json`` and its images in ``images_dir``
    for ``steps`` steps of ``batch_size`` images (each with all its captions) at peak learning
    rate ``lr``, and save it in ``out_dir`` (absent, empty, or a folder this function wrote,
    which is replaced whole once the new one is complete). Returns the summary also written to
    ``out_dir/train_log.json`` (which adds the per-step losses): options, sizes, counts,
    ``first_loss``, ``final_loss`` (mean of the last 10 % of steps), ``seconds``,
    ``seconds_per_step``. ValueError naming the argument or file for bad input, before training."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise UsageError(f"lr must be a number > 0, got {lr!r}")
    sizes = check_sizes(**sizes)
    out_dir = os.fspath(out_dir)
    check_out_dir(out_dir, marker=TRAIN_LOG, kind="geocap hf-train-tiny model folder", verb="replace")
    started = time.perf_counter()
    image_ids, pixels, captions = load_captioned_images(images_dir, captions_json,
                                                        build_image_processor(sizes["image_size"]), progress=progress)
    model, processor, tokenizer = build_tiny_captioner(caption_words(t for c in captions for t in c), seed=seed,
                                                       **sizes)
    labels, cut = _labels(captions, tokenizer, sizes["max_length"])

    losses = []
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(image_ids), generator=generator), 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    train_started = time.perf_counter()
    model.train()
    bar = progress_bar(total=steps, unit="step", desc="hf-train-tiny", enabled=progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)                  # dropout draws
        try:
            for step in range(steps):
                stop.check()
                chosen = []
                while len(chosen) < min(batch_size, len(image_ids)):
                    if position == len(order):
                        order, position = torch.randperm(len(image_ids), generator=generator), 0
                    chosen.append(int(order[position]))
                    position += 1
                counts = torch.tensor([labels[i].shape[0] for i in chosen])
                encoded = model.encoder(pixel_values=pixels[chosen], return_dict=True).last_hidden_state
                targets = _batch_labels([labels[i] for i in chosen])
                # decoder input t (start token, then the caption) is real where label t is
                out = model(encoder_outputs=(encoded.repeat_interleave(counts, dim=0),), labels=targets,
                            decoder_attention_mask=(targets != -100).long(), return_dict=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(out.loss.detach().item())
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix_str(f"loss {losses[-1]:.3f}")
        finally:
            bar.close()
    model.eval()
    train_seconds = time.perf_counter() - train_started
    tail = losses[-max(1, steps // 10):]
    summary = {"format": "geocap-hf-tiny-train-log", "format_version": 1,
               "images_dir": os.path.abspath(os.fspath(images_dir)),
               "captions_json": os.path.abspath(os.fspath(captions_json)),
               "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "sizes": sizes,
               "images": len(image_ids), "captions": sum(len(c) for c in captions), "captions_cut": cut,
               "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
               "torch_threads": torch.get_num_threads(), "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
               "train_seconds": train_seconds, "seconds_per_step": train_seconds / steps,
               "seconds": time.perf_counter() - started}
    _save(out_dir, model, processor, tokenizer, dict(summary, loss=losses), progress=progress)
    summary["out_dir"] = out_dir
    return summary


def _save(out_dir: str, model, processor, tokenizer, log: dict, *, progress: bool) -> None:
    """Model, tokenizer, processor and ``train_log.json`` (last) into a temporary folder beside
    ``out_dir``, then swapped into place; the temporary folder is removed on any failure.
    ``progress=False`` also silences transformers' own bar while saving."""
    hf_logging = import_transformers().utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        _save_folder(out_dir, model, processor, tokenizer, log)
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()


def _save_folder(out_dir: str, model, processor, tokenizer, log: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    remove_stale_temporary_folders(out_dir)         # what killed runs left
    tmp = temporary_folder(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_text_atomic(os.path.join(tmp, TRAIN_LOG), json.dumps(log, indent=1) + "\n")
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
