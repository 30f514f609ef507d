#!/usr/bin/env bash
# geocap set-up and entry point. On a fresh machine:
#   ./run.sh          installs everything into .venv (first run only) and runs the main job on the
#                     embedded synthetic data: kernel check, synth -> prepro -> train -> evaluate
#   ./run.sh test     installs likewise and runs the test suite (extra arguments go to pytest)
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
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi

command="${1:-demo}"
[ $# -gt 0 ] && shift
geocap="$venv/bin/geocap"
case "$command" in
    demo)
        # 1. every attention backend against the float64 reference, and a timing table
        "$geocap" demo "$@"
        # 2. the embedded synthetic dataset through the whole captioner (~1 minute on 2 cores)
        work=out/demo
        rm -rf "$work"
        "$geocap" synth "$work/data" --images 1000 --feature-dim 256
        "$geocap" prepro captions --karpathy "$work/data/dataset_coco.json" --out "$work/data/caps"
        "$geocap" train --data "$work/data" --out "$work/run" --steps 400 --layers 2 --d-model 128 --heads 4 \
            --d-ff 256 --batch-size 32 --optimizer adamw --lr 1e-3 --warmup 50 --val-every 200 --val-images 100 \
            --checkpoint-every 400
        "$geocap" evaluate --checkpoint "$work/run/checkpoint-best.pt" --data "$work/data" --split test \
            --out "$work/eval" --no-meteor
        "$venv/bin/python" - "$work" <<'PY'
import json, sys
from geocap.data.vocab import load_captions
work = sys.argv[1]
refs = load_captions(f"{work}/data/caps")
first_ref = {}
for image_id, text in zip(refs.image_id.tolist(), refs.reference):
    first_ref.setdefault(image_id, text)
print("\nthree test images: generated caption | a reference")
for row in json.load(open(f"{work}/eval/captions_test.json"))[:3]:
    print(f"  {row['image_id']}: {row['caption']} | {first_ref[row['image_id']]}")
PY
        ;;
    test) exec "$py" -m pytest tests "$@" ;;
    *) echo "usage: ./run.sh [demo|test] [args...]" >&2; exit 2 ;;
esac
