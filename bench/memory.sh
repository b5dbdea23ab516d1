#!/usr/bin/env bash
# Memory stays flat over a long run: trains EPOCHS epochs (default 30) of a model on the
# built-in data and prints peak_rss_mb per epoch from metrics.jsonl, with the growth from the
# end of epoch 2 (when every buffer has been allocated once) to the last epoch.
#   bench/memory.sh [EPOCHS] [MODEL] [extra train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-30}
MODEL=${2:-convnet_small}
shift 2 || shift $# || true
cargo build --release -q
OUT=$(mktemp -d)/run
echo "$(date -u '+%F %H:%M') UTC, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
echo "target/release/convlab train --model $MODEL --epochs $EPOCHS --out RUN $*"
target/release/convlab train --model "$MODEL" --epochs "$EPOCHS" --out "$OUT" "$@" > /dev/null
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| epoch | peak RSS MB | val top-1 |")
print("|---|---|---|")
for r in rows:
    print(f"| {r['epoch']} | {r['peak_rss_mb']:.1f} | {100 * r['val_top1']:.2f}% |")
base = rows[min(1, len(rows) - 1)]["peak_rss_mb"]
print(f"\ngrowth from epoch {rows[min(1, len(rows) - 1)]['epoch']} to {rows[-1]['epoch']}: "
      f"{rows[-1]['peak_rss_mb'] - base:+.1f} MB")
PY
