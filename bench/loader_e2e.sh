#!/usr/bin/env bash
# Does the loader keep up at photo sizes? One training epoch end to end on JPEGs (decode,
# random-resized crop, flip, normalise on the loader's workers, sharing the cores with the
# step) against `bench train` on random tensors in memory, same model, size, batch, recipe and
# threads, alternated ROUNDS times. Issue 20's target: end-to-end / pure >= 0.90.
#   bench/loader_e2e.sh [DATA] [ROUNDS] [MODEL] [SIZE] [BATCH] [IMAGES] [PRECISION]
#   (default: target/data/flowers 2 resnet18 224 32 640 fp32; 2 threads, recipes/finetune.toml)
# DATA is an ImageFolder: target/data/flowers from ../shared/data (README.md), or photos of
# other sizes made by bench/make_varied_photos.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-target/data/flowers}
R=${2:-2}
MODEL=${3:-resnet18}
SIZE=${4:-224}
B=${5:-32}
N=${6:-640}
P=${7:-fp32}
if [ ! -d "$DATA" ]; then
  echo "bench/loader_e2e.sh: DATA '$DATA' is not a folder (unpack ../shared/data, see README.md)" >&2
  exit 2
fi
if [ "$N" -lt "$B" ]; then
  echo "bench/loader_e2e.sh: IMAGES ($N) must be at least one batch ($B)" >&2
  exit 2
fi
cargo build --release -q
BIN=target/release/convlab
classes=$(find "$DATA" -mindepth 1 -maxdepth 1 -type d | wc -l)
# Warm the page cache so the first round does not pay for the disk alone.
find "$DATA" -type f -print0 | xargs -0 cat > /dev/null
echo "$(date -u '+%F %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs," \
  "commit $(git rev-parse --short HEAD), $DATA ($N training images, $classes classes)," \
  "$MODEL ${SIZE} px, batch $B, $P, 2 threads"
echo
echo "| round | end-to-end epoch img/s | \`bench train\` img/s | end-to-end / pure |"
echo "|---|---|---|---|"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq "$R"); do
  out="$tmp/run$r"
  "$BIN" train --data "$DATA" --recipe recipes/finetune.toml --model "$MODEL" \
    --set "model.input_size=$SIZE" --set "precision=\"$P\"" --epochs 1 --batch-size "$B" \
    --set "data.limit_train=$N" --set data.limit_val=32 --threads 2 --out "$out" > /dev/null
  e=$(tail -n 1 "$out/metrics.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_sec"])')
  # As many timed steps as the epoch has batches, after bench's warm-up steps.
  p=$("$BIN" bench train --model "$MODEL" --input "3x${SIZE}x${SIZE}" --batch "$B" \
    --steps $((N / B)) --threads 2 --classes "$classes" --recipe recipes/finetune.toml \
    --precision "$P" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_sec"])')
  python3 -c "import sys; e, p = map(float, sys.argv[2:4]); print(f'| {sys.argv[1]} | {e:.2f} | {p:.2f} | {e / p:.2f}x |')" "$r" "$e" "$p"
done
