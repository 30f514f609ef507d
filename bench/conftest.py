"""Benchmark-wide set-up and the end-of-session comparison table.

Run: ``python -m pytest bench --benchmark-only`` (add ``--benchmark-json=PATH`` for
pytest-benchmark's full record). For each benchmark group (one (pass, N, dtype) for attention) the
summary gives every variant's median time per call, its speed-up over the baseline (the variant
whose ``extra_info["baseline"]`` is true, else ``eager``, else the first named ``eager*``),
geocap's speed-up over each peer (the subjects: variants with ``extra_info["subject"]`` true, else
``geocap``, else every ``geocap*``), and the peak memory found in ``extra_info``
(``peak_cuda_alloc_mb``, ``peak_rss_growth_mb`` or ``peak_mem_mb``). It is printed at the end of the
session and, when ``GEOCAP_BENCH_SUMMARY=<path>`` is set, written there as JSON, rewritten after
every test so that a run cut short still leaves the groups it finished.

Benchmarks name their variant in ``benchmark.extra_info["variant"]`` (else the test name is used)
and set ``benchmark.group``. Speed ratios are reported, never asserted.

Benchmarks must not run under the Triton interpreter: with CUDA present a ``TRITON_INTERPRET``
left in the environment is removed here, before the benchmark modules import triton. Without CUDA
``backend="auto"`` takes the PyTorch path and the variable does not matter.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import OrderedDict
from importlib import metadata

import torch

MEMORY_KEYS = ("peak_cuda_alloc_mb", "peak_rss_growth_mb", "peak_mem_mb")
SUMMARY_ENV = "GEOCAP_BENCH_SUMMARY"
_REMOVED_INTERPRET = None
if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
    _REMOVED_INTERPRET = os.environ.pop("TRITON_INTERPRET")
    if "triton" in sys.modules:  # pragma: no cover - depends on what imported triton first
        sys.stderr.write("bench/conftest.py: TRITON_INTERPRET was set and triton is already imported; "
                         "CUDA benchmarks may be interpreted -- unset it before running pytest\n")


_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def pytest_collection_modifyitems(config, items):
    """Under ``--benchmark-skip`` (the correctness checks only, as gpu_check.sh's sanity stage
    runs them) deselect the benchmarks instead of skipping them: a skip comes after the
    benchmark's module-scoped fixtures (trained models, baseline decodes) were already built.
    Under ``--benchmark-disable`` too: each benchmark reports its timings (medians, ratios,
    rates in ``extra_info``), which a disabled benchmark never measures."""
    if not (config.getoption("benchmark_skip", default=False) or config.getoption("benchmark_disable", default=False)):
        return
    timed = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    if timed:
        config.hook.pytest_deselected(items=timed)
        items[:] = [item for item in items if "benchmark" not in getattr(item, "fixturenames", ())]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _session_benchmarks(config):
    bs = getattr(config, "_benchmarksession", None) if config is not None else None
    return [] if bs is None else list(bs.benchmarks)


def _memory(info: dict):
    for key in MEMORY_KEYS:
        if key in info:
            return info[key], key
    return None, None


def build_summary(benchmarks) -> dict:
    """The comparison, as a JSON-able dict, from pytest-benchmark's per-benchmark metadata."""
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for bench in benchmarks:
        if not bench or getattr(bench, "has_error", False):
            continue
        stats = bench.stats
        info = dict(bench.extra_info or {})
        variant = str(info.get("variant") or bench.name)
        mem, mem_key = _memory(info)
        group = groups.setdefault(bench.group or bench.name, {"group": bench.group or bench.name, "entries": []})
        group["entries"].append({
            "variant": variant, "name": bench.fullname, "median_s": stats.median, "min_s": stats.min,
            "mean_s": stats.mean, "stddev_s": stats.stddev if stats.rounds > 1 else 0.0, "rounds": stats.rounds,
            "iterations": bench.iterations, "peak_mem_mb": mem, "peak_mem_key": mem_key,
            "baseline": bool(info.get("baseline")) or None, "subject": bool(info.get("subject")) or None,
            "extra_info": info,
        })
    out = []
    for group in groups.values():
        entries = group["entries"]
        names = [e["variant"] for e in entries]
        base = next((e for e in entries if e["baseline"]), None)
        if base is None:
            base_name = "eager" if "eager" in names else next((n for n in names if n.startswith("eager")), None)
            base = next((e for e in entries if e["variant"] == base_name), None)
        subjects = [e for e in entries if e["subject"]]
        if not subjects:
            subjects = [e for e in entries if e["variant"] == "geocap"] or \
                       [e for e in entries if e["variant"].startswith("geocap")]
        for e in entries:
            e["speedup_vs_baseline"] = (base["median_s"] / e["median_s"]) if base and e["median_s"] > 0 else None
        subject_vs = {}
        for subj in subjects:
            if subj["median_s"] > 0:
                subject_vs[subj["variant"]] = {e["variant"]: e["median_s"] / subj["median_s"]
                                               for e in entries if e is not subj}
        # fields every entry agrees on describe the group (pass, N, B, dtype, device, ...)
        infos = [e["extra_info"] for e in entries]
        common = {k: v for k, v in infos[0].items()
                  if k not in ("variant", "backend", "rounds", "iterations", "peak_mem_method") and k not in MEMORY_KEYS
                  and all(i.get(k) == v for i in infos[1:])}
        out.append({
            "group": group["group"], "params": common,
            "baseline": base["variant"] if base else None, "subjects": [e["variant"] for e in subjects],
            "subject_speedup_vs": subject_vs,
            "variants": [{k: v for k, v in e.items() if k not in ("baseline", "subject")} for e in entries],
        })
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__, "triton": _version("triton"), "pytest_benchmark": _version("pytest-benchmark"),
        "python": platform.python_version(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret_removed": _REMOVED_INTERPRET,
        "groups": out,
    }


