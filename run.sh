#!/usr/bin/env bash
# geocap set-up and entry point. On a fresh machine:
#   ./run.sh          installs everything into .venv (first run only) and runs the main job on the
#                     embedded synthetic data: kernel check, synth -> prepro -> train and evaluate
#                     ORT and its no-geometry ablation (variants ort and none) -> a table of both
#   ./run.sh test     installs likewise and runs the test suite, one pytest-xdist worker per core
#                     (GEOCAP_TEST_WORKERS=N to choose, 0 for one process; extra arguments go to pytest)
#   ./run.sh lint     installs likewise and runs ruff (pyproject.toml's rules)
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
# reinstall when the dependency list changes
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build here
    "$py" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    # the pin again: nothing the extras pull (transformers, ...) may replace it
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]" "torch==2.13.0"
    touch "$stamp"
fi

command="${1:-demo}"
[ $# -gt 0 ] && shift
geocap="$venv/bin/geocap"
case "$command" in
    demo)
        # the captioner part: one synthetic dataset, ORT (variant ort) and its no-geometry ablation
        # (variant none, as geocap study names them) trained alike
        # (same seed, data order and sizes; batches of 10 images with their 5 captions each, as ORT),
        # both evaluated on the test split (sizes chosen to keep the whole demo near 5 minutes on
        # 2 cores; see the README)
        work=out/demo data=out/demo/data images=3000 steps=1200
        train_options=(--steps "$steps" --layers 2 --d-model 128 --heads 4 --d-ff 256 --batch-size 10
                       --optimizer adamw --lr 1e-3 --warmup 50 --val-every 400 --val-images 100
                       --checkpoint-every "$steps")
        echo "== 1/5 kernel check: every attention backend against the float64 reference, timings"
        "$geocap" kernel-check "$@"
        echo; echo "== 2/5 synthetic data: $images images -> $data"
        rm -rf "$work"
        "$geocap" synth "$data" --images "$images" --feature-dim 256
        "$geocap" prepro captions --karpathy "$data/dataset_coco.json" --out "$data/caps"
        for model in ort none; do
            echo; echo "== 3/5 variant $model: train $steps steps -> $work/$model, evaluate"
            "$geocap" train --data "$data" --out "$work/$model" --variant "$model" "${train_options[@]}"
            "$geocap" evaluate --checkpoint "$work/$model/checkpoint-best.pt" --data "$data" --split test \
                --out "$work/$model/eval" --no-meteor
        done
        # ORT's attention over the test split (reference captions teacher-forced, plus
        # hypothetical ones with swapped nouns), the seed's four analyses, and the viewer
        echo; echo "== 4/5 attention: dump -> $work/dump, analyses -> $work/report, viewer -> $work/view"
        "$geocap" dump --checkpoint "$work/ort/checkpoint-best.pt" --data "$data" --split test \
            --out "$work/dump" --features
        "$geocap" analyze "$work/dump" --out "$work/report" --viewer-href ../view/index.html
        "$geocap" view "$work/dump" --out "$work/view" --report "$work/report/report.md"
        echo; echo "== 5/5 ort vs none (ORT's no-geometry ablation) on the test split"
        "$geocap" demo-table --captions "$data/caps" --samples 3 \
            ort="$work/ort/eval/metrics_test.json" none="$work/none/eval/metrics_test.json"
        echo "everything is under $work/ (data/, ort/, none/, dump/, report/, view/)"
        echo "analysis report:  $PWD/$work/report/report.md"
        echo "attention viewer: file://$PWD/$work/view/index.html"
        echo "${SECONDS} s in all"
        ;;
    # worksteal: the Triton-interpreter tests take up to ~45 s each, and idle workers take over queued ones
    test) exec "$py" -m pytest tests -n "${GEOCAP_TEST_WORKERS:-auto}" --dist worksteal "$@" ;;
    lint) exec "$venv/bin/ruff" check . "$@" ;;
    *) echo "usage: ./run.sh [demo|test|lint] [args...]" >&2; exit 2 ;;
esac
