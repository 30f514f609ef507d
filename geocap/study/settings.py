"""The settings that define a study (``geocap study``): one flat dataclass, JSON-able, compared
field by field, so that a study folder is only ever continued with the settings it was begun with.

Variants (``VARIANTS``, the one definition) are ORT's geometry exactly (``ort``), no geometry
(``none``, ORT's ablation: the synthetic features carry no position at all), a direction-aware
geometry embedding (``directional``) and ``absolute``: ``none`` plus each object's normalised box
and area appended to its input features (how captioners are usually given positions, so that
``ort - absolute`` asks whether ORT's *relative* geometry beats simply giving the model its
boxes). They differ only in the train options of ``VARIANTS[variant]``; everything else (data,
sizes, steps, seeds) is shared. The seeds of a study are ``0 .. seeds - 1``; seed k trains with
``TrainConfig.seed = k`` (the model's initialisation, dropout and the data order), and its
untrained control is that very initialisation.

Training has an end: AdamW, ``warmup`` linear steps to ``lr``, then ``decay`` (cosine) to 0 at
``steps``; the model evaluated is the final one. Validation every ``val_every`` steps is the
teacher-forced loss of the first ``val_loss_images`` val images (cheap: no decoding), from which
:mod:`geocap.study.convergence` judges convergence; greedy CIDEr-D validation on
``val_cider_images`` images is optional (0: none).

Sizes. The step times they are estimated from: see bench/RESULTS.md, "Study step times" (6 layers
~0.133 s per training step on a 2-core CPU, 2 layers ~0.067 s).

* full (the defaults, ``full()``): 4 variants x 5 seeds = 20 models, 4 layers (the least depth that
  still shows depth trends), d_model 128, 10000 images (1000 val for the validation loss, 1000
  test), 5000 steps of 10 images (~6 epochs). Measured (bench/RESULTS.md, "Study step times"):
  565-589 s per model with two at once on an idle 2-core CPU, 12 120 process-seconds for the 20
  models: about 100 min idle (126 min measured on shared cores); 19 of 20 models converged by
  the criterion, yet not converged: a 10000-step schedule lowers the loss 13 % (docs/study.md).
* quick (``for_quick()``): 4 variants x 2 seeds = 8 models: 2 layers, 1000 steps on 3000 images
  (the demo's data size), the validation loss on all 300 val images.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from geocap.data.atomic import write_text_atomic
from geocap.data.json_file import read_json
from geocap.metrics.tokenize import TOKENIZERS
from geocap.train.schedule import DECAYS
from geocap.train.variants import VARIANTS

from .schedule import short_steps
from geocap.errors import DataError, UsageError

__all__ = ["SETTINGS_FILE", "StudySettings", "VARIANTS"]

SETTINGS_FILE = "settings.json"



@dataclass(frozen=True)
class StudySettings:
    """Every setting that defines a study; two studies with different settings are never mixed.

    ``variants``: names of :data:`VARIANTS`, in the order they are run; ``seeds``: models per
    variant (seeds 0 .. seeds-1); ``quick``: whether these are the quick study's sizes.
    Data (made once per study by ``geocap synth`` + ``geocap prepro captions``): ``images``
    synthetic images (10 % of them test, 10 % val), ``feature_dim``, ``data_seed``,
    ``min_count`` and ``max_caption_len`` of the vocabulary and the encoded captions.
    Model and training (TrainConfig's meanings): ``layers``, ``d_model``, ``heads``, ``d_ff``,
    ``dropout``, ``steps``, ``batch_size`` (images, each with its captions), ``lr`` (AdamW's peak,
    after ``warmup`` linear steps, then ``decay`` to 0 at ``steps``: "cosine", "linear" or "none");
    every ``val_every`` steps the teacher-forced loss of the first ``val_loss_images`` val images
    (the convergence criterion's curve; ``converge_tolerance``: :mod:`geocap.study.convergence`) and,
    when ``val_cider_images`` > 0, greedy CIDEr-D on that many. The final model is the one evaluated.
    The schedule check (:mod:`geocap.study.schedule`): seeds 0 .. ``schedule_check_seeds``-1 of each
    variant are also trained with half the steps, and converged when doubling the schedule lowers
    their validation loss by less than ``schedule_tolerance`` (relative).
    Evaluation on the test split: ``beam_size``, ``max_decode_len`` words, ``tokenizer`` of the
    caption metrics (auto: Java's PTB tokenizer when Java is there).
    """

    variants: tuple = tuple(VARIANTS)
    seeds: int = 5
    quick: bool = False
    # data
    images: int = 10000
    feature_dim: int = 256
    data_seed: int = 0
    min_count: int = 5
    max_caption_len: int = 16
    # model and training
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    steps: int = 5000
    batch_size: int = 10
    lr: float = 1e-3
    warmup: int = 200
    decay: str = "cosine"
    val_every: int = 200
    val_loss_images: int = 1000
    val_cider_images: int = 0
    converge_tolerance: float = 0.01
    schedule_check_seeds: int = 1
    schedule_tolerance: float = 0.02
    # evaluation
    beam_size: int = 3
    max_decode_len: int = 20
    tokenizer: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        self.validate()

    @classmethod
    def full(cls, **changes) -> "StudySettings":
        """The full study's settings (the class defaults), with ``changes``."""
        return cls(**changes)

    @classmethod
    def for_quick(cls, **changes) -> "StudySettings":
        """The quick study: the same code path, 2 seeds, a 2-layer model, fewer images and steps;
        with ``changes``."""
        quick = dict(seeds=2, quick=True, images=3000, layers=2, steps=1000, warmup=50, val_every=50,
                     val_loss_images=300)
        quick.update(changes)
        return cls(**quick)

    @property
    def seed_list(self) -> list:
        return list(range(self.seeds))

    def models(self) -> list:
        """The (variant, seed) pairs of the study in the order they are run: seed by seed, each
        seed's variants in ``variants`` order (so a study stopped early has whole seeds)."""
        return [(variant, seed) for seed in self.seed_list for variant in self.variants]

    def validate(self) -> None:
        """ValueError naming the setting for any value out of range or of the wrong type."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f"study setting {f.name} must be an int, got {value!r}")
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UsageError(f"study setting {f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            if kind is bool and not isinstance(value, bool):
                raise UsageError(f"study setting {f.name} must be true or false, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise UsageError(f"study setting {f.name} must be a string, got {value!r}")
        if not self.variants:
            raise UsageError("study setting variants must name at least one variant")
        for name in self.variants:
            if name not in VARIANTS:
                raise UsageError(f"study setting variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if len(set(self.variants)) != len(self.variants):
            raise UsageError(f"study setting variants names a variant twice: {', '.join(self.variants)}")
        for name in ("seeds", "images", "layers", "d_model", "heads", "d_ff", "steps", "batch_size", "val_every",
                     "val_loss_images", "beam_size", "max_decode_len", "min_count", "max_caption_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"study setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("data_seed", "warmup", "val_cider_images", "schedule_check_seeds"):
            if getattr(self, name) < 0:
                raise UsageError(f"study setting {name} must be >= 0, got {getattr(self, name)}")
        if self.images < 10:
            raise UsageError(f"study setting images must be at least 10 (one in ten is a test image), "
                             f"got {self.images}")
        if self.d_model % self.heads:
            raise UsageError(f"study setting d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"study setting dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise UsageError(f"study setting lr must be > 0, got {self.lr}")
        if self.decay not in DECAYS:
            raise UsageError(f"study setting decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.decay != "none" and self.steps <= self.warmup:
            raise UsageError(f"study setting steps ({self.steps}) must exceed warmup ({self.warmup}) with a decay")
        if self.schedule_check_seeds > self.seeds:
            raise UsageError(f"study setting schedule_check_seeds ({self.schedule_check_seeds}) must not exceed seeds "
                             f"({self.seeds})")
        if self.schedule_check_seeds and self.decay != "none" and short_steps(self.steps) <= self.warmup:
            raise UsageError(f"study setting steps ({self.steps}): the schedule check's short run "
                             f"({short_steps(self.steps)} steps) must exceed warmup ({self.warmup})")
        if not self.schedule_tolerance > 0:
            raise UsageError(f"study setting schedule_tolerance must be > 0, got {self.schedule_tolerance}")
        if not self.converge_tolerance > 0:
            raise UsageError(f"study setting converge_tolerance must be > 0, got {self.converge_tolerance}")
        if self.tokenizer not in TOKENIZERS:
            raise UsageError(f"study setting tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")

    def train_options(self, variant: str, seed: int) -> dict:
        """The TrainConfig fields (besides ``data`` and ``out``) of model (``variant``, ``seed``)."""
        if variant not in self.variants:
            raise UsageError(f"variant {variant!r} is not one of this study's ({', '.join(self.variants)})")
        return {"layers": self.layers, "d_model": self.d_model, "heads": self.heads, "d_ff": self.d_ff,
                "dropout": self.dropout, "steps": self.steps, "batch_size": self.batch_size, "optimizer": "adamw",
                "lr": self.lr, "warmup": self.warmup, "decay": self.decay, "val_every": self.val_every,
                "val_loss_images": self.val_loss_images, "val_cider": self.val_cider_images > 0,
                "val_images": self.val_cider_images, "checkpoint_every": self.steps, "seed": seed,
                **VARIANTS[variant]}

    def schedule_checked(self, seed: int) -> bool:
        """Whether model ``seed`` of each variant has a schedule check (a half-length run)."""
        return seed < self.schedule_check_seeds

    def short_train_options(self, variant: str, seed: int) -> dict:
        """The schedule check's short run of (``variant``, ``seed``): its train options with half the
        steps (:func:`geocap.study.schedule.short_steps`), everything else the same."""
        short = short_steps(self.steps)
        return {**self.train_options(variant, seed), "steps": short, "checkpoint_every": short}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variants"] = list(self.variants)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Optional["StudySettings"] = None) -> "StudySettings":
        """``base`` (default: the full study's) with the fields of ``data`` replaced; ValueError
        naming unknown fields or bad values."""
        if not isinstance(data, dict):
            raise UsageError(f"study settings must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(f"unknown study settings: {', '.join(unknown)} (known: {', '.join(known)})")
        merged = base.to_dict() if base is not None else {}
        merged.update(data)
        if isinstance(merged.get("variants"), str):
            merged["variants"] = [v for v in merged["variants"].split(",") if v]
        if not isinstance(merged.get("variants", ()), (list, tuple)):
            raise UsageError(f"study setting variants must be a list of names, got {merged['variants']!r}")
        return cls(**merged)

    def save(self, path) -> None:
        """Write the settings as JSON at ``path``, atomically."""
        import json

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "StudySettings":
        """The settings saved at ``path``: every field present (a file missing one was written by
        another version and is refused, naming the fields); ValueError naming the file."""
        path = os.fspath(path)
        data = read_json(path, "study settings file")
        try:
            if isinstance(data, dict):
                missing = [f.name for f in fields(cls) if f.name not in data]
                if missing:
                    raise DataError(f"settings missing: {', '.join(missing)}")
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: {err}") from None

    def differences(self, other: "StudySettings") -> list:
        """One ``"name (B there, A now)"`` per setting in which ``self`` (A, the settings asked for
        now) and ``other`` (B, e.g. those of a study folder) differ, in field order; empty when
        they define the same study."""
        now, there = self.to_dict(), other.to_dict()
        return [f"{name} ({there[name]!r} there, {now[name]!r} now)" for name in now if now[name] != there[name]]
