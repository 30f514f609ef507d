"""geocap dump --hf: a tiny randomly initialised Hugging Face captioner (saved here, no download)
through dump, analyze and view, end to end; its records equal the model's own maps."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")

from geocap.analysis import StatsCollector, collect  # noqa: E402
from geocap.data.attention_record import referent_objects, regular_objects  # noqa: E402
from geocap.data.dump_format import open_dump  # noqa: E402
from geocap.dump.job import DumpOptions  # noqa: E402
from geocap.hf import PatchGrid, record_captions  # noqa: E402
from geocap.hf.dump import dump_hf, load_captioner  # noqa: E402
from geocap.hf.models import import_transformers  # noqa: E402
from geocap.hf.referents import CategoryWords, category_regions, word_starts  # noqa: E402

transformers = import_transformers()

WORDS = ["a", "two", "dog", "dogs", "cat", "red", "ball", "on", "the", "left", "of", "traffic", "light", "near"]
SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
CATEGORIES = [{"id": 1, "name": "dog", "supercategory": "animal"}, {"id": 2, "name": "cat", "supercategory": "animal"},
              {"id": 3, "name": "traffic light", "supercategory": "street"}]
CAPTIONS = {7: ["a dog on the left of a cat", "two dogs near a traffic light"], 9: ["a red ball"],
            12: ["a cat near a dog"]}
INSTANCES = {7: [(1, [0, 0, 16, 16]), (2, [20, 20, 12, 12]), (3, [16, 0, 16, 8])], 9: [], 12: [(2, [8, 8, 8, 8])]}


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    core.decoder = decoders.WordPiece(prefix="##")        # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]", unk_token="[UNK]")


def save_tiny_model(folder, tok=None):
    """A tiny random ViT (2 layers, 32 px, 8 px patches) + GPT-2 (3 layers) captioner saved with its
    tokenizer (``tok``, default the word-level one) and image processor."""
    torch.manual_seed(0)
    tok = word_tokenizer() if tok is None else tok
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64),
        transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=len(tok), add_cross_attention=True,
                                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel._from_config(config, attn_implementation="eager").eval()
    model.generation_config.decoder_start_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def write_images(folder, ids=(7, 9, 12)):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id in ids:
        pixels = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)      # 48 wide, 32 high: resized to 32x32
        Image.fromarray(pixels).save(os.path.join(folder, f"img_{image_id:04d}.png"))


def write_coco(folder, ids=(7, 9, 12)):
    images = [{"id": i, "file_name": f"img_{i:04d}.png", "width": 48, "height": 32} for i in ids]
    captions = [{"id": 100 * i + k, "image_id": i, "caption": c} for i in ids for k, c in enumerate(CAPTIONS[i])]
    instances = [{"id": 100 * i + k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                 for i in ids for k, (c, b) in enumerate(INSTANCES[i])]
    for name, payload in (("captions.json", {"images": images, "annotations": captions}),
                          ("instances.json", {"images": images, "annotations": instances, "categories": CATEGORIES})):
        with open(os.path.join(folder, name), "w") as fh:
            json.dump(payload, fh)
    return os.path.join(folder, "captions.json"), os.path.join(folder, "instances.json")


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_tiny_model(root / "model")
    write_images(root / "images")
    captions, instances = write_coco(root)
    return root, captions, instances


def test_word_starts_and_category_matching():
    tok = word_tokenizer()
    ids = tok("two dogs near a traffic light", add_special_tokens=False)["input_ids"] + [2]
    words, starts = word_starts(ids, tok)
    assert words == ["two", "dogs", "near", "a", "traffic", "light"]
    assert starts == [0, 1, 2, 3, 4, 5, -1]            # the end token adds no text
    ids = tok("a zebra near a dog", add_special_tokens=False)["input_ids"]
    assert word_starts(ids, tok) == (["a", "near", "a", "dog"], [0, -1, 1, 2, 3])   # an unknown word adds none
    matcher = CategoryWords({c["id"]: c["name"] for c in CATEGORIES})
    assert matcher.match(["a", "dogs", "near", "a", "traffic", "light", "cat."]) == [(1, 1), (5, 3), (6, 2)]
    assert matcher.match(["light"]) == []            # a multi-word name needs the whole phrase


def test_category_regions_cover_the_box_patches():
    grid = PatchGrid(4, 4, prefix=1)
    regions = category_regions(grid, [(5, (0.0, 0.0, 0.5, 0.5)), (6, (0.9, 0.9, 0.95, 0.95))])
    assert regions[5] == [1, 2, 5, 6]                # the top-left 2x2 patches (after the class token)
    assert regions[6] == [16]                        # a tiny box: the patch holding its centre


def test_hf_dump_records_equal_the_models_own(hf_data, tmp_path):
    root, captions, instances = hf_data
    result = dump_hf(root / "model", root / "images", tmp_path / "dump", captions=captions, instances=instances,
                     shard_images=2, batch_size=2, writer="inline", progress=False)
    assert result.complete and result.dump_images == 3
    dump = open_dump(tmp_path / "dump", progress=False)
    records = list(dump)
    assert [r.image_id for r in records] == [7, 7, 9, 12]
    assert dump.metadata["source"] == "hf" and dump.metadata["mode"] == "teacher-forced"
    model, processor, tok, _ = load_captioner(root / "model")
    from PIL import Image
    pixels = processor(images=[Image.open(root / "images" / "img_0007.png").convert("RGB")],
                       return_tensors="pt")["pixel_values"]
    own = record_captions(model, pixels, image_ids=[7], captions=[CAPTIONS[7]], tokenizer=tok)[0]
    for stored, direct in zip(records[:2], own):
        assert stored.tokens == direct.tokens
        for name in ("encoder_self", "decoder_self", "cross"):
            np.testing.assert_array_equal(getattr(stored, name), getattr(direct, name))
        for name in ("encoder_entropy", "decoder_entropy", "cross_entropy"):
            np.testing.assert_array_equal(getattr(stored, name), getattr(direct, name))
        np.testing.assert_array_equal(stored.boxes, direct.boxes)
        assert stored.extra["special_objects"] == [0] and stored.extra["patch_grid"] == [4, 4]
        assert stored.extra["file_name"] == "img_0007.png"
        assert (stored.extra["width"], stored.extra["height"]) == (48, 32)
    first = records[0]
    # "a dog on the left of a cat <eos>": dog -> region of category 1, cat -> region of category 2
    assert first.referents.tolist() == [-1, 0, -1, -1, -1, -1, -1, 1, -1]
    regions = first.extra["referent_objects"]
    grid = PatchGrid(4, 4, prefix=1)
    expected = category_regions(grid, [(1, (0, 0, 16 / 48, 16 / 32)), (2, (20 / 48, 20 / 32, 32 / 48, 1.0)),
                                       (3, (16 / 48, 0, 32 / 48, 8 / 32))])
    assert regions == [expected[1], expected[2], expected[3]]
    assert records[1].referents.tolist()[1] == 0 and records[1].referents.tolist()[5] == 2   # dogs; traffic light
    assert records[2].referents is not None and (records[2].referents == -1).all()          # no instances in 9
    assert not regular_objects(first)[0] and regular_objects(first)[1:].all()
    assert referent_objects(first, 1).tolist() == expected[2]


def test_hf_dump_analyze_and_view_end_to_end(hf_data, tmp_path):
    root, captions, instances = hf_data
    dump_hf(root / "model", root / "images", tmp_path / "dump", captions=captions, instances=instances,
            progress=False)
    dump = open_dump(tmp_path / "dump", progress=False)
    results = collect(dump, progress=False).results()
    grounding = results["grounding"]
    assert grounding.tokens == 5        # dog, cat; dogs, traffic light; cat (image 12 has no dog)
    records = list(dump)
    hits = np.zeros(3)
    chance = 0.0
    for r in records:
        for t in np.flatnonzero(r.referents >= 0):
            region = set(referent_objects(r, int(r.referents[t])))
            mean = r.cross[:, :, t, 1:].astype(np.float64).mean(axis=1)        # class token left out
            hits += [int(np.argmax(mean[layer]) + 1 in region) for layer in range(3)]
            chance += len(region) / 16
    np.testing.assert_allclose(grounding.accuracy, hits / 5)
    assert grounding.chance == pytest.approx(chance / 5)
    assert results["proximity"].pairs["distance"] == 3 * 16 * 15     # patch pairs only: the class token is in none

    from geocap.view.site import build_site
    build_site(open_dump(tmp_path / "dump", progress=False), tmp_path / "site", images_dir=root / "images",
               metadata=dump.metadata)
    assert (tmp_path / "site" / "index.html").is_file()
    assert sorted(os.listdir(tmp_path / "site" / "images")) == ["12.png", "7.png", "9.png"]


def test_hf_dump_generated_mode_without_captions_and_resume(hf_data, tmp_path):
    root, _, _ = hf_data
    out = tmp_path / "dump"
    first = dump_hf(root / "model", root / "images", out, shard_images=1, max_len=6, beam_size=1, progress=False,
                    writer="inline")
    assert first.complete
    records = list(open_dump(out, progress=False))
    assert [r.kind for r in records] == ["generated"] * 3
    assert [r.image_id for r in records] == [7, 9, 12]              # ids from the file names
    model, processor, tok, _ = load_captioner(root / "model")
    from PIL import Image
    pixels = processor(images=[Image.open(root / "images" / "img_0009.png").convert("RGB")],
                       return_tensors="pt")["pixel_values"]
    ids = model.generate(pixel_values=pixels, num_beams=1, max_new_tokens=6)[0].tolist()[1:]
    assert records[1].tokens == ["<eos>" if i == 2 else tok.convert_ids_to_tokens(i) for i in ids]
    os.remove(out / "shard-00001.h5")
    again = dump_hf(root / "model", root / "images", out, shard_images=1, max_len=6, beam_size=1, progress=False,
                    writer="inline")
    assert again.shards_written == [1] and again.shards_redone == [1]
    with pytest.raises(ValueError, match="max_len"):
        dump_hf(root / "model", root / "images", out, shard_images=1, max_len=5, beam_size=1, progress=False)


def test_hf_dump_bad_input_names_the_argument(hf_data, tmp_path):
    root, captions, _ = hf_data
    with pytest.raises(ValueError, match="teacher-forced needs reference captions"):
        dump_hf(root / "model", root / "images", tmp_path / "a", mode="teacher-forced", progress=False)
    with pytest.raises(ValueError, match="--images: .*no such directory"):
        dump_hf(root / "model", tmp_path / "missing", tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="--hf: .*no config.json"):
        dump_hf(tmp_path, root / "images", tmp_path / "c", progress=False)
    bad = tmp_path / "captions.json"
    payload = json.loads(open(captions).read())
    payload["images"].append({"id": 99, "file_name": "nope.png", "width": 4, "height": 4})
    bad.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="image 99: file .*nope.png .* is missing"):
        dump_hf(root / "model", root / "images", tmp_path / "d", captions=bad, progress=False)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="BertModel is not supported.*VisionEncoderDecoderModel"):
        dump_hf(tmp_path / "cfg", root / "images", tmp_path / "e", progress=False)


def test_hf_dump_stats_only_matches_full_analysis(hf_data, tmp_path):
    root, captions, instances = hf_data
    dump_hf(root / "model", root / "images", tmp_path / "full", captions=captions, instances=instances,
            progress=False, writer="inline")
    dump_hf(root / "model", root / "images", tmp_path / "stats", captions=captions, instances=instances,
            progress=False, writer="inline", stats_only=True, stats_collector=StatsCollector)
    full = collect(open_dump(tmp_path / "full", progress=False), progress=False).results()
    stats = open_dump(tmp_path / "stats", progress=False)
    assert stats.metadata["stats_only"]
    merged = collect(stats, progress=False).results()
    np.testing.assert_allclose(merged["grounding"].accuracy, full["grounding"].accuracy)
    assert merged["grounding"].tokens == full["grounding"].tokens == 5


def test_dump_options_object_is_accepted(hf_data, tmp_path):
    root, captions, _ = hf_data
    result = dump_hf(root / "model", root / "images", tmp_path / "dump", DumpOptions(limit=1, hypothetical=False),
                     captions=captions, progress=False)
    assert result.dump_images == 1


def test_cli_dump_hf_then_analyze_and_view(hf_data, tmp_path, capsys):
    from geocap.cli import main
    root, captions, instances = hf_data
    dump_dir, report, site = tmp_path / "dump", tmp_path / "report", tmp_path / "site"
    assert main(["dump", "--hf", str(root / "model"), "--images", str(root / "images"), "--captions", captions,
                 "--instances", instances, "--out", str(dump_dir), "--no-progress"]) == 0
    assert "dump complete" in capsys.readouterr().out
    assert main(["analyze", str(dump_dir), "--out", str(report), "--no-progress"]) == 0
    analysis = json.loads((report / "analysis.json").read_text())
    assert analysis["grounding"]["tokens"] == 5
    assert main(["view", str(dump_dir), "--out", str(site), "--images", str(root / "images"), "--no-progress"]) == 0
    assert (site / "index.html").is_file()
    assert main(["compare", f"tiny={report}", f"again={report / 'analysis.json'}", "--out",
                 str(tmp_path / "compare.md")]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10000
    accuracy = analysis["grounding"]["accuracy"]
    assert f"| grounding accuracy | again | {accuracy[0]:.1%}" in table and "tiny: chance" in table
    assert main(["compare", str(report)]) == 2
    assert "expected NAME=REPORT_DIR" in capsys.readouterr().err
    assert main(["dump", "--hf", str(root / "model"), "--out", str(tmp_path / "x")]) == 2       # no --images
    assert "needs --images" in capsys.readouterr().err
    assert main(["dump", "--data", str(root), "--out", str(tmp_path / "x")]) == 2
    assert "needs --checkpoint, --split" in capsys.readouterr().err


def test_readme_your_own_model_commands_run_as_written(hf_data, tmp_path):
    """The README's three commands for a saved Hugging Face model, with its placeholders filled in
    (the optional captions and instances files given)."""
    import re
    import shlex
    from pathlib import Path

    from geocap.cli import main
    root, captions, instances = hf_data
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "--hf MODEL_DIR" in b]
    assert len(blocks) == 1
    lines = [line for line in blocks[0].strip().splitlines()]
    assert [line.split()[:2] for line in lines] == [["geocap", "dump"], ["geocap", "analyze"], ["geocap", "view"]]
    values = {"MODEL_DIR": root / "model", "IMAGES": root / "images", "DUMP": tmp_path / "dump",
              "REPORT": tmp_path / "report", "VIEW": tmp_path / "view", "captions.json": captions,
              "instances.json": instances}
    for line in lines:
        words = shlex.split(line.replace("[", "").replace("]", ""))
        args = [str(values.get(w, w)) for w in words[1:]]
        assert main(args + ["--no-progress"]) == 0, line
    assert json.loads((tmp_path / "report" / "analysis.json").read_text())["grounding"]["tokens"] == 5
    assert (tmp_path / "view" / "index.html").is_file()


def test_hf_dump_shares_shards_among_ranks(hf_data, tmp_path):
    """Two ranks (as under torchrun) write alternate shards of one dump; together they equal one rank's."""
    root, captions, instances = hf_data
    kw = dict(captions=captions, instances=instances, shard_images=1, writer="inline", progress=False)
    rank0 = dump_hf(root / "model", root / "images", tmp_path / "two", rank=0, world_size=2, **kw)
    assert rank0.shards_written == [0, 2] and not rank0.complete
    rank1 = dump_hf(root / "model", root / "images", tmp_path / "two", rank=1, world_size=2, **kw)
    assert rank1.shards_written == [1] and rank1.complete
    dump_hf(root / "model", root / "images", tmp_path / "one", **kw)
    two, one = list(open_dump(tmp_path / "two", progress=False)), list(open_dump(tmp_path / "one", progress=False))
    assert [(r.image_id, r.tokens) for r in two] == [(r.image_id, r.tokens) for r in one]
    for a, b in zip(two, one):
        np.testing.assert_array_equal(a.cross, b.cross)
        assert a.extra == b.extra


