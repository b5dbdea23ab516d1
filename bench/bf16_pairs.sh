#!/usr/bin/env bash
# convlab bf16 against PyTorch bf16 + channels-last, alternated: ROUNDS pairs of runs back to
# back per workload (issue 20's photo-size training workloads), each pair's ratio and the
# median. On a VM whose speed moves by 10-40% within minutes, a pair measured seconds apart is
# fairer than photo_sizes.sh's one run of each.
#   bench/bf16_pairs.sh [ROUNDS] [THREADS] [STEPS]      (default: 3 2 4)
# WHAT=infer alternates inference at photo_sizes.sh's inference batches instead; PRECISION=fp32
# alternates convlab fp32 against PyTorch fp32 (the issue's fp32 targets) instead of bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
T=${2:-2}
STEPS=${3:-4}
WHAT=${WHAT:-train}
PRECISION=${PRECISION:-bf16}
peer=$([ "$PRECISION" = bf16 ] && echo "bf16+CL" || echo "$PRECISION")
source bench/setup.sh
PY="$VENV/bin/python bench/pytorch_peer.py"
echo "$(date -u '+%F %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs," \
  "$WHAT $PRECISION, $T threads, $STEPS timed steps, $ROUNDS alternated pairs"
echo
echo "| workload | batch | convlab $PRECISION img/s | PyTorch $peer img/s | ratios | median |"
echo "|---|---|---|---|---|---|"
if [ "$WHAT" = train ]; then
  list="resnet18 128 32;resnet18 224 32;resnet50 224 16;vgg16 224 8;bench-vgg 32 64"
else
  list="resnet18 128 64;resnet18 224 64;resnet50 224 32"
fi
IFS=';' read -ra workloads <<< "$list"
for wl in "${workloads[@]}"; do
  read -r model size batch <<< "$wl"
  args=(--model "$model" --input "3x${size}x${size}" --batch "$batch" --steps "$STEPS" --threads "$T" --precision "$PRECISION")
  c=() p=()
  for _ in $(seq "$ROUNDS"); do
    c+=("$($BIN bench "$WHAT" "${args[@]}" --json)")
    p+=("$($PY "$WHAT" "${args[@]}")")
  done
  python3 - "$model $size px" "$batch" "$ROUNDS" "${c[@]}" "${p[@]}" <<'PY'
import json, statistics, sys
name, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = [json.loads(a)["images_per_sec"] for a in sys.argv[4:]]
c, p = runs[:n], runs[n:]
r = [x / y for x, y in zip(c, p)]
f = lambda v: " / ".join(f"{x:.1f}" for x in v)
print(f"| {name} | {b} | {f(c)} | {f(p)} | {' / '.join(f'{x:.2f}x' for x in r)} | {statistics.median(r):.2f}x |")
PY
done
