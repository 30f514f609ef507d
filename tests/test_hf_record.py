"""geocap.hf: records of Hugging Face captioners (tiny random models built here, no download)."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")

from geocap.analysis import StatsCollector  # noqa: E402
from geocap.hf import PatchGrid, UnsupportedModel, record_captions  # noqa: E402
from geocap.hf.models import import_transformers  # noqa: E402
from geocap.kernels import attention_entropy  # noqa: E402

transformers = import_transformers()

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64)
START, EOS = 1, 2


def vision_encoder_decoder(attention="eager"):
    torch.manual_seed(0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(**TINY_VIT),
        # untied output layer: tied to random embeddings, the tiny decoder only repeats its input
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, add_cross_attention=True,
                                tie_word_embeddings=False, bos_token_id=START, eos_token_id=EOS))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, 0, EOS
    return transformers.VisionEncoderDecoderModel._from_config(config, attn_implementation=attention).eval()


def blip(attention="eager"):
    torch.manual_seed(0)
    config = transformers.BlipConfig(
        vision_config=TINY_VIT,
        text_config=dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, encoder_hidden_size=32, bos_token_id=START, sep_token_id=EOS,
                         eos_token_id=EOS, pad_token_id=0))
    return transformers.BlipForConditionalGeneration._from_config(config, attn_implementation=attention).eval()


MODELS = {"VisionEncoderDecoderModel": vision_encoder_decoder, "BlipForConditionalGeneration": blip}
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
CAPTIONS = [[[3, 4, 5], [6, 7, 8, 9, EOS]], [[10, 11]]]


def own_attention(model, pixels, ids):
    """The model's own maps for one image and one caption (ids ending with <eos>), each
    ``[L, H, ...]`` float32, and the encoder's hidden states: from its public forward calls."""
    inputs = torch.tensor([[START] + ids[:-1]])
    with torch.no_grad():
        if isinstance(model, transformers.VisionEncoderDecoderModel):
            out = model(pixel_values=pixels, decoder_input_ids=inputs, output_attentions=True)
            encoder, decoder, cross = out.encoder_attentions, out.decoder_attentions, out.cross_attentions
            hidden = out.encoder_last_hidden_state
        else:
            out = model(pixel_values=pixels, input_ids=inputs, output_attentions=True)
            text = model.text_decoder(input_ids=inputs, encoder_hidden_states=out.last_hidden_state,
                                      output_attentions=True)
            encoder, hidden = out.attentions, out.last_hidden_state
            decoder, cross = text.attentions, text.cross_attentions
    stack = lambda maps: torch.stack([m[0] for m in maps])  # noqa: E731
    return {"encoder_self": stack(encoder), "decoder_self": stack(decoder), "cross": stack(cross)}, hidden[0]


@pytest.mark.parametrize("name", MODELS)
def test_maps_entropies_and_features_are_the_models_own(name):
    model = MODELS[name]()
    records = record_captions(model, PIXELS, image_ids=[7, 8], captions=CAPTIONS)
    assert [[r.caption_id for r in image] for image in records] == [[0, 1], [0]]
    for b, image in enumerate(records):
        for record, caption in zip(image, CAPTIONS[b]):
            ids = caption if caption[-1] == EOS else caption + [EOS]
            assert record.extra["token_ids"] == ids and record.tokens[-1] == "<eos>"
            assert record.image_id == 7 + b and record.kind == "reference"
            maps, hidden = own_attention(model, PIXELS[b:b + 1], ids)
            assert maps["encoder_self"].shape == (2, 2, 17, 17) and maps["cross"].shape == (2, 2, len(ids), 17)
            for name_, entropy_name in (("encoder_self", "encoder_entropy"), ("decoder_self", "decoder_entropy"),
                                        ("cross", "cross_entropy")):
                recorded = getattr(record, name_)
                assert recorded.dtype == np.float16
                assert torch.equal(torch.from_numpy(recorded), maps[name_].half()), name_
                assert np.array_equal(getattr(record, entropy_name), attention_entropy(maps[name_]).numpy())
            assert np.array_equal(record.features, hidden.numpy())
            record.validate()


@pytest.mark.parametrize("name", MODELS)
def test_generated_records_are_generates_tokens(name):
    model = MODELS[name]()
    options = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        free = model.generate(pixel_values=PIXELS[:1], **options)[0].tolist()
    assert len(free) == 7 and EOS not in free[1:] and free[3] not in free[:3]   # the seeds give this
    # cut at max_new_tokens (no <eos>), then stopped by making the caption's third token the end token
    for eos, expected in ((EOS, free[1:]), (free[3], free[1:4])):
        model.generation_config.eos_token_id = eos
        if name == "BlipForConditionalGeneration":
            model.config.text_config.sep_token_id = eos
        with torch.no_grad():
            sequence = model.generate(pixel_values=PIXELS[:1], **options)[0].tolist()
        assert sequence[1:] == expected
        (record,) = record_captions(model, PIXELS[:1], image_ids=[3], generate=True, generate_kwargs=options)[0]
        assert record.kind == "generated" and record.caption_id == -1
        assert record.extra["token_ids"] == expected
        assert (record.tokens[-1] == "<eos>") == (eos != EOS)
        maps, _ = own_attention(model, PIXELS[:1], expected)
        assert torch.equal(torch.from_numpy(record.cross), maps["cross"].half())


