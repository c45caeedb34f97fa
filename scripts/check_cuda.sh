#!/usr/bin/env bash
# The CUDA build compiles on a machine without CUDA (burn's CUDA runtime loads the driver at run
# time): `cargo check` with the `cuda` feature, and with every GPU feature at once.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo check --release --locked --features cuda --all-targets
cargo check --release --locked --features cuda,vulkan --all-targets
