#!/usr/bin/env bash
# Loader throughput, convlab vs torchvision, in one run on this machine: decode + augment +
# batch of the CIFAR-10 training JPEGs and the Flowers photos, same transforms, same workers.
#   bench/loader_compare.sh [WORKERS] [CIFAR_IMAGES]
# Needs target/data/cifar10 and target/data/flowers unpacked from ../shared/data (README.md)
# and creates a throwaway venv with torch + torchvision in target/torchvenv (or $TORCH_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-2}
N=${2:-20000}
source bench/setup.sh
row() { # name, convlab json, torch json
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
name, c, t = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| {name} | {c['images']} | {c['workers']} | {c['images_per_sec']:.0f} | "
      f"{t['images_per_sec']:.0f} | {c['images_per_sec'] / t['images_per_sec']:.2f}x |")
PY
}
echo "| workload | images | workers | convlab img/s | torchvision img/s | ratio |"
echo "|---|---|---|---|---|---|"
for spec in "cifar10 cifar $N" "flowers imagenet 0"; do
  set -- $spec
  lim=(); [ "$3" != 0 ] && lim=(--images "$3")
  # Warm the page cache so neither side pays for the disk (whoever ran first would).
  find target/data/$1 -type f -print0 | xargs -0 cat > /dev/null
  c=$($BIN bench data --data target/data/$1 --transform $2 --workers $W "${lim[@]}" --json)
  t=$("$VENV/bin/python" bench/torchvision_loader.py --data target/data/$1 --transform $2 --workers $W "${lim[@]}")
  row "$1 ($2)" "$c" "$t"
done
