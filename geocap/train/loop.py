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
                memory = model.encode(batch.features, batch.boxes, batch.box_mask)
                decoded = greedy_decode(model, memory, max_len=max_len)
            for image_id, caption in zip(batch.image_ids.tolist(), captions_text(decoded, vocab)):
                res[image_id] = caption
                gts[image_id] = dataset.references(image_id)
    score, _ = cider_d(gts, res)
    examples = [[i, res[i]] for i in list(res)[:3]]
    return {"cider_d": float(score), "images": n, "examples": examples}


def validation_loss(model: ObjectRelationTransformer, dataset: CaptionDataset, *, images: int = 0,
                    batch_size: int = 50, device: torch.device = torch.device("cpu"),
                    amp_dtype: Optional[torch.dtype] = None) -> dict:
    """Teacher-forced cross-entropy (no label smoothing, no dropout) of the first ``images`` (0 =
    all) images of ``dataset`` (a per-image CaptionDataset with every caption of each image), each
    caption's words and <eos> (:mod:`geocap.train.step`): no decoding, so it is cheap enough for a
    thousand images at every validation. Returns ``{"loss", "loss_se", "images", "tokens"}``:
    ``loss`` = summed token losses / tokens; ``loss_se`` its standard error over images (the
    ratio estimator's: with per-image sums ``s_i`` and token counts ``t_i``, ``sqrt(sum (s_i -
    loss t_i)^2 / (n (n - 1))) / mean t``; None for one image), the noise a convergence criterion
    must beat. The model's mode and every random generator are left as they were."""
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
                log_probs = policy(batch.features, batch.boxes, batch.box_mask, inputs,
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
    return {"loss": loss, "loss_se": se, "images": n, "tokens": int(counts.sum())}


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
        return _train(config, resume, info, device, amp_dtype, latest_path, best_path)
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


def _train(config, resume, info, device, amp_dtype, latest_path, best_path) -> TrainResult:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt, ckpt_phase = None, "xe"
    if resume:
        ckpt = load_checkpoint(latest_path)
        saved = ckpt.extra.get("train_config") or {}
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(config, k)]
        if changed:
            raise UsageError(f"cannot resume {latest_path} with other " + ", ".join(
                f"{k} ({saved[k]!r} there, {getattr(config, k)!r} now)" for k in changed))
        if ckpt.extra.get("world_size", 1) != info.world_size:
            raise UsageError(f"{latest_path} was written by {ckpt.extra.get('world_size', 1)} processes; resume "
                             f"with as many (now {info.world_size})")
        if config.steps < ckpt.step:
            raise UsageError(f"--steps {config.steps} is below the step {latest_path} has reached ({ckpt.step}); "
                             f"give --steps {ckpt.step} or more to continue the run")
        ckpt_phase = _check_resume_phase(config, ckpt, saved, latest_path)
        if (ckpt_phase == "xe" and config.phase_at(ckpt.step) == "xe"
                and ckpt.extra.get("xe_batches") != XE_BATCHES):
            raise UsageError(f"cannot resume {latest_path} in cross-entropy: it was written when a batch held "
                             f"--batch-size captions (now images, each with its captions), so its data position "
                             f"means other batches; continue it with SCST (--scst-from-step {ckpt.step}) or start "
                             f"a new run")
    digest = D.broadcast_object(info, data_digest(config) if info.is_main else None)
    cpi = config.captions_per_image
    train_ds = CaptionDataset(config.features_path, config.captions_path, config.train_split, per_image=True,
                              captions_per_image="one-random" if cpi == "one-random" else "all")
    vocab = train_ds.vocab
    xe_objective = CrossEntropyObjective.for_vocab(vocab, smoothing=config.label_smoothing,
                                                   captions_per_image=cpi if isinstance(cpi, int) else None)
    val_ds, val_loss_ds = None, None
    if config.val_every > 0 and config.val_cider:
        val_ds = CaptionDataset(config.features_path, config.captions_path, config.val_split, per_image=True,
                                captions_per_image=1)
    if config.val_every > 0 and config.val_loss_images > 0:
        val_loss_ds = CaptionDataset(config.features_path, config.captions_path, config.val_split, per_image=True,
                                     captions_per_image="all")
    model_config = _model_config(config, train_ds)
    if ckpt is not None and ckpt.config != model_config:
        raise UsageError(f"{latest_path}: its model config does not fit the data and options "
                         f"({ckpt.config.to_dict()} vs {model_config.to_dict()})")
    if ckpt is not None and ckpt.vocab != vocab:
        raise UsageError(f"{latest_path}: trained with another vocabulary than {config.captions_path}")
    if ckpt is not None:            # after the checks that say more: same shapes and vocabulary, other bytes
        _check_resume_data(ckpt.extra.get("data_digest"), digest, config, latest_path)

    model = _initial_model(config, model_config, device)
    params = list(model.parameters())
    optimizer = make_optimizer(params, config.optimizer, lr=0.0 if config.optimizer == "noam" else config.lr,
                               weight_decay=config.weight_decay)
    if config.optimizer == "noam":
        schedule = LRSchedule(optimizer, "noam", warmup=config.warmup, d_model=config.d_model,
                              factor=config.lr_factor)
    else:
        schedule = LRSchedule(optimizer, "warmup", warmup=config.warmup, lr=config.lr, decay=config.decay,
                              total=config.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, epoch, batch_index = 0, 0, 0
    best_cider, best_step = None, None
    torch.manual_seed(config.seed + 1000003 * info.rank)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state)
        schedule.load_state_dict(ckpt.scheduler_state)
        if ckpt.extra.get("scaler"):
            scaler.load_state_dict(ckpt.extra["scaler"])
        step = ckpt.step
        pos = ckpt.data_position or {}
        epoch, batch_index = int(pos.get("epoch", 0)), int(pos.get("batch", 0))
        if ckpt_phase != config.phase_at(step):  # a cross-entropy run continued with SCST: its data from the start
            epoch, batch_index = 0, 0
        best = ckpt.extra.get("best") or {}
        best_cider, best_step = best.get("cider_d"), best.get("step")
        restore_rng(ckpt)
        ranks = ckpt.extra.get("rank_rng") or []
        if len(ranks) > info.rank:
            _restore_rank_rng(ranks[info.rank])
    net = PolicyModule(model)
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    xe_sampler = BucketBatchSampler(train_ds.box_counts, config.batch_size, shuffle=True,
                                    pool_batches=config.pool_batches, seed=config.seed)
    scst_parts = []  # [dataset, sampler, objective], built when the first SCST step comes

    def phase_data(phase):
        if phase == "xe":
            return train_ds, xe_sampler, None
        if not scst_parts:  # draws no random number: exact resume holds wherever it is built
            ds = CaptionDataset(config.features_path, config.captions_path, config.train_split, per_image=True,
                                captions_per_image=1)
            objective = SCSTObjective(reward_scorer(ds), vocab, samples=config.scst_samples,
                                      baseline=config.scst_baseline, max_len=config.max_decode_len)
            scst_parts.extend([ds, BucketBatchSampler(ds.box_counts, config.scst_images_per_batch, shuffle=True,
                                                      pool_batches=config.pool_batches, seed=config.seed),
                               objective])
        return tuple(scst_parts)

    def no_batch(phase):
        dataset, _, _ = phase_data(phase)
        size = config.scst_images_per_batch if phase == "scst" else config.batch_size
        return (f"split {config.train_split!r} gives no {phase} batch per process "
                f"({len(dataset)} images, {size} per batch, {info.world_size} processes)")

    # everything is checked before the first write, so a refused run (or resume) leaves RUN as it was
    if not epoch_batches(phase_data(config.phase_at(step))[1], epoch, info.rank, info.world_size):
        raise ValueError(no_batch(config.phase_at(step)))
    if info.is_main:
        os.makedirs(config.out, exist_ok=True)
        for name in RUN_FILES:
            remove_stale_temporaries(os.path.join(config.out, name))
        write_text_atomic(os.path.join(config.out, CONFIG_FILE), json.dumps(config.to_dict(), indent=2) + "\n")

    def amp_context():
        return _autocast(device, amp_dtype)
    log = _MetricsLog(os.path.join(config.out, METRICS), info.is_main, step if ckpt is not None else None)
    bar = progress_bar(enabled=config.progress and info.is_main, total=config.steps, initial=step, desc="train")
    started = time.perf_counter()
    last_val, history = None, []
    interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
    interval_reward, interval_baseline, interval_length = 0.0, 0.0, 0.0

    def save(path, extra_metrics=None):
        ranks = D.gather_objects(info, _rng_as_json())
        if not info.is_main:
            return
        extra = {"data_position": {"epoch": epoch, "batch": batch_index}, "data_phase": config.phase_at(step),
                 "metrics": extra_metrics if extra_metrics is not None else last_val,
                 "best": {"cider_d": best_cider, "step": best_step},
                 "train_config": config.to_dict(), "world_size": info.world_size,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "rank_rng": ranks, "xe_batches": XE_BATCHES, "data_digest": digest}
        save_checkpoint(path, model=model, config=model_config, vocab=vocab, optimizer=optimizer,
                        scheduler=schedule, step=step, rng=True, extra=extra)

    model.train()
    try:
        while step < config.steps:
            phase = config.phase_at(step)
            dataset, sampler, objective = phase_data(phase)
            batches = epoch_batches(sampler, epoch, info.rank, info.world_size)
            if not batches:
                raise ValueError(no_batch(phase))
            if batch_index >= len(batches):
                epoch, batch_index = epoch + 1, 0
                continue
            loader = DataLoader(dataset, batch_sampler=_Batches(batches[batch_index:]), collate_fn=dataset.collate,
                                num_workers=config.num_workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(config.seed * 1000003 + epoch))
            switched = False
            for batch in loader:
                stop.check()
                batch = batch.to(device, non_blocking=True)
                stats = None
                if objective is None:
                    lr = schedule.get_last_lr()[0]
                    loss, tokens = xe_objective(net, batch, autocast=amp_context)
                else:
                    lr = config.scst_lr
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss, stats = objective(net, model, batch, autocast=amp_context)
                    tokens = stats.tokens
                if not torch.isfinite(loss) and not scaler.is_enabled():
                    raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower the learning rate")
                grad_norm = optimizer_update(loss, optimizer, params, grad_clip=config.grad_clip, scaler=scaler)
                schedule.step()
                step += 1
                batch_index += 1
                interval_loss += float(loss.detach())
                interval_steps += 1
                interval_tokens += tokens
                if stats is not None:
                    interval_reward += stats.reward
                    interval_baseline += stats.baseline
                    interval_length += stats.sample_length
                bar.update(1)
                last = step >= config.steps
                switched = config.phase_at(step) != phase
                if step % config.log_every == 0 or last or switched:
                    mean_loss, mean_reward, mean_baseline, mean_length = D.mean_scalars(
                        info, [x / interval_steps for x in (interval_loss, interval_reward, interval_baseline,
                                                            interval_length)], device)
                    entry = {"kind": "train", "phase": phase, "step": step, "epoch": epoch, "loss": mean_loss,
                             "lr": lr, "grad_norm": float(grad_norm), "tokens": interval_tokens * info.world_size,
                             "time": time.perf_counter() - started}
                    postfix = f"loss {mean_loss:.3f} lr {lr:.2e}"
                    if phase == "scst":
                        entry.update(reward=mean_reward, baseline=mean_baseline, sample_length=mean_length)
                        postfix = f"reward {mean_reward:.3f} baseline {mean_baseline:.3f} lr {lr:.2e}"
                    log.write(entry)
                    history.append(entry)
                    bar.set_postfix_str(postfix, refresh=False)  # shown at the next update
                    interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
                    interval_reward, interval_baseline, interval_length = 0.0, 0.0, 0.0
                if switched:  # the next step reads the SCST data stream from its start
                    epoch, batch_index = 0, 0
                if config.val_every > 0 and (val_ds is not None or val_loss_ds is not None) \
                        and (step % config.val_every == 0 or last):
                    new_best = False
                    if info.is_main:
                        t0 = time.perf_counter()
                        last_val = {"kind": "val", "step": step, "epoch": epoch}
                        if val_ds is not None:
                            result = validate(model, val_ds, images=config.val_images,
                                              batch_size=config.val_batch_size, max_len=config.max_decode_len,
                                              device=device, amp_dtype=amp_dtype)
                            new_best = best_cider is None or result["cider_d"] > best_cider
                            if new_best:
                                best_cider, best_step = result["cider_d"], step
                            last_val.update(cider_d=result["cider_d"], best=new_best, best_cider_d=best_cider,
                                            best_step=best_step, images=result["images"],
                                            examples=result["examples"])
                        if val_loss_ds is not None:
                            got = validation_loss(model, val_loss_ds, images=config.val_loss_images,
                                                  batch_size=config.val_batch_size, device=device,
                                                  amp_dtype=amp_dtype)
                            last_val.update(loss=got["loss"], loss_se=got["loss_se"], loss_images=got["images"],
                                            loss_tokens=got["tokens"])
                        last_val.update(seconds=time.perf_counter() - t0, time=time.perf_counter() - started)
                        log.write(last_val)
                        history.append(last_val)
                    new_best = D.broadcast_object(info, new_best)
                    if new_best:
                        save(best_path, last_val)
                    D.barrier(info)
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
                    save(latest_path)
                if last or switched:
                    break
            if step < config.steps and not switched:
                epoch, batch_index = epoch + 1, 0
    finally:
        bar.close()
    D.barrier(info)
    return TrainResult(step=step, best_cider=best_cider, best_step=best_step, last_val=last_val, model=model,
                       out=config.out, history=history)
