"""Count the aten operators a block of code dispatches, and its host synchronisations.

:func:`count_ops` is a ``TorchDispatchMode``: it sees every aten call below autograd (forward and
backward), including those inside autograd Functions and registered ops' implementations, but not
what a Triton kernel does (a launch is not an aten call). Each call is classed as

- ``views``: returns an alias of an input (view, transpose, slice, detach, ...): no kernel;
- ``allocations``: ``empty``-like: memory, no kernel;
- ``syncs``: ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``.tolist()``: the host waits for the
  device) and copies from a CUDA tensor to the CPU;
- ``kernels``: everything else (each launches, or on CPU runs, one aten kernel).

Registered geocap ops (``geocap::*``) are counted in ``custom_ops`` and looked into (their aten
calls count as above); Triton launches made inside :func:`triton_launch` count in
``triton_launches``, and the aten calls the Triton CPU interpreter makes to run them (host
copies that a GPU launch does not make) are not counted.

Used by the tests (tests/test_op_counts.py) and the per-call benchmark (bench/test_bench_overhead.py).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
SYNCS = {"_local_scalar_dense", "item"}


def _is_view(func) -> bool:
    """A non-mutating op whose first result aliases an input (``Tensor(a)`` in its schema)."""
    schema = func._schema
    return (not schema.is_mutable and bool(schema.returns)
            and schema.returns[0].alias_info is not None)


def _device_to_host(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name not in ("_to_copy", "copy_", "to"):
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name == "copy_":
        return len(tensors) >= 2 and tensors[1].device.type != "cpu" and tensors[0].device.type == "cpu"
    target = kwargs.get("device")
    return (bool(tensors) and tensors[0].device.type != "cpu" and target is not None
            and torch.device(target).type == "cpu")


@dataclass
class OpCounts:
    """What :func:`count_ops` saw: totals per class and the names of the kernel ops (with repeats)."""
    kernels: int = 0
    views: int = 0
    allocations: int = 0
    syncs: int = 0
    custom_ops: int = 0
    triton_launches: int = 0
    kernel_names: Counter = field(default_factory=Counter)
    sync_names: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.kernels + self.views + self.allocations + self.syncs

    def summary(self) -> str:
        top = ", ".join(f"{n} x{c}" for n, c in self.kernel_names.most_common())
        return (f"{self.kernels} kernels, {self.triton_launches} Triton launches, {self.custom_ops} geocap ops, "
                f"{self.views} views, {self.allocations} allocations, "
                f"{self.syncs} syncs ({', '.join(self.sync_names) or 'none'}); kernels: {top or 'none'}")


def _custom_op_implementation(func):
    """The Python function behind a ``torch.library.custom_op`` (None if it cannot be found)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - private API moved
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None)


class _Counter(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _launch_depth:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        c = self.counts
        if func.namespace == "geocap":
            c.custom_ops += 1
            impl = _custom_op_implementation(func)
            if impl is not None:
                with self:                       # look inside: its aten calls count too
                    return impl(*args, **kwargs)
        if name in SYNCS or _device_to_host(func, args, kwargs):
            c.syncs += 1
            c.sync_names.append(name)
        elif name in ALLOCATIONS:
            c.allocations += 1
        elif _is_view(func):
            c.views += 1
        else:
            c.kernels += 1
            c.kernel_names[name] += 1
        return func(*args, **kwargs)


_launch_depth = 0
_active: list = []


@contextlib.contextmanager
def count_ops():
    """``with count_ops() as counts:`` fills an :class:`OpCounts` with the block's aten calls."""
    counts = OpCounts()
    _active.append(counts)
    try:
        with _Counter(counts):
            yield counts
    finally:
        _active.remove(counts)


@contextlib.contextmanager
def triton_launch():
    """Wrap one Triton kernel launch: counted as one launch by an active :func:`count_ops`,
    which ignores the aten calls made inside (the interpreter's)."""
    global _launch_depth
    for counts in _active:
        counts.triton_launches += 1
    _launch_depth += 1
    try:
        yield
    finally:
        _launch_depth -= 1
