"""The training configuration: one flat dataclass, JSON-able, built from defaults, an optional
JSON file and command-line options (later sources win).

Data layout (what ``geocap synth DIR`` + ``geocap prepro captions --karpathy
DIR/dataset_coco.json --out DIR/caps`` produce)::

    DIR/features.h5      the feature store          (``features`` option, relative to DIR)
    DIR/caps/vocab.json  the captions directory     (``captions`` option, relative to DIR)
    DIR/caps/captions.h5

Run layout (``out``)::

    RUN/train_config.json      the resolved TrainConfig, ``data`` made absolute (written at the start,
                               rank 0, once every option and the data have been checked)
    RUN/checkpoint-latest.pt   every ``checkpoint_every`` steps and at the end
    RUN/checkpoint-best.pt     the checkpoint of the best validation CIDEr-D so far
    RUN/metrics.jsonl          one JSON object per line: "kind" "train" or "val"; train lines carry
                               "phase" ("xe" or "scst"; scst lines add "reward", "baseline",
                               "sample_length")
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from geocap.data.json_file import read_json
from geocap.kernels.geometry import EMBEDDINGS
from geocap.model import ORTConfig

from .schedule import DECAYS
from .scst import BASELINES
from geocap.errors import DataError, UsageError

CONFIG_FILE = "train_config.json"
LATEST, BEST, METRICS = "checkpoint-latest.pt", "checkpoint-best.pt", "metrics.jsonl"

# fields that shape the model or the data order: a resumed run must keep them
_ORT_DEFAULTS = {f.name: f.default for f in fields(ORTConfig) if f.default is not dataclasses.MISSING}
RESUME_FIXED = ("layers", "d_model", "heads", "d_ff", "dropout", "geometry", "embedding", "box_features", "features",
                "captions", "train_split", "batch_size", "seed", "captions_per_image", "pool_batches", "optimizer")


@dataclass
class TrainConfig:
    """Training options: cross-entropy, then optionally self-critical (the module doc has the layouts).

    Model: ``layers``, ``d_model``, ``heads``, ``d_ff``, ``dropout``, ``geometry``, ``embedding`` (the
    box embedding, "ort" or "signed"), ``box_features`` (each object's box appended to its features) as in
    ORTConfig (vocab_size and feature_dim come from the data). Steps count optimiser updates; ``steps`` is
    the total (a resumed run continues up to it). ``batch_size`` counts *images* per batch and
    process (DDP multiplies it), each with its captions: ``captions_per_image`` "all" (default;
    5 per image in COCO), an int k (the first k of each image, fewer when it has fewer) or
    "one-random" (one, drawn afresh each epoch); each image is encoded once per batch and its
    encoder dropout draw is shared by its captions. (Until per-image batches, ``batch_size``
    counted captions: ``batch_size=50`` then is ``batch_size=10`` with 5 captions per image now,
    ORT's ``batch_size 10, seq_per_img 5``.)

    Optimiser: ``"noam"`` = Adam(betas (0.9, 0.98), eps 1e-9) with ORT's schedule
    ``lr = lr_factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``; ``"adamw"`` = AdamW
    (``weight_decay``) whose lr rises linearly to ``lr`` over ``warmup`` steps, then follows
    ``decay``: ``"none"`` (stays at ``lr``: the default, the behaviour of every run made before
    decays existed), ``"cosine"`` or ``"linear"`` (falls to 0 at ``steps``, so the run has an end;
    :func:`geocap.train.schedule.decayed_lr`).
    ``grad_clip``: max L2 norm of all gradients (0 = no clipping; the norm is logged either way).
    ``label_smoothing`` ε: loss = (1-ε)·NLL + ε·mean over the words other than <pad> of -log p
    (all words when the vocabulary's <pad> is its <eos>, as ORT's).

    ``precision``: ``"auto"`` (bf16 autocast on a GPU that has it, else fp32), ``"fp32"``,
    ``"bf16"``, ``"fp16"`` (with a GradScaler; both also run on a CPU, slowly). ``device``: ``"auto"``
    (cuda:LOCAL_RANK when CUDA is there, else cpu), or a torch device string.

    Validation every ``val_every`` steps (0 = never; also at the end): greedy decoding of the
    ``val_split`` images (the first ``val_images``; 0 = all) up to ``max_decode_len`` words,
    CIDEr-D against their references (``val_cider``; false: no decoding, and no best checkpoint); and,
    when ``val_loss_images`` > 0, the teacher-forced loss of the first ``val_loss_images`` val images
    with its standard error over images (:func:`geocap.train.loop.validation_loss`: no decoding, so
    cheap; the convergence criterion's measure). ``checkpoint_every`` (0 = only at the end).

    Self-critical training (:mod:`geocap.train.scst`): the steps numbered from
    ``scst_from_step`` on (``step >= scst_from_step`` completed updates; -1 = never, the
    default; 0 = from the first step) use SCST instead of cross-entropy: batches of
    ``scst_batch_size`` training images per process (0 = ``batch_size``), ``scst_samples``
    sampled captions each (up to ``max_decode_len`` tokens), CIDEr-D reward (document frequencies
    of the training split's references), baseline ``scst_baseline`` ("greedy": the greedy
    caption's reward; "mean": the mean reward of the image's other samples, needs
    ``scst_samples >= 2``), a constant learning rate ``scst_lr`` (the optimiser and its moments
    carry on from cross-entropy; the schedule is not used), gradient clipping as above. The
    switch can come in the middle of a run or at a resume: ``--resume --scst-from-step S``
    continues a cross-entropy checkpoint of step s with SCST from step max(S, s) (a checkpoint
    already in SCST keeps its SCST: S <= s, same images per batch).
    """

    data: str = ""
    out: str = ""
    features: str = "features.h5"
    captions: str = "caps"
    train_split: str = "train"
    val_split: str = "val"
    # model (defaults are ORTConfig's, the one place ORT's sizes are written down)
    layers: int = _ORT_DEFAULTS["layers"]
    d_model: int = _ORT_DEFAULTS["d_model"]
    heads: int = _ORT_DEFAULTS["heads"]
    d_ff: int = _ORT_DEFAULTS["d_ff"]
    dropout: float = _ORT_DEFAULTS["dropout"]
    geometry: bool = _ORT_DEFAULTS["geometry"]
    embedding: str = _ORT_DEFAULTS["embedding"]
    box_features: bool = _ORT_DEFAULTS["box_features"]
    backend: str = "auto"
    # optimisation
    steps: int = 30000
    batch_size: int = 10
    optimizer: str = "noam"
    lr_factor: float = 1.0
    lr: float = 5e-4
    warmup: int = 20000
    decay: str = "none"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    # data
    captions_per_image: Union[str, int] = "all"
    pool_batches: int = 50
    num_workers: int = 0
    # evaluation, checkpoints, logging
    val_every: int = 1000
    val_images: int = 0
    val_cider: bool = True
    val_loss_images: int = 0
    val_batch_size: int = 50
    max_decode_len: int = 16
    checkpoint_every: int = 1000
    log_every: int = 10
    progress: bool = True
    # self-critical sequence training
    scst_from_step: int = -1
    scst_baseline: str = "greedy"
    scst_samples: int = 5
    scst_batch_size: int = 0
    scst_lr: float = 2e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the option for any value out of range or of the wrong type."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise UsageError(f"train option {f.name} must be an int, got {value!r}")
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UsageError(f"train option {f.name} must be a number, got {value!r}")
                setattr(self, f.name, float(value))
            elif f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise UsageError(f"train option {f.name} must be true or false, got {value!r}")
            elif f.type in ("str", str):
                if not isinstance(value, str):
                    raise UsageError(f"train option {f.name} must be a string, got {value!r}")
        positive = ("layers", "d_model", "heads", "d_ff", "steps", "batch_size", "pool_batches", "val_batch_size",
                    "max_decode_len", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"train option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "val_every", "val_images", "val_loss_images", "checkpoint_every", "num_workers",
                     "seed"):
            if getattr(self, name) < 0:
                raise UsageError(f"train option {name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise UsageError(f"train option d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"train option dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"train option label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("lr_factor", "lr", "scst_lr"):
            if not getattr(self, name) > 0:
                raise UsageError(f"train option {name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UsageError(f"train option {name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("noam", "adamw"):
            raise UsageError(f"train option optimizer must be 'noam' or 'adamw', got {self.optimizer!r}")
        if self.decay not in DECAYS:
            raise UsageError(f"train option decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.decay != "none" and self.optimizer != "adamw":
            raise UsageError(f"train option decay {self.decay!r} needs optimizer 'adamw' (noam has its own decay)")
        if self.decay != "none" and self.steps <= self.warmup:
            raise UsageError(f"train option decay {self.decay!r} needs steps ({self.steps}) > warmup ({self.warmup})")
        if self.optimizer == "noam" and self.warmup < 1:
            raise UsageError("train option warmup must be at least 1 with the noam schedule")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UsageError(f"train option precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.embedding not in EMBEDDINGS:
            raise UsageError(f"train option embedding must be one of {', '.join(map(repr, EMBEDDINGS))}, "
                             f"got {self.embedding!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise UsageError(f"train option backend must be auto, torch or triton, got {self.backend!r}")
        if self.scst_from_step < -1:
            raise UsageError(f"train option scst_from_step must be -1 (no SCST) or a step >= 0, "
                             f"got {self.scst_from_step}")
        if self.scst_baseline not in BASELINES:
            raise UsageError(f"train option scst_baseline must be 'greedy' or 'mean', got {self.scst_baseline!r}")
        if self.scst_samples < 1:
            raise UsageError(f"train option scst_samples must be at least 1, got {self.scst_samples}")
        if self.scst_baseline == "mean" and self.scst_samples < 2:
            raise UsageError(f"train option scst_samples must be at least 2 with scst_baseline 'mean' (a sample's "
                             f"baseline is the mean reward of its image's other samples), got {self.scst_samples}")
        if self.scst_batch_size < 0:
            raise UsageError(f"train option scst_batch_size must be >= 0 (0: batch_size), got {self.scst_batch_size}")
        cpi = self.captions_per_image
        if isinstance(cpi, str) and cpi.isdigit():
            self.captions_per_image = cpi = int(cpi)
        if cpi not in ("all", "one-random") and (isinstance(cpi, bool) or not isinstance(cpi, int) or cpi < 1):
            raise UsageError(f"train option captions_per_image must be 'all', 'one-random' or a positive int, "
                             f"got {cpi!r}")

    def require_paths(self) -> None:
        """ValueError unless ``data`` and ``out`` are set and the data files exist."""
        if not self.data:
            raise UsageError("train needs --data DIR (the folder holding features.h5 and the captions directory)")
        if not self.out:
            raise UsageError("train needs --out RUN (the folder for checkpoints and metrics)")
        if not os.path.isdir(self.data):
            raise DataError(f"--data {self.data}: not a directory")
        if not os.path.isfile(self.features_path):
            raise DataError(f"{self.features_path}: feature store missing (expected DIR/{self.features}; "
                             f"`geocap synth DIR` or `geocap prepro features` writes it)")
        if not os.path.isdir(self.captions_path):
            raise DataError(f"{self.captions_path}: captions directory missing (expected DIR/{self.captions}; "
                             f"`geocap prepro captions ... --out DIR/{self.captions}` writes it)")

    def phase_at(self, step: int) -> str:
        """``"scst"`` for the update after ``step`` completed ones when it is self-critical (see
        the class doc), else ``"xe"``."""
        return "scst" if 0 <= self.scst_from_step <= step else "xe"

    @property
    def scst_images_per_batch(self) -> int:
        """Images per SCST batch and process: ``scst_batch_size``, or ``batch_size`` when 0."""
        return self.scst_batch_size or self.batch_size

    @property
    def features_path(self) -> str:
        return os.path.join(self.data, self.features)

    @property
    def captions_path(self) -> str:
        return os.path.join(self.data, self.captions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Optional["TrainConfig"] = None) -> "TrainConfig":
        """``base`` (default: the defaults) with the fields of ``data`` replaced; unknown fields
        raise ValueError naming them."""
        if not isinstance(data, dict):
            raise UsageError(f"a train config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown train options: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        merged = base.to_dict() if base is not None else {}
        merged.update(data)
        return cls(**merged)

    @classmethod
    def load(cls, path, base: Optional["TrainConfig"] = None) -> "TrainConfig":
        """Read a JSON config file (a subset of the fields) over ``base``."""
        path = os.fspath(path)
        data = read_json(path, "JSON config file")
        try:
            return cls.from_dict(data, base)
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None
