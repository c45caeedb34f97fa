#!/usr/bin/env bash
# Tail latency side by side: median, p90 and p99 over many batch-1 passes of each model at 1 and 2
# threads, for each effnet binary given (e.g. two commits' builds), then 2 threads against 1 while
# another process keeps one core busy.
#
#   scripts/bench_tail.sh ITERS BINARY [BINARY...]     (MODELS="b0 v2-s b7": the models, default b0 v2-s)
set -euo pipefail
iters=$1
shift
for model in ${MODELS:-b0 v2-s}; do
    for threads in 1 2; do
        for bin in "$@"; do
            echo "== $(basename "$bin"): effnet bench $model --threads $threads --iters $iters"
            "$bin" bench "$model" --threads "$threads" --iters "$iters" | tail -n 1
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
        "$bin" bench b0 --threads "$threads" --iters "$iters" | tail -n 1
    done
done
