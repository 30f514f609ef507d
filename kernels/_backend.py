"""Backend selection shared by every op in geocap.kernels.

``backend`` is one of:
- ``"auto"``: Triton when the tensors live on a CUDA device (and Triton imports), PyTorch otherwise;
- ``"triton"``: force the Triton kernels; on CPU tensors only when the Triton interpreter is on
  (``TRITON_INTERPRET=1`` set before triton is first imported), else a ValueError;
- ``"torch"``: force the PyTorch implementation, which runs everywhere.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks for the Triton CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``; raise ValueError naming ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_importable() else "torch"
    if not triton_importable():
        raise ValueError("backend='triton' was requested but triton cannot be imported")
    if not on_cuda and not interpreter_requested():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or the Triton interpreter for tensors on {device} "
            "(set TRITON_INTERPRET=1 before triton is first imported)"
        )
    if not on_cuda and device.type != "cpu":
        raise ValueError(f"backend='triton' runs on CUDA or (interpreted) CPU tensors, not on {device}")
    return "triton"
