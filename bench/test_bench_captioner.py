"""Captioner throughput: beam-search decoding and cross-entropy training, geocap vs the ORT-style
baselines of ``bench/ort_style.py``, side by side on the same weights.

Groups and variants (every variant of a group does the same work on the same inputs):

``decode beam3 T16 B<images>``  images per second of beam search (beam 3, at most T = 16
    tokens, length penalty 0), encoding included, 8 images per call on CPU (32 on CUDA), model
    in eval mode:
    ``ort_style`` (baseline) = ``ort_beam_search``: encode the batch eagerly, then each image
    alone, every step re-decoding the ``[3, t]`` prefix with eager attention;
    ``geocap`` (subject) = ``model.encode`` + ``geocap.decoding.beam_search``: all images' beams
    as one batch, one token per step over the key/value cache.
``train B10x5`` (images x captions)  captions per second of one optimiser step (Adam, betas
    (0.9, 0.98), lr 1e-4; forward, loss, backward, grad-norm clip 0.1 and step by
    ``geocap.train.optimizer_update``) on 10 images x 5 captions, model in train mode (dropout 0.1):
    ``ort_style`` (baseline) = ``OrtStyleCaptioner`` on the per-caption batch (features copied
    per caption, each copy encoded; eager attention with ORT's ``nn.Dropout`` on the weights;
    the output layer at every position, <pad> included; ``ort_style.training_step``; ORT's
    per-tensor ``torch.optim.Adam``);
    ``geocap`` (subject) = exactly the trainer's cross-entropy step (``geocap.train.loop``):
    ``CrossEntropyObjective`` through a ``PolicyModule`` on the per-image ``Batch`` (each image
    encoded once, its ``Memory`` expanded to its captions, ``teacher_force`` with the decoder
    only up to each caption's last target and the output layer only at the targets in the loss),
    then ``optimizer_update`` with the trainer's ``make_optimizer`` (fused Adam).

Model: ``ORTConfig(vocab_size=10000, feature_dim=2048, layers=3, d_model=256, heads=8,
d_ff=1024)``, ORT's init, fixed seed (random weights: decoded captions run the full 16 tokens);
36 box slots per image with 20-36 real boxes (the rest padded), features ~ N(0, 1), valid
normalised boxes; training captions of 8-16 words (T = 18 with <bos>/<eos>). float32 on CPU;
on CUDA the same shapes (float32, Triton kernels) -- this file is sized for the CPU.

Before anything is timed, module fixtures check equal work: both decoders choose the same
captions for every image (token for token; scores within 1e-3; a near-tie flip between the two
float32 implementations is tolerated for at most 1 image in 16 and counted in ``extra_info``)
and, in eval mode, the two training variants give the same loss (rtol 1e-4) and gradients
(per parameter, max error <= 1e-3 x its largest entry + 1e-6). Nothing asserts speed.

Timing: ``benchmark.pedantic``, one untimed warm-up call (which also sizes the run), then 3
rounds of 1 call (5 when a call takes under 0.5 s); median per call. On a shared machine run it
with ``OMP_NUM_THREADS=1``: with more OpenMP threads than free cores, torch's thread pool spins
at its barriers and small ops slow down 5-20x, which says nothing about either implementation.
``extra_info``: ``images_per_s`` or ``captions_per_s`` (work per call / median), the shapes, the 1-minute load
average before and after (the machine may be shared), and the peak memory of one call
(``bench/memory.py``: CPU RSS growth in a forked 1-thread child; CUDA allocator peak). The
speed-up of geocap over the baseline is the conftest table's ratio of medians (= the ratio of
throughputs, since both do the same work per call); it is also stored as ``speedup_vs_ort_style``.

Run: ``python -m pytest bench/test_bench_captioner.py --benchmark-only -q`` (with
``GEOCAP_BENCH_SUMMARY=PATH`` for the JSON table). Knobs: ``GEOCAP_BENCH_DECODE_IMAGES`` (images
per decoding call), ``GEOCAP_BENCH_TRAIN_IMAGES`` (images per training step, 5 captions each).
"""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from geocap.decoding import Decoded, beam_search
from geocap.data.dataset import Batch
from geocap.model import ObjectRelationTransformer, ORTConfig
from geocap.train import CrossEntropyObjective, PolicyModule, make_optimizer, optimizer_update, token_loss

try:  # the bench directory is on sys.path under pytest's default (prepend) import mode
    from memory import peak_memory_info
    from ort_style import OrtStyleCaptioner, ort_beam_search, per_caption_batch, training_step
