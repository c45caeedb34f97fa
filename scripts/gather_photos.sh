#!/usr/bin/env bash
# Real photos for calibration and accuracy checks, from package registries only (no other
# downloads): the fixture photos, scikit-image's bundled sample images (PyPI) and the photos and
# artwork of five Debian wallpaper packages. Usage: scripts/gather_photos.sh OUT_DIR
# Needs python3 (for pip download) and apt-get; files are copied, never modified.
set -euo pipefail
out=${1:?usage: scripts/gather_photos.sh OUT_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
shared="$here/../shared/fixtures"
for f in "$shared"/jpeg/*.jpg "$shared"/images/*.png; do
  [ -f "$f" ] && cp "$f" "$out/fixture_$(basename "$f")"
done
(cd "$work" && python3 -m pip download --no-deps -q scikit-image -d skw >/dev/null &&
  python3 - "$out" <<'PY'
import glob, sys, zipfile
z = zipfile.ZipFile(glob.glob("skw/*.whl")[0])
keep = ["astronaut.png", "brick.png", "camera.png", "clock_motion.png", "coins.png", "grass.png",
        "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "moon.png",
        "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png", "color.png"]
for n in z.namelist():
    base = n.rsplit("/", 1)[-1]
    if "/data/" in n and base in keep:
        open(f"{sys.argv[1]}/skimage_{base}", "wb").write(z.read(n))
PY
)
(cd "$work" && apt-get download -q gnome-backgrounds mate-backgrounds ukui-wallpapers \
  lomiri-wallpapers sway-backgrounds >/dev/null 2>&1 &&
  for d in *.deb; do dpkg-deb -x "$d" x; done)
# One size of each picture (sway ships several), 20 kB to 9 MB.
find "$work/x" -type f \( -name '*.jpg' -o -name '*.png' -o -name '*.webp' \) \
  -size +20k -size -9M | grep -v 'Sway_Wallpaper_Blue_[^1]\|_Portrait\|Sway_Wallpaper_Blue_1[^9]' |
  sort | while read -r f; do cp "$f" "$out/deb_$(basename "$(dirname "$f")")_$(basename "$f")"; done
ls "$out" | wc -l
