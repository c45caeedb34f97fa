#!/usr/bin/env bash
# The engine beside ONNX Runtime and OpenVINO, for a noisy machine: ROUNDS alternating rounds, each
# `effnet bench MODEL --reference` (engine, then the runtimes on the graph `effnet export onnx`
# writes) followed by each OTHER engine build alone; prints every runtime's median over the rounds
# and the median of the per-round ratios engine / runtime (each ratio taken seconds apart).
#   [ROUNDS=5] [ITERS=10] [PYTHON=python3] [EFFNET=build] scripts/bench_rounds.sh MODEL THREADS [OTHER...]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
THREADS=$2
shift 2
ROUNDS=${ROUNDS:-5}
ITERS=${ITERS:-10}
EFFNET=${EFFNET:-target/release/effnet}
PYTHON=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
lscpu | grep -E "Model name|^CPU\(s\)"
echo "$MODEL, $THREADS thread(s), batch 1, $ROUNDS rounds of $ITERS iterations; engine = $EFFNET"
for round in $(seq "$ROUNDS"); do
  BENCH_SKIP_PYTORCH=1 "$EFFNET" bench "$MODEL" --threads "$THREADS" --iters "$ITERS" \
    --reference --python "$PYTHON" --json > "$out/$round-0.json"
  i=0
  for other in "$@"; do
    i=$((i + 1))
    "$other" bench "$MODEL" --threads "$THREADS" --iters "$ITERS" --json > "$out/$round-$i.json"
  done
done
python3 - "$out" "$ROUNDS" "$@" <<'PY'
import json, statistics, sys
out, rounds, others = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
per_round = []
for r in range(1, rounds + 1):
    row = {e["runtime"]: e["median_ms"] for e in json.load(open(f"{out}/{r}-0.json"))}
    for i, other in enumerate(others, 1):
        engine = json.load(open(f"{out}/{r}-{i}.json"))[0]
        row[f"engine {other}"] = engine["median_ms"]
    per_round.append(row)
names = list(per_round[0])
print("| runtime | median ms (of round medians) | rounds | engine / runtime (median of rounds) |")
print("|---|---:|---|---:|")
for name in names:
    ms = [row[name] for row in per_round]
    ratio = statistics.median(row["effnet engine"] / row[name] for row in per_round)
    rounds_ms = " ".join(f"{v:.2f}" for v in ms)
    print(f"| {name} | {statistics.median(ms):.2f} | {rounds_ms} | {ratio:.2f}x |")
PY
