"""geocap.hf.tiny (``geocap hf-train-tiny``): a tiny VisionEncoderDecoderModel built here and trained
from random init on rendered synthetic scenes; its folder loads offline and records with
geocap.hf.record_captions. Tiny sizes (32-pixel images, width 32, one layer) keep it to seconds."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")
pytest.importorskip("tokenizers", reason="geocap.hf.tiny builds its tokenizer with tokenizers")

from geocap.cli import main  # noqa: E402
from geocap.data.synth import generate_synthetic, render_images  # noqa: E402
from geocap.hf import record_captions  # noqa: E402
from geocap.hf.models import import_transformers  # noqa: E402
from geocap.hf.tiny import (BOS, EOS, PAD, UNK, build_tiny_captioner, caption_words,  # noqa: E402
                            train_tiny_captioner)

transformers = import_transformers()
SIZES = dict(image_size=32, patch_size=8, d_model=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four synthetic scenes rendered at longer side 48: (images dir, captions JSON)."""
    root = tmp_path_factory.mktemp("tiny")
    generate_synthetic(root / "data", images=4, seed=0, feature_dim=8, progress=False)
    render_images(root / "data", root / "rendered", size=48, progress=False)
    return root / "rendered" / "images", root / "rendered" / "captions_all.json"


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    summary = train_tiny_captioner(*scenes, out, steps=60, batch_size=4, lr=1e-2, seed=0, progress=False, **SIZES)
    return out, summary


def test_tokenizer_model_and_generation_config_fit_together():
    before = torch.random.get_rng_state()
    model, processor, tok = build_tiny_captioner(["a", "cup", "on", "table", "."], seed=3, **SIZES)
    assert torch.equal(torch.random.get_rng_state(), before)          # the global RNG is left alone
    again, _, _ = build_tiny_captioner(["a", "cup", "on", "table", "."], seed=3, **SIZES)
    other, _, _ = build_tiny_captioner(["a", "cup", "on", "table", "."], seed=4, **SIZES)
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(weights(model), weights(again)) and not torch.equal(weights(model), weights(other))
    assert tok.convert_ids_to_tokens([PAD, BOS, EOS, UNK, 4, 8]) == ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "."]
    assert tok("A cup on a TABLE.")["input_ids"] == [4, 5, 6, 4, 7, 8, EOS]
    assert tok("a dog", add_special_tokens=False)["input_ids"] == [4, UNK]
    assert type(model).__name__ == "VisionEncoderDecoderModel" and not model.training
    assert model.config.decoder_start_token_id == BOS and model.config.decoder.vocab_size == len(tok) == 9
    assert model.config.encoder.patch_size == 8 and model.config.encoder.hidden_size == 32
    assert processor.size == {"height": 32, "width": 32}
    pixels = processor(images=[np.zeros((48, 40, 3), np.uint8)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and torch.all(pixels == -1)
    with torch.no_grad():
        sequence = model.generate(pixel_values=pixels)[0].tolist()
    assert sequence[0] == BOS and len(sequence) <= 32 and not {PAD, BOS} & set(sequence[1:])
    with pytest.raises(ValueError, match=r"image_size \(30\) must be a multiple of patch_size \(8\)"):
        build_tiny_captioner(["a"], image_size=30)
    with pytest.raises(ValueError, match=r"d_model \(30\) must be a multiple of heads \(4\)"):
        build_tiny_captioner(["a"], d_model=30)
    with pytest.raises(ValueError, match="words is empty"):
        build_tiny_captioner([])
    assert caption_words(["A cup.", "a cup on a table."]) == ["a", ".", "cup", "on", "table"]


def test_loss_falls_and_the_folder_loads_offline_and_records(trained, scenes, monkeypatch):
    out, summary = trained
    with open(out / "train_log.json") as f:
        log = json.load(f)
    losses = log["loss"]
    assert len(losses) == 60 and log["steps"] == 60 and log["images"] == 4 and log["captions"] == 20
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses     # four images: it overfits
    assert summary["final_loss"] == pytest.approx(np.mean(losses[-6:]))
    assert not [n for n in os.listdir(out.parent) if n != "tiny"]      # no temporary or old folder left
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.VisionEncoderDecoderModel.from_pretrained(out, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    with open(scenes[1]) as f:
        coco = json.load(f)
    from PIL import Image
    for image in coco["images"]:
        refs = [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        pixels = processor(images=[Image.open(scenes[0] / image["file_name"]).convert("RGB")],
                           return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 32, 32)
        (records,) = record_captions(model, pixels, image_ids=[image["id"]], captions=[refs], tokenizer=tok,
                                     generate=True)
        assert [r.kind for r in records] == ["reference"] * len(refs) + ["generated"]
        words = [r.lower().replace(".", " .").split() + ["<eos>"] for r in refs]
        assert [r.tokens for r in records[:-1]] == words
        assert records[0].cross.shape == (1, 2, len(words[0]), 17) and records[0].encoder_self.shape == (1, 2, 17, 17)
        # overfit on four images with different captions, it writes one of this image's own
        assert records[-1].tokens in words, (records[-1].tokens, words)
        assert records[-1].extra["token_ids"][-1] == EOS


def test_same_seed_same_run_other_seed_another(scenes, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train_tiny_captioner(*scenes, tmp_path / name, steps=4, batch_size=2, seed=seed, progress=False, **SIZES)
        with open(tmp_path / name / "train_log.json") as f:
            runs[name] = json.load(f)["loss"]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bad_input_names_the_argument_or_file(scenes, tmp_path):
    images, captions = scenes
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="nothing.json: COCO captions file missing"):
        train_tiny_captioner(images, tmp_path / "nothing.json", out, steps=1, progress=False)
    with pytest.raises(ValueError, match="images_dir: .* is not a folder"):
        train_tiny_captioner(tmp_path / "none", captions, out, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        train_tiny_captioner(images, captions, out, steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown size argument 'width'"):
        train_tiny_captioner(images, captions, out, steps=1, progress=False, width=3)
    coco = json.loads(captions.read_text())
    coco["images"][1]["file_name"] = "gone.png"
    (tmp_path / "gone.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"gone.png: image {coco['images'][1]['id']} of .*gone.json is missing"):
        train_tiny_captioner(images, tmp_path / "gone.json", out, steps=1, progress=False, **SIZES)
    assert not out.exists()
    (out / "mine").mkdir(parents=True)
    with pytest.raises(ValueError, match="is not empty and is not a geocap hf-train-tiny model folder"):
        train_tiny_captioner(images, captions, out, steps=1, progress=False, **SIZES)


def test_command_line_replaces_its_own_model_folder(scenes, tmp_path, capsys):
    images, captions = scenes
    out = tmp_path / "model"
    args = ["hf-train-tiny", "--images", str(images), "--captions", str(captions), "--out", str(out),
            "--batch-size", "2", "--image-size", "32", "--d-model", "32", "--layers", "1", "--heads", "2",
            "--no-progress"]
    assert main(args + ["--steps", "2"]) == 0
    assert "trained a tiny VisionEncoderDecoderModel" in capsys.readouterr().out
    assert main(args + ["--steps", "3", "--seed", "5"]) == 0
    with open(out / "train_log.json") as f:
        log = json.load(f)
    assert (log["steps"], log["seed"], log["sizes"]["d_model"]) == (3, 5, 32)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert main(args + ["--steps", "0"]) == 2
    assert "steps must be an int >= 1" in capsys.readouterr().err
