"""Peak memory of one call of a benchmarked function, for ``benchmark.extra_info``.

Two methods, chosen by device; both measure what the call needs *beyond* what was alive before it
(inputs excluded; outputs, saved activations and every temporary included):

CUDA -- ``peak_cuda_alloc_mb``
    ``torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base =
    torch.cuda.memory_allocated()``, one call, ``synchronize()``, then
    ``torch.cuda.max_memory_allocated() - base``. This is memory handed out by PyTorch's caching
    allocator (tensors), not memory it reserved from the driver, and not Triton's or cuDNN's
    workspaces allocated outside the allocator.

CPU -- ``peak_rss_growth_mb``
    The call runs in a child process forked from the benchmark process (``multiprocessing``
    ``'fork'`` context), so the benchmark process's own heap history cannot hide or inflate it. In
    the child: one untimed warm-up call (a forked child faults library code pages and per-thread
    caches back in on its first op, ~5-20 MB of RSS that is not the call's memory); ``gc.collect()``;
    glibc ``malloc_trim(0)`` returns heap pages the parent had freed
    but kept resident (otherwise the call could reuse them without any RSS growth); writing ``5``
    to ``/proc/self/clear_refs`` resets the kernel's RSS high-water mark (which a forked child
    inherits at the parent's RSS) to the current RSS; the start RSS is read from
    ``/proc/self/statm`` (resident pages x page size); the function runs once more, measured; the peak is
    ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux). The figure is ``ru_maxrss - start RSS``.
    Inputs created before the fork are shared copy-on-write and not counted, as long as the
    call does not write to them. The child runs with ``torch.set_num_threads(1)``: the OpenMP /
    MKL thread pools of the parent do not survive ``fork`` (a parallel region in the child hangs),
    and the thread count changes per-thread scratch, not the tensors the call allocates. If
    ``clear_refs`` cannot be written, the trim is skipped (the
    inherited high-water mark then equals the start RSS) and the method string says so: the
    figure can then under-count memory the call found already resident.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import resource
import traceback

import torch

MIB = 2.0 ** 20

CPU_METHOD = ("fork a child (1 thread); {warm}gc + malloc_trim(0) + clear_refs=5 (reset RSS high-water mark); "
              "ru_maxrss minus RSS from /proc/self/statm, over one call")
CPU_METHOD_NO_RESET = ("fork a child (1 thread); {warm}ru_maxrss minus RSS from /proc/self/statm, over one call "
                       "(clear_refs not writable: no trim, may under-count reused pages)")
CUDA_METHOD = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats, minus memory_allocated() before; "
               "one call")


def _statm_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _child(fn, conn, warmup) -> None:
    try:
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
        if warmup:
            fn()                      # fault code pages and allocator caches in; not measured
        gc.collect()
        reset = _reset_high_water_mark()  # probe first: only trim when the mark can follow
        if reset:
            _malloc_trim()
            _reset_high_water_mark()
        start = _statm_rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = CPU_METHOD if reset else CPU_METHOD_NO_RESET
        conn.send(("ok", (peak - start) / MIB, method.format(warm="1 warm-up call; " if warmup else "")))
    except BaseException:  # report, never hang the parent
        conn.send(("error", traceback.format_exc(), None))
    finally:
        conn.close()
        os._exit(0)


def cpu_peak_rss_growth_mb(fn, timeout_s: float = 600.0, warmup: bool = True):
    """``(megabytes, method)``: RSS growth of one ``fn()`` in a forked child (module docstring),
    after one unmeasured warm-up call there unless ``warmup`` is False.
    Returns ``(None, reason)`` if it cannot be measured (no fork, child failed or timed out)."""
    if "fork" not in mp.get_all_start_methods() or not os.path.exists("/proc/self/statm"):
        return None, "not measured: needs Linux fork and /proc"
    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, child_conn, warmup), daemon=True)
    proc.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout_s):
            return None, f"not measured: child did not finish within {timeout_s:.0f} s"
        status, value, method = parent_conn.recv()
    except EOFError:
        return None, "not measured: child exited without a result"
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
    if status != "ok":
        return None, "not measured: child raised " + value.strip().splitlines()[-1]
    return value, method


def cuda_peak_alloc_mb(fn, device=None):
    """``(megabytes, method)``: peak CUDA allocator growth over one ``fn()``."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / MIB, CUDA_METHOD


def peak_memory_info(fn, device) -> dict:
    """Entries for ``benchmark.extra_info``: ``peak_cuda_alloc_mb`` or ``peak_rss_growth_mb``
    (None when not measurable) and ``peak_mem_method``."""
    device = torch.device(device)
    if device.type == "cuda":
        mb, method = cuda_peak_alloc_mb(fn, device)
        return {"peak_cuda_alloc_mb": round(mb, 2), "peak_mem_method": method}
    mb, method = cpu_peak_rss_growth_mb(fn)
    return {"peak_rss_growth_mb": None if mb is None else round(mb, 2), "peak_mem_method": method}


MEMORY_KEYS = ("peak_cuda_alloc_mb", "peak_rss_growth_mb", "peak_mem_mb")
