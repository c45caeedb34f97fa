#!/usr/bin/env bash
# Each layer's time beside the time its multiply-adds could not go below on this core, one thread:
#   scripts/layer_floors.sh MODEL WEIGHTS [WEIGHTS_INT8] [ITERS]
# Builds what is missing, runs `examples/peak_rates` (peak rate per precision and each layer
# group's floor: dense MACs at the precision's peak, depthwise at the f32 peak), then `effnet bench
# MODEL --profile` in fp32 and bf16 (where the CPU has it) with WEIGHTS and in int8 with
# WEIGHTS_INT8 (when given), and prints per layer group: median ms, floor ms and floor / time,
# with the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 weights=$2 int8=${3:-} iters=${4:-300}
EFFNET=${EFFNET:-target/release/effnet}
PEAK=${PEAK:-target/release/examples/peak_rates}
[ -x "$EFFNET" ] || cargo build --release --locked --bin effnet
[ -x "$PEAK" ] || cargo build --release --locked --example peak_rates
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PEAK" "$model" | tee "$out/floors"
precisions="fp32"
grep -q '^bf16' "$out/floors" && precisions="$precisions bf16"
[ -n "$int8" ] && precisions="$precisions int8"
for p in $precisions; do
  w=$weights
  [ "$p" = int8 ] && w=$int8
  "$EFFNET" bench "$model" --weights "$w" --precision "$p" --threads 1 --iters "$iters" \
    --profile >"$out/profile-$p" 2>&1
  echo
  echo "== $p: effnet bench $model --weights $w --precision $p --threads 1 --iters $iters --profile"
  python3 - "$out/floors" "$out/profile-$p" "$p" <<'EOF'
import re, sys
floors_file, profile_file, precision = sys.argv[1:]
column = {"fp32": "f32", "bf16": "bf16", "int8": "int8"}[precision]
lines = open(floors_file).read().split("floor ms", 1)[1].splitlines()
header = ["group", "dense", "dw"] + lines[0].split()[4:]
floors = {}
for line in lines[1:]:
    cells = line.split()
    if cells:
        floors[cells[0]] = float(cells[header.index(column)])
times = {}
profile = open(profile_file).read()
layers = profile.split("engine layers", 1)[1].split("engine profile", 1)[0]
for line in layers.splitlines()[1:]:
    m = re.match(r"\s+(\S+) .*?([\d.]+) ms\s+[\d.]+%", line)
    if m:
        name = m.group(1)
        group = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name
        # The stem made inside the first block (Lite) is one line for both.
        if name == "stem" and " + " in line:
            group = "stem+blocks.0"
        times[group] = times.get(group, 0.0) + float(m.group(2))
print(f"{'group':<12} {'ms':>7} {'floor':>7} {'floor/ms':>9}")
total_t = total_f = 0.0
for group, t in times.items():
    f = sum(floors.get(g, 0.0) for g in group.split("+"))
    total_t += t
    total_f += f
    print(f"{group:<12} {t:7.3f} {f:7.3f} {f / t if t else 0:9.2f}")
print(f"{'total':<12} {total_t:7.3f} {total_f:7.3f} {total_f / total_t:9.2f}")
EOF
done
