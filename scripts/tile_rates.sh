#!/usr/bin/env bash
# The core's AVX-512 FMA rate register-only over 170 ms, and a plain 12x32 GEMM tile's rate with
# its weights streamed from L1, L2 or beyond (scripts/probes/tile_rates.c; gcc, a CPU with
# AVX-512F). Beside `examples/gemm_rates`: tells whether the engine's f32 kernel is short of the
# peak because of the core or of where its weights come from.
#   scripts/tile_rates.sh
set -euo pipefail
cd "$(dirname "$0")"
grep -qw avx512f /proc/cpuinfo || { echo "tile_rates: this CPU has no AVX-512F" >&2; exit 1; }
bin=$(mktemp)
trap 'rm -f "$bin"' EXIT
gcc -O2 -mavx512f -mfma probes/tile_rates.c -o "$bin"
"$bin"
