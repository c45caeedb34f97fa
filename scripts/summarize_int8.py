"""Medians over the rounds of `scripts/bench_int8.sh` (its own output, read from a file or stdin):
per model and thread count, every runtime's median of its round medians, the median of the
per-round ratios engine int8 / runtime (each pair timed in the same `effnet bench` run), and the
top-1 agreement with fp32."""

import re
import statistics
import sys
from collections import defaultdict

HEADER = re.compile(r"^(\S+) at \d+x\d+, batch \d+, (\d+) thread")
ROW = re.compile(r"^(.+?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x(?:\s+([\d.]+)%)?$")
ENGINE_INT8 = "effnet engine int8"

runs = defaultdict(list)  # (model, threads) -> [{runtime: (ms, agreement)}]
current = None
for line in open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin:
    line = line.rstrip()
    if m := HEADER.match(line):
        current = {}
        runs[(m[1], int(m[2]))].append(current)
    elif current is not None and (m := ROW.match(line)) and m[1] != "runtime":
        current[m[1].strip()] = (float(m[2]), m[7])

for (model, threads), rounds in runs.items():
    rounds = [r for r in rounds if ENGINE_INT8 in r]
    if not rounds:
        continue
    print(f"\n{model}, {threads} thread(s), {len(rounds)} round(s)")
    print("| runtime | median ms | engine int8 / runtime | top-1 = fp32 |")
    print("|---|---:|---:|---:|")
    for name in rounds[0]:
        ms = [r[name][0] for r in rounds if name in r]
        ratios = [r[ENGINE_INT8][0] / r[name][0] for r in rounds if name in r]
        agree = rounds[0][name][1]
        print(
            f"| {name} | {statistics.median(ms):.2f} | {statistics.median(ratios):.2f}x"
            f" ({min(ratios):.2f}-{max(ratios):.2f}) | {agree + ' %' if agree else ''} |"
        )
