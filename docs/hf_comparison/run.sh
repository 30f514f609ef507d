#!/bin/bash
# The worked comparison of docs/hf_comparison/README.md: ORT (the full study's ort seed-0 model) and
# a tiny ViT + GPT-2 VisionEncoderDecoderModel trained from random init, on the same 600 test
# images of the study's synthetic scenes. Run from the repository root after
#     OMP_NUM_THREADS=1 geocap study --out out/study
# (or set STUDY to a study folder). Writes out/hf_comparison/ and docs/hf_comparison/compare.{md,png}.
set -euo pipefail
STUDY=${STUDY:-out/study}
OUT=${OUT:-out/hf_comparison}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
# the study's scenes drawn as 64-pixel images (COCO captions and instances files beside them)
geocap synth-images --data "$STUDY/data" --out "$OUT/images" --split train --size 64
geocap synth-images --data "$STUDY/data" --out "$OUT/images" --split test --size 64
# 6 layers like the study's ORT (encoder and decoder), d_model 64, 4 heads, patch 8: 8x8 patches + [CLS]
geocap hf-train-tiny --images "$OUT/images/images" --captions "$OUT/images/captions_train.json" \
    --out "$OUT/tiny" --steps 3000 --layers 6
geocap dump --hf "$OUT/tiny" --images "$OUT/images/images" --captions "$OUT/images/captions_test.json" \
    --instances "$OUT/images/instances_test.json" --out "$OUT/dump-tiny"
geocap analyze "$OUT/dump-tiny" --out "$OUT/report-tiny"
# ORT's analysis is the study's own (geocap study dumps and analyses every model on the test split)
geocap compare "ORT (6 layers)=$STUDY/models/ort-seed0/analysis" "tiny ViT+GPT-2 (6 layers)=$OUT/report-tiny" \
    --out docs/hf_comparison/compare.md
cp "$OUT/report-tiny/analysis.json" docs/hf_comparison/analysis_tiny_vit_gpt2.json
cp "$STUDY/models/ort-seed0/analysis/analysis.json" docs/hf_comparison/analysis_ort.json
