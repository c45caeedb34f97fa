#!/usr/bin/env bash
# Where the second thread of a training step loses time: records `effnet bench b0 --train` at two
# threads with call stacks (perf, DWARF unwinding), finds the step's own thread (the one whose
# samples run Trainer::step), and prints how many of its samples lie outside any rayon task
# (serial work the other thread cannot share), those samples by what called them (burn's autodiff
# bookkeeping, the fused ops' own serial parts, ...), and their leaf functions. Then every thread's
# samples split four ways: inside rayon tasks, deferred jobs (weight gradients and optimizer
# updates that other threads take off the step's critical path, `model::fused::deferred`),
# waiting for work (scheduler, yield, steal and sleep leaves) and other serial work. A thread busy
# all the time bounds the step by its work, not by what the step thread runs alone.
#
#   scripts/profile_train_threads.sh [EFFNET] (default target/release/effnet; ITERS=120; FREQ=1999
#   samples per second, DELAY=2500 ms of start-up left out: FREQ=999 DELAY=4000 ITERS=80 takes
#   about 5 minutes, most of it unwinding the stacks)
set -euo pipefail
effnet=${1:-target/release/effnet}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
RAYON_NUM_THREADS=2 perf record -q -F "${FREQ:-1999}" --call-graph dwarf,12000 -D "${DELAY:-2500}" \
    -o "$tmp/perf.data" \
    "$effnet" bench b0 --train --threads 2 --iters "${ITERS:-120}" | grep '^effnet'
perf script -i "$tmp/perf.data" -F tid,ip,sym 2>/dev/null >"$tmp/stacks"
step=$(awk '/^ *[0-9]+ *$/ {tid = $1; next} /Trainer::step/ {n[tid]++}
    END {for (t in n) print n[t], t}' "$tmp/stacks" | sort -rn | awk 'NR == 1 {print $2}')
awk -v step="$step" '
    /^ *[0-9]+ *$/ {tid = $1; par = 0; leaf = ""; chain = ""; next}
    NF == 0 {
        if (tid == step) {
            total++
            if (!par) {
                serial++; n[leaf]++
                c = "other"
                if (chain ~ /DistributionSampler|TensorData::random|Distribution::sampler/)
                    c = "random masks (burn)"
                else if (chain ~ /effnet::model::fused::/) c = "fused ops, serial parts"
                else if (chain ~ /Gradients::register/) c = "gradient accumulation (burn add)"
                else if (chain ~ /burn_autodiff::(runtime|graph)/) c = "burn autodiff bookkeeping"
                else if (chain ~ /optim/) c = "optimizer (burn glue)"
                else if (chain ~ /burn_flex/) c = "burn_flex ops"
                cat[c]++
            }
        }
        tid = ""; next
    }
    {
        s = $0; sub(/^[ \t]*[0-9a-f]+ /, "", s)
        if (leaf == "") leaf = substr(s, 1, 90)
        if (s ~ /rayon::iter::plumbing|rayon_core::join|StackJob/) par = 1
        chain = chain " " s
    }
    END {
        printf "step thread %s: %d samples, %d (%.1f %%) outside rayon tasks, by caller:\n",
            step, total, serial, 100 * serial / total
        by = "sort -rn"
        for (c in cat) printf "%6d  (%4.1f %% of the thread)  %s\n", cat[c], 100 * cat[c] / total, c | by
        close(by)
        print "leaves:"
        for (k in n) printf "%6d  %s\n", n[k], k > leaves
    }' leaves="$tmp/leaves" "$tmp/stacks"
sort -k1,1 -rn "$tmp/leaves" | sed -n 1,30p  # not head: SIGPIPE under pipefail
awk -v step="$step" '
    /^ *[0-9]+ *$/ {tid = $1; par = 0; deferred = 0; leaf = ""; next}
    NF == 0 {
        if (tid != "") {
            total[tid]++
            if (leaf ~ /__schedule|sched_yield|yield_now|steal|find_work|wait_until|Sleep::|futex/)
                waiting[tid]++
            else if (par) tasks[tid]++
            else if (deferred) jobs[tid]++
            else other[tid]++
        }
        tid = ""; next
    }
    {
        s = $0; sub(/^[ \t]*[0-9a-f]+ /, "", s)
        if (leaf == "") leaf = s
        if (s ~ /rayon::iter::plumbing|rayon_core::join|StackJob/) par = 1
        if (s ~ /effnet::model::fused::deferred::/) deferred = 1
    }
    END {
        print "every thread (samples: in rayon tasks, deferred jobs, waiting for work, other):"
        for (t in total) {
            if (total[t] < 100) continue
            n = total[t]
            printf "  %s%s %6d: tasks %4.1f %%, deferred %4.1f %%, waiting %4.1f %%, " \
                "other %4.1f %%\n",
                t, (t == step ? " (step)" : ""), n, 100 * tasks[t] / n, 100 * jobs[t] / n,
                100 * waiting[t] / n, 100 * other[t] / n
        }
    }' "$tmp/stacks"
