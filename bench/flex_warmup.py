"""Compile FlexAttention for gpu_check.sh's last stage ahead of time, in a background process.

    TORCHINDUCTOR_CACHE_DIR=DIR TRITON_CACHE_DIR=DIR2 python bench/flex_warmup.py

Runs bench/test_bench_attention.py's compiled flex runner (``run_flex``: the geometry score_mod and
key padding, ``torch.compile(flex_attention, dynamic=False)``) once per case that gpu_check.sh's
``bench_flex`` stage will time: forward, ``GEOCAP_BENCH_N`` (default 36) at the bench's batch size,
each of ``GEOCAP_BENCH_DTYPES`` (default the bench's dtypes). Inductor's FX-graph and Triton caches
land on disk (the directories above), so the later stage, a new process pointed at the same caches,
finds its kernels compiled: on the H200 with torch 2.11 the first compiled flex forward had not
finished after 165 s, and compiling inside the timed stage cost the rest of the sweep.

Prints one line per case (seconds to compile and run it) and exits 0 when every case compiled;
gpu_check.sh caps it with ``timeout`` (300 s) and starts it before the timing stage, pinned to the
upper half of the CPUs so the timing stage's host keeps its own.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _attention_bench():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("geocap_bench_attention_warmup", HERE / "test_bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # torch.compile looks the module of traced code up by name
    spec.loader.exec_module(module)
    return module


def main() -> int:
    bench = _attention_bench()
    device = bench.DEVICE
    sizes = bench._env_list("GEOCAP_BENCH_N", [36], int)
    dtypes = bench._env_list("GEOCAP_BENCH_DTYPES", [bench._dtype_name(d) for d in bench.DTYPES])
    failed = 0
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for n in sizes:
            inputs = bench.make_inputs(bench.BATCH[n], n, dtype, device, seed=n)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    bench.run_flex(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                print(f"flex_warmup: N={n} {dtype_name} fwd compiled and ran in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            except Exception as exc:                 # reported; the timed stage will meet it again
                failed += 1
                print(f"flex_warmup: N={n} {dtype_name} fwd FAILED after {time.perf_counter() - t0:.1f} s: "
                      f"{type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
