#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs on a GPU machine into .gpubin/FEATURES/ (git-ignored):
# effnet and the tests/gpu.rs binary with `--features $FEATURES` (default `vulkan`: wgpu with
# Vulkan's SPIR-V compiler; `wgpu` alone compiles WGSL; `vulkan,cuda` adds CUDA), stripped and
# xz-compressed so that they travel small (about 90 MB -> 16 MB each).
#
#   FEATURES=vulkan scripts/gpu_build.sh
#
# burn's CUDA runtime links LLVM 23, which its build script downloads from GitHub; docs/gpu.md says
# how a CUDA build was made offline here.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=${FEATURES:-vulkan}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu}
out=.gpubin/${FEATURES//,/-}
cargo build --release --locked --features "$FEATURES" --bin effnet
test=$(cargo test --release --locked --features "$FEATURES" --test gpu --no-run \
    --message-format=json | grep -o '"executable":"[^"]*/gpu-[^"]*"' | cut -d'"' -f4)
mkdir -p "$out"
for pair in "effnet:$CARGO_TARGET_DIR/release/effnet" "gpu-test:$test"; do
    strip -o "$out/${pair%%:*}" "${pair#*:}"
    xz -f -T2 -6 "$out/${pair%%:*}"
done
# tests/gpu.rs runs the CLI from the path cargo compiled into it; gpu_check.sh puts it there.
realpath "$CARGO_TARGET_DIR/release/effnet" > "$out/effnet.path"
ls -l "$out"
