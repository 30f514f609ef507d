"""The settings that define a study (``geocap study``): one flat dataclass, JSON-able, compared
field by field, so that a study folder is only ever continued with the settings it was begun with.

Variants (``VARIANTS``) are ORT's geometry exactly (``ort``), no geometry (``none``, ORT's
ablation) and a direction-aware geometry embedding (``directional``); they differ only in the
train options of ``VARIANTS[variant]``, everything else (data, sizes, steps, seeds) is shared.
The seeds of a study are ``0 .. seeds - 1``; seed k trains with ``TrainConfig.seed = k`` (the
model's initialisation, dropout and the data order).

Sizes, from the time per training step measured on the 2-core CPU machine the study was
written on (torch 2.13, fp32, batches of 10 images with their 5 captions, d_model 128, 4 heads,
d_ff 256, 256-dimensional features, one torch thread because the machine was shared; 2026-12-04):
2 layers 0.067 s/step, 6 layers 0.24 s/step (6 layers, d_model 256, d_ff 1024: 0.59 s/step).
Two torch threads on the same, shared, cores were 7-25x slower (1.65 s/step for 2 layers):
on a shared machine run the study with ``OMP_NUM_THREADS=1``.

* full (the defaults, ``full()``): 9 models (3 variants x 3 seeds) in at most 90 min = 600 s
  per model. 6 layers (ORT's depth), d_model 128, 6000 images (4800 train), 4000 steps of 10
  images (~8 epochs). The first full study (2026-12-04) trained 2000 steps: 2666 s for the 9
  models, and 6 of the 9 had not converged (validation CIDEr-D still gaining 8-22 % over the last
  fifth of training). At 4000 steps (2026-12-06, one torch thread, the other core busy) a model
  took 544-597 s (mean 572 s: ~0.13 s per training step, ~40 s for evaluation, dump and
  analyses), ~86 min for the 9, the longest run that fits the 90 minutes; 8 of the 9 had still
  not converged (gains of 7-17 %).
* quick (``for_quick()``): 6 models (3 variants x 2 seeds) in at most 10 minutes: 2 layers,
  1000 steps on 3000 images (the demo's data size). Measured with ort and none, 2 seeds each:
  4 models in 214 s (50-56 s per model, 47 s of it training), so ~5.5 min for the six.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from geocap.data.atomic import write_text_atomic
from geocap.data.json_file import read_json

__all__ = ["SETTINGS_FILE", "StudySettings", "VARIANTS"]

SETTINGS_FILE = "settings.json"

# variant -> the train options (TrainConfig fields) that make it; all other options are shared
VARIANTS = {
    "ort": {"geometry": True},
    "none": {"geometry": False},
    "directional": {"geometry": True, "embedding": "signed"},
}
TOKENIZERS = ("auto", "java", "python")


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
    after ``warmup`` linear steps), ``val_every`` steps validation on the first ``val_images``
    val images (greedy, CIDEr-D; the best one is the checkpoint evaluated).
    Evaluation on the test split: ``beam_size``, ``max_decode_len`` words, ``tokenizer`` of the
    caption metrics (auto: Java's PTB tokenizer when Java is there).
    """

    variants: tuple = ("ort", "none", "directional")
    seeds: int = 3
    quick: bool = False
    # data
    images: int = 6000
    feature_dim: int = 256
    data_seed: int = 0
    min_count: int = 5
    max_caption_len: int = 16
    # model and training
    layers: int = 6
    d_model: int = 128
    heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    steps: int = 4000
    batch_size: int = 10
    lr: float = 1e-3
    warmup: int = 100
    val_every: int = 200
    val_images: int = 200
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
        quick = dict(seeds=2, quick=True, images=3000, layers=2, steps=1000, warmup=50, val_every=200,
                     val_images=100)
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
                raise ValueError(f"study setting {f.name} must be an int, got {value!r}")
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"study setting {f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"study setting {f.name} must be true or false, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"study setting {f.name} must be a string, got {value!r}")
        if not self.variants:
            raise ValueError("study setting variants must name at least one variant")
        for name in self.variants:
            if name not in VARIANTS:
                raise ValueError(f"study setting variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"study setting variants names a variant twice: {', '.join(self.variants)}")
        for name in ("seeds", "images", "layers", "d_model", "heads", "d_ff", "steps", "batch_size", "val_every",
                     "beam_size", "max_decode_len", "min_count", "max_caption_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"study setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("data_seed", "warmup", "val_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"study setting {name} must be >= 0, got {getattr(self, name)}")
        if self.images < 10:
            raise ValueError(f"study setting images must be at least 10 (one in ten is a test image), "
                             f"got {self.images}")
        if self.d_model % self.heads:
            raise ValueError(f"study setting d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"study setting dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"study setting lr must be > 0, got {self.lr}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"study setting tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")

    def train_options(self, variant: str, seed: int) -> dict:
        """The TrainConfig fields (besides ``data`` and ``out``) of model (``variant``, ``seed``)."""
        if variant not in self.variants:
            raise ValueError(f"variant {variant!r} is not one of this study's ({', '.join(self.variants)})")
        return {"layers": self.layers, "d_model": self.d_model, "heads": self.heads, "d_ff": self.d_ff,
                "dropout": self.dropout, "steps": self.steps, "batch_size": self.batch_size, "optimizer": "adamw",
                "lr": self.lr, "warmup": self.warmup, "val_every": self.val_every, "val_images": self.val_images,
                "checkpoint_every": self.steps, "seed": seed, **VARIANTS[variant]}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variants"] = list(self.variants)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Optional["StudySettings"] = None) -> "StudySettings":
        """``base`` (default: the full study's) with the fields of ``data`` replaced; ValueError
        naming unknown fields or bad values."""
        if not isinstance(data, dict):
            raise ValueError(f"study settings must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown study settings: {', '.join(unknown)} (known: {', '.join(known)})")
        merged = base.to_dict() if base is not None else {}
        merged.update(data)
        if isinstance(merged.get("variants"), str):
            merged["variants"] = [v for v in merged["variants"].split(",") if v]
        if not isinstance(merged.get("variants", ()), (list, tuple)):
            raise ValueError(f"study setting variants must be a list of names, got {merged['variants']!r}")
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
                    raise ValueError(f"settings missing: {', '.join(missing)}")
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def differences(self, other: "StudySettings") -> list:
        """One ``"name (B there, A now)"`` per setting in which ``self`` (A, the settings asked for
        now) and ``other`` (B, e.g. those of a study folder) differ, in field order; empty when
        they define the same study."""
        now, there = self.to_dict(), other.to_dict()
        return [f"{name} ({there[name]!r} there, {now[name]!r} now)" for name in now if now[name] != there[name]]
