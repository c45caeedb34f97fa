#!/usr/bin/env bash
# A `git bisect run` test for the training trajectory: builds the checked-out commit (in
# $TARGET, default /tmp/effnet-bisect-target, so the main build stays), trains CONFIG on two
# threads until EPOCHS epochs are logged (then stops the run), and calls the commit good when that
# epoch's training loss is below THRESHOLD. Each result is appended to $LOG. Build failures and
# runs that die are skipped (exit 125).
#
#   git bisect start BAD GOOD -- src Cargo.toml Cargo.lock
#   CONFIG=$PWD/docs/runs/b0-fashion-mnist-13ep-noshift.toml EPOCHS=2 THRESHOLD=0.91 \
#     git bisect run scripts/bisect_training_loss.sh
set -uo pipefail
config=${CONFIG:?CONFIG=path to a training config}
epochs=${EPOCHS:-2}
threshold=${THRESHOLD:?THRESHOLD=training loss below which a commit is good}
target=${TARGET:-/tmp/effnet-bisect-target}
log=${LOG:-/tmp/bisect-results.txt}
CARGO_TARGET_DIR=$target cargo build --release --bin effnet >/tmp/bisect-build.log 2>&1 || exit 125
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
RAYON_NUM_THREADS=2 "$target/release/effnet" train --config "$config" --out "$out/run" \
    >/tmp/bisect-run.log 2>&1 &
pid=$!
while [ "$(cat "$out/run/metrics.csv" 2>/dev/null | wc -l)" -le "$epochs" ]; do
    sleep 2
    kill -0 "$pid" 2>/dev/null || exit 125
done
kill "$pid"
wait "$pid" 2>/dev/null
loss=$(sed -n "$((epochs + 1))p" "$out/run/metrics.csv" | cut -d, -f3)
echo "$(git log --oneline -1 | cut -c1-60) epoch-$epochs train loss $loss" >>"$log"
awk -v l="$loss" -v t="$threshold" 'BEGIN {exit !(l < t)}'
