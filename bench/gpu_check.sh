#!/usr/bin/env bash
# GPU check for geocap: environment, the test suite (compiled Triton), then the benchmarks.
#
#   bash bench/gpu_check.sh "$OUT"        (from the repository root, on the GPU machine)
#
# No network is needed: geocap is made importable from a symlink tree on PYTHONPATH
# (geocap/* + kernels -> geocap.kernels + analysis -> geocap.analysis), nothing is pip-installed.
# Every stage runs under `timeout` (SIGINT first, so pytest still writes its JSON / junit files,
# then SIGKILL) and the whole script stays inside GPU_CHECK_DEADLINE_S (default 420 s, well inside 8 min).
#
# Files left in $OUT (flat, at most 7, within the device tool's 8):
#   gpu_check.log                     everything printed below
#   timing.json                       bench/gpu_timing.py, the first stage (on an idle host): kernel
#                                     time (do_bench), host time (200 calls, checks on/off) and kernels
#                                     per call (torch.profiler) per case; entropy kernel sweep; D2D copy
#   bench_entropy_summary.json        bench/conftest.py comparison (written after every benchmark)
#   bench_captioner_summary.json      likewise, bench/test_bench_captioner.py
#   bench_attention_summary.json      likewise, bench/test_bench_attention.py (eager, sdpa_bias, geocap)
#   bench_flex_summary.json           likewise, compiled FlexAttention beside eager and geocap (N = 36, fwd)
#   raw_records.tar.gz                at the end: junit_tests.xml (pytest tests, stops after 25
#                                     failures), junit_bench_sanity.xml, and the pytest-benchmark
#                                     records bench_{entropy,captioner,attention,flex}.json
#
# Exit status: 3 if geocap cannot be imported (nothing else runs), 1 if the test suite failed (or
# timed out), else 2 if a bench stage failed, else 0.
# The benchmarks run even when the tests failed.
#
# Knobs (environment): GPU_CHECK_DEADLINE_S (420), GPU_CHECK_TESTS_S (210), GPU_CHECK_TEST_WORKERS
# (pytest-xdist workers when xdist is importable, default nproc - 1; 0 runs the suite in one process),
# GPU_CHECK_SANITY_S (45), GPU_CHECK_ENTROPY_S (45), GPU_CHECK_CAPTIONER_S (60),
# GPU_CHECK_ATTENTION_RESERVE_S (120, kept for the attention sweep while earlier stages run),
# GPU_CHECK_ATTENTION_S (rest of the deadline less GPU_CHECK_FLEX_S), GPU_CHECK_FLEX_S (60, the flex stage,
# including its wait for the background compilation), GPU_CHECK_FLEX_WARMUP_S (300, the background
# compilation's cap: bench/flex_warmup.py, started before the timing stage on the upper half of the CPUs);
# GPU_CHECK_TIMING_S (240, the first stage); GPU_CHECK_DRY_RUN=1 runs the timing stage on the CPU
# with tiny shapes (--dry-run, Triton interpreted), skips the test suite and restricts the attention
# sweep to N=36 (for trying the script on a CPU machine); GEOCAP_BENCH_N / GEOCAP_BENCH_DTYPES /
# GEOCAP_BENCH_VARIANTS (default here eager,sdpa_bias,geocap) / GEOCAP_BENCH_PASSES pass through to bench/test_bench_attention.py.
set -u -o pipefail

OUT_ARG=${1:-}
if [[ -z "$OUT_ARG" ]]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
    exit 64
fi
mkdir -p "$OUT_ARG"
OUT=$(cd "$OUT_ARG" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG="$OUT/gpu_check.log"
START=$(date +%s)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-420}
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - START )); }

# seconds a stage may use: its cap, but never past the deadline (keeping `reserve` s for later stages)
stage_limit() {
    local cap=$1 reserve=${2:-0} left
    left=$(( DEADLINE_S - $(elapsed) - reserve - 5 ))
    (( left < cap )) && cap=$left
    (( cap < 1 )) && cap=0
    echo "$cap"
}

