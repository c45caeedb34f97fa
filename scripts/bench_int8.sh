#!/usr/bin/env bash
# int8 and bf16 side by side with ONNX Runtime and OpenVINO, speed and accuracy, in one run:
#   [PYTHON=/path/to/python] [PHOTOS=DIR] [ROUNDS=N] [MODELS=...] scripts/bench_int8.sh [ITERS]
# Gathers real photos (scripts/gather_photos.sh) unless PHOTOS holds some, quantises Lite0 (real
# weights) and B0 (the torchvision fixture: random weights, so every layer is put in int8 with
# --threshold 0 and its agreement figures mean nothing) with `effnet quantize` on every other
# photo, then times at 1 and 2 threads, batch 1: the engine in fp32 and int8 (and
# bf16), ONNX Runtime and OpenVINO in fp32/bf16, the weights' own QDQ graph and ONNX Runtime's
# quantize_static QDQ graph calibrated on the same photos, each with its top-1 agreement with its
# own fp32 on the held-out photos. ROUNDS repeats the timings (quantising once); the run ends with
# every runtime's median over the rounds (scripts/summarize_int8.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-50}
EFFNET=${EFFNET:-target/release/effnet}
PYTHON=${PYTHON:-python3}
PHOTOS=${PHOTOS:-${TMPDIR:-/tmp}/effnet-photos}
"$PYTHON" -c "import onnxruntime, openvino, onnx, safetensors, numpy" 2>/dev/null ||
  "$PYTHON" -m pip install -q onnxruntime openvino onnx safetensors numpy
[ -n "$(ls -A "$PHOTOS" 2>/dev/null)" ] || PATH="$(dirname "$PYTHON"):$PATH" scripts/gather_photos.sh "$PHOTOS" >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
{
  lscpu | grep -E "Model name|^CPU\(s\)"
  echo "photos: $(ls "$PHOTOS" | wc -l) in $PHOTOS; half calibrate, half are held out"
  fixtures=../shared/fixtures/weights
  for model in ${MODELS:-lite0:efficientnet-lite0-57934424.pth:0.99 b0:torchvision_efficientnet_b0_seed0.pth:0}; do
    IFS=: read -r name file threshold <<<"$model"
    model=$name:$file
    "$EFFNET" quantize --weights "$fixtures/$file" --calib "$PHOTOS" --holdout 0.5 \
      --threshold "$threshold" --threads 2 --out "$out/$name-int8.safetensors"
    echo
    for round in $(seq "${ROUNDS:-1}"); do
      for threads in 1 2; do
        echo "round $round"
        "$EFFNET" bench --weights "$out/$name-int8.safetensors" --threads "$threads" --iters "$ITERS" \
          --reference --python "$PYTHON" --calib "$PHOTOS" --holdout 0.5
        echo
        # bf16 needs AVX512-BF16: elsewhere the engine refuses it, and the run says so.
        if bf16=$("$EFFNET" bench --weights "$fixtures/${model#*:}" --precision bf16 \
          --threads "$threads" --iters "$ITERS" --reference --python "$PYTHON" --calib "$PHOTOS" \
          --holdout 0.5 2>&1); then
          grep -E "^(effnet engine|runtime|openvino .* bf16)" <<<"$bf16"
        else
          echo "bf16 skipped: $(tail -n 1 <<<"$bf16")"
        fi
        echo
      done
    done
  done
} | tee "$out/log"
echo "== medians over the rounds"
python3 scripts/summarize_int8.py "$out/log"