def save_tiny_blip(folder):
    """A tiny random BlipForConditionalGeneration with a BERT word-piece tokenizer and BLIP's image
    processor, saved as a user's folder would be."""
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS
    if int(transformers.__version__.split(".")[0]) >= 5:        # transformers 5 takes the vocabulary itself
        tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    else:
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(0)
    config = transformers.BlipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64),
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, encoder_hidden_size=32, bos_token_id=5, sep_token_id=3,
                         eos_token_id=3, pad_token_id=0))
    model = transformers.BlipForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def test_hf_dump_of_a_blip_model(hf_data, tmp_path):
    root, captions, instances = hf_data
    save_tiny_blip(tmp_path / "blip")
    result = dump_hf(tmp_path / "blip", root / "images", tmp_path / "dump", captions=captions, instances=instances,
                     writer="inline", progress=False)
    assert result.complete
    dump = open_dump(tmp_path / "dump", progress=False)
    assert dump.metadata["model_class"] == "BlipForConditionalGeneration"
    first = dump[0]
    assert first.tokens == ["a", "dog", "on", "the", "left", "of", "a", "cat", "<eos>"]
    assert first.referents.tolist() == [-1, 0, -1, -1, -1, -1, -1, 1, -1]
    assert first.extra["special_objects"] == [0] and first.cross.shape == (2, 2, 9, 17)