declare -A RC=()
ORDER=()

# run_stage NAME LIMIT_S CMD...: timeout with SIGINT (pytest finishes its reports), SIGKILL 20 s later
run_stage() {
    local name=$1 limit=$2; shift 2
    ORDER+=("$name")
    echo
    echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s (elapsed $(elapsed)s): $*"
    if (( limit <= 0 )); then
        echo "=== [$name] SKIPPED: no time left before the ${DEADLINE_S}s deadline"
        RC[$name]=skipped
        return 0
    fi
    local t0=$(date +%s) rc
    timeout -s INT -k 20 "$limit" "$@"
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "=== [$name] TIMED OUT after ${limit}s (rc $rc)"
    fi
    echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 ))s"
    RC[$name]=$rc
    return 0
}

main() {
    echo "geocap gpu_check: repo $REPO, out $OUT, started $(date -u +%Y-%m-%dT%H:%M:%SZ), deadline ${DEADLINE_S}s"
    [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]] && echo "DRY RUN: test suite skipped, attention sweep limited to N=36"

    # --- make geocap importable without installing anything ---------------------------------
    unset TRITON_INTERPRET
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    local site
    site=$(mktemp -d /tmp/geocap_site.XXXXXX)
    mkdir -p "$site/geocap"
    local f
    for f in "$REPO"/geocap/*; do
        [[ "$(basename "$f")" == __pycache__ ]] && continue
        ln -s "$f" "$site/geocap/$(basename "$f")"
    done
    ln -sfn "$REPO/kernels" "$site/geocap/kernels"
    ln -sfn "$REPO/analysis" "$site/geocap/analysis"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    # without this, `python -m pytest` run from the repository root puts the root first on sys.path
    # and `geocap` resolves to ./geocap, which has no kernels/ or analysis/ inside
    export PYTHONSAFEPATH=1
    echo "PYTHONPATH=$PYTHONPATH"

    # --- environment -----------------------------------------------------------------------
    echo
    echo "=== environment"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi
    grep -m1 "model name" /proc/cpuinfo 2>/dev/null; echo "cpus: $(nproc 2>/dev/null)"
    timeout 120 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for mod in ("torch", "triton", "numpy", "scipy", "pytest", "pytest_benchmark", "hypothesis", "h5py", "pycocotools"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:18s} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod:18s} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
import geocap, geocap.kernels
print("geocap from", geocap.__file__, "| kernels from", geocap.kernels.__file__)
EOF
    local env_rc=$?
    echo "env stage rc=$env_rc (elapsed $(elapsed)s)"
    if (( env_rc != 0 )); then
        echo "gpu_check: the environment check failed (see above); nothing else can run. exit status 3"
        return 3
    fi
    "$PY" -c "import pytest, pytest_benchmark, hypothesis" 2>/dev/null \
        || echo "WARNING: pytest / pytest_benchmark / hypothesis not all importable (see above); stages needing them will fail"

    cd "$REPO" || return 1

    # --- FlexAttention compiled in the background from the start (bench/flex_warmup.py, capped at
    # GPU_CHECK_FLEX_WARMUP_S): its on-disk caches serve the bench_flex stage at the end. Pinned to the
    # upper half of the CPUs, so that the timing stage's host work keeps the lower half.
    local flex_cache flex_log flex_pid="" ncpu cpus
    flex_cache=$(mktemp -d /tmp/geocap_flex_cache.XXXXXX)
    flex_log="$flex_cache/flex_warmup.log"
    export TORCHINDUCTOR_CACHE_DIR="$flex_cache/inductor" TRITON_CACHE_DIR="$flex_cache/triton"
    ncpu=$(nproc 2>/dev/null || echo 1)
    cpus=$(( ncpu > 1 ? ncpu / 2 : 0 ))-$(( ncpu - 1 ))
    local flex_n="${GEOCAP_BENCH_FLEX_N:-36}"
    echo
    echo "=== [flex_warmup] started in the background (cpus $cpus, cap ${GPU_CHECK_FLEX_WARMUP_S:-300}s, log at the end)"
    GEOCAP_BENCH_N="$flex_n" taskset -c "$cpus" timeout -s KILL "${GPU_CHECK_FLEX_WARMUP_S:-300}" \
        "$PY" bench/flex_warmup.py > "$flex_log" 2>&1 &
    flex_pid=$!

    # --- timing first, on an idle host (bench/gpu_timing.py: kernel time, host time, kernels per
    # call; JSON rewritten after every measurement); the test suite only after it, never beside it
    local timing_s=${GPU_CHECK_TIMING_S:-240} dry=()
    [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]] && dry=(--dry-run)
    run_stage timing "$(stage_limit "$timing_s" 60)" \
        "$PY" bench/gpu_timing.py "$OUT/timing.json" "${dry[@]}" --deadline-s $(( timing_s - 30 ))

    # --- the test suite, compiled Triton ---------------------------------------------------
    local attention_reserve=${GPU_CHECK_ATTENTION_RESERVE_S:-120} entropy_s=${GPU_CHECK_ENTROPY_S:-45} sanity_s=${GPU_CHECK_SANITY_S:-45} captioner_s=${GPU_CHECK_CAPTIONER_S:-60}
    if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
        ORDER+=(tests); RC[tests]=skipped
        echo; echo "=== [tests] SKIPPED (GPU_CHECK_DRY_RUN=1)"
    else
        # pytest-xdist, where installed, spreads the files over worker processes: the suite's time is
        # mostly Triton compilation and CPU-side tests, and the GPU machine has the cores for it
        local parallel=()
        local workers=${GPU_CHECK_TEST_WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}
        if "$PY" -c "import xdist" 2>/dev/null && [[ "$workers" != 0 ]]; then
            parallel=(-n "$workers" --dist loadfile)
        fi
        run_stage tests "$(stage_limit "${GPU_CHECK_TESTS_S:-210}" $(( sanity_s + entropy_s + captioner_s + attention_reserve )))" \
            "$PY" -m pytest tests -q -rfE --maxfail=25 -p no:cacheprovider "${parallel[@]}" --tb=short --junitxml="$OUT/junit_tests.xml"
    fi

    # --- bench correctness checks (flex score_mod vs geometry_log_bias, variants agree) --------
    # compiled flex left out of them: its cold compile per shape takes minutes (flex_warmup compiles
    # the timed cases in the background; uncompiled flex is still checked)
    GEOCAP_BENCH_COMPILED_FLEX=0 run_stage bench_sanity \
        "$(stage_limit "$sanity_s" $(( entropy_s + captioner_s + attention_reserve )))" \
        "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-skip --junitxml="$OUT/junit_bench_sanity.xml"

    # --- benchmarks: entropy first (short), then the attention sweep with the rest ------------
    if [[ -f bench/test_bench_entropy.py ]]; then
        GEOCAP_BENCH_SUMMARY="$OUT/bench_entropy_summary.json" \
        run_stage bench_entropy "$(stage_limit "$entropy_s" $(( captioner_s + attention_reserve )))" \
            "$PY" -m pytest bench/test_bench_entropy.py --benchmark-only -q -p no:cacheprovider \
            --benchmark-json="$OUT/bench_entropy.json"
    else
        ORDER+=(bench_entropy); RC[bench_entropy]=absent
        echo; echo "=== [bench_entropy] bench/test_bench_entropy.py not present"
    fi

    # --- captioner: decoding (beam 3, T = 16, 32 images) and training against ORT-style ------
    if [[ -f bench/test_bench_captioner.py ]]; then
        GEOCAP_BENCH_SUMMARY="$OUT/bench_captioner_summary.json" \
        run_stage bench_captioner "$(stage_limit "$captioner_s" "$attention_reserve")" \
            "$PY" -m pytest bench/test_bench_captioner.py --benchmark-only -q -p no:cacheprovider \
            --benchmark-json="$OUT/bench_captioner.json"
    else
        ORDER+=(bench_captioner); RC[bench_captioner]=absent
        echo; echo "=== [bench_captioner] bench/test_bench_captioner.py not present"
    fi

    local n_default="${GEOCAP_BENCH_N:-}"
    [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 && -z "$n_default" ]] && n_default=36
    # flex is left to its own last stage: on the H200 (torch 2.11) its first compiled forward had not
    # finished after 165 s, which cost the rest of the sweep (RESULTS.md, 2026-12-04)
    local flex_s=${GPU_CHECK_FLEX_S:-60}
    GEOCAP_BENCH_N="$n_default" GEOCAP_BENCH_VARIANTS="${GEOCAP_BENCH_VARIANTS:-eager,sdpa_bias,geocap}" \
    GEOCAP_BENCH_SUMMARY="$OUT/bench_attention_summary.json" \
    run_stage bench_attention "$(stage_limit "${GPU_CHECK_ATTENTION_S:-$DEADLINE_S}" "$flex_s")" \
        "$PY" -m pytest bench/test_bench_attention.py --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/bench_attention.json" --benchmark-columns=min,median,mean,stddev,rounds,iterations

    # flex beside eager and geocap, forward at N = 36 only, in whatever time is left, after its
    # background compilation (waited for here, within the stage's time)
    local flex_wait_s waited=0 flex_rc
    flex_wait_s=$(stage_limit "$flex_s" 0)
    while [[ -n "$flex_pid" ]] && kill -0 "$flex_pid" 2>/dev/null && (( waited < flex_wait_s - 20 )); do
        sleep 2; waited=$(( waited + 2 ))
    done
    if [[ -n "$flex_pid" ]] && ! kill -0 "$flex_pid" 2>/dev/null; then
        wait "$flex_pid"; flex_rc=$?
    else
        flex_rc="still running after ${waited}s of waiting"
    fi
    echo
    echo "=== [flex_warmup] rc=$flex_rc (waited ${waited}s here); its log:"
    cat "$flex_log" 2>/dev/null
    GEOCAP_BENCH_N="$flex_n" GEOCAP_BENCH_PASSES=fwd GEOCAP_BENCH_VARIANTS=eager,geocap,flex \
    GEOCAP_BENCH_SUMMARY="$OUT/bench_flex_summary.json" \
    run_stage bench_flex "$(stage_limit "$flex_s" 0)" \
        "$PY" -m pytest bench/test_bench_attention.py --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/bench_flex.json"

    # --- verdict -----------------------------------------------------------------------------
    echo
    echo "=== summary (elapsed $(elapsed)s of ${DEADLINE_S}s)"
    local name status=0
    for name in "${ORDER[@]}"; do
        echo "  $name: rc=${RC[$name]}"
    done
    if [[ "${RC[tests]}" != 0 && "${RC[tests]}" != skipped ]]; then
        status=1
    else
        for name in bench_sanity bench_entropy bench_captioner bench_attention bench_flex; do
            case "${RC[$name]:-absent}" in 0|absent) ;; *) status=2 ;; esac
        done
    fi
    echo "  files in $OUT:"; ls -la "$OUT"
    # the device tool returns at most 8 files: the raw pytest records (junit, pytest-benchmark) go
    # into one archive; the log and the comparison summaries stay beside it, readable as they are
    if compgen -G "$OUT/junit_*.xml" >/dev/null || compgen -G "$OUT/bench_*[a-z].json" >/dev/null; then
        (cd "$OUT" && tar czf raw_records.tar.gz --remove-files $(ls junit_*.xml 2>/dev/null) \
            $(ls bench_*.json 2>/dev/null | grep -v _summary.json)) && echo "  raw records -> $OUT/raw_records.tar.gz"
    fi
    echo "gpu_check exit status: $status"
    [[ -n "$flex_pid" ]] && kill -9 "$flex_pid" 2>/dev/null
    rm -rf "$site" "$flex_cache"
    return "$status"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
