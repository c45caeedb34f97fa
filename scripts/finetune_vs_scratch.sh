#!/usr/bin/env bash
# Reproduces the fine-tuning record in docs/training.md: EfficientNet-Lite0 fine-tuned from the real
# ImageNet weights vs the same model trained from scratch, same data (the first 3000 Fashion-MNIST
# training images at 64x64), same batch, same number of steps, same recipe; evaluated on the full
# 10000-image test set with the EMA weights.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
EFFNET=target/release/effnet
OUT=${1:-runs/finetune-vs-scratch}
COMMON=(--dataset fashion-mnist --resolution 64 --batch-size 32 --epochs 3 --train-limit 3000 --seed 0)
"$EFFNET" finetune --weights ../shared/fixtures/weights/efficientnet-lite0-57934424.pth \
  --freeze-epochs 1 "${COMMON[@]}" --out "$OUT/finetune"
"$EFFNET" train lite0 "${COMMON[@]}" --out "$OUT/scratch"
echo
for run in finetune scratch; do
  echo "== $run"
  cat "$OUT/$run/metrics.csv"
done
