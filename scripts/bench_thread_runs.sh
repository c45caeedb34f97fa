#!/usr/bin/env bash
# The thread chooser never gets stuck: RUNS consecutive `effnet bench MODEL --threads 2` processes
# per model, each beside a `--threads 1` run, and the speed-up of each pair (2 threads must be at
# least 1.4x faster than 1 on an idle 2-core machine).
#   scripts/bench_thread_runs.sh [RUNS] [MODELS...]   (default: 10 b0 lite0)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
shift || true
MODELS=("${@:-b0 lite0}")
EFFNET=${EFFNET:-target/release/effnet}
# The whole report first: `grep -m1` on the pipe could close it while effnet still writes (SIGPIPE,
# which pipefail turned into a silent stop of the script).
median() {
  local out
  out=$("$EFFNET" bench "$1" --threads "$2" --iters 30 --json)
  grep -m1 '"median_ms"' <<<"$out" | tr -dc '0-9.'
}
for model in ${MODELS[@]}; do
  printf '%s: 1 thread / 2 threads (ms), speed-up\n' "$model"
  worst=99
  for run in $(seq "$RUNS"); do
    one=$(median "$model" 1)
    two=$(median "$model" 2)
    ratio=$(echo "$one / $two" | bc -l)
    worst=$(echo "if ($ratio < $worst) $ratio else $worst" | bc -l)
    printf '  run %2d: %6.2f / %6.2f  %.2fx\n' "$run" "$one" "$two" "$ratio"
  done
  printf '  lowest speed-up: %.2fx\n' "$worst"
done
