#!/usr/bin/env bash
# The GPU figures of docs/gpu.md in one short run on a machine with a GPU, from binaries built
# elsewhere (a GPU machine's time should not go to compiling): training parity with Flex
# (tests/gpu.rs on the device), then B0 at 224, batch 64 and 256, inference and training steps in
# f32 and with --mixed-precision (f16; bf16 too on CUDA), and PyTorch (torchvision's
# efficientnet_b0) on the same GPU.
#
#   scripts/gpu_build.sh                 # here: effnet, tests/gpu.rs -> .gpubin/vulkan/
#   (scripts/llvm_for_cuda.sh; FEATURES=vulkan,cuda scripts/gpu_build.sh  # CUDA too)
#   scripts/gpu_check.sh > gpu-check.log # there (BIN, DEVICE, RES, BATCHES, ITERS, LIMIT,
#                                        # HALVES, PYTHON; TORCH=0 skips PyTorch; GPU_TEST=0
#                                        # the tests). CUDA: BIN=.gpubin/vulkan-cuda DEVICE=cuda:0
#
# Every command is printed before its output, with its exit status and seconds after it; each is
# cut off after LIMIT seconds so that one slow step cannot take the rest of the run with it.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.gpubin/vulkan}
DEVICE=${DEVICE:-vulkan}
ITERS=${ITERS:-20}
RES=${RES:-224}
BATCHES=${BATCHES:-64,256}
LIMIT=${LIMIT:-150}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-1}
GPU_TEST=${GPU_TEST:-1}
# Half types for --mixed-precision (bf16 is CUDA's only: HALVES="f16 bf16" with DEVICE=cuda:0).
HALVES=${HALVES:-f16}

step() {
    echo
    echo "\$ $*"
    local t0=$SECONDS
    timeout "$LIMIT" "$@"
    echo "(rc $?, $((SECONDS - t0)) s)"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
nproc
# The binaries, unpacked outside the repository when they came compressed (python3's lzma where
# there is no xz).
unxz='import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)'
run=$BIN
if [ -e "$BIN/effnet.xz" ]; then
    run=$(mktemp -d)
    for z in "$BIN"/*.xz; do
        f="$run/$(basename "${z%.xz}")"
        xz -dc "$z" > "$f" 2>/dev/null || "$PYTHON" -c "$unxz" "$z" > "$f"
        chmod +x "$f"
    done
fi
# tests/gpu.rs runs the CLI at the path cargo compiled into it.
exe=$(cat "$BIN/effnet.path" 2>/dev/null || true)
if [ -n "$exe" ] && [ ! -e "$exe" ]; then
    mkdir -p "$(dirname "$exe")" && cp "$run/effnet" "$exe"
fi
effnet="$run/effnet"
b0="b0 --device $DEVICE --resolution $RES --batch $BATCHES --iters $ITERS"

step "$effnet" bench b0 --device "$DEVICE" --batch 1 --iters 3
if [ "$GPU_TEST" = 1 ]; then
    EFFNET_TEST_WGPU=$DEVICE step "$run/gpu-test" --test-threads 1 --nocapture
fi
step "$effnet" bench $b0
step "$effnet" bench $b0 --train
for half in $HALVES; do
    step "$effnet" bench $b0 --mixed-precision "$half"
    step "$effnet" bench $b0 --train --mixed-precision "$half"
done
[ "$TORCH" = 1 ] || exit 0
for n in ${BATCHES//,/ }; do
    for amp in "" $HALVES; do
        # effnet's training benchmark has 10 classes, its inference the model's 1000.
        for mode in "--classes 10" "--classes 1000 --eval"; do
            step "$PYTHON" scripts/bench_train_torch.py --device cuda --resolution "$RES" \
                --batch "$n" --iters "$ITERS" ${amp:+--amp $amp} $mode
        done
    done
done
