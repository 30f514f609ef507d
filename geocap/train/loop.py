"""Training of the ORT captioner (``geocap train``): cross-entropy, then optionally
self-critical sequence training (SCST, :mod:`geocap.train.scst`).

Conventions:

- A step is one optimiser update on one batch per process; ``step`` counts completed updates.
- Cross-entropy batches are batches of ``batch_size`` training *images* (the per-image dataset),
  each with its captions (all of them, the first ``captions_per_image`` k, or one drawn at
  random): each image is encoded once and its memory expanded to its captions
  (:mod:`geocap.train.step`; the encoder's dropout draw is shared by an image's captions).
  Runs written before batches were per image (they counted captions) cannot be resumed in
  cross-entropy (the checkpoint's ``extra["xe_batches"]`` is ``"images"`` since).
- Loss: next-token cross-entropy with teacher forcing (inputs ``captions[:, :-1]``, targets
  ``captions[:, 1:]``), averaged over the batch's targets up to and including each caption's <eos>
  (found from the caption lengths: the vocabulary's <eos> may be its <pad>, as ORT's); optional
  label smoothing (see :class:`~geocap.train.config.TrainConfig`). DDP averages gradients over
  the processes. The model's ``pad_id``/``bos_id``/``eos_id`` are the vocabulary's.
- Phases: the update after ``step`` completed ones is self-critical when
  ``TrainConfig.phase_at(step) == "scst"`` (``step >= scst_from_step``), with its own data
  stream: batches of training *images* (per-image dataset, same sampler, seed and rank split),
  whose epochs count from 0 at the switch. DDP wraps a :class:`~geocap.train.scst.PolicyModule`
  whose one forward does teacher forcing or sampling, so both phases' gradients are all-reduced
  as usual; the greedy baseline is decoded by the unwrapped model under ``no_grad``.
- Data order: :class:`~geocap.data.dataset.BucketBatchSampler` (seed ``seed``, epoch e) gives the
  epoch's batch list; with W processes, rank r takes batches ``r, r + W, ...`` of the first
  ``W * floor(len / W)``, so every rank runs the same number of steps. ``data_position`` =
  ``{"epoch": e, "batch": i}``: the next batch is the i-th of rank's epoch-e list of the data
  stream of ``phase_at(step)`` (the checkpoint also records it as ``extra["data_phase"]``; the
  position is reset to epoch 0, batch 0 at the switch, and when a cross-entropy checkpoint is
  resumed with an ``scst_from_step`` it has already reached).
- Randomness: the model is initialised from ``seed`` (identical on every rank; DDP broadcasts rank
  0's weights anyway); training then reseeds torch with ``seed + 1000003 * rank`` (dropout differs
  per rank). The DataLoader gets its own generator per epoch, so it never draws from the global
  generator. Validation runs under ``torch.random.fork_rng`` and leaves the generators untouched.
- Exact resume: a checkpoint holds the weights, optimiser, schedule, GradScaler, step, data
  position and phase, and every rank's random states (``extra["rank_rng"]``), so resuming from
  ``checkpoint-latest.pt`` and training on gives the same parameters as training straight through
  (same number of processes; with ``num_workers > 0`` and ``captions_per_image="one-random"`` the
  workers' caption draws are reproducible per epoch but not across a mid-epoch resume).
- Resume checks: the checkpoint records the SHA-256 of the data files (:func:`data_digest`);
  ``--resume`` refuses other bytes (even of the same shapes and vocabulary) and a ``steps`` below
  the step already reached.
- Only rank 0 writes files; checkpoints are written atomically (temporary file + rename). At the
  start rank 0 deletes what killed runs left in RUN: the temporaries ``<name>.tmp-<pid>`` of the
  run's own files (config, checkpoints, metrics) whose pid is no longer alive
  (:func:`geocap.data.atomic.remove_stale_temporaries`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler

from geocap import distributed as D
from geocap import stop
from geocap.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from geocap.data.atomic import remove_stale_temporaries, write_text_atomic
from geocap.data.dataset import BucketBatchSampler, CaptionDataset
from geocap.data.file_digest import file_sha256
from geocap.errors import DataError, UsageError
from geocap.decoding import greedy_decode
from geocap.metrics import cider_d
from geocap.model import ObjectRelationTransformer, ORTConfig
from geocap.progress import progress_bar

from .config import BEST, CONFIG_FILE, LATEST, METRICS, RESUME_FIXED, TrainConfig
from .schedule import LRSchedule
from .scst import PolicyModule, SCSTObjective, captions_text, reward_scorer
from .step import CrossEntropyObjective, make_optimizer, optimizer_update

RUN_FILES = (CONFIG_FILE, LATEST, BEST, METRICS)  # what a run writes in RUN
XE_BATCHES = "images"  # extra["xe_batches"]: what a cross-entropy batch counts (checked at resume)


@dataclass
class TrainResult:
    """What :func:`train` did: the final ``step``, the best validation CIDEr-D and its step
    (None without validation), the last validation entry, the trained model (unwrapped, on its
    device) and the run folder."""
    step: int
    best_cider: Optional[float]
    best_step: Optional[int]
    last_val: Optional[dict]
    model: ObjectRelationTransformer
    out: str
    history: list = field(default_factory=list)


class _Batches(Sampler):
    """A fixed list of index batches, as a DataLoader ``batch_sampler``."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def epoch_batches(sampler: BucketBatchSampler, epoch: int, rank: int = 0, world_size: int = 1) -> list:
    """Rank ``rank``'s index batches of ``epoch`` (see the module doc)."""
    sampler.set_epoch(epoch)
    batches = list(sampler)
    if world_size > 1:
        usable = len(batches) // world_size * world_size
        batches = batches[rank:usable:world_size]
    return batches


