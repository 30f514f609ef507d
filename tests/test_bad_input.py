"""Bad input through every public entry point: features of the wrong width for a checkpoint,
boxes not normalised, an empty batch, an unknown word, max_len < 1, beam_size < 1.

Each gives a ValueError naming the argument (never an error from deep inside torch, never a
silent result), except the empty batch, whose answer is chosen per API and documented there:

=========================================  ===============================================
entry point                                B = 0
=========================================  ===============================================
Captioner.caption                          ``[]``
Captioner.log_probs                        ``[0, T + 1, V]``
ObjectRelationTransformer.forward          ``[0, T, V]`` (with return_attention: empty maps)
ObjectRelationTransformer.encode           a Memory of 0 rows (decode_step: ``[0, V]``)
greedy_decode, beam_search, sample         ValueError "memory holds no image"
=========================================  ===============================================
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geocap.captioner import Captioner
from geocap.data.vocab import SPECIALS, UNK, Vocabulary
from geocap.decoding import beam_search, greedy_decode, sample
from geocap.model import ObjectRelationTransformer, ORTConfig

from helpers import random_boxes, synth_data_dir

WORDS = ["a", "man", "dog", "on", "the", "grass", "riding", "horse"]
D, MAX_LEN = 16, 24


def make_captioner(geometry=True) -> Captioner:
    vocab = Vocabulary(list(SPECIALS) + WORDS)
    torch.manual_seed(0)
    config = ORTConfig(vocab_size=len(vocab), feature_dim=D, layers=1, d_model=32, heads=2, d_ff=64, max_len=MAX_LEN,
                       geometry=geometry)
    return Captioner(ObjectRelationTransformer(config).eval(), vocab)


@pytest.fixture(scope="module", params=[True, False], ids=["geometry", "no-geometry"])
def captioner(request):
    return make_captioner(request.param)


def make_inputs(batch=2, n=4):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(batch, n, D, generator=g)
    boxes = random_boxes(batch, n, generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor([n, 2])[:batch, None]
    return features, boxes, mask


def raises_for(name, pattern, call, *args):
    """``call(*args)`` raises a ValueError matching ``pattern``; the failure names the entry point."""
    with pytest.raises(ValueError, match=pattern) as info:
        try:
            call(*args)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - any other error is the bug this file looks for
            pytest.fail(f"{name}: {type(err).__name__} instead of ValueError: {err}")
        else:
            pytest.fail(f"{name}: no error")
    return info


def tokens_for(batch=2):
    return torch.tensor([[4, 5, 6], [7, 8, 0]])[:batch]


def entry_points(captioner):
    """name -> f(features, boxes, mask) through each public way images enter the model."""
    model = captioner.model
    bos_tokens = torch.cat([torch.ones(2, 1, dtype=torch.long), tokens_for()], 1)
    return {
        "Captioner.caption": lambda f, b, m: captioner.caption(f, b, m, beam_size=2, max_len=4),
        "Captioner.log_probs": lambda f, b, m: captioner.log_probs(f, b, tokens_for(f.shape[0]), m),
        "model.forward": lambda f, b, m: model(f, b, m, bos_tokens[:f.shape[0]]),
        "model.forward(record)": lambda f, b, m: model(f, b, m, bos_tokens[:f.shape[0]], return_attention=True),
        "model.encode": lambda f, b, m: model.encode(f, b, m),
    }


# -- 1. features of the wrong width ---------------------------------------------------------------
@pytest.mark.parametrize("width", [D - 1, D + 1, 2048])
def test_wrong_feature_width_names_features_and_the_config(captioner, width):
    features, boxes, mask = make_inputs()
    wrong = torch.randn(2, 4, width)
    for name, call in entry_points(captioner).items():
        raises_for(name, rf"features must have shape \[B, N, {D}\].*feature_dim", call, wrong, boxes, mask)


def test_wrong_feature_width_for_a_loaded_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    make_captioner().save(path)
    loaded = Captioner.load(path, device="cpu")
    _, boxes, mask = make_inputs()
    with pytest.raises(ValueError, match="feature_dim"):
        loaded.caption(torch.randn(2, 4, D * 2), boxes, mask)
    with pytest.raises(ValueError, match="feature_dim"):
        loaded.log_probs(torch.randn(2, 4, D // 2), boxes, tokens_for(), mask)


def test_memory_of_another_model_is_refused():
    """Decoding a Memory encoded by a model of another shape: a ValueError naming memory, not a
    shape error from inside an attention kernel."""
    model = make_captioner().model
    other = ObjectRelationTransformer(ORTConfig(vocab_size=12, feature_dim=D, layers=2, d_model=16, heads=2,
                                                d_ff=32, max_len=MAX_LEN)).eval()
    memory = other.encode(*make_inputs())
    for decode in (lambda: greedy_decode(model, memory, max_len=3), lambda: beam_search(model, memory, max_len=3),
                   lambda: sample(model, memory, max_len=3),
                   lambda: model.decode_step(memory, torch.ones(2, dtype=torch.long))):
        with pytest.raises(ValueError, match="memory does not fit this model"):
            decode()
    with pytest.raises(ValueError, match="memory must be a Memory"):
        model.decode_step(memory.states, torch.ones(2, dtype=torch.long))


# -- 2. boxes not normalised, whatever the model (geometry or not) ---------------------------------
def _bad_boxes(boxes):
    inverted = boxes.clone()
    inverted[0, 1] = torch.tensor([0.6, 0.2, 0.3, 0.5])  # x2 < x1
    nan, inf = boxes.clone(), boxes.clone()
    nan[1, 0, 2] = float("nan")
    inf[0, 3, 3] = float("inf")
    return {"pixels": (boxes * 640, "normalised to \\[0, 1\\]"), "negative": (boxes - 0.5, "normalised"),
            "above 1": (boxes + 1.0, "normalised"), "inverted": (inverted, "x2 >= x1"),
            "nan": (nan, "NaN or inf"), "inf": (inf, "NaN or inf"),
            "3 coordinates": (boxes[..., :3], "boxes must have shape"),
            "too few slots": (boxes[:, :3], "boxes must have shape"),
            "integer pixels": ((boxes * 640).long(), "(dtype|floating point)")}


@pytest.mark.parametrize("case", sorted(_bad_boxes(torch.zeros(2, 4, 4))))
def test_boxes_not_normalised(captioner, case):
    features, boxes, mask = make_inputs()
    bad, message = _bad_boxes(boxes)[case]
    for name, call in entry_points(captioner).items():
        error = raises_for(name, message, call, features, bad, mask)
        assert "boxes" in str(error.value), (name, str(error.value))


def test_padded_slots_may_hold_any_boxes(captioner):
    """Only real slots are checked: junk (even NaN) in padded slots changes nothing."""
    features, boxes, mask = make_inputs()
    junk = boxes.clone()
    junk[1, 2:] = torch.tensor([[float("nan"), 5.0, -3.0, 0.0], [900.0, 10.0, 1.0, 0.0]])
    model = captioner.model
    tokens = torch.cat([torch.ones(2, 1, dtype=torch.long), tokens_for()], 1)
    with torch.no_grad():
        assert torch.equal(model(features, junk, mask, tokens), model(features, boxes, mask, tokens))
    assert captioner.caption(features, junk, mask) == captioner.caption(features, boxes, mask)
    # detectors' rounding slightly past [0, 1] is tolerated (geocap.kernels' BOX_SLACK = 1e-2)
    edge = boxes.clone()
    edge[0, 0] = torch.tensor([-0.005, 0.0, 1.005, 1.0])
    captioner.log_probs(features, edge, tokens_for(), mask)


def test_boxes_may_be_omitted_only_without_geometry():
    features, _, mask = make_inputs()
    tokens = torch.ones(2, 1, dtype=torch.long)
    assert make_captioner(geometry=False).model(features, None, mask, tokens).shape == (2, 1, len(SPECIALS) + 8)
    with pytest.raises(ValueError, match=r"boxes must be a tensor.*geometry"):
        make_captioner(geometry=True).model(features, None, mask, tokens)


# -- 3. an empty batch ----------------------------------------------------------------------------
def test_empty_batch(captioner):
    features, boxes, mask = make_inputs()
    f, b, m = features[:0], boxes[:0], mask[:0]
    model, v = captioner.model, len(captioner.vocab)
    assert captioner.caption(f, b, m) == [] == captioner.caption(f, b, m, beam_size=1)
    assert captioner.caption(f.numpy(), b.numpy()) == []
    assert captioner.log_probs(f, b, torch.zeros(0, 3, dtype=torch.long), m).shape == (0, 4, v)
    tokens = torch.ones(0, 5, dtype=torch.long)
    with torch.no_grad():
        assert model(f, b, m, tokens).shape == (0, 5, v)
        log_probs, record = model(f, b, m, tokens, return_attention=True)
    assert log_probs.shape == (0, 5, v)
    assert record.encoder_probs[0].shape == (0, 2, 4, 4) and record.cross_entropy[0].shape == (0, 2, 5)
    memory = model.encode(f, b, m)
    assert memory.batch_size == 0 and memory.states.shape == (0, 4, 32)
    step, cache = model.decode_step(memory, torch.ones(0, dtype=torch.long))
    assert step.shape == (0, v) and cache.length == 1
    for decode in (greedy_decode, beam_search, sample):
        with pytest.raises(ValueError, match="memory holds no image"):
            decode(model, memory, max_len=3)
    # an empty batch is still checked: the options, the feature width, the boxes' shape
    with pytest.raises(ValueError, match="beam_size"):
        captioner.caption(f, b, m, beam_size=0)
    with pytest.raises(ValueError, match="feature_dim"):
        captioner.caption(torch.zeros(0, 4, D + 1), b, m)
    with pytest.raises(ValueError, match="boxes"):
        model.encode(f, b[..., :2], m)


def test_empty_batch_emits_no_warning(captioner, recwarn):
    """LayerNorm over zero rows would warn from torch's std(); B = 0 and N = 0 are silent."""
    model = captioner.model
    tokens = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        model(torch.zeros(0, 4, D), torch.zeros(0, 4, 4), None, tokens[:0])
        out = model(torch.zeros(2, 0, D), torch.zeros(2, 0, 4), None, tokens)
    assert out.shape == (2, 3, len(captioner.vocab)) and torch.isfinite(out).all()
    assert not [w for w in recwarn if "std" in str(w.message)]


