#!/usr/bin/env bash
# Trains every family's small variant on the built-in data (BENCHMARKS.md, "Small variants").
# Usage: bench/small_variants.sh [EPOCHS] [OUT_DIR]
set -euo pipefail
epochs=${1:-5}
out=${2:-runs/small-variants}
bin=./target/release/convlab
cargo build --release --quiet
mkdir -p "$out"
for m in convnet_small alexnet_small zfnet_small vgg11_small googlenet_small resnet18_small; do
  "$bin" train --model "$m" --epochs "$epochs" --out "$out/$m" > "$out/$m.log" 2>&1
  python3 - "$out/$m" <<'PY'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/summary.json"))
m = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ips = sorted(e["images_per_sec"] for e in m)[len(m) // 2]
print(f"| {s['model']} | {100*s['final_val_top1']:.2f} | {100*s['best_val_top1']:.2f} | {s['params']:,} | {ips:.0f} | {s['seconds']:.0f} |")
PY
done
