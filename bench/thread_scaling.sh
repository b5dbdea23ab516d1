#!/usr/bin/env bash
# 1 thread against 2 threads at photo sizes (issue 20: 2 threads >= 1.7x one thread), training
# throughput of `convlab bench train`, fp32 and bf16, the two thread counts alternated.
#   bench/thread_scaling.sh [ROUNDS] [STEPS]    (default: 2 rounds, 3 timed steps)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-2}
STEPS=${2:-3}
cargo build --release --quiet --bin convlab --example conv_layers
BIN=target/release/convlab
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | { grep -xE 'avx2|avx512f|avx512_bf16|amx_bf16' || true; } | xargs)
echo "$(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs ($flags), $STEPS timed steps, commit $(git rev-parse --short HEAD)"
echo
# The units themselves first: one core's peak and two cores' at once (two vCPUs that share a
# physical core's unit, or a host's tile unit, cannot scale the kernels on it either).
CONV_LAYERS_ONLY=peaks target/release/examples/conv_layers 2 | sed 's/^/    /'
echo
echo "| workload | precision | round | 1 thread img/s | 2 threads img/s | scaling |"
echo "|---|---|---|---|---|---|"
# convlab's notes on stderr (e.g. bf16 computing in fp32 on this CPU) go after the table.
notes=$(mktemp)
trap 'rm -f "$notes"' EXIT
ips() { $BIN "$@" --json 2>>"$notes" | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_sec"])'; }
while read -r model size batch; do
  for p in fp32 bf16; do
    for r in $(seq "$R"); do
      args=(bench train --model "$model" --input "3x${size}x${size}" --batch "$batch" --steps "$STEPS" --precision "$p")
      one=$(ips "${args[@]}" --threads 1)
      two=$(ips "${args[@]}" --threads 2)
      python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'| $model $size px, batch $batch | $p | $r | {a:.1f} | {b:.1f} | {b / a:.2f}x |')" "$one" "$two"
    done
  done
done <<'LIST'
resnet18 128 32
resnet50 224 16
LIST
if [ -s "$notes" ]; then
  echo
  sort -u "$notes" | sed 's/^/convlab: /'
fi
