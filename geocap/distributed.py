"""Process-group helpers for ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT): NCCL on CUDA, gloo on CPU; a single process when
WORLD_SIZE is unset or 1. Rank 0 is the one that writes files. Shared by the jobs that sit on
the model (training, dumps); depends on torch only.

A rank dies with its launcher: ``torchrun`` starts each rank in a session of its own, so
killing the launcher alone (SIGKILL, or a crash) used to leave the ranks running to the end;
:func:`setup` makes a rank that torchrun started (``TORCHELASTIC_RUN_ID`` set) die with its
parent, the launcher (:func:`geocap.parent_death.die_with_parent`). Ranks started otherwise
(by hand with the variables set, ``torch.multiprocessing``) are left as they are."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from geocap.parent_death import die_with_parent
from geocap.errors import UsageError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an int") from None


def setup(device_kind: str) -> DistInfo:
    """Join the process group described by the environment (``device_kind`` "cuda" -> NCCL,
    else gloo); a no-op for one process. An already initialised group is reused. A rank that
    torchrun started dies with the launcher from here on."""
    rank, world = environment_rank()
    local = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistInfo()
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if os.environ.get("TORCHELASTIC_RUN_ID"):      # started by torchrun: the parent is the launcher
        die_with_parent()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UsageError(f"WORLD_SIZE={world} but {name} is not set (launch with torchrun)")
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, True)


def local_rank() -> int:
    """This process's LOCAL_RANK (0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def environment_rank() -> tuple:
    """``(RANK, WORLD_SIZE)`` from the environment (0 and 1 when unset); ValueError naming a
    variable that is not an int. The one reader of these variables (:func:`setup` uses it too)."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def resolve_device(device=None, rank_local=None) -> torch.device:
    """The torch device a job on the model runs on: ``None`` / ``"auto"``: ``cuda:LOCAL_RANK``
    (modulo the GPUs there are) when CUDA is available, else the CPU; otherwise ``device`` itself
    (a torch device or its string). ``rank_local``: LOCAL_RANK when None. ValueError naming
    ``device`` when it is not a device, or a CUDA one without CUDA."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            rank_local = local_rank() if rank_local is None else rank_local
            return torch.device("cuda", rank_local % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UsageError(f"device: not a torch device ({device!r}: {err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: CUDA is not available")
    return resolved


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_scalars(info: DistInfo, values: list, device: torch.device) -> list:
    """Each of ``values`` averaged over the ranks, in one all-reduce (the floats themselves for
    one process)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [x / info.world_size for x in t.tolist()]


def gather_objects(info: DistInfo, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
