#!/usr/bin/env bash
# The test suite, as the README gives it and CI runs it (.ci/run): every test, built with the
# `wgpu` feature so the GPU code path runs for real (tests/gpu.rs) on a software Vulkan adapter,
# Mesa's lavapipe (Debian's mesa-vulkan-drivers), installed here when missing. Extra arguments go
# to `cargo test` (e.g. `scripts/test.sh --test cli`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "==> installing mesa-vulkan-drivers (lavapipe, a software Vulkan adapter for tests/gpu.rs)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null; }
  else
    echo "note: tests/gpu.rs needs a Vulkan adapter: sudo apt-get install mesa-vulkan-drivers" >&2
  fi
fi

exec cargo test --release --locked --features wgpu "$@"