def _write_summary(config) -> None:
    path = os.environ.get(SUMMARY_ENV)
    benchmarks = _session_benchmarks(config)
    if not path or not benchmarks:
        return
    summary = build_summary(benchmarks)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    os.replace(tmp, path)


def pytest_runtest_logreport(report):
    # after each test: keep the JSON summary current (a run killed by a timeout keeps what it finished)
    if report.when == "teardown":
        try:
            _write_summary(_CONFIG)
        except Exception as exc:  # never fail a test over the summary
            sys.stderr.write(f"bench/conftest.py: could not write the summary: {exc!r}\n")


def pytest_sessionfinish(session, exitstatus):
    try:
        _write_summary(session.config)
    except Exception as exc:
        sys.stderr.write(f"bench/conftest.py: could not write the summary: {exc!r}\n")


def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_summary(summary: dict) -> list[str]:
    lines = ["median time per call; 'vs <baseline>' = baseline median / variant median (>1: the variant is faster "
             "than the baseline, eager); '<subject> x' = variant median / subject median (>1: geocap is faster "
             "than that variant); peak memory from extra_info (bench/memory.py)"]
    for g in summary["groups"]:
        params = g["params"]
        shape = " ".join(f"{k}={params[k]}" for k in ("B", "H", "d", "device") if k in params)
        subjects = g["subjects"]
        lines.append("")
        lines.append(f"[{g['group']}] {shape}")
        vs_base = f"vs {g['baseline']}" if g["baseline"] else "vs baseline"
        header = f"  {'variant':<14} {'median':>12} {'rounds x it':>12} {vs_base:>16}"
        for subj in subjects:
            header += f" {subj + ' x':>16}"
        show_load = any("loadavg_1m_after" in e["extra_info"] for e in g["variants"])
        if show_load:
            header += f" {'load1m':>7}"
        lines.append(header + f" {'peak mem':>12}  mem measure")
        for e in g["variants"]:
            runs = f"{e['rounds']}x{e['iterations']}"
            row = (f"  {e['variant']:<14} {_fmt_time(e['median_s']):>12} {runs:>12} "
                   f"{_fmt_ratio(e['speedup_vs_baseline']):>16}")
            for subj in subjects:
                row += f" {_fmt_ratio(g['subject_speedup_vs'].get(subj, {}).get(e['variant'])):>16}"
            if show_load:
                loads = [x for x in (e["extra_info"].get("loadavg_1m_before"), e["extra_info"].get("loadavg_1m_after"))
                         if x is not None]
                row += f" {max(loads):>7.2f}" if loads else f" {'-':>7}"
            mem = "-" if e["peak_mem_mb"] is None else f"{e['peak_mem_mb']:.1f} MB"
            lines.append(row + f" {mem:>12}  {e['peak_mem_key'] or ''}")
        for e in g["variants"]:
            if e["extra_info"].get("note"):
                lines.append(f"  note ({e['variant']}): {e['extra_info']['note']}")
    return lines


def pytest_terminal_summary(terminalreporter):
    benchmarks = _session_benchmarks(terminalreporter.config)
    if not benchmarks:
        return
    try:
        lines = format_summary(build_summary(benchmarks))
    except Exception as exc:  # the table is a convenience; never turn a green run red
        terminalreporter.write_line(f"bench/conftest.py: could not build the summary: {exc!r}")
        return
    terminalreporter.section("geocap benchmark comparison")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get(SUMMARY_ENV)
    if path:
        terminalreporter.write_line(f"summary JSON: {path}")