# -- 4. unknown words -----------------------------------------------------------------------------
def test_unknown_word_maps_to_unk_with_the_checkpoint_vocabulary(tmp_path):
    """Words enter through Vocabulary.encode (prepro, and callers scoring a text): with the
    checkpoint's vocabulary an unknown word is <unk> (prepro's documented behaviour), and its id
    is a valid input."""
    path = tmp_path / "model.pt"
    make_captioner().save(path)
    loaded = Captioner.load(path, device="cpu")
    ids = loaded.vocab.encode("a zebra on the grass".split())
    assert ids == [loaded.vocab.index["a"], UNK, loaded.vocab.index["on"], loaded.vocab.index["the"],
                   loaded.vocab.index["grass"]]
    features, boxes, mask = make_inputs(batch=1)
    assert loaded.log_probs(features, boxes, torch.tensor([ids]), mask).shape == (1, 6, len(loaded.vocab))
    assert loaded.vocab.encode(["<eos>", "<bos>", "<pad>"]) == [UNK] * 3  # special spellings are not words


def test_unknown_word_without_unk_names_the_word():
    vocab = Vocabulary(["<eos>", "UNK", *WORDS], pad_id=0, bos_id=0, eos_id=0, unk_id=None)  # ORT's layout
    assert vocab.encode(["a", "man"]) == [2, 3]
    with pytest.raises(ValueError, match="'zebra'"):
        vocab.encode(["a", "zebra"])


