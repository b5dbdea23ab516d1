#!/usr/bin/env bash
# One photo at a time: inference latency at batch 1 (ms per image), convlab against PyTorch,
# alternated ROUNDS times per model at 224 px, and the median of each. What `convlab predict`
# on one file and any per-request service pay; the throughput scripts (photo_sizes.sh) measure
# batches of 32-64. With OLD_BIN set to an older convlab binary, each round also runs it.
#   bench/latency.sh [ROUNDS] [THREADS] [MODELS...]     (default: 3 2 resnet18 resnet50 vgg16)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
T=${2:-2}
shift $(($# < 2 ? $# : 2))
MODELS=${*:-resnet18 resnet50 vgg16}
OLD_BIN=${OLD_BIN:-}
source bench/setup.sh
PY="$VENV/bin/python bench/pytorch_peer.py"
ms() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(1000 / d["images_per_sec"], 1))'; }
echo "$(date -u '+%F %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs," \
  "infer batch 1 at 224 px, $T threads, 20 timed steps, $ROUNDS alternated rounds, commit $(git rev-parse --short HEAD)"
echo
echo "| model | ${OLD_BIN:+convlab old ms | }convlab ms | PyTorch fp32 ms | median ratio (PyTorch / convlab) |"
echo "|---|${OLD_BIN:+---|}---|---|---|"
for m in $MODELS; do
  args=(infer --model "$m" --input 3x224x224 --batch 1 --steps 20 --threads "$T")
  old=() new=() peer=()
  for _ in $(seq "$ROUNDS"); do
    [ -n "$OLD_BIN" ] && old+=("$("$OLD_BIN" bench "${args[@]}" --json 2>/dev/null | ms)")
    new+=("$($BIN bench "${args[@]}" --json 2>/dev/null | ms)")
    peer+=("$($PY "${args[@]}" | ms)")
  done
  python3 - "$m" "${old[*]:-}" "${new[*]}" "${peer[*]}" <<'PY'
import statistics, sys
model, old, new, peer = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
cell = lambda v: " / ".join(v)
med = lambda v: statistics.median(float(x) for x in v)
cols = [model] + ([cell(old)] if old else []) + [cell(new), cell(peer), f"{med(peer) / med(new):.2f}x"]
print("| " + " | ".join(cols) + " |")
PY
done
