"""geocap dump --hf on odd input: each a clear error naming what is wrong (or, with --on-error skip,
a bad image left out, listed and counted), and a dump stopped by a bad image resumable once the
image is removed."""
import json
import os
import shutil
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")

from test_hf_dump import hf_data, write_images  # noqa: E402,F401  (its fixture: the tiny model, images, COCO)

from geocap.data.dump_format import open_dump, read_manifest  # noqa: E402
from geocap.hf import UnsupportedModel, record_captions  # noqa: E402
from geocap.hf.dump import dump_hf  # noqa: E402
from geocap.hf.models import import_transformers  # noqa: E402

transformers = import_transformers()


def test_a_swin_encoder_is_unsupported_not_a_crash(tmp_path, hf_data):
    root, _, _ = hf_data
    encoder = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                      window_size=4)
    decoder = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=18, add_cross_attention=True,
                                      bos_token_id=1, eos_token_id=2)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel._from_config(config, attn_implementation="eager").eval()
    said = r"image encoder SwinConfig \(swin\) is not supported by geocap.hf: its num_attention_heads is \[1, 2\]"
    with pytest.raises(UnsupportedModel, match=said):
        record_captions(model, torch.zeros(1, 3, 32, 32), image_ids=[1], captions=[[[3]]])
    folder = tmp_path / "swin"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(root / "model" / name, folder / name)
    with pytest.raises(UnsupportedModel, match=said):
        dump_hf(folder, root / "images", tmp_path / "dump", progress=False)
    assert not (tmp_path / "dump" / "manifest.json").exists()


def _captions(root, tmp_path, edit):
    payload = json.loads((root / "captions.json").read_text())
    edit(payload)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(payload))
    return path


def test_captions_without_text_name_the_image_and_the_file(hf_data, tmp_path):
    root, _, _ = hf_data

    def blank(payload):
        payload["annotations"][2]["caption"] = "  "
    with pytest.raises(ValueError, match=r"--captions: .*captions.json: annotation 900 of image 9 \(img_0009.png\) "
                                         r"has no caption text"):
        dump_hf(root / "model", root / "images", tmp_path / "a", captions=_captions(root, tmp_path, blank),
                progress=False)

    def bare(payload):
        payload["annotations"] = [a for a in payload["annotations"] if a["image_id"] != 9]
    captions = _captions(root, tmp_path, bare)
    with pytest.raises(ValueError, match=r"--captions: .*captions.json: image 9 \(img_0009.png\) has no caption"):
        dump_hf(root / "model", root / "images", tmp_path / "b", captions=captions, progress=False)
    assert not (tmp_path / "b").exists()
    generated = dump_hf(root / "model", root / "images", tmp_path / "c", captions=captions, mode="generated",
                        max_len=2, progress=False, writer="inline")
    assert generated.complete and generated.dump_images == 3           # generated mode needs no reference


def test_image_files_the_captions_file_leaves_out_are_counted(hf_data, tmp_path, capsys):
    from geocap.cli import main
    root, _, _ = hf_data

    def two(payload):
        payload["images"] = [i for i in payload["images"] if i["id"] != 12]
        payload["annotations"] = [a for a in payload["annotations"] if a["image_id"] != 12]
    captions = _captions(root, tmp_path, two)
    assert main(["dump", "--hf", str(root / "model"), "--images", str(root / "images"), "--captions", str(captions),
                 "--out", str(tmp_path / "dump"), "--no-progress", "--writer", "inline"]) == 0
    out = capsys.readouterr().out
    assert "1 image files of " in out and "are not in the captions file's images (first: img_0012.png): left out" \
        in out


def test_a_missing_tokenizer_or_processor_is_named(hf_data, tmp_path):
    root, _, _ = hf_data
    for gone, said in ((("tokenizer.json", "tokenizer_config.json"), "no tokenizer saved there"),
                       (("preprocessor_config.json",), "no image processor saved there")):
        folder = tmp_path / gone[0]
        shutil.copytree(root / "model", folder)
        for name in gone:
            os.remove(folder / name)
        with pytest.raises(ValueError, match=f"--hf: .*{gone[0]}: {said} .*save_pretrained"):
            dump_hf(folder, root / "images", tmp_path / "dump", progress=False)


def _images_with_a_bad_one(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, ids=(7, 9, 12))
    (folder / "img_0003.png").write_bytes(b"not a png")        # the first image: it stops the first shard
    return folder


def test_a_dump_stopped_by_a_bad_image_resumes_once_it_is_removed(hf_data, tmp_path):
    root, _, _ = hf_data
    images = _images_with_a_bad_one(tmp_path)
    kw = dict(shard_images=2, max_len=2, progress=False, writer="inline")
    with pytest.raises(ValueError, match=r"image 3: cannot read .*img_0003.png"):
        dump_hf(root / "model", images, tmp_path / "dump", **kw)
    assert read_manifest(str(tmp_path / "dump"))["shards"] == []
    os.remove(images / "img_0003.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dump_hf(root / "model", images, tmp_path / "dump", **kw)
    assert any("no shard of the earlier run finished; starting afresh" in str(w.message) for w in caught)
    assert result.complete and result.dump_images == 3
    assert [r.image_id for r in open_dump(tmp_path / "dump", progress=False)] == [7, 9, 12]
    # once a shard is finished, the settings are fixed: other images are another dump
    write_images(images, ids=(20,))
    with pytest.raises(ValueError, match="other settings"):
        dump_hf(root / "model", images, tmp_path / "dump", **kw)


def test_on_error_skip_lists_and_counts_the_bad_image(hf_data, tmp_path, capsys):
    from geocap.cli import main
    root, _, _ = hf_data
    images = _images_with_a_bad_one(tmp_path)
    assert main(["dump", "--hf", str(root / "model"), "--images", str(images), "--out", str(tmp_path / "dump"),
                 "--shard-images", "2", "--max-len", "2", "--on-error", "skip", "--writer", "inline",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 images skipped (unreadable or refused" in out and "dump complete" in out and ": 3 images" in out
    assert "wrote 2 shards (3 images" in out
    skipped = read_manifest(str(tmp_path / "dump"))["skipped_images"]
    assert list(skipped) == ["3"] and skipped["3"]["file"] == "img_0003.png" and skipped["3"]["shard"] == 0
    assert "image 3: cannot read" in skipped["3"]["reason"]
    assert [r.image_id for r in open_dump(tmp_path / "dump", progress=False)] == [7, 9, 12]
    assert main(["dump", "--hf", str(root / "model"), "--images", str(images), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 2                                  # the default stops, naming the image
    assert "image 3: cannot read" in capsys.readouterr().err