def test_patch_boxes_tile_the_image_and_special_tokens_are_flagged():
    for grid in (PatchGrid(4, 4, 1), PatchGrid(3, 5, 0), PatchGrid(2, 7, 5)):
        boxes = grid.boxes().astype(np.float64)
        assert boxes.shape == (grid.num_tokens, 4) and grid.special == list(range(grid.prefix))
        assert (boxes[:grid.prefix] == [0, 0, 1, 1]).all()
        patches = boxes[grid.prefix:]
        assert patches.min() == 0 and patches.max() == 1 and (patches[:, 2:] > patches[:, :2]).all()
        x1, y1, x2, y2 = patches.T
        overlap_w = np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None])
        overlap_h = np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None])
        overlap = np.clip(overlap_w, 0, None) * np.clip(overlap_h, 0, None)
        np.fill_diagonal(overlap, 0)
        assert (overlap == 0).all()
        assert np.isclose(((x2 - x1) * (y2 - y1)).sum(), 1.0, rtol=0, atol=1e-12)
        # neighbours share their edge exactly (float32), row-major from the top left
        cells = patches.reshape(grid.rows, grid.cols, 4)
        assert (cells[:, 1:, 0] == cells[:, :-1, 2]).all() and (cells[1:, :, 1] == cells[:-1, :, 3]).all()
        assert (cells[0, 0] == np.float32([0, 0, 1 / grid.cols, 1 / grid.rows])).all()


@pytest.mark.parametrize("name", MODELS)
def test_records_carry_the_class_token_flag_and_pass_the_analyses(name):
    records = record_captions(MODELS[name](), PIXELS, image_ids=[1, 2], captions=CAPTIONS, generate=True,
                              generate_kwargs=dict(max_new_tokens=4, do_sample=False))
    collector = StatsCollector(reservoir=100)
    for record in (r for image in records for r in image):
        assert record.extra["special_objects"] == [0] and record.extra["patch_grid"] == [4, 4]
        assert (record.boxes[0] == [0, 0, 1, 1]).all() and record.num_objects == 17
        assert record.extra["width"] == record.extra["height"] == 32
        collector.update(record)
    assert collector.records == 5
    assert "entropy" in collector.to_json()


def test_unsupported_model_names_its_class_and_the_supported_ones():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).eval()
    supported = "VisionEncoderDecoderModel, BlipForConditionalGeneration"
    with pytest.raises(UnsupportedModel, match=f"GPT2LMHeadModel is not supported.*supported: {supported}"):
        record_captions(model, PIXELS, image_ids=[1, 2], captions=CAPTIONS)


def test_a_model_that_returns_no_maps_is_told_to_use_eager_attention():
    # with SDPA attention, transformers returns empty tuples of maps (BLIP has no SDPA path at all)
    model = vision_encoder_decoder(attention="sdpa")
    with pytest.raises(ValueError, match="VisionEncoderDecoderModel returned no encoder attention maps: "
                                         ".*attn_implementation='eager'"):
        record_captions(model, PIXELS[:1], image_ids=[1], captions=[[[3]]])


def test_bad_input_is_a_clear_error():
    model = vision_encoder_decoder()
    with pytest.raises(ValueError, match="caption 0 of image 9: token id 50 is outside the vocabulary"):
        record_captions(model, PIXELS[:1], image_ids=[9], captions=[[[3, 50]]])
    with pytest.raises(ValueError, match="caption 0 of image 9 is text: pass tokenizer="):
        record_captions(model, PIXELS[:1], image_ids=[9], captions=[["a cat"]])
    with pytest.raises(ValueError, match="image_ids must hold one id per image"):
        record_captions(model, PIXELS, image_ids=[9], captions=CAPTIONS)
    with pytest.raises(ValueError, match=r"what must be .*got 'cross'"):
        record_captions(model, PIXELS, image_ids=[1, 2], captions=CAPTIONS, what="cross")
    with pytest.raises(ValueError, match="training mode"):
        record_captions(model.train(), PIXELS, image_ids=[1, 2], captions=CAPTIONS)


def word_tokenizer():
    """A word-level tokenizer over the tiny decoder's 50 ids, built here: "[BOS]" = START,
    "[EOS]" = EOS, "a" = 3, "dog" = 4, "w5".."w49" the rest."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["[PAD]", "[BOS]", "[EOS]", "a", "dog"] + [f"w{i}" for i in range(5, 50)]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # like BERT's (BLIP's) tokenizer, it wraps text in special tokens unless told not to
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                             special_tokens=[("[BOS]", START), ("[EOS]", EOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="[BOS]", eos_token="[EOS]",
                                                pad_token="[PAD]")


def test_text_captions_and_token_strings_come_from_the_tokenizer():
    model, tokenizer = vision_encoder_decoder(), word_tokenizer()
    (text, ids), = record_captions(model, PIXELS[:1], image_ids=[4], captions=[["a dog w7", [3, 4, 7]]],
                                   tokenizer=tokenizer)
    assert text.tokens == ids.tokens == ["a", "dog", "w7", "<eos>"]
    assert text.extra["token_ids"] == ids.extra["token_ids"] == [3, 4, 7, EOS]
    assert np.array_equal(text.cross, ids.cross) and np.array_equal(text.decoder_entropy, ids.decoder_entropy)


def test_geocap_imports_no_transformers_until_a_model_is_recorded():
    import subprocess
    import sys
    code = ("import sys, geocap.cli, geocap.analysis, geocap.dump, geocap.hf; "
            "print(sorted(m for m in ('transformers', 'kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