except ImportError:  # pragma: no cover - imported as a package
    from .memory import peak_memory_info
    from .ort_style import OrtStyleCaptioner, ort_beam_search, per_caption_batch, training_step

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CONFIG = dict(vocab_size=10000, feature_dim=2048, layers=3, d_model=256, heads=8, d_ff=1024, dropout=0.1,
              max_len=64)
N_BOXES, MIN_REAL_BOXES = 36, 20
BEAM, MAX_LEN, CAPTIONS_PER_IMAGE, MIN_WORDS, MAX_WORDS = 3, 16, 5, 8, 16


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive int, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {raw!r}")
    return value


# images per decoding call and per training step (CPU: sized so that the file runs in ~2 min on
# 2 shared cores; the ORT-style decoder costs ~0.6 s per image there)
DECODE_IMAGES = _env_int("GEOCAP_BENCH_DECODE_IMAGES", 32 if CUDA else 8)
TRAIN_IMAGES = _env_int("GEOCAP_BENCH_TRAIN_IMAGES", 10)
LEARNING_RATE, GRAD_CLIP = 1e-4, 0.1


def sync_timer() -> float:
    """perf_counter that first waits for the CUDA device."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=sync_timer)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_model(seed: int = 0) -> ObjectRelationTransformer:
    torch.manual_seed(seed)
    return ObjectRelationTransformer(ORTConfig(**CONFIG)).to(DEVICE)


def make_images(batch: int, seed: int):
    """features ``[B, 36, 2048]``, boxes ``[B, 36, 4]`` (valid, normalised), attention_mask ``[B, 36]``
    with 20-36 real boxes per image (padded slots: zero features and boxes)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, N_BOXES, CONFIG["feature_dim"], generator=g)
    xy = torch.rand(batch, N_BOXES, 2, generator=g) * 0.8
    wh = (torch.rand(batch, N_BOXES, 2, generator=g) * (1 - xy)).clamp(min=0.01)
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)
    real = torch.randint(MIN_REAL_BOXES, N_BOXES + 1, (batch,), generator=g)
    attention_mask = torch.arange(N_BOXES)[None, :] < real[:, None]
    features = features * attention_mask[..., None]
    boxes = boxes * attention_mask[..., None]
    return features.to(DEVICE), boxes.to(DEVICE), attention_mask.to(DEVICE)


def make_captions(batch: int, per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K, T]`` captions ``<bos> w1 .. wL <eos> <pad>..`` with L in 8..16 random word ids, and
    their framed lengths ``[B, K]`` (L + 2)."""
    cfg = ORTConfig(**CONFIG)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (batch, per_image), generator=g)
    t = MAX_WORDS + 2
    words = torch.randint(3, cfg.vocab_size, (batch, per_image, t), generator=g)
    pos = torch.arange(t)
    caps = torch.where(pos <= lengths[..., None], words, torch.full_like(words, cfg.pad_id))
    caps[..., 0] = cfg.bos_id
    caps.scatter_(2, (lengths + 1)[..., None], cfg.eos_id)
    return caps.to(DEVICE), (lengths + 2).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# The timed calls
# ---------------------------------------------------------------------------------------------
def geocap_decode(model, features, boxes, attention_mask):
    with torch.no_grad():
        return beam_search(model, model.encode(features, boxes, attention_mask), beam_size=BEAM, max_len=MAX_LEN)


def ort_decode(ort, features, boxes, attention_mask):
    return ort_beam_search(ort, features, boxes, attention_mask, beam_size=BEAM, max_len=MAX_LEN)


def per_image_batch(images, captions, lengths) -> Batch:
    """The trainer's per-image :class:`Batch` of ``images`` and ``captions [B, K, T]``."""
    features, boxes, attention_mask = images
    return Batch(features=features, boxes=boxes, attention_mask=attention_mask, captions=captions,
                 caption_lengths=lengths, image_ids=torch.arange(features.shape[0], device=features.device))


