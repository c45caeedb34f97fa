#!/usr/bin/env bash
# The engine beside ONNX Runtime and OpenVINO (fp32 and bf16) on each family, batch 1, 1 and 2
# threads, all on the graph `effnet export onnx` writes, in one run:
#   [PYTHON=/path/to/python] [PRECISION=bf16] scripts/bench_families.sh [ITERS] [MODELS...]
# (default: 20 b0 v2-b0 v2-s; PRECISION=bf16 adds the engine in bf16 to each table)
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-20}
shift || true
MODELS=("${@:-b0 v2-b0 v2-s}")
EFFNET=${EFFNET:-target/release/effnet}
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import onnxruntime, openvino, safetensors, numpy" 2>/dev/null ||
  "$PYTHON" -m pip install -q onnxruntime openvino safetensors numpy
lscpu | grep -E "Model name|^CPU\(s\)"
for model in ${MODELS[@]}; do
  for threads in 1 2; do
    "$EFFNET" bench "$model" --threads "$threads" --iters "$ITERS" --reference --python "$PYTHON" ${PRECISION:+--precision "$PRECISION"}
    echo
  done
done