def test_generated_mode_follows_the_models_generation_config(hf_data, tmp_path, capfd):
    """Without --beam-size / --max-len the caption is the model's plain generate() under its saved
    generation_config (here 2 beams, at most 5 tokens); with them, those override it; no warning."""
    import shutil
    root, _, _ = hf_data
    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update(num_beams=2, max_length=5)
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    model, processor, tok, _ = load_captioner(model_dir)
    from PIL import Image
    pixels = processor(images=[Image.open(root / "images" / f"img_{i:04d}.png").convert("RGB") for i in (7, 9, 12)],
                       return_tensors="pt")["pixel_values"]
    capfd.readouterr()
    for options, kwargs in (({}, {}), ({"beam_size": 1, "max_len": 7}, {"num_beams": 1, "max_new_tokens": 7})):
        out = tmp_path / f"dump{len(options)}"
        dump_hf(model_dir, root / "images", out, progress=False, writer="inline", **options)
        records = list(open_dump(out, progress=False))
        assert open_dump(out, progress=False).metadata["beam_size"] == options.get("beam_size")
        with torch.no_grad():
            own = [model.generate(pixel_values=pixels[b:b + 1], **kwargs)[0].tolist()[1:] for b in range(3)]
        assert [len(ids) for ids in own] == ([4, 4, 4] if not options else [7, 7, 7])    # the limits applied
        assert [r.tokens for r in records] == [["<eos>" if i == 2 else tok.convert_ids_to_tokens(i) for i in ids]
                                               for ids in own]
        assert "max_new_tokens" not in capfd.readouterr().err          # no transformers warning per image


