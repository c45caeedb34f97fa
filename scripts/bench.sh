#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: the native engine side by side with ONNX Runtime (and PyTorch when
# installed) on the same weights and input, B0/B1/B3 at native resolution, batch 1, 1 and 2 threads;
# peak memory of `effnet classify`; callgrind instruction counts per inference; the training step
# of B0 (32x32, batch 64, 1 thread) beside PyTorch's when torch + torchvision are installed.
#   [PYTHON=/path/to/python] scripts/bench.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-50}
cargo build --release --locked -q
EFFNET=target/release/effnet
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import onnxruntime, openvino, safetensors, numpy" 2>/dev/null ||
  "$PYTHON" -m pip install -q onnxruntime openvino safetensors numpy

echo "## Latency (median of $ITERS runs after a warm-up; same weights and input in every runtime)"
for model in b0 b1 b3; do
  for threads in 1 2; do
    "$EFFNET" bench "$model" --threads "$threads" --iters "$ITERS" --reference --python "$PYTHON"
    echo
  done
done

echo "## Loaded machine: one core kept busy by another process; 2 threads must not be slower than 1"
yes > /dev/null &
HOG=$!
sleep 1
for threads in 1 2 1 2; do
  "$EFFNET" bench b0 --threads "$threads" --iters "$ITERS" | tail -1 | sed "s/^/threads $threads: /"
done
kill "$HOG"
echo

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$EFFNET" convert ../shared/fixtures/weights/torchvision_efficientnet_b0_seed0.pth "$TMP/b0.safetensors" >/dev/null

echo "## Peak memory (max RSS) of one B0 classification, whole process"
/usr/bin/time -f "max RSS %M KiB" "$EFFNET" classify --weights "$TMP/b0.safetensors" \
  ../shared/fixtures/images/coffee.png --top 1 2>&1 | tail -1

echo
echo "## Instructions per B0 inference at 224x224, 1 thread (callgrind; valgrind hides AVX-512, so this is the AVX2 path)"
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$EFFNET" bench b0 --weights "$TMP/b0.safetensors" \
    --iters "$1" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
one=$(count 1)
three=$(count 3)
echo "$(( (three - one) / 2 )) instructions per inference"

echo
echo "## Training step: B0 at 32x32, batch 64, 1 thread (PyTorch: torchvision efficientnet_b0 + RMSprop)"
"$EFFNET" bench b0 --train --threads 1 --iters 20 --reference --python "$PYTHON"
