"""Bytes per image of Hugging Face dumps, whole encoder maps against the compact options.

A random-weight ViT-base (224 px, 16 px patches: 197 tokens, 12 layers x 12 heads) + 6-layer
GPT-2 captioner is built from its configs and saved in a temporary folder (no download); each
of ``--images`` random images is dumped in generated mode (captions of ``--max-len`` tokens, lzf)
with whole maps, ``--maps decoder,cross`` and ``--encoder-top-k K`` for each K given. Prints
one JSON line per variant: MiB per image of the shard files and, for top-k, the most weight an
encoder row lost. Random weights attend diffusely, so their loss is near the worst case; a
trained encoder's peaked rows lose less.

    python bench/hf_dump_sizes.py [--images 4] [--max-len 12] [--top-k 16 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _save_model(folder: str) -> None:
    import torch
    from test_hf_dump import word_tokenizer

    from geocap.hf.models import import_transformers

    transformers = import_transformers()
    torch.manual_seed(0)
    tok = word_tokenizer()
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(),         # ViT-base: 224 px, 16 px patches, 12 layers, 12 heads, 768 wide
        transformers.GPT2Config(n_layer=6, vocab_size=len(tok), add_cross_attention=True, tie_word_embeddings=False,
                                bos_token_id=1, eos_token_id=2))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel._from_config(config, attn_implementation="eager").eval()
    generation = model.generation_config
    generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id = 1, 2, 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.ViTImageProcessor().save_pretrained(folder)


def _write_images(folder: str, n: int) -> None:
    from PIL import Image

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(os.path.join(folder, f"{k}.png"))


def _mib_per_image(out: str, images: int) -> float:
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".h5"))
    return size / images / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=12)
    parser.add_argument("--top-k", type=int, nargs="*", default=[16, 32])
    args = parser.parse_args(argv)
    from geocap.data.dump_format import open_dump
    from geocap.hf.dump import dump_hf

    with tempfile.TemporaryDirectory() as root:
        _save_model(os.path.join(root, "model"))
        _write_images(os.path.join(root, "images"), args.images)
        variants = [("whole maps", {}), ("--maps decoder,cross", {"maps": "decoder,cross"})]
        variants += [(f"--encoder-top-k {k}", {"encoder_top_k": k}) for k in args.top_k]
        for name, options in variants:
            out = os.path.join(root, f"dump{len(os.listdir(root))}")
            dump_hf(os.path.join(root, "model"), os.path.join(root, "images"), out, mode="generated",
                    max_len=args.max_len, beam_size=1, progress=False, **options)
            row = {"variant": name, "images": args.images, "mib_per_image": round(_mib_per_image(out, args.images), 3)}
            if "encoder_top_k" in options:
                row["max_row_weight_lost"] = round(open_dump(out, progress=False).encoder_missing(), 4)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
