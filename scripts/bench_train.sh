#!/usr/bin/env bash
# The training-step figures of docs/benchmarks.md, side by side with PyTorch in one run: B0 at
# 32x32 (batch 64) and 224x224 (batch 16), one and two threads, each effnet run followed by
# torchvision's efficientnet_b0 + RMSprop on the same batch shape (`effnet bench --train
# --reference`). Needs torch and torchvision in PYTHON (default python3).
#
#   scripts/bench_train.sh | tee docs/runs/bench-train-DATE.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cargo build --release --quiet
EFFNET=target/release/effnet
git log -1 --format='commit %h %s' | cut -c1-100
for threads in 1 2; do
    echo
    RAYON_NUM_THREADS=$threads "$EFFNET" bench b0 --train --threads "$threads" --iters 20 \
        --reference --python "$PYTHON"
done
for threads in 1 2; do
    echo
    RAYON_NUM_THREADS=$threads "$EFFNET" bench b0 --train --threads "$threads" --iters 5 \
        --resolution 224 --batch 16 --reference --python "$PYTHON"
done