def train_steps(model, images, captions, lengths, optimizer, params) -> dict:
    """``{variant: (loss(), step())}`` on ``model``'s weights for ``images`` (B of them) and
    ``captions [B, K, T]`` (framed lengths ``[B, K]``): ``loss()`` the variant's loss (with the
    graph), ``step()`` its timed optimiser update (returns the detached loss)."""
    features, boxes, attention_mask = images
    f, b, m, flat = per_caption_batch(features, boxes, attention_mask, captions)
    ort = OrtStyleCaptioner(model)
    pad_id = model.config.pad_id
    batch = per_image_batch(images, captions, lengths)
    policy = PolicyModule(model)
    objective = CrossEntropyObjective(pad_id=pad_id, eos_id=model.config.eos_id)

    def ort_loss():
        return token_loss(ort(f, b, m, flat[:, :-1]), flat[:, 1:], pad_id=pad_id)

    def ort_step():
        return training_step(lambda inputs: ort(f, b, m, inputs), flat, optimizer, params, grad_clip=GRAD_CLIP,
                             pad_id=pad_id)

    def geocap_step():  # the trainer's cross-entropy step (geocap.train.loop)
        loss, _ = objective(policy, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()}")
        optimizer_update(loss, optimizer, params, grad_clip=GRAD_CLIP)
        return loss.detach()

    return {"ort_style": (ort_loss, ort_step), "geocap": (lambda: objective(policy, batch)[0], geocap_step)}


# ---------------------------------------------------------------------------------------------
# Equal work, checked once before anything is timed
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode_case():
    model = make_model().eval()
    images = make_images(DECODE_IMAGES, seed=1)
    ours = geocap_decode(model, *images)
    theirs = ort_decode(OrtStyleCaptioner(model), *images)
    flips = same_captions(ours, theirs)
    return model, images, float(ours.lengths.float().mean()), flips


