#!/usr/bin/env bash
# Tail latency side by side: median, p90 and p99 over many batch-1 passes of each model at 1 and 2
# threads, for each effnet binary given (e.g. two commits' builds), then 2 threads against 1 while
# another process keeps one core busy.
#
#   scripts/bench_tail.sh ITERS BINARY [BINARY...]
#
# MODELS="b0 v2-s b7": the models (default b0 v2-s); THREADS="2": the thread counts (default 1 2);
# ROUNDS=N: repeat the idle runs N times, the binaries alternating (default 1). Builds that report
# it also print how many timed passes their thread policy ran on one thread.
set -euo pipefail
iters=$1
shift
for round in $(seq "${ROUNDS:-1}"); do
    for model in ${MODELS:-b0 v2-s}; do
        for threads in ${THREADS:-1 2}; do
            for bin in "$@"; do
                echo "== round $round, $(basename "$bin"): effnet bench $model --threads $threads --iters $iters"
                "$bin" bench "$model" --threads "$threads" --iters "$iters" | grep -E '^(thread policy|effnet engine)'
            done
        done
    done
done
echo "== one core busy (a spinning process), B0"
( while :; do :; done ) &
spin=$!
trap 'kill $spin' EXIT
for bin in "$@"; do
    for threads in 1 2; do
        echo "== $(basename "$bin"): effnet bench b0 --threads $threads --iters $iters (loaded)"
        "$bin" bench b0 --threads "$threads" --iters "$iters" | grep -E '^(thread policy|effnet engine)'
    done
done