def _resolve_precision(config: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, None for fp32."""
    if config.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if config.precision == "fp32":
        return None
    return torch.bfloat16 if config.precision == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _rng_as_json() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _restore_rank_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and state.get("cuda"):
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


@contextlib.contextmanager
def _evaluating(model: ObjectRelationTransformer, device: torch.device):
    """Inside the block: the model in eval mode, no gradients, every random generator forked (the
    run's streams are left as they were); the model's mode comes back after it."""
    was_training = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _image_batches(dataset: CaptionDataset, n: int, batch_size: int, device: torch.device):
    """``(first image's position, batch on device)`` over the first ``n`` images of ``dataset``."""
    for start in range(0, n, batch_size):
        yield start, dataset.collate([dataset[i] for i in range(start, min(n, start + batch_size))]).to(device)


def validate(model: ObjectRelationTransformer, dataset: CaptionDataset, *, images: int = 0, batch_size: int = 50,
             max_len: int = 16, device: torch.device = torch.device("cpu"),
             amp_dtype: Optional[torch.dtype] = None) -> dict:
    """Greedy-decode the first ``images`` (0 = all) images of ``dataset`` (a per-image
    CaptionDataset) and score them with CIDEr-D against their references (document frequencies
    from these images' references, as coco-caption). Returns ``{"cider_d", "images",
    "examples"}`` (a few ``[image_id, caption]``). The model's mode and every random generator
    are left as they were."""
    n = len(dataset) if images <= 0 else min(images, len(dataset))
    vocab = dataset.vocab
    res, gts = {}, {}
    with _evaluating(model, device):
        for _, batch in _image_batches(dataset, n, batch_size, device):
            with _autocast(device, amp_dtype):
                memory = model.encode(batch.features, batch.boxes, batch.attention_mask)
                decoded = greedy_decode(model, memory, max_len=max_len)
            for image_id, caption in zip(batch.image_ids.tolist(), captions_text(decoded, vocab)):
                res[image_id] = caption
                gts[image_id] = dataset.references(image_id)
    score, _ = cider_d(gts, res)
    examples = [[i, res[i]] for i in list(res)[:3]]
    return {"cider_d": float(score), "images": n, "examples": examples}


def validation_loss(model: ObjectRelationTransformer, dataset: CaptionDataset, *, images: int = 0,
                    batch_size: int = 50, device: torch.device = torch.device("cpu"),
                    amp_dtype: Optional[torch.dtype] = None, per_image: bool = False) -> dict:
    """Teacher-forced cross-entropy (no label smoothing, no dropout) of the first ``images`` (0 =
    all) images of ``dataset`` (a per-image CaptionDataset with every caption of each image), each
    caption's words and <eos> (:mod:`geocap.train.step`): no decoding, so it is cheap enough for a
    thousand images at every validation. Returns ``{"loss", "loss_se", "images", "tokens"}``:
    ``loss`` = summed token losses / tokens; ``loss_se`` its standard error over images (the
    ratio estimator's: with per-image sums ``s_i`` and token counts ``t_i``, ``sqrt(sum (s_i -
    loss t_i)^2 / (n (n - 1))) / mean t``; None for one image), the noise a convergence criterion
    must beat. ``per_image``: also ``"image_sums"`` and ``"image_tokens"`` (float64 tensors [n]: each
    image's summed token losses and its tokens), for a comparison of two models paired over images.
    The model's mode and every random generator are left as they were."""
    from .scst import PolicyModule
    from .step import caption_rows, target_mask

    n = len(dataset) if images <= 0 else min(images, len(dataset))
    if n < 1:
        raise ValueError("validation_loss: the dataset has no image")
    policy = PolicyModule(model)
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    with _evaluating(model, device):
        for start, batch in _image_batches(dataset, n, batch_size, device):
            rows = caption_rows(batch)
            inputs, targets = rows.captions[:, :-1], rows.captions[:, 1:]
            mask = target_mask(rows.lengths, targets.shape[1])
            with _autocast(device, amp_dtype):
                log_probs = policy(batch.features, batch.boxes, batch.attention_mask, inputs,
                                   image_index=rows.image_index, positions=mask)      # [M, V]
            nll = -log_probs.float().gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)   # [M]
            image = rows.image_index[:, None].expand_as(mask)[mask].cpu() + start        # [M]
            sums.index_add_(0, image, nll.double().cpu())
            counts.index_add_(0, image, torch.ones_like(nll, dtype=torch.float64).cpu())
    loss = float(sums.sum() / counts.sum())
    se = None
    if n > 1:
        resid = sums - loss * counts
        se = float(torch.sqrt((resid ** 2).sum() / (n * (n - 1))) / counts.mean())
    got = {"loss": loss, "loss_se": se, "images": n, "tokens": int(counts.sum())}
    if per_image:
        got.update(image_sums=sums, image_tokens=counts)
    return got


class _MetricsLog:
    """Appends JSON lines to RUN/metrics.jsonl (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            # drop what a crashed run logged after the checkpoint it resumes from
            kept = []
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(entry, dict) and entry.get("step", 0) <= resume_step:
                        kept.append(json.dumps(entry))
            write_text_atomic(path, "".join(k + "\n" for k in kept))
        elif enabled and resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, entry: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train per ``config`` (see TrainConfig and the module doc), from scratch or, with
    ``resume``, from ``config.out``/checkpoint-latest.pt. Under torchrun (WORLD_SIZE > 1) this
    runs DistributedDataParallel. ValueError for bad options, missing data, a run folder that
    already holds a run (without ``resume``), or a checkpoint that does not fit the options or
    the data; all of them are raised before anything is written in ``config.out``. The run's
    ``train_config.json`` (and checkpoints) record ``data`` as an absolute path."""
    config.validate()
    config.require_paths()
    # the run records where its data is: absolute, so that --resume works from any directory
    config = dataclasses.replace(config, data=os.path.abspath(config.data))
    device = D.resolve_device(config.device)
    amp_dtype = _resolve_precision(config, device)
    latest_path, best_path = os.path.join(config.out, LATEST), os.path.join(config.out, BEST)
    if resume and not os.path.isfile(latest_path):
        raise UsageError(f"--resume: {latest_path} missing (nothing to resume)")
    if not resume and os.path.exists(latest_path):
        raise UsageError(f"{config.out} already holds a training run ({LATEST}); pass --resume to continue it "
                         f"or choose another --out")
    info = D.setup(device.type)
    try:
        return Trainer(config, resume, info, device, amp_dtype, latest_path, best_path).run()
    finally:
        D.teardown(info)


def _model_config(config: TrainConfig, train_ds: CaptionDataset) -> ORTConfig:
    """The model ``config`` trains on the data of ``train_ds`` (its vocabulary and feature width)."""
    vocab = train_ds.vocab
    return ORTConfig(vocab_size=len(vocab), feature_dim=train_ds.store.feature_dim, layers=config.layers,
                     d_model=config.d_model, heads=config.heads, d_ff=config.d_ff, dropout=config.dropout,
                     geometry=config.geometry, embedding=config.embedding, box_features=config.box_features,
                     pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id)


def _initial_model(config: TrainConfig, model_config: ORTConfig, device: torch.device) -> ObjectRelationTransformer:
    """The model before its first update: initialised from ``torch.manual_seed(config.seed)``."""
    torch.manual_seed(config.seed)
    return ObjectRelationTransformer(model_config, backend=config.backend).to(device)


def initial_checkpoint(config: TrainConfig, path) -> None:
    """Write to ``path`` (atomically) the checkpoint of the model :func:`train` would start from with
    ``config`` (its random initialisation, step 0, the data's vocabulary): an *untrained* control
    with the very weights the trained model began from. The global torch generator is left as it
    was. ValueError for bad options or missing data."""
    config.validate()
    config.require_paths()
    train_ds = CaptionDataset(config.features_path, config.captions_path, config.train_split, per_image=True)
    model_config = _model_config(config, train_ds)
    with torch.random.fork_rng(devices=[]):
        model = _initial_model(config, model_config, torch.device("cpu"))
    save_checkpoint(path, model=model, config=model_config, vocab=train_ds.vocab, step=0, rng=False,
                    extra={"untrained": True, "train_config": config.to_dict()})


def data_digest(config: TrainConfig) -> dict:
    """SHA-256 of the data a run trains on: ``{"features": hex, "captions/<file>": hex, ...}`` for
    the feature store and every file of the captions folder (temporaries left out). Recorded in
    every checkpoint (``extra["data_digest"]``) and compared when the run is resumed."""
    digest = {"features": file_sha256(config.features_path)}
    for name in sorted(os.listdir(config.captions_path)):
        path = os.path.join(config.captions_path, name)
        if os.path.isfile(path) and ".tmp-" not in name:
            digest[f"captions/{name}"] = file_sha256(path)
    return digest


def _check_resume_data(saved: Optional[dict], now: dict, config: TrainConfig, latest_path: str) -> None:
    """DataError unless the data now are the bytes the run started with (``saved``: the
    checkpoint's digest; a checkpoint written before digests were recorded is not checked)."""
    if not saved:
        return
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        where = {"features": config.features_path}
        names = [where.get(k, os.path.join(config.data, config.captions, k.split("/", 1)[-1])) for k in changed]
        raise DataError(f"cannot resume {latest_path}: the data are not those the run started with "
                        f"({', '.join(names)} differ from what its checkpoint recorded, by SHA-256)")


def _check_resume_phase(config: TrainConfig, ckpt, saved: dict, latest_path: str) -> str:
    """The phase of ``ckpt``'s data position; ValueError when ``config`` cannot continue it."""
    phase = ckpt.extra.get("data_phase", "xe")
    if phase not in ("xe", "scst"):
        raise UsageError(f"{latest_path}: unknown data_phase {phase!r} (expected 'xe' or 'scst')")
    if phase == "scst":
        if config.phase_at(ckpt.step) != "scst":
            raise UsageError(f"cannot resume {latest_path}: it trained with SCST up to step {ckpt.step} "
                             f"(scst_from_step {saved.get('scst_from_step')!r}); scst_from_step must stay between "
                             f"0 and {ckpt.step}, got {config.scst_from_step}")
        before = saved.get("scst_batch_size") or saved.get("batch_size")
        if before is not None and before != config.scst_images_per_batch:
            raise UsageError(f"cannot resume {latest_path} with other SCST images per batch ({before} there, "
                             f"{config.scst_images_per_batch} now; scst_batch_size, or batch_size when it is 0)")
    return phase


@dataclass
class _Interval:
    """What the steps since the last log line summed: the loss, the number of steps and target tokens,
    and (SCST) the reward, the baseline and the sample length."""
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    reward: float = 0.0
    baseline: float = 0.0
    length: float = 0.0

    def add(self, loss: float, tokens: int, stats) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        if stats is not None:
            self.reward += stats.reward
            self.baseline += stats.baseline
            self.length += stats.sample_length


class Trainer:
    """One run of :func:`train` on one process: built in checked steps, then :meth:`run`.

    The constructor reads and checks everything (resume checkpoint, data, model, optimiser) and
    writes nothing; :meth:`run` writes the run folder and trains. Steps, in order:
    :meth:`_check_resume` (the checkpoint against the options), :meth:`_setup_data` (digest,
    datasets, objective), :meth:`_check_checkpoint_fits` (the checkpoint against the data),
    :meth:`_setup_model` (model, optimiser, schedule, scaler, the run's generators),
    :meth:`_restore` (the checkpoint's state). While training, each update is :meth:`_step`,
    then :meth:`_log_interval`, :meth:`_validate` and :meth:`_save`. The order of every random
    draw is that of the one function this class replaced, so runs and resumes are unchanged.
    """

    def __init__(self, config: TrainConfig, resume: bool, info, device: torch.device,
                 amp_dtype: Optional[torch.dtype], latest_path: str, best_path: str):
        self.config, self.info, self.device, self.amp_dtype = config, info, device, amp_dtype
        self.latest_path, self.best_path = latest_path, best_path
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.ckpt, self.ckpt_phase = self._check_resume() if resume else (None, "xe")
        self._setup_data()
        self._check_checkpoint_fits()
        self._setup_model()
        if self.ckpt is not None:
            self._restore()
        self.net = PolicyModule(self.model)
        if info.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.xe_sampler = BucketBatchSampler(self.train_ds.box_counts, config.batch_size, shuffle=True,
                                             pool_batches=config.pool_batches, seed=config.seed)
        self._scst_parts = []  # [dataset, sampler, objective], built when the first SCST step comes
        self.last_val, self.history = None, []

    # ------------------------------------------------------------------ setup

    def _check_resume(self) -> tuple:
        """``(checkpoint, its data phase)`` of RUN/checkpoint-latest.pt; ValueError (UsageError for
        ``--steps``) when the options cannot continue it."""
        config, latest_path, world_size = self.config, self.latest_path, self.info.world_size
        ckpt = load_checkpoint(latest_path)
        saved = ckpt.extra.get("train_config") or {}
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(config, k)]
        if changed:
            raise UsageError(f"cannot resume {latest_path} with other " + ", ".join(
                f"{k} ({saved[k]!r} there, {getattr(config, k)!r} now)" for k in changed))
        if ckpt.extra.get("world_size", 1) != world_size:
            raise UsageError(f"{latest_path} was written by {ckpt.extra.get('world_size', 1)} processes; resume "
                             f"with as many (now {world_size})")
        if config.steps < ckpt.step:
            raise UsageError(f"--steps {config.steps} is below the step {latest_path} has reached ({ckpt.step}); "
                             f"give --steps {ckpt.step} or more to continue the run")
        phase = _check_resume_phase(config, ckpt, saved, latest_path)
        if (phase == "xe" and config.phase_at(ckpt.step) == "xe"
                and ckpt.extra.get("xe_batches") != XE_BATCHES):
            raise UsageError(f"cannot resume {latest_path} in cross-entropy: it was written when a batch held "
                             f"--batch-size captions (now images, each with its captions), so its data position "
                             f"means other batches; continue it with SCST (--scst-from-step {ckpt.step}) or start "
                             f"a new run")
        return ckpt, phase

    def _setup_data(self) -> None:
        """The data digest (rank 0's, broadcast), the training and validation datasets and the
        cross-entropy objective."""
        config, info = self.config, self.info
        self.digest = D.broadcast_object(info, data_digest(config) if info.is_main else None)
        cpi = config.captions_per_image
        self.train_ds = CaptionDataset(config.features_path, config.captions_path, config.train_split, per_image=True,
                                       captions_per_image="one-random" if cpi == "one-random" else "all")
        self.vocab = self.train_ds.vocab
        self.xe_objective = CrossEntropyObjective.for_vocab(self.vocab, smoothing=config.label_smoothing,
                                                            captions_per_image=cpi if isinstance(cpi, int) else None)
        self.val_ds, self.val_loss_ds = None, None
        if config.val_every > 0 and config.val_cider:
            self.val_ds = CaptionDataset(config.features_path, config.captions_path, config.val_split,
                                         per_image=True, captions_per_image=1)
        if config.val_every > 0 and config.val_loss_images > 0:
            self.val_loss_ds = CaptionDataset(config.features_path, config.captions_path, config.val_split,
                                              per_image=True, captions_per_image="all")
        self.model_config = _model_config(config, self.train_ds)

    def _check_checkpoint_fits(self) -> None:
        """ValueError unless the checkpoint (if any) has the model config, vocabulary and data of now."""
        ckpt, latest_path = self.ckpt, self.latest_path
        if ckpt is None:
            return
        if ckpt.config != self.model_config:
            raise UsageError(f"{latest_path}: its model config does not fit the data and options "
                             f"({ckpt.config.to_dict()} vs {self.model_config.to_dict()})")
        if ckpt.vocab != self.vocab:
            raise UsageError(f"{latest_path}: trained with another vocabulary than {self.config.captions_path}")
        # after the checks that say more: same shapes and vocabulary, other bytes
        _check_resume_data(ckpt.extra.get("data_digest"), self.digest, self.config, latest_path)

    def _setup_model(self) -> None:
        """The initial model, its optimiser, learning-rate schedule and GradScaler, the position at
        step 0, and the run's generator reseeded per rank (see the module doc)."""
        config, device = self.config, self.device
        self.model = _initial_model(config, self.model_config, device)
        self.params = list(self.model.parameters())
        self.optimizer = make_optimizer(self.params, config.optimizer,
                                        lr=0.0 if config.optimizer == "noam" else config.lr,
                                        weight_decay=config.weight_decay)
        if config.optimizer == "noam":
            self.schedule = LRSchedule(self.optimizer, "noam", warmup=config.warmup, d_model=config.d_model,
                                       factor=config.lr_factor)
        else:
            self.schedule = LRSchedule(self.optimizer, "warmup", warmup=config.warmup, lr=config.lr,
                                       decay=config.decay, total=config.steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.batch_index = 0, 0, 0
        self.best_cider, self.best_step = None, None
        torch.manual_seed(config.seed + 1000003 * self.info.rank)

    def _restore(self) -> None:
        """The checkpoint's weights, optimiser, schedule, scaler, step, data position, best score and
        random states (the data position restarts when the phase changed since it was written)."""
        ckpt = self.ckpt
        self.model.load_state_dict(ckpt.model_state)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.schedule.load_state_dict(ckpt.scheduler_state)
        if ckpt.extra.get("scaler"):
            self.scaler.load_state_dict(ckpt.extra["scaler"])
        self.step = ckpt.step
        pos = ckpt.data_position or {}
        self.epoch, self.batch_index = int(pos.get("epoch", 0)), int(pos.get("batch", 0))
        if self.ckpt_phase != self.config.phase_at(self.step):  # cross-entropy continued with SCST: data from the start
            self.epoch, self.batch_index = 0, 0
        best = ckpt.extra.get("best") or {}
        self.best_cider, self.best_step = best.get("cider_d"), best.get("step")
        restore_rng(ckpt)
        ranks = ckpt.extra.get("rank_rng") or []
        if len(ranks) > self.info.rank:
            _restore_rank_rng(ranks[self.info.rank])

    def _phase_data(self, phase: str) -> tuple:
        """``(dataset, sampler, objective)`` of ``phase``'s data stream (objective None in cross-entropy)."""
        config = self.config
        if phase == "xe":
            return self.train_ds, self.xe_sampler, None
        if not self._scst_parts:  # draws no random number: exact resume holds wherever it is built
            ds = CaptionDataset(config.features_path, config.captions_path, config.train_split, per_image=True,
                                captions_per_image=1)
            objective = SCSTObjective(reward_scorer(ds), self.vocab, samples=config.scst_samples,
                                      baseline=config.scst_baseline, max_len=config.max_decode_len)
            self._scst_parts.extend([ds, BucketBatchSampler(ds.box_counts, config.scst_images_per_batch,
                                                            shuffle=True, pool_batches=config.pool_batches,
                                                            seed=config.seed),
                                     objective])
        return tuple(self._scst_parts)

    def _no_batch(self, phase: str) -> str:
        dataset, _, _ = self._phase_data(phase)
        size = self.config.scst_images_per_batch if phase == "scst" else self.config.batch_size
        return (f"split {self.config.train_split!r} gives no {phase} batch per process "
                f"({len(dataset)} images, {size} per batch, {self.info.world_size} processes)")

    def _epoch_batches(self, sampler) -> list:
        return epoch_batches(sampler, self.epoch, self.info.rank, self.info.world_size)

    def _start_run_folder(self) -> None:
        """Check that the first step has a batch, then (rank 0) create RUN, remove what killed runs
        left there and write its config: the first write, after every check."""
        config = self.config
        phase = config.phase_at(self.step)
        if not self._epoch_batches(self._phase_data(phase)[1]):
            raise DataError(self._no_batch(phase))
        if self.info.is_main:
            os.makedirs(config.out, exist_ok=True)
            for name in RUN_FILES:
                remove_stale_temporaries(os.path.join(config.out, name))
            write_text_atomic(os.path.join(config.out, CONFIG_FILE), json.dumps(config.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------------ training

    def _amp_context(self):
        return _autocast(self.device, self.amp_dtype)

    def _step(self, batch, objective) -> tuple:
        """One optimiser update on ``batch`` (``objective`` None: cross-entropy, else SCST's):
        ``(loss, target tokens, SCST stats or None, lr, grad_norm)``."""
        config, optimizer = self.config, self.optimizer
        stats = None
        if objective is None:
            lr = self.schedule.get_last_lr()[0]
            loss, tokens = self.xe_objective(self.net, batch, autocast=self._amp_context)
        else:
            lr = config.scst_lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, stats = objective(self.net, self.model, batch, autocast=self._amp_context)
            tokens = stats.tokens
        if not torch.isfinite(loss) and not self.scaler.is_enabled():
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step + 1}; lower the learning rate")
        grad_norm = optimizer_update(loss, optimizer, self.params, grad_clip=config.grad_clip, scaler=self.scaler)
        self.schedule.step()
        self.step += 1
        self.batch_index += 1
        return loss, tokens, stats, lr, grad_norm

    def _log_interval(self, interval: _Interval, phase: str, lr: float, grad_norm) -> None:
        """The train entry of the steps in ``interval`` (means over processes) to the log, the
        history and the progress bar."""
        info = self.info
        mean_loss, mean_reward, mean_baseline, mean_length = D.mean_scalars(
            info, [x / interval.steps for x in (interval.loss, interval.reward, interval.baseline, interval.length)],
            self.device)
        entry = {"kind": "train", "phase": phase, "step": self.step, "epoch": self.epoch, "loss": mean_loss,
                 "lr": lr, "grad_norm": float(grad_norm), "tokens": interval.tokens * info.world_size,
                 "time": time.perf_counter() - self.started}
        postfix = f"loss {mean_loss:.3f} lr {lr:.2e}"
        if phase == "scst":
            entry.update(reward=mean_reward, baseline=mean_baseline, sample_length=mean_length)
            postfix = f"reward {mean_reward:.3f} baseline {mean_baseline:.3f} lr {lr:.2e}"
        self.log.write(entry)
        self.history.append(entry)
        self.bar.set_postfix_str(postfix, refresh=False)  # shown at the next update

    def _validate(self) -> None:
        """Validation on rank 0 (CIDEr-D and/or the teacher-forced loss) logged; the best checkpoint
        saved when CIDEr-D improved; every rank waits for it."""
        config, info = self.config, self.info
        new_best = False
        if info.is_main:
            t0 = time.perf_counter()
            self.last_val = last_val = {"kind": "val", "step": self.step, "epoch": self.epoch}
            if self.val_ds is not None:
                result = validate(self.model, self.val_ds, images=config.val_images,
                                  batch_size=config.val_batch_size, max_len=config.max_decode_len,
                                  device=self.device, amp_dtype=self.amp_dtype)
                new_best = self.best_cider is None or result["cider_d"] > self.best_cider
                if new_best:
                    self.best_cider, self.best_step = result["cider_d"], self.step
                last_val.update(cider_d=result["cider_d"], best=new_best, best_cider_d=self.best_cider,
                                best_step=self.best_step, images=result["images"], examples=result["examples"])
            if self.val_loss_ds is not None:
                got = validation_loss(self.model, self.val_loss_ds, images=config.val_loss_images,
                                      batch_size=config.val_batch_size, device=self.device, amp_dtype=self.amp_dtype)
                last_val.update(loss=got["loss"], loss_se=got["loss_se"], loss_images=got["images"],
                                loss_tokens=got["tokens"])
            last_val.update(seconds=time.perf_counter() - t0, time=time.perf_counter() - self.started)
            self.log.write(last_val)
            self.history.append(last_val)
        new_best = D.broadcast_object(info, new_best)
        if new_best:
            self._save(self.best_path, self.last_val)
        D.barrier(info)

    def _save(self, path: str, extra_metrics: Optional[dict] = None) -> None:
        """The checkpoint of now at ``path`` (rank 0 writes; every rank sends its random state)."""
        info, config = self.info, self.config
        ranks = D.gather_objects(info, _rng_as_json())
        if not info.is_main:
            return
        extra = {"data_position": {"epoch": self.epoch, "batch": self.batch_index},
                 "data_phase": config.phase_at(self.step),
                 "metrics": extra_metrics if extra_metrics is not None else self.last_val,
                 "best": {"cider_d": self.best_cider, "step": self.best_step},
                 "train_config": config.to_dict(), "world_size": info.world_size,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "rank_rng": ranks, "xe_batches": XE_BATCHES, "data_digest": self.digest}
        save_checkpoint(path, model=self.model, config=self.model_config, vocab=self.vocab, optimizer=self.optimizer,
                        scheduler=self.schedule, step=self.step, rng=True, extra=extra)

    def _train_epoch(self, phase: str, batches: list, interval: _Interval) -> tuple:
        """Train on ``batches`` (the current epoch's of ``phase``'s data stream) from the current
        batch on, until their end, the last step or a phase switch: ``(interval, switched)``."""
        config, device = self.config, self.device
        dataset, _, objective = self._phase_data(phase)
        loader = DataLoader(dataset, batch_sampler=_Batches(batches[self.batch_index:]), collate_fn=dataset.collate,
                            num_workers=config.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed * 1000003 + self.epoch))
        switched = False
        for batch in loader:
            stop.check()
            batch = batch.to(device, non_blocking=True)
            loss, tokens, stats, lr, grad_norm = self._step(batch, objective)
            interval.add(float(loss.detach()), tokens, stats)
            self.bar.update(1)
            last = self.step >= config.steps
            switched = config.phase_at(self.step) != phase
            if self.step % config.log_every == 0 or last or switched:
                self._log_interval(interval, phase, lr, grad_norm)
                interval = _Interval()
            if switched:  # the next step reads the SCST data stream from its start
                self.epoch, self.batch_index = 0, 0
            if config.val_every > 0 and (self.val_ds is not None or self.val_loss_ds is not None) \
                    and (self.step % config.val_every == 0 or last):
                self._validate()
            if (config.checkpoint_every and self.step % config.checkpoint_every == 0) or last:
                self._save(self.latest_path)
            if last or switched:
                break
        return interval, switched

    def run(self) -> TrainResult:
        """Write the run folder's start, train up to ``config.steps`` and return what was done."""
        config, info = self.config, self.info
        self._start_run_folder()
        self.log = _MetricsLog(os.path.join(config.out, METRICS), info.is_main,
                               self.step if self.ckpt is not None else None)
        self.bar = progress_bar(enabled=config.progress and info.is_main, total=config.steps, initial=self.step,
                                desc="train")
        self.started = time.perf_counter()
        interval = _Interval()
        self.model.train()
        try:
            while self.step < config.steps:
                phase = config.phase_at(self.step)
                batches = self._epoch_batches(self._phase_data(phase)[1])
                if not batches:
                    raise DataError(self._no_batch(phase))
                if self.batch_index >= len(batches):
                    self.epoch, self.batch_index = self.epoch + 1, 0
                    continue
                interval, switched = self._train_epoch(phase, batches, interval)
                if self.step < config.steps and not switched:
                    self.epoch, self.batch_index = self.epoch + 1, 0
        finally:
            self.bar.close()
        D.barrier(info)
        return TrainResult(step=self.step, best_cider=self.best_cider, best_step=self.best_step,
                           last_val=self.last_val, model=self.model, out=config.out, history=self.history)
