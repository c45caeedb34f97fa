#!/usr/bin/env bash
# One- and two-thread training steps (B0, 32x32, batch 64) of prebuilt binaries, alternated
# ROUNDS times so that the machine's drift hits every binary alike; prints each run's median
# step time, then per binary the median of those, the two-thread speed-up of the medians and the
# median of the per-round speed-ups (each round's 1- and 2-thread runs are minutes apart at most,
# so its ratio is less exposed to this VM's drift than the ratio of medians).
#
# Each round also runs the first binary's one-thread step as two processes at once: perfectly
# parallel work, so 2 x (one alone) / (the mean of the two) is the most that two threads can gain
# on this machine in that round (CEILING=0 skips it). A VM's two vCPUs can share a physical core
# or a power budget: on the AVX2 VM of 2026-12-04 this ceiling was well under 2.
#
# LOADED=1 keeps one core busy with a spinning shell loop throughout (a loaded machine; no ceiling).
#
# Each round starts by timing a core-to-core round trip (examples/core_round_trip, when built:
# `cargo build --release --example core_round_trip`; ROUND_TRIP=path to use another build): a VM's
# vCPUs move between near and far cores, and the two-thread step moves with them.
#
#   scripts/bench_train_threads.sh /path/to/effnet-old target/release/effnet   (ROUNDS=6, ITERS=12)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 EFFNET [EFFNET...]" >&2; exit 2; }
rounds=${ROUNDS:-6}
iters=${ITERS:-12}
ceiling=${CEILING:-1}
log=$(mktemp)
tmp=$(mktemp -d)
hog=
trap 'rm -rf "$log" "$tmp"; [ -z "$hog" ] || kill "$hog"' EXIT
if [ "${LOADED:-0}" = 1 ]; then
    (while :; do :; done) &
    hog=$!
    ceiling=0
    echo "loaded: one core kept busy by process $hog"
fi
step_ms() { # THREADS BIN: the median step time of one run
    RAYON_NUM_THREADS=$1 "$2" bench b0 --train --threads "$1" --iters "$iters" |
        awk '/^effnet \(/ {print $4}'
}
round_trip=${ROUND_TRIP:-target/release/examples/core_round_trip}
for round in $(seq "$rounds"); do
    if [ -x "$round_trip" ]; then
        echo "round $round  $("$round_trip" 50000)"
    fi
    for bin in "$@"; do
        for threads in 1 2; do
            ms=$(step_ms "$threads" "$bin")
            echo "round $round  $bin  $threads thread(s)  $ms ms"
            echo "$round $bin $threads $ms" >>"$log"
        done
    done
    if [ "$ceiling" = 1 ]; then
        step_ms 1 "$1" >"$tmp/a" &
        step_ms 1 "$1" >"$tmp/b"
        wait
        alone=$(awk -v r="$round" -v b="$1" '$1 == r && $2 == b && $3 == 1 {print $4}' "$log")
        c=$(awk -v alone="$alone" '{s += $1; n++} END {printf "%.2f", 2 * alone / (s / n)}' \
            "$tmp/a" "$tmp/b")
        echo "round $round  two one-thread processes at once: $(cat "$tmp/a") and $(cat "$tmp/b") ms: ceiling ${c}x"
        echo "$round ceiling - $c" >>"$log"
    fi
done
echo
median() { sort -g | awk '{v[NR] = $1} END {print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for bin in "$@"; do
    m1=$(awk -v b="$bin" '$2 == b && $3 == 1 {print $4}' "$log" | median)
    m2=$(awk -v b="$bin" '$2 == b && $3 == 2 {print $4}' "$log" | median)
    per_round=$(awk -v b="$bin" '$2 == b {t[$1, $3] = $4; r[$1] = 1}
        END {for (i in r) print t[i, 1] / t[i, 2]}' "$log" | median)
    printf '%s: median %.1f ms (1 thread), %.1f ms (2 threads): %.2fx; per-round median %.2fx\n' \
        "$bin" "$m1" "$m2" "$(echo "$m1 $m2" | awk '{print $1 / $2}')" "$per_round"
done
if [ "$ceiling" = 1 ]; then
    printf 'ceiling (two one-thread processes of %s at once): per-round median %.2fx (%s)\n' "$1" \
        "$(awk '$2 == "ceiling" {print $4}' "$log" | median)" \
        "$(awk '$2 == "ceiling" {printf "%s ", $4}' "$log")"
fi
