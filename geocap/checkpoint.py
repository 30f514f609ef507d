"""geocap checkpoints: model weights, config and vocabulary in one file that loads safely.

A checkpoint is ``torch.save`` of a plain dict holding only tensors, str/int/float/bool/None,
lists and dicts, and it is read with ``torch.load(..., weights_only=True)``: the restricted
unpickler refuses any other object, so loading a file never runs code from it (a pickle whose
``__reduce__`` names ``os.system`` is rejected, not executed). The dict (format
``geocap-checkpoint`` version 1)::

    format           "geocap-checkpoint"
    format_version   1
    geocap_version   geocap.__version__ of the writer
    config           ORTConfig.to_dict()
    vocab            {"words": [...], "min_count": int | None, "pad_id", "bos_id", "eos_id": int,
                     "unk_id": int | None} (Vocabulary.to_dict; ids absent in older files mean the
                     defaults 0-3); the config's pad/bos/eos ids must be the vocabulary's
    model            the model's state_dict (CPU tensors)
    optimizer        optimizer.state_dict() or None
    scheduler        scheduler.state_dict() or None
    step             int, optimisation steps done
    rng              None, or {"torch": ByteTensor, "cuda": [ByteTensor per device],
                     "numpy": {"name", "keys" (int64 tensor [624]), "pos", "has_gauss",
                     "cached_gaussian"}, "python": {"version", "state" (list of int),
                     "gauss_next"}}
    extra            JSON-able dict; by convention "data_position" (where the data loader is)
                     and "metrics" (the latest evaluation)

Every way a file can be wrong (missing, truncated, random bytes, a pickle with code, a torch file
of another format, a missing key, another format version, weights that do not fit the config)
raises :class:`CheckpointError`, a ValueError naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from geocap.data.atomic import atomic_output
from geocap.data.file_digest import file_sha256  # noqa: F401  (re-exported)
from geocap.data.vocab import Vocabulary
from geocap.errors import CheckpointError
from geocap.model import ObjectRelationTransformer, ORTConfig

CHECKPOINT_FORMAT = "geocap-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED = ("format", "format_version", "geocap_version", "config", "vocab", "model", "optimizer",
             "scheduler", "step", "rng", "extra")




@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module doc). ``model_state`` is the state_dict for
    :class:`~geocap.model.ObjectRelationTransformer` ``(config)``; ``optimizer_state`` and
    ``scheduler_state`` are None when not saved; ``rng`` None when not saved."""

    path: str
    config: ORTConfig
    vocab: Vocabulary
    model_state: dict
    optimizer_state: Optional[dict] = None
    scheduler_state: Optional[dict] = None
    step: int = 0
    rng: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    geocap_version: str = ""
    format_version: int = CHECKPOINT_VERSION

    @property
    def data_position(self) -> Any:
        """``extra["data_position"]`` (None when absent)."""
        return self.extra.get("data_position")

    @property
    def metrics(self) -> Any:
        """``extra["metrics"]`` (None when absent)."""
        return self.extra.get("metrics")

    def build_model(self, device: Union[str, torch.device, None] = None, **kwargs) -> ObjectRelationTransformer:
        """A new :class:`ObjectRelationTransformer` with these weights (strictly loaded), on
        ``device`` (default CPU), in training mode as torch modules start; ``kwargs`` go to the
        constructor (e.g. ``backend=``)."""
        model = ObjectRelationTransformer(self.config, **kwargs)
        model.load_state_dict(self.model_state, strict=True)
        return model if device is None else model.to(device)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside torch.compile (``_orig_mod``) and DataParallel/DDP (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


class _SkipInPlace(torch.overrides.TorchFunctionMode):
    """Within the block, in-place tensor methods and functions (``normal_``, ``uniform_``,
    ``kaiming_uniform_``: what weight initialisation does) return their tensor untouched: a
    model built inside has the right names, shapes and dtypes, uninitialised. (The meta device
    would cost no memory, but its factories and initialisers run through torch._refs, whose first
    use imports torch._dynamo: ~3 s of a process's first checkpoint load.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")      # torch.nn.init passes it by name
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor):
            return target
        return func(*args, **kwargs)


def _expected_state(config: ORTConfig) -> dict:
    """``{name: (shape, dtype)}`` of the state_dict of a model built from ``config`` (on the CPU,
    its initialisation skipped: :class:`_SkipInPlace`; cached per config)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _EXPECTED:
        with torch.no_grad(), _SkipInPlace():
            model = ObjectRelationTransformer(config)
        _EXPECTED[key] = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        del model
    return _EXPECTED[key]


_EXPECTED: dict = {}             # config JSON -> expected state (a few configs per process)


def _state_mismatch(state: Any, config: ORTConfig) -> Optional[str]:
    """None when ``state`` is a state_dict that fits ``config``, else what is wrong."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return "the model state is not a dict of named tensors"
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        return f"the model state holds non-tensors ({', '.join(bad[:5])})"
    expected = _expected_state(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        return f"the model weights do not fit the config ({'; '.join(parts)})"
    for name, (shape, dtype) in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            return f"the model weight {name} has shape {tuple(tensor.shape)}, the config needs {shape}"
        if tensor.dtype.is_floating_point != dtype.is_floating_point:
            return f"the model weight {name} has dtype {tensor.dtype}, the config needs {dtype}"
    return None


def _ids_mismatch(config: ORTConfig, vocab: Vocabulary) -> Optional[str]:
    """None when the config's <pad>/<bos>/<eos> ids are the vocabulary's, else what differs."""
    got = (config.pad_id, config.bos_id, config.eos_id)
    want = (vocab.pad_id, vocab.bos_id, vocab.eos_id)
    if got != want:
        return f"the config's pad/bos/eos ids {got} are not the vocabulary's {want}"
    return None


def _rng_state() -> dict:
    """The torch CPU/CUDA, numpy and python random states, as tensors, ints, floats and lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(x) for x in state],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }


