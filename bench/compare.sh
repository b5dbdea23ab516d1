#!/usr/bin/env bash
# convlab vs PyTorch on this machine, in one run: training and inference throughput of the
# same networks with the same thread count, plus the fp32 SGEMM peak, as one Markdown table.
#   bench/compare.sh [THREADS] [MODEL] [INPUT]
# PyTorch comes from a throwaway venv in target/torchvenv (or $TORCH_VENV), never from convlab.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
MODEL=${2:-bench-vgg}
INPUT=${3:-3x32x32}
source bench/setup.sh
PY="$VENV/bin/python bench/pytorch_peer.py"
gemm=$($PY gemm --size 2048 --threads $T)
peak=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['gflops_per_sec'])" "$gemm")
flops=$($BIN models --json | python3 -c "
import json,sys
for m in json.load(sys.stdin):
    if m['name']=='$MODEL': print(m['gflops']*1e9)")
echo "fp32 SGEMM 2048^3 (PyTorch/oneDNN, $T threads): $(printf %.0f "$peak") GFLOP/s"
echo
echo "| $MODEL $INPUT, $T threads | batch | convlab img/s | PyTorch fp32 img/s | PyTorch bf16+CL img/s | convlab / PyTorch fp32 | convlab GFLOP/s (% of SGEMM peak) |"
echo "|---|---|---|---|---|---|---|"
for what in train infer; do
  B=64; [ $what = infer ] && B=256
  c=$($BIN bench $what --model $MODEL --input $INPUT --batch $B --threads $T --json)
  p32=$($PY $what --model $MODEL --input $INPUT --batch $B --threads $T --flops "$flops")
  p16=$($PY $what --model $MODEL --input $INPUT --batch $B --threads $T --flops "$flops" --precision bf16)
  python3 - "$what" "$B" "$c" "$p32" "$p16" "$peak" <<'PY'
import json, sys
what, b, c, p32, p16, peak = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6]), float(sys.argv[6])
print(f"| {what} | {b} | {c['images_per_sec']:.0f} | {p32['images_per_sec']:.0f} | {p16['images_per_sec']:.0f} | "
      f"{c['images_per_sec'] / p32['images_per_sec']:.2f}x | {c['gflops_per_sec']:.0f} ({100 * c['gflops_per_sec'] / peak:.0f}%) |")
PY
done
