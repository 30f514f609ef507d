"""geocap.decoding on a tiny ORT: greedy, beam search and sampling checked against teacher
forcing (the model's forward on the produced tokens), batching, <eos>/<pad>/max_len handling,
an exhaustive search on a tiny vocabulary, and the gradients and randomness of sampling."""
from __future__ import annotations

import itertools

import pytest
import torch

from geocap.decoding import Decoded, beam_search, greedy_decode, length_penalty_factor, sample
from geocap.model import ObjectRelationTransformer, ORTConfig

from helpers import random_boxes

TINY = dict(vocab_size=20, feature_dim=16, layers=2, d_model=32, heads=2, d_ff=64)
PAD, BOS, EOS = 0, 1, 2


def make_model(seed=0, **overrides) -> ObjectRelationTransformer:
    torch.manual_seed(seed)
    return ObjectRelationTransformer(ORTConfig(**{**TINY, **overrides}), backend="torch").eval()


def make_images(batch=3, n=6, seed=1):
    """features [B, N, 16], boxes [B, N, 4], attention_mask [B, N] with 6, 4, 1 (, 3) real boxes."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, TINY["feature_dim"], generator=g) * 2
    boxes = random_boxes(batch, n, generator=g)
    attention_mask = torch.arange(n)[None, :] < torch.tensor([n, 4, 1, 3][:batch])[:, None]
    return features, boxes, attention_mask


def teacher_forced(model, images, tokens):
    """log_probs [R, T, V] of forward on <bos> + tokens[:, :-1]; images repeated to R rows."""
    features, boxes, attention_mask = images
    r = tokens.shape[0] // features.shape[0]
    inputs = torch.cat([torch.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        return model(features.repeat_interleave(r, 0), boxes.repeat_interleave(r, 0),
                     attention_mask.repeat_interleave(r, 0), inputs)


def check_layout(out: Decoded, max_len: int):
    """<eos> only as the last valid token, <pad> and log-prob 0 after the end, T the longest."""
    rows, width = out.tokens.shape
    assert out.lengths.shape == out.scores.shape == (rows,) and out.token_log_probs.shape == (rows, width)
    assert width == int(out.lengths.max()) <= max_len and int(out.lengths.min()) >= 1
    mask = out.mask
    for i in range(rows):
        n = int(out.lengths[i])
        row = out.tokens[i].tolist()
        assert EOS not in row[:n - 1] and PAD not in row[:n] and BOS not in row[:n]
        assert row[n - 1] == EOS or n == max_len
        assert all(tok == PAD for tok in row[n:])
        assert mask[i].tolist() == [True] * n + [False] * (width - n)
    assert (out.token_log_probs[~mask] == 0).all()


def check_against_teacher_forcing(model, images, out: Decoded, *, argmax: bool):
    """token_log_probs (and scores) are the model's log-probs of the tokens; with ``argmax`` every
    token is also the most likely non-<pad>/<bos> token given its prefix."""
    log_probs = teacher_forced(model, images, out.tokens)
    picked = log_probs.gather(2, out.tokens[..., None]).squeeze(2)
    mask = out.mask
    torch.testing.assert_close(out.token_log_probs.detach()[mask], picked[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_log_probs.detach().sum(1), picked.masked_fill(~mask, 0).sum(1),
                               atol=1e-5, rtol=0)
    if argmax:
        allowed = log_probs.clone()
        allowed[..., [PAD, BOS]] = float("-inf")
        assert (allowed.argmax(-1)[mask] == out.tokens[mask]).all()


def with_eos_bias(model, bias):
    with torch.no_grad():
        model.generator.bias[EOS] += bias
    return model


# -- greedy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("eos_bias", [0.0, 1.0])
def test_greedy_is_the_teacher_forced_argmax_chain(eos_bias):
    model = with_eos_bias(make_model(), eos_bias)
    images = make_images()
    out = greedy_decode(model, model.encode(*images), max_len=12)
    check_layout(out, 12)
    check_against_teacher_forcing(model, images, out, argmax=True)
    torch.testing.assert_close(out.scores, out.token_log_probs.sum(1))
    assert out.tokens.shape[0] == 3 and not out.scores.requires_grad


def test_eos_stops_rows_and_pads_them():
    images = make_images(batch=4)
    # a bias that ends some rows early and not others (checked below, so the test means something)
    model = with_eos_bias(make_model(seed=3), 1.0)
    memory = model.encode(*images)
    for out in (greedy_decode(model, memory, max_len=10), beam_search(model, memory, beam_size=3, max_len=10)):
        check_layout(out, 10)
        ended = out.tokens.gather(1, (out.lengths - 1)[:, None]).squeeze(1) == EOS
        assert ended.any() and len(set(out.lengths.tolist())) > 1
        lists = out.to_lists()
        assert [len(words) for words in lists] == (out.lengths - ended.long()).tolist()
        assert all(PAD not in words and EOS not in words for words in lists)
    # eos almost certain: every caption is just <eos>, and decoding stops after one step
    model = with_eos_bias(make_model(seed=3), 50.0)
    memory = model.encode(*images)
    for out in (greedy_decode(model, memory, max_len=10), beam_search(model, memory, beam_size=3, max_len=10),
                sample(model, memory, n=2, max_len=10)):
        assert out.tokens.tolist() == [[EOS]] * out.tokens.shape[0] and (out.lengths == 1).all()
        assert out.to_lists() == [[]] * out.tokens.shape[0]


def test_max_len_caps_the_captions():
    model = with_eos_bias(make_model(), -50.0)  # eos (nearly) impossible: captions are cut
    images = make_images()
    memory = model.encode(*images)
    for out in (greedy_decode(model, memory, max_len=5), beam_search(model, memory, beam_size=2, max_len=5),
                sample(model, memory, n=2, max_len=5)):
        assert out.tokens.shape[1] == 5 and (out.lengths == 5).all() and (out.tokens != EOS).all()
        assert [len(words) for words in out.to_lists()] == [5] * out.tokens.shape[0]
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, memory, max_len=0)
    small = make_model(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        beam_search(small, small.encode(*images), max_len=9)
    assert greedy_decode(small, small.encode(*images), max_len=8).tokens.shape[1] <= 8


# -- beam search ------------------------------------------------------------------------------
def test_beam_size_one_is_greedy():
    model = with_eos_bias(make_model(), 1.0)
    memory = model.encode(*make_images())
    greedy = greedy_decode(model, memory, max_len=12)
    beam = beam_search(model, memory, beam_size=1, max_len=12)
    assert torch.equal(beam.tokens, greedy.tokens) and torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.scores, greedy.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed,eos_bias", [(0, 0.0), (0, 1.0), (3, 1.0), (5, 0.5)])
def test_beam_scores_are_teacher_forced_and_beat_greedy(seed, eos_bias):
    """Beam search is not exact: the greedy caption can fall out of a narrow beam and end up
    better than every caption kept. That happens here with 2 beams (seed 0 image 1, seed 5
    image 2; test_beam_search_matches_a_plain_reference shows that is the algorithm, not a bug),
    so beam >= greedy is asserted from 3 beams on."""
    model = with_eos_bias(make_model(seed), eos_bias)
    images = make_images(batch=4)
    memory = model.encode(*images)
    greedy = greedy_decode(model, memory, max_len=10)
    for beam_size in (3, 5, 8):
        beam = beam_search(model, memory, beam_size=beam_size, max_len=10)
        check_layout(beam, 10)
        check_against_teacher_forcing(model, images, beam, argmax=False)
        torch.testing.assert_close(beam.scores, beam.token_log_probs.sum(1), atol=1e-5, rtol=0)
        assert (beam.scores >= greedy.scores - 1e-5).all(), (beam_size, beam.scores, greedy.scores)
    # with a length penalty the score is the teacher-forced sum divided by GNMT's factor
    beam = beam_search(model, memory, beam_size=3, max_len=10, length_penalty=0.8)
    check_against_teacher_forcing(model, images, beam, argmax=False)
    expected = beam.token_log_probs.sum(1) / ((5 + beam.lengths.float()) / 6) ** 0.8
    torch.testing.assert_close(beam.scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -1.0])
def test_wide_beam_finds_the_exact_best_caption(alpha):
    """vocab of 6 = <pad>, <bos>, <eos> + 3 words, max_len 3: at most 12 candidates before the
    last step, so 12 beams search exhaustively; compare with the best of all 1 + 3 + 9 + 27
    captions scored by forward."""
    model = with_eos_bias(make_model(seed=5, vocab_size=6), 1.5)
    images = make_images()
    words = [3, 4, 5]
    captions = [list(p) + [EOS] for n in (0, 1, 2) for p in itertools.product(words, repeat=n)]
    captions += [list(p) for p in itertools.product(words, repeat=3)]  # cut at max_len
    tokens = torch.tensor([c + [PAD] * (3 - len(c)) for c in captions])
    lengths = torch.tensor([len(c) for c in captions])
    best_scores, best_captions = [], []
    for i in range(3):
        image = tuple(x[i:i + 1] for x in images)
        one = tuple(x.expand(len(captions), *x.shape[1:]) for x in image)
        log_probs = teacher_forced(model, one, tokens)
        picked = log_probs.gather(2, tokens[..., None]).squeeze(2)
        picked = picked.masked_fill(torch.arange(3)[None, :] >= lengths[:, None], 0).sum(1)
        scores = picked / length_penalty_factor(lengths.float(), alpha)
        best_scores.append(scores.max())
        best_captions.append(captions[int(scores.argmax())])
    beam = beam_search(model, model.encode(*images), beam_size=12, max_len=3, length_penalty=alpha)
    torch.testing.assert_close(beam.scores, torch.stack(best_scores), atol=1e-5, rtol=0)
    assert [row[:n] for row, n in zip(beam.tokens.tolist(), beam.lengths.tolist())] == best_captions


def reference_beam_search(model, image, beam_size, max_len, alpha):
    """The same algorithm, one image, in plain Python: every prefix re-run through forward (no
    cache, no batching). Returns (penalised score, tokens)."""
    live, best = [([], 0.0)], (float("-inf"), None)
    for step in range(max_len):
        length = step + 1
        candidates = []
        for seq, score in live:
            with torch.no_grad():
                log_probs = model(*image, torch.tensor([[BOS] + seq]))[0, -1]
            candidates += [(score + float(log_probs[w]), seq + [w])
                           for w in range(log_probs.shape[0]) if w not in (PAD, BOS)]
        candidates.sort(key=lambda c: -c[0])
        for score, seq in candidates[:beam_size]:  # the top K that end go to the pool
            if seq[-1] == EOS or length == max_len:
                penalised = score / length_penalty_factor(length, alpha)
                if penalised > best[0]:
                    best = (penalised, seq)
        if length == max_len:
            break
        live = [(seq, score) for score, seq in candidates if seq[-1] != EOS][:beam_size]
        widest = max(length_penalty_factor(n, alpha) for n in (length + 1, max_len))
        if best[0] >= max(score for _, score in live) / widest:
            break
    return best


@pytest.mark.parametrize("seed,eos_bias,beam_size,alpha",
                         [(0, 0.0, 2, 0.0), (5, 0.5, 2, 0.0), (3, 1.0, 3, 0.8), (5, 1.0, 4, -0.5)])
def test_beam_search_matches_a_plain_reference(seed, eos_bias, beam_size, alpha):
    model = with_eos_bias(make_model(seed), eos_bias)
    images = make_images(batch=4)
    beam = beam_search(model, model.encode(*images), beam_size=beam_size, max_len=8, length_penalty=alpha)
    for i in range(4):
        score, tokens = reference_beam_search(model, tuple(x[i:i + 1] for x in images), beam_size, 8, alpha)
        assert beam.tokens[i, :int(beam.lengths[i])].tolist() == tokens
        assert abs(float(beam.scores[i]) - score) < 1e-4


# -- batching ---------------------------------------------------------------------------------
def test_batched_equals_one_image_at_a_time():
    model = with_eos_bias(make_model(seed=5), 1.0)
    images = make_images()
    memory = model.encode(*images)
    decoders = [lambda m: greedy_decode(model, m, max_len=10),
                lambda m: beam_search(model, m, beam_size=3, max_len=10),
                lambda m: beam_search(model, m, beam_size=4, max_len=10, length_penalty=0.6)]
    for decode in decoders:
        batched = decode(memory)
        for i in range(3):
            alone = decode(model.encode(*(x[i:i + 1] for x in images)))
            n = int(alone.lengths[0])
            assert int(batched.lengths[i]) == n
            assert torch.equal(batched.tokens[i, :n], alone.tokens[0, :n])
            torch.testing.assert_close(batched.scores[i], alone.scores[0], atol=1e-5, rtol=0)


# -- sampling ---------------------------------------------------------------------------------
def test_sample_rows_log_probs_and_gradients():
    model = with_eos_bias(make_model(), 1.0)
    images = make_images()
    torch.manual_seed(7)
    out = sample(model, model.encode(*images), n=4, max_len=10)
    assert out.tokens.shape[0] == out.lengths.shape[0] == 12 and out.baseline is None
    check_layout(out, 10)
    check_against_teacher_forcing(model, images, out, argmax=False)
    assert out.token_log_probs.requires_grad
    assert len({tuple(r) for r in out.to_lists()}) > 3  # actually random
    # SCST-style loss: gradients reach the decoder and, through the memory, the encoder
    loss = -(out.token_log_probs * out.mask).sum()
    loss.backward()
    for name in ("generator.weight", "word_embed.weight", "feature_embed.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_sample_low_temperature_is_greedy_in_image_major_order():
    model = with_eos_bias(make_model(), 1.0)
    images = make_images()
    memory = model.encode(*images)
    greedy = greedy_decode(model, memory, max_len=10)
    out = sample(model, memory, n=3, max_len=10, temperature=1e-4)
    for i in range(3):  # image i's samples at rows 3i .. 3i + 2
        for j in range(3):
            n = int(greedy.lengths[i])
            assert int(out.lengths[3 * i + j]) == n
            assert torch.equal(out.tokens[3 * i + j, :n], greedy.tokens[i, :n])
    torch.testing.assert_close(out.scores.detach(), greedy.scores.repeat_interleave(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, memory, temperature=0.0)


def test_sample_is_reproducible_and_baseline_is_greedy_in_eval_mode():
    model = with_eos_bias(make_model(dropout=0.3), 1.0)
    memory = model.encode(*make_images())
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(sample(model, memory, n=3, max_len=8, temperature=1.5))
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].token_log_probs, runs[1].token_log_probs, atol=0, rtol=0)
    model.train()  # the baseline runs in eval mode, and the mode is restored
    out = sample(model, memory, n=2, max_len=8, greedy_baseline=True)
    assert model.training
    model.eval()
    greedy = greedy_decode(model, memory, max_len=8)
    assert torch.equal(out.baseline.tokens, greedy.tokens) and not out.baseline.scores.requires_grad
    torch.testing.assert_close(out.baseline.scores, greedy.scores, atol=0, rtol=0)


def test_shared_start_end_padding_id():
    """ORT's ids, 0 = <pad> = <bos> = <eos>: decoding starts from 0, nothing is excluded when
    choosing, choosing 0 ends a row (kept and counted), and ended rows are padded with 0."""
    model = make_model(seed=3, pad_id=0, bos_id=0, eos_id=0)
    with torch.no_grad():
        model.generator.bias[0] += 1.5
    images = make_images()
    memory = model.encode(*images)
    max_len = 6
    for out in (greedy_decode(model, memory, max_len=max_len),
                beam_search(model, memory, beam_size=3, max_len=max_len)):
        for row, n in zip(out.tokens.tolist(), out.lengths.tolist()):
            assert 0 not in row[:n - 1] and (row[n - 1] == 0 or n == max_len) and set(row[n:]) <= {0}
        assert (out.lengths < max_len).any()
        inputs = torch.cat([torch.zeros(out.tokens.shape[0], 1, dtype=torch.long), out.tokens[:, :-1]], dim=1)
        with torch.no_grad():
            lp = model(*images, inputs)
        token_lp = lp.gather(2, out.tokens[..., None]).squeeze(2) * out.mask
        torch.testing.assert_close(token_lp.sum(1), out.token_log_probs.sum(1), atol=1e-4, rtol=1e-4)
    greedy = greedy_decode(model, memory, max_len=max_len)
    inputs = torch.cat([torch.zeros(3, 1, dtype=torch.long), greedy.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        argmax = model(*images, inputs).argmax(-1)  # over every id, 0 included
    assert torch.equal(argmax[greedy.mask], greedy.tokens[greedy.mask])