@pytest.mark.parametrize("ids", [[[4, 99, 5]], [[4, -1, 5]]], ids=["too large", "negative"])
def test_ids_outside_the_vocabulary_name_tokens(captioner, ids):
    """An id the model has no embedding for: ValueError naming tokens, not an IndexError (or,
    on a GPU, a device-side assert) from inside the embedding."""
    features, boxes, mask = make_inputs(batch=1)
    model = captioner.model
    bad = torch.tensor(ids)
    with pytest.raises(ValueError, match="tokens hold ids .* outside the vocabulary"):
        captioner.log_probs(features, boxes, bad, mask)
    with pytest.raises(ValueError, match="tokens hold ids .* outside the vocabulary"):
        model(features, boxes, mask, bad)
    with pytest.raises(ValueError, match="tokens hold ids .* outside the vocabulary"):
        model.embed_tokens(bad)
    memory = model.encode(features, boxes, mask)
    with pytest.raises(ValueError, match="tokens hold ids .* outside the vocabulary"):
        model.decode_step(memory, bad[:, 1])


@pytest.mark.parametrize("tokens, message", [
    (torch.tensor([[1.0, 4.0]]), "integer word ids"), (torch.tensor([1, 4]), r"shape \[B, T\]"),
    (torch.ones(2, 3, dtype=torch.long), "2 rows but there are 1 images"), ([[1, 4]], "torch.Tensor"),
    (torch.tensor([[True, False]]), "integer word ids"),
])
def test_malformed_tokens_name_tokens(captioner, tokens, message):
    features, boxes, mask = make_inputs(batch=1)
    with pytest.raises(ValueError, match=f"tokens.*{message}|{message}"):
        captioner.model(features, boxes, mask, tokens)


