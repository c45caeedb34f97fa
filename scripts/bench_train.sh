#!/usr/bin/env bash
# The training-step figures of docs/benchmarks.md, side by side with PyTorch in one run: B0 at
# 32x32 (batch 64) and 224x224 (batch 16), one and two threads, each effnet run followed by
# torchvision's efficientnet_b0 + RMSprop on the same batch shape (`effnet bench --train
# --reference`). Needs torch and torchvision in PYTHON (default python3).
#
# Last, two one-thread effnet steps run at once as separate processes: perfectly parallel work, so
# 2 x (one alone) / (each of the two) is the most any two-thread step can gain on this machine.
#
#   scripts/bench_train.sh | tee docs/runs/bench-train-DATE.txt   (EFFNET=path: skip the build)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${EFFNET:-}" ]; then # EFFNET=path times a binary built before
    cargo build --release --quiet
    EFFNET=target/release/effnet
    git log -1 --format='commit %h %s' | cut -c1-100
fi
echo "binary: $EFFNET ($("$EFFNET" --version))"
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
echo
echo "== two one-thread processes at once (B0 32x32 b64; the ceiling for two threads)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for p in a b; do
    RAYON_NUM_THREADS=1 "$EFFNET" bench b0 --train --threads 1 --iters 20 >"$tmp/$p" &
done
wait
cat "$tmp/a" "$tmp/b"