def same_captions(ours, theirs, atol: float = 1e-3) -> int:
    """Equal work: the two searches chose the same caption for every image, with scores within
    ``atol``. A near-tie (two captions within float32 rounding of each other) may flip between
    implementations; it is tolerated when the scores agree, for at most 1 image in 16 (at least
    1), and counted. Returns the number of flipped images."""
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=0, atol=atol,
                               msg=lambda m: f"beam scores of geocap and the ORT-style search differ: {m}")
    flips = sum(a != b for a, b in zip(ours.to_lists(), theirs.to_lists()))
    allowed = max(1, len(ours.lengths) // 16)
    assert flips <= allowed, (f"geocap and the ORT-style beam search chose different captions for {flips} of "
                              f"{len(ours.lengths)} images (at most {allowed} near-ties allowed)")
    return flips


def _grads_of_step(model, images, captions, lengths) -> dict:
    """``{variant: (loss, [grad per parameter])}`` of one training step's loss, model in eval mode."""
    params = [p for p in model.parameters()]
    results = {}
    for name, (loss_fn, _) in train_steps(model, images, captions, lengths, None, params).items():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        results[name] = (loss.detach(), [p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return results


@pytest.fixture(scope="module")
def train_case():
    """Equal work: both variants' losses and gradients agree. The geometry term is ill-conditioned
    (its float32 rounding differs between ORT's op order and geocap's, which takes centre offsets
    from the box edges), so a gradient may differ from the ORT-style one by more than a fixed
    1e-3 x its largest value + 1e-6; it must then be within 2x the ORT-style float32 gradient's
    own error against a float64 run of the same ORT-style step (the tests' eager rule)."""
    import copy

    model = make_model()
    images = make_images(TRAIN_IMAGES, seed=2)
    captions, lengths = make_captions(TRAIN_IMAGES, CAPTIONS_PER_IMAGE, seed=3)
    model.eval()  # no dropout: the variants must agree exactly
    results = _grads_of_step(model, images, captions, lengths)
    ref_loss, ref_grads = results["ort_style"]
    exact = None
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0, msg=lambda m, name=name: f"{name} loss: {m}")
        for i, ((pname, _), g, r) in enumerate(zip(model.named_parameters(), grads, ref_grads)):
            err = (g - r).abs().max().item()
            if err <= 1e-3 * r.abs().max().item() + 1e-6:
                continue
            if exact is None:
                model64 = copy.deepcopy(model).double()
                images64 = tuple(t.double() if t.is_floating_point() else t for t in images)
                exact = _grads_of_step(model64, images64, captions, lengths)["ort_style"][1]
            err64 = (g.double() - exact[i]).abs().max().item()
            ort_err64 = (r.double() - exact[i]).abs().max().item()
            assert err64 <= 2 * ort_err64 + 1e-6, (
                f"{name}: gradient of {pname} differs by {err:.3g} from the ORT-style one and by {err64:.3g} "
                f"from float64 (the ORT-style float32 one by {ort_err64:.3g})")
    return model, images, captions, lengths


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------
def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _time(benchmark, call):
    """Warm up once (untimed, sizes the run), then time ``call``; returns the median per call."""
    t0 = sync_timer()
    call()
    per_call = sync_timer() - t0
    rounds = 5 if per_call < 0.5 else 3
    before = _loadavg()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(rounds=rounds, iterations=1, loadavg_1m_before=before, loadavg_1m_after=_loadavg())
    return benchmark.stats.stats.median


_MEDIANS: dict = {}


def _record_ratio(benchmark, group, variant, median, baseline="ort_style"):
    _MEDIANS[(group, variant)] = median
    base = _MEDIANS.get((group, baseline))
    if base is not None and variant != baseline:
        benchmark.extra_info["speedup_vs_ort_style"] = round(base / median, 3)


def _common_info(benchmark, variant):
    benchmark.extra_info.update(
        variant=variant, baseline=variant == "ort_style", subject=variant == "geocap", device=DEVICE.type,
        device_name=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
        threads=torch.get_num_threads(), d_model=CONFIG["d_model"], layers=CONFIG["layers"],
        heads=CONFIG["heads"], d_ff=CONFIG["d_ff"], vocab=CONFIG["vocab_size"], D=CONFIG["feature_dim"],
        N=N_BOXES, dtype="float32")


@pytest.mark.parametrize("variant", ["ort_style", "geocap"])
def test_decode(benchmark, decode_case, variant):
    model, images, mean_len, flips = decode_case
    if variant == "geocap":
        def call():
            return geocap_decode(model, *images)
    else:
        ort = OrtStyleCaptioner(model)

        def call():
            return ort_decode(ort, *images)
    group = f"decode beam{BEAM} T{MAX_LEN} B{DECODE_IMAGES}"
    benchmark.group = group
    _common_info(benchmark, variant)
    median = _time(benchmark, call)
    benchmark.extra_info.update(B=DECODE_IMAGES, beam=BEAM, max_len=MAX_LEN, mean_caption_tokens=mean_len,
                                near_tie_flips=flips,
                                images_per_s=round(DECODE_IMAGES / median, 2))
    _record_ratio(benchmark, group, variant, median)
    benchmark.extra_info.update(peak_memory_info(call, DEVICE))


@pytest.mark.parametrize("variant", ["ort_style", "geocap"])
def test_train(benchmark, train_case, variant):
    base_model, images, captions, lengths = train_case
    model = copy.deepcopy(base_model).train()  # each variant trains its own copy of the same weights
    params = list(model.parameters())
    if variant == "geocap":  # the trainer's optimiser (fused where torch has the kernel)
        optimizer = make_optimizer(params, "noam", lr=LEARNING_RATE)
    else:  # ORT's: torch.optim.Adam, per-tensor
        optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-9)
    _, call = train_steps(model, images, captions, lengths, optimizer, params)[variant]
    n_captions = captions.shape[0] * captions.shape[1]
    group = f"train B{TRAIN_IMAGES}x{CAPTIONS_PER_IMAGE}"
    benchmark.group = group
    _common_info(benchmark, variant)
    median = _time(benchmark, call)
    benchmark.extra_info.update(B=n_captions, images=TRAIN_IMAGES, captions_per_image=CAPTIONS_PER_IMAGE,
                                T=captions.shape[2], captions_per_s=round(n_captions / median, 2))
    _record_ratio(benchmark, group, variant, median)
    benchmark.extra_info.update(peak_memory_info(call, DEVICE))


# ---------------------------------------------------------------------------------------------
# Sanity (not timed): the equal-work check can fail
# ---------------------------------------------------------------------------------------------
def test_same_captions_rejects_other_captions():
    def decoded(rows, scores):
        tokens = torch.tensor(rows)
        return Decoded(tokens, torch.full((len(rows),), tokens.shape[1]), torch.tensor(scores), eos_id=2)

    rows = [[5, 6, 2]] * 16
    assert same_captions(decoded(rows, [-1.0] * 16), decoded(rows, [-1.0] * 16)) == 0
    flipped = [[5, 7, 2]] + rows[1:]
    assert same_captions(decoded(rows, [-1.0] * 16), decoded(flipped, [-1.0002] + [-1.0] * 15)) == 1
    with pytest.raises(AssertionError, match="2 of 16"):
        same_captions(decoded(rows, [-1.0] * 16), decoded([[5, 7, 2]] * 2 + rows[2:], [-1.0] * 16))
    with pytest.raises(AssertionError, match="scores"):
        same_captions(decoded(rows, [-1.0] * 16), decoded(rows, [-1.5] + [-1.0] * 15))