@pytest.mark.parametrize("tokens", [np.array([["a", "b"]]), np.array([[b"4", b"5"]]), np.array([[4, None]]),
                                    np.array([[4 + 1j, 5]])], ids=["str", "bytes", "object", "complex"])
def test_non_numeric_token_arrays_name_tokens(captioner, tokens):
    """Strings (or objects, complex numbers) as token ids: the documented ValueError, not a TypeError."""
    features, boxes, mask = make_inputs(batch=1)
    raises_for("Captioner.log_probs", "tokens must be a numeric array", captioner.log_probs, features, boxes,
               tokens, mask)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_features_name_features_and_the_image(captioner, value):
    """NaN/inf in a real box's features: a ValueError naming features, the image and the box,
    through every entry point (before the fix caption gave '' and log_probs NaN); in a padded
    slot they are ignored."""
    features, boxes, mask = make_inputs()
    bad = features.clone()
    bad[1, 1, 3] = value
    kind = "NaN" if value != value else "inf"
    for name, call in entry_points(captioner).items():
        raises_for(name, rf"features hold {kind} values: image 1, box 1", call, bad, boxes, mask)
    raises_for("Captioner.caption(numpy)", "features hold", captioner.caption, bad.numpy(), boxes.numpy(),
               mask.numpy())
    padded = features.clone()
    padded[1, 3] = value                        # image 1 has 2 real boxes: slot 3 is padding
    assert captioner.caption(padded, boxes, mask, beam_size=1, max_len=4) == captioner.caption(
        features, boxes, mask, beam_size=1, max_len=4)
    assert torch.isfinite(captioner.log_probs(padded, boxes, tokens_for(), mask)).all()


# -- 5. max_len < 1 (and beyond the model's positions) -------------------------------------------------
@pytest.mark.parametrize("max_len", [0, -1, True, 2.5, MAX_LEN + 1])
def test_bad_max_len(captioner, max_len):
    features, boxes, mask = make_inputs()
    model = captioner.model
    memory = model.encode(features, boxes, mask)
    with pytest.raises(ValueError, match="max_len"):
        captioner.caption(features, boxes, mask, max_len=max_len)
    for decode in (greedy_decode, beam_search, sample):
        with pytest.raises(ValueError, match="max_len"):
            decode(model, memory, max_len=max_len)


def test_max_len_of_the_model():
    with pytest.raises(ValueError, match="max_len"):
        ORTConfig(vocab_size=10, max_len=0)
    model = make_captioner().model
    features, boxes, mask = make_inputs()
    with pytest.raises(ValueError, match="max_len"):
        model(features, boxes, mask, torch.ones(2, MAX_LEN + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        make_captioner().log_probs(features, boxes, torch.full((2, MAX_LEN), 4), mask)
    memory = model.encode(features, boxes, mask)
    with pytest.raises(ValueError, match="max_len"):
        model.decode_step(memory, torch.ones(2, MAX_LEN + 1, dtype=torch.long))


# -- 6. beam_size < 1 (and n < 1 samples) -------------------------------------------------------------
@pytest.mark.parametrize("beam_size", [0, -2, True, 2.0, None])
def test_bad_beam_size(captioner, beam_size):
    features, boxes, mask = make_inputs()
    with pytest.raises(ValueError, match="beam_size"):
        captioner.caption(features, boxes, mask, beam_size=beam_size)
    memory = captioner.model.encode(features, boxes, mask)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(captioner.model, memory, beam_size=beam_size, max_len=3)


@pytest.mark.parametrize("n", [0, -1, 1.0])
def test_bad_sample_count(captioner, n):
    memory = captioner.model.encode(*make_inputs())
    with pytest.raises(ValueError, match="n must be a positive int"):
        sample(captioner.model, memory, n=n, max_len=3)


def test_training_resume_on_features_of_another_width(tmp_path):
    """The trainer's data path: resuming a run on a feature store of another width is refused
    before any step (the checkpoint's model cannot take those features)."""
    from geocap.train import TrainConfig, train

    dirs = {}
    for width in (16, 8):
        dirs[width] = synth_data_dir(tmp_path / f"data{width}", images=20, feature_dim=width)
    options = dict(out=str(tmp_path / "run"), layers=1, d_model=32, heads=2, d_ff=64, batch_size=8, steps=1,
                   val_every=0, progress=False, device="cpu")
    assert train(TrainConfig(data=dirs[16], **options)).step == 1
    with pytest.raises(ValueError, match=r"model config does not fit the data.*'feature_dim': 16"):
        train(TrainConfig(data=dirs[8], **dict(options, steps=2)), resume=True)
