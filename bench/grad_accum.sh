#!/usr/bin/env bash
# Gradient accumulation at photo sizes: peak memory and throughput of one training step of a
# batch cut into 1, 2, 4 and 8 passes (`grad_accum_steps`), convlab (`convlab bench train
# --recipe`) and PyTorch (`bench/pytorch_peer.py --accum`, the slices' losses weighted by their
# share of the batch) alternated, each in a process of its own so that its peak RSS is its own.
#   bench/grad_accum.sh [MODEL] [SIZE] [BATCH] [STEPS]    (default: resnet50 224 32 2)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-resnet50}
SIZE=${2:-224}
BATCH=${3:-32}
STEPS=${4:-2}
cargo build --release --quiet
BIN=target/release/convlab
PY=target/torchvenv/bin/python
echo "$(date -u '+%F %H:%M') UTC, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, commit $(git rev-parse --short HEAD)"
echo "$MODEL ${SIZE} px, batch $BATCH, 2 threads, $STEPS timed steps after 3 warm-up steps"
echo
echo "| passes | convlab img/s | convlab peak RSS MB | PyTorch img/s | PyTorch peak RSS MB |"
echo "|---|---|---|---|---|"
dir=$(mktemp -d)
field() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1'], 1))"; }
for k in 1 2 4 8; do
  echo "grad_accum_steps = $k" > "$dir/r.toml"
  c=$($BIN bench train --recipe "$dir/r.toml" --model "$MODEL" --input "3x${SIZE}x${SIZE}" \
        --batch "$BATCH" --steps "$STEPS" --threads 2 --json)
  p=$($PY bench/pytorch_peer.py train --model "$MODEL" --input "3x${SIZE}x${SIZE}" \
        --batch "$BATCH" --steps "$STEPS" --threads 2 --accum "$k")
  echo "| $k | $(field images_per_sec <<<"$c") | $(field peak_rss_mb <<<"$c") | $(field images_per_sec <<<"$p") | $(field peak_rss_mb <<<"$p") |"
done
rm -r "$dir"
