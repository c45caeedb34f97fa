#!/usr/bin/env bash
# Peak memory of training on a streamed image folder does not grow with the folder: B0 trained for
# the same number of steps on generated folders of 2,000 and 20,000 JPEGs (320x240), peak RSS from
# GNU time. Usage: [EFFNET=path/to/effnet] scripts/loader_rss.sh [WORKDIR] (default: a temporary
# folder, removed after); EFFNET runs another build (an older commit's) on the same folders.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d)}"
[ $# -ge 1 ] || trap 'rm -rf "$WORK"' EXIT
cargo build --release --locked --quiet
cargo build --release --locked --quiet --example make_image_folder
EFFNET=${EFFNET:-target/release/effnet}
MAKE=target/release/examples/make_image_folder
STEPS="${STEPS:-30}"
echo "images  peak RSS (MiB)  seconds   (effnet train b0 --resolution 64 --batch-size 32 --max-steps $STEPS)"
for n in 2000 20000; do
  [ -d "$WORK/f$n" ] || "$MAKE" "$WORK/f$n" "$n" >/dev/null
  rm -rf "$WORK/run$n"
  /usr/bin/time -f "%M %e" -o "$WORK/time$n" "$EFFNET" train b0 --dataset "$WORK/f$n" \
    --resolution 64 --batch-size 32 --max-steps "$STEPS" --random-resized-crop \
    --set eval_every=1000 --out "$WORK/run$n" >/dev/null 2>"$WORK/log$n"
  read -r kib secs <"$WORK/time$n"
  printf '%6d  %14.1f  %7.1f\n' "$n" "$(echo "$kib / 1024" | bc -l)" "$secs"
done
