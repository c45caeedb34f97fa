#!/usr/bin/env bash
# Times the same `effnet bench` command on several commits side by side, so a before/after
# figure can be re-measured: each commit is built in a git worktree (sharing this checkout's
# target dir, so only what differs recompiles) and the binaries then run in turn, ROUNDS times.
#
#   scripts/bench_commits.sh "b0 --train --threads 1 --iters 15" 8c7c331 HEAD
#
# Environment: ROUNDS (default 2). --reference works on commits whose binary embeds its Python
# scripts (from "bench: embed the reference scripts" on). PROFILE=REGEX records each run with
# `perf record` (flat, 999 Hz) and prints the share of samples in the symbols matching REGEX
# (e.g. PROFILE='memset|clear_page'): a figure the VM's wall-clock noise does not swamp.
set -euo pipefail
cd "$(dirname "$0")/.."
args=$1
shift
[ $# -ge 1 ] || { echo "usage: $0 \"BENCH ARGS\" REV [REV...]" >&2; exit 2; }
root=$(pwd)
bins=$(mktemp -d)
trap 'rm -rf "$bins"' EXIT
for rev in "$@"; do
    sha=$(git rev-parse --short "$rev")
    tree="$bins/tree-$sha"
    git worktree add -f --detach "$tree" "$sha" >/dev/null
    (cd "$tree" && CARGO_TARGET_DIR="$root/target" cargo build --release --quiet)
    cp "$root/target/release/effnet" "$bins/effnet-$sha"
    git worktree remove --force "$tree"
done
cargo build --release --quiet # leave target/release/effnet built from this checkout
for round in $(seq "${ROUNDS:-2}"); do
    for rev in "$@"; do
        sha=$(git rev-parse --short "$rev")
        echo "== round $round, $rev ($sha): effnet bench $args"
        if [ -n "${PROFILE:-}" ]; then
            # shellcheck disable=SC2086
            perf record -q -F 999 -o "$bins/perf.data" -- "$bins/effnet-$sha" bench $args | tail -n 1
            perf report -i "$bins/perf.data" --no-children --sort symbol -g none 2>/dev/null |
                awk -v re="$PROFILE" '!/^#/ && $0 ~ re {printf "  %s %s\n", $1, $3}'
        else
            # shellcheck disable=SC2086
            "$bins/effnet-$sha" bench $args | tail -n 1
        fi
    done
done