def test_encoder_entropies_without_its_maps(hf_data, tmp_path):
    """--maps decoder,cross: the encoder's entropies are kept, its N x N maps are not (the bulk of a
    patch captioner's dump); everything else as in the full dump."""
    root, captions, instances = hf_data
    kw = dict(captions=captions, instances=instances, writer="inline", progress=False)
    full = dump_hf(root / "model", root / "images", tmp_path / "full", **kw)
    lean = dump_hf(root / "model", root / "images", tmp_path / "lean", maps="decoder,cross", **kw)
    dump = open_dump(tmp_path / "lean", progress=False)
    assert dump.metadata["maps"] == ["decoder_self", "cross"] and dump.metadata["what"] == ["encoder", "decoder",
                                                                                             "cross"]
    for a, b in zip(dump, open_dump(tmp_path / "full", progress=False)):
        assert a.encoder_self is None and b.encoder_self is not None
        np.testing.assert_array_equal(a.encoder_entropy, b.encoder_entropy)
        np.testing.assert_array_equal(a.cross, b.cross)
    assert lean.dump_bytes < full.dump_bytes
    results = collect(dump, progress=False).results()
    assert results["grounding"].tokens == 5
    with pytest.raises(ValueError, match=r"maps \(encoder\) must be among what \(decoder,cross\)"):
        dump_hf(root / "model", root / "images", tmp_path / "bad", what="decoder,cross", maps="encoder", **kw)
