#!/usr/bin/env bash
# bf16 models with their activations in f32 (`CONVLAB_ACTIVATIONS=f32`) against bf16 between
# layers (`CONVLAB_ACTIVATIONS=bf16`, the default), alternated in one run on the issue-20 training workloads:
# throughput and peak RSS of `convlab bench train --precision bf16`.
#   bench/bf16_activations.sh [ROUNDS] [THREADS] [STEPS]   (default: 2 rounds, 2 threads, 4 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-2}
T=${2:-2}
STEPS=${3:-4}
cargo build --release --quiet
BIN=target/release/convlab
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | { grep -xE 'avx2|avx512f|avx512_bf16|amx_bf16' || true; } | xargs)
echo "$(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs ($flags), $T threads, $STEPS timed steps, commit $(git rev-parse --short HEAD)"
echo
echo "| workload | batch | round | f32 activations img/s | bf16 activations img/s | ratio | peak RSS f32 / bf16 activations MB |"
echo "|---|---|---|---|---|---|---|"
while read -r model size batch; do
  args=(bench train --model "$model" --input "3x${size}x${size}" --batch "$batch" --steps "$STEPS" --threads "$T" --precision bf16 --json)
  for r in $(seq "$R"); do
    a=$(CONVLAB_ACTIVATIONS=f32 $BIN "${args[@]}")
    b=$(CONVLAB_ACTIVATIONS=bf16 $BIN "${args[@]}")
    python3 - "$model $size px" "$batch" "$r" "$a" "$b" <<'PY'
import json, sys
name, batch, r = sys.argv[1:4]
a, b = map(json.loads, sys.argv[4:6])
assert a["activations"] == "f32" and b["activations"] == "bf16", (a["activations"], b["activations"])
ips = lambda x: x["images_per_sec"]
print(f"| {name} | {batch} | {r} | {ips(a):.1f} | {ips(b):.1f} | {ips(b) / ips(a):.2f}x | "
      f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} |")
PY
  done
done <<'LIST'
resnet18 128 32
resnet18 224 32
resnet50 224 16
vgg16 224 8
bench-vgg 32 64
LIST