def save_checkpoint(path, *, model: torch.nn.Module, config: Union[ORTConfig, dict], vocab: Vocabulary,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, step: int = 0,
                    rng: bool = True, extra: Optional[dict] = None) -> None:
    """Write a checkpoint of ``model`` (an ObjectRelationTransformer, possibly inside a
    torch.compile / DDP wrapper) to ``path``, atomically (temporary file, then rename).

    ``config`` must be the model's config (an ORTConfig or its dict) and fit ``vocab``
    (``config.vocab_size == len(vocab)``); ``optimizer``/``scheduler`` are saved through their
    ``state_dict()``; ``rng=True`` records every random generator's state (see
    :func:`restore_rng`); ``extra`` is a JSON-able dict, by convention with ``"data_position"`` and
    ``"metrics"``. Raises ValueError, before writing anything, when these do not agree.
    """
    path = os.fspath(path)
    if isinstance(config, dict):
        config = ORTConfig.from_dict(config)
    if not isinstance(config, ORTConfig):
        raise ValueError(f"config must be an ORTConfig or its dict, got {type(config).__name__}")
    if not isinstance(vocab, Vocabulary):
        raise ValueError(f"vocab must be a Vocabulary, got {type(vocab).__name__}")
    if config.vocab_size != len(vocab):
        raise ValueError(f"config.vocab_size = {config.vocab_size} but the vocabulary has {len(vocab)} words")
    problem = _ids_mismatch(config, vocab)
    if problem:
        raise ValueError(problem)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        extra = json.loads(json.dumps(extra))  # a JSON-able copy: plain types only, safe to unpickle
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must be JSON-serialisable ({err})") from None
    inner = _unwrap(model)
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    problem = _state_mismatch(state, config)
    if problem:
        raise ValueError(f"cannot save {path}: {problem}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "geocap_version": _geocap_version(),
        "config": config.to_dict(),
        "vocab": vocab.to_dict(),
        "model": state,
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": step,
        "rng": _rng_state() if rng else None,
        "extra": extra,
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def _geocap_version() -> str:
    import geocap
    return geocap.__version__


def load_checkpoint(path, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, tensors mapped to ``map_location``.

    Never runs code from the file (``torch.load(weights_only=True)``). Raises
    :class:`CheckpointError` naming ``path`` when the file is missing, unreadable, not a geocap
    checkpoint, of another format version, incomplete, or holds weights that do not fit its config.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file missing")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure of the restricted unpickler means "not ours"
        raise CheckpointError(f"{path}: not a loadable geocap checkpoint: corrupt, truncated, or holding objects "
                              f"other than tensors and plain data, which are never unpickled (torch.load with "
                              f"weights_only=True: {type(err).__name__}: {load_error_detail(err)})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a geocap checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    if data.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('format_version')!r}; this geocap "
                              f"reads version {CHECKPOINT_VERSION}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if not isinstance(data["config"], dict):
        raise CheckpointError(f"{path}: 'config' is not a dict")
    try:
        config = ORTConfig.from_dict(data["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid config ({err})") from None
    vocab_data = data["vocab"]
    words = vocab_data.get("words") if isinstance(vocab_data, dict) else None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{path}: 'vocab' must hold a list of strings under 'words'")
    try:
        vocab = Vocabulary.from_dict(vocab_data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid vocabulary ({err})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: the vocabulary has {len(vocab)} words but config.vocab_size is "
                              f"{config.vocab_size}")
    problem = _ids_mismatch(config, vocab)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    problem = _state_mismatch(data["model"], config)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    step = data["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be a non-negative int, got {step!r}")
    for key in ("optimizer", "scheduler", "rng"):
        if data[key] is not None and not isinstance(data[key], dict):
            raise CheckpointError(f"{path}: {key!r} must be a dict or None")
    if not isinstance(data["extra"], dict):
        raise CheckpointError(f"{path}: 'extra' must be a dict")
    return Checkpoint(path=path, config=config, vocab=vocab, model_state=data["model"],
                      optimizer_state=data["optimizer"], scheduler_state=data["scheduler"], step=step,
                      rng=data["rng"], extra=data["extra"], geocap_version=str(data["geocap_version"]),
                      format_version=data["format_version"])


def load_error_detail(err: Exception) -> str:
    """The informative line of a torch.load error (also used by :mod:`geocap.ort_import`),
    without torch's advice to retry with ``weights_only=False`` (which would run whatever code
    the file holds)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    keep = []
    for line in lines:
        if line.startswith(("Weights only load failed", "Check the documentation")):
            continue
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line:
            keep.append(line)
    detail = "; ".join(keep) if keep else (lines[0] if lines else "no message")
    return detail[:300]


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put the torch CPU, CUDA (as many devices as both have), numpy and python ``random``
    generators back in the states saved in ``checkpoint``; CheckpointError when it holds none or
    they are malformed."""
    rng = checkpoint.rng
    if rng is None:
        raise CheckpointError(f"{checkpoint.path}: the checkpoint holds no random generator states "
                              f"(saved with rng=False)")
    try:
        torch.set_rng_state(rng["torch"].cpu())
        cuda = list(rng["cuda"])
        if cuda and torch.cuda.is_available():
            for device, state in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state.cpu(), device)
        npy = rng["numpy"]
        np.random.set_state((npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
        py = rng["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{checkpoint.path}: malformed random generator states "
                              f"({type(err).__name__}: {err})") from None
