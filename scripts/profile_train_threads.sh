#!/usr/bin/env bash
# Where the second thread of a training step loses time: records `effnet bench b0 --train` at two
# threads with call stacks (perf, DWARF unwinding), finds the step's own thread (the one whose
# samples run Trainer::step), and prints how many of its samples lie outside any rayon task
# (serial work the other thread cannot share), those samples by what called them (burn's autodiff
# bookkeeping, the fused ops' own serial parts, ...), and their leaf functions.
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
