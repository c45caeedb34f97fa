#!/usr/bin/env bash
# One- and two-thread training steps (B0, 32x32, batch 64) of prebuilt binaries, alternated
# ROUNDS times so that the machine's drift hits every binary alike; prints each run's median
# step time, then per binary the median of those and the two-thread speed-up.
#
# LOADED=1 keeps one core busy with a spinning shell loop throughout (a loaded machine).
#
#   scripts/bench_train_threads.sh /path/to/effnet-old target/release/effnet   (ROUNDS=6, ITERS=12)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 EFFNET [EFFNET...]" >&2; exit 2; }
rounds=${ROUNDS:-6}
iters=${ITERS:-12}
log=$(mktemp)
hog=
trap 'rm -f "$log"; [ -z "$hog" ] || kill "$hog"' EXIT
if [ "${LOADED:-0}" = 1 ]; then
    (while :; do :; done) &
    hog=$!
    echo "loaded: one core kept busy by process $hog"
fi
for round in $(seq "$rounds"); do
    for bin in "$@"; do
        for threads in 1 2; do
            ms=$(RAYON_NUM_THREADS=$threads "$bin" bench b0 --train --threads "$threads" \
                --iters "$iters" | awk '/^effnet \(/ {print $4}')
            echo "round $round  $bin  $threads thread(s)  $ms ms"
            echo "$bin $threads $ms" >>"$log"
        done
    done
done
echo
for bin in "$@"; do
    for threads in 1 2; do
        printf '%s %s ' "$bin" "$threads"
        awk -v b="$bin" -v t="$threads" '$1 == b && $2 == t {print $3}' "$log" | sort -g |
            awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m}'
    done
done | awk '{m[$1, $2] = $3; if (!($1 in seen)) {seen[$1] = 1; order[++n] = $1}}
    END {for (i = 1; i <= n; i++) {b = order[i]; printf "%s: median %.1f ms (1 thread), %.1f ms (2 threads): %.2fx\n", b, m[b, 1], m[b, 2], m[b, 1] / m[b, 2]}}'
