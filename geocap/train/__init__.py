"""``geocap train``: cross-entropy training of the ORT captioner, then optionally self-critical
sequence training (SCST, CIDEr-D reward), single process or under torchrun
(DistributedDataParallel), with exact resume.

Usage::

    geocap synth DIR && geocap prepro captions --karpathy DIR/dataset_coco.json --out DIR/caps
    geocap train --data DIR --out RUN [--config options.json] [--OPTION VALUE ...] [--resume]
    torchrun --nproc_per_node=K -m geocap train --data DIR --out RUN ...
    geocap train --data DIR --out RUN --steps 40000 --scst-from-step 30000 [--scst-baseline mean]
    geocap train --out RUN --resume --steps 40000 --scst-from-step 30000   # SCST after a finished XE run

Options come from the TrainConfig defaults, then ``--config`` (a JSON object with a subset of the
fields), then the command line; ``--resume`` starts from RUN/train_config.json instead of the
defaults and continues RUN/checkpoint-latest.pt (``--steps`` may raise the total). See
:mod:`geocap.train.config` for the layouts and :mod:`geocap.train.loop` for the conventions.
"""
from __future__ import annotations

from .config import BEST, CONFIG_FILE, LATEST, METRICS, TrainConfig
from .loop import TrainResult, epoch_batches, initial_checkpoint, train, validate, validation_loss
from .schedule import DECAYS, LRSchedule, decayed_lr, noam_lr, warmup_lr
from .scst import PolicyModule, SCSTObjective, SCSTStats, mean_baseline, reward_scorer, scst_loss
from .step import (CaptionRows, CrossEntropyObjective, caption_rows, make_optimizer, optimizer_update, target_mask,
                   token_loss)

__all__ = ["BEST", "CONFIG_FILE", "DECAYS", "decayed_lr", "initial_checkpoint", "LATEST", "METRICS", "CaptionRows",
           "CrossEntropyObjective", "LRSchedule",
           "PolicyModule", "SCSTObjective", "SCSTStats", "TrainConfig", "TrainResult",
           "caption_rows", "epoch_batches", "make_optimizer", "mean_baseline", "noam_lr",
           "optimizer_update",
           "reward_scorer", "scst_loss", "target_mask", "token_loss", "train",
           "validate", "validation_loss", "warmup_lr"]
