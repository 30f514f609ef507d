#!/usr/bin/env bash
# Scale check of the dump path: a synthetic dataset whose train split holds 100k+ images, a small
# model (trained a few steps: the point is the dump's machinery, not caption quality), a full
# dump of that split with every map, then open_dump over it: length, random access, one pass in
# chunks, bytes per image. Usage: bash bench/scale_dump.sh [WORK_DIR]   (IMAGES=125000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
work=${1:-/tmp/geocap-scale}
images=${IMAGES:-125000}
rm -rf "$work"
step() { local label=$1 t0=$SECONDS; shift; "$@"; echo "[scale] $label: $((SECONDS - t0)) s"; }
step synth "$py" -m geocap synth "$work/data" --images "$images" --feature-dim 32 --seed 1
step prepro "$py" -m geocap prepro captions --karpathy "$work/data/dataset_coco.json" --out "$work/data/caps"
step train "$py" -m geocap train --data "$work/data" --out "$work/run" --steps 20 --layers 2 --d-model 64 --heads 4 \
    --d-ff 128 --batch-size 8 --val-every 0 --checkpoint-every 20 --no-progress
step dump "$py" -m geocap dump --checkpoint "$work/run/checkpoint-latest.pt" --data "$work/data" --split train \
    --out "$work/dump" --no-hypothetical --no-progress
"$py" - "$work/dump" <<'PY'
import os, sys, time
import numpy as np
from geocap.dump import open_dump
path = sys.argv[1]
t0 = time.perf_counter(); d = open_dump(path, progress=False); t_open = time.perf_counter() - t0
n = len(d)
images = d.metadata.get("n_images") or len({d[i].image_id for i in range(0, n, max(1, n // 1000))})
rng = np.random.default_rng(0)
t0 = time.perf_counter()
for i in rng.integers(0, n, 1000):
    d[int(i)]
t_random = time.perf_counter() - t0
t0 = time.perf_counter(); seen = 0; ids = set()
for chunk in d.iter_chunks(512):
    seen += len(chunk)
    ids.update(r.image_id for r in chunk)
t_pass = time.perf_counter() - t0
size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
print(f"[scale] open_dump: {t_open:.1f} s; {n} records of {len(ids)} images in {len(os.listdir(path))} files, "
      f"{size / 2**30:.2f} GiB ({size / len(ids) / 1024:.1f} KiB per image)")
print(f"[scale] 1000 random records: {t_random:.1f} s; one pass in chunks of 512: {t_pass:.0f} s "
      f"({seen / t_pass:.0f} records/s); records seen {seen} == len {n}: {seen == n}")
PY
