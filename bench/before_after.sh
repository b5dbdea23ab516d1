#!/usr/bin/env bash
# An older convlab binary, the current build and PyTorch, alternated on one training workload:
# ROUNDS rounds of the three runs back to back, img/s and both convlab builds' ratios to PyTorch.
# Measures what a change did on a VM whose speed moves between runs minutes apart.
#   bench/before_after.sh OLD_BIN [ROUNDS] [MODEL] [SIZE] [BATCH] [STEPS] [PRECISION]
#   (default: 3 resnet50 224 16 4 fp32; 2 threads; OLD_BIN e.g. a copy of
#   target/release/convlab built at the older commit)
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/before_after.sh OLD_BIN [ROUNDS] [MODEL] [SIZE] [BATCH] [STEPS] [PRECISION]}
R=${2:-3}
MODEL=${3:-resnet50}
SIZE=${4:-224}
B=${5:-16}
STEPS=${6:-4}
P=${7:-fp32}
if [ ! -x "$OLD" ] || [ -d "$OLD" ]; then
  echo "bench/before_after.sh: OLD_BIN '$OLD' is not an executable convlab binary" >&2
  exit 2
fi
source bench/setup.sh
args=(train --model "$MODEL" --input "3x${SIZE}x${SIZE}" --batch "$B" --steps "$STEPS" --threads 2)
ips() { "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_sec"])'; }
echo "$(date -u '+%F %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs," \
  "train $MODEL ${SIZE} px, batch $B, $P, 2 threads, $STEPS timed steps"
echo
echo "| round | convlab old | convlab new | PyTorch $P | ratio old | ratio new |"
echo "|---|---|---|---|---|---|"
for r in $(seq "$R"); do
  a=$(ips "$OLD" bench "${args[@]}" --precision "$P" --json)
  b=$(ips "$BIN" bench "${args[@]}" --precision "$P" --json)
  p=$(ips "$VENV/bin/python" bench/pytorch_peer.py "${args[@]}" --precision "$P")
  python3 -c "import sys; a, b, p = map(float, sys.argv[2:5]); print(f'| {sys.argv[1]} | {a:.2f} | {b:.2f} | {p:.2f} | {a / p:.2f}x | {b / p:.2f}x |')" "$r" "$a" "$b" "$p"
done
