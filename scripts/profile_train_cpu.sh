#!/usr/bin/env bash
# Where the CPU time of a training step goes at one and at two threads (B0, 32x32, batch 64):
# `perf record` of `effnet bench b0 --train` (the first 3 s, warm-up, left out), the samples
# turned into ms of CPU per step (samples / rate / steps in the recorded span) and split into
# work and idle (polling for tasks, yielding, the scheduler). Two threads that only split the
# work would show the one-thread work and no idle time; compare the rows.
#
#   scripts/profile_train_cpu.sh [EFFNET] (default target/release/effnet; ITERS=150)
set -euo pipefail
effnet=${1:-target/release/effnet}
rate=2999
# Symbols of a thread that waits: polling, yielding, the scheduler, rayon's own loops.
idle='sched_yield|yield_now|futex|Sleep|clock_gettime|schedule|syscall|finish_task_switch'
idle="$idle|crossbeam|rayon_core::(broadcast|registry|sleep)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for threads in 1 2; do
    step=$(RAYON_NUM_THREADS=$threads perf record -q -F "$rate" -D 3000 -o "$tmp/perf.data" \
        "$effnet" bench b0 --train --threads "$threads" --iters "${ITERS:-150}" |
        awk '/^effnet \(/ {print $4}')
    perf script -i "$tmp/perf.data" -F time,ip,sym 2>/dev/null |
        awk -v rate="$rate" -v step="$step" -v threads="$threads" -v idle_re="$idle" '
            {
                t = $1; sub(/:$/, "", t); t += 0
                if (first == "") first = t
                last = t
                s = $0; sub(/^[ \t]*[0-9.]+:[ \t]*[0-9a-f]+ /, "", s)
                if (s ~ idle_re)
                    idle++
                else
                    work++
            }
            END {
                steps = (last - first) * 1000 / step
                printf "%d thread(s): step %.2f ms; CPU per step: work %.1f ms, idle %.1f ms\n",
                    threads, step, work / rate * 1000 / steps, idle / rate * 1000 / steps
            }'
done
