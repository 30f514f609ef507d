"""The schedule check (geocap.study.schedule): doubling the schedule's gain, paired over images,
and its verdicts; each test fails on a wrong gain, an unpaired interval or a reversed rule."""
from __future__ import annotations

import math

import numpy as np
import pytest

from geocap.errors import UsageError
from geocap.study.schedule import schedule_gain, seed_spread, short_steps
from geocap.study.settings import StudySettings


def record(short, full, tokens, steps=1000):
    return {"short_sums": list(map(float, short)), "sums": list(map(float, full)), "tokens": list(map(float, tokens)),
            "steps": steps, "short_steps": short_steps(steps)}


def images(n=500, seed=0):
    """Per-image token counts and summed losses of a model whose loss varies a lot between images."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 60, n).astype(np.float64)
    per_token = rng.gamma(4.0, 0.25, n)             # per-image difficulty: loss 1.0 +- 0.5
    return tokens, per_token * tokens


def test_gain_is_the_relative_loss_difference():
    tokens, full = images()
    short = full * 1.05                               # the short run's loss is 5 % higher on every image
    got = schedule_gain(record(short, full, tokens), tolerance=0.02)
    assert got["gain"] == pytest.approx(0.05, rel=1e-12)
    assert got["loss"] == pytest.approx(full.sum() / tokens.sum(), rel=1e-12)
    assert got["short_loss"] == pytest.approx(short.sum() / tokens.sum(), rel=1e-12)
    assert got["converged"] is False and got["gain_ci95"][0] >= 0.02
    assert (got["short_steps"], got["steps"], got["images"]) == (500, 1000, 500)
    assert "500 -> 1000" in got["reason"] and "not under 2 %" in got["reason"]


def test_the_interval_is_paired_over_images():
    """Image difficulty common to both models cancels: a 0.5 % gain with a large between-image spread
    is decided (converged); an unpaired interval (from each model's own spread) would straddle 2 %."""
    tokens, full = images()
    rng = np.random.default_rng(1)
    short = full * (1.005 + rng.normal(0, 0.002, len(full)))
    got = schedule_gain(record(short, full, tokens), tolerance=0.02)
    lo, hi = got["gain_ci95"]
    assert lo < got["gain"] < hi and hi - lo < 0.002
    assert got["converged"] is True
    unpaired_se = math.sqrt(np.var(full / tokens, ddof=1) * 2 / len(full)) / (full.sum() / tokens.sum())
    assert got["gain"] + 1.96 * unpaired_se > 0.02      # the unpaired interval would not decide


def test_no_gain_or_a_worse_long_run_converges_and_a_tie_with_the_tolerance_is_undecided():
    tokens, full = images()
    assert schedule_gain(record(full, full, tokens))["converged"] is True
    assert schedule_gain(record(full, full, tokens))["gain_ci95"] == [0.0, 0.0]
    assert schedule_gain(record(full * 0.97, full, tokens))["converged"] is True       # over-fitting: longer is worse
    rng = np.random.default_rng(2)
    noisy = full * (1.02 + rng.normal(0, 0.05, len(full)))                            # 2 % +- noise: straddles
    got = schedule_gain(record(noisy, full, tokens), tolerance=0.02)
    assert got["gain_ci95"][0] < 0.02 < got["gain_ci95"][1] and got["converged"] is None
    assert "undecided" in got["reason"]


def test_too_few_images_are_undecided_and_malformed_records_are_refused():
    got = schedule_gain(record([1.0], [1.0], [2.0]))
    assert got["converged"] is None and "at least 2" in got["reason"]
    tokens, full = images(10)
    with pytest.raises(ValueError, match="one length"):
        schedule_gain(record(full[:9], full, tokens))
    with pytest.raises(ValueError, match="finite"):
        schedule_gain(record(np.where(np.arange(10) == 3, np.nan, full), full, tokens))
    with pytest.raises(ValueError, match="must hold"):
        schedule_gain({"sums": [1.0]})
    with pytest.raises(ValueError, match="tolerance"):
        schedule_gain(record(full, full, tokens), tolerance=0)


def test_seed_spread():
    assert seed_spread([1.0]) is None
    assert seed_spread([1.0, 1.2, None]) == pytest.approx(np.std([1.0, 1.2], ddof=1))


def test_settings_of_the_check():
    settings = StudySettings.full()
    assert settings.schedule_checked(0) and not settings.schedule_checked(1)
    short = settings.short_train_options("ort", 0)
    assert short == {**settings.train_options("ort", 0), "steps": settings.steps // 2,
                     "checkpoint_every": settings.steps // 2}
    with pytest.raises(UsageError, match="schedule_check_seeds"):
        StudySettings.full(seeds=2, schedule_check_seeds=3)
    with pytest.raises(UsageError, match="short run"):
        StudySettings.full(steps=300, warmup=200)
    with pytest.raises(UsageError, match="schedule_tolerance"):
        StudySettings.full(schedule_tolerance=0)
    assert StudySettings.full(steps=300, warmup=200, schedule_check_seeds=0).steps == 300
