#!/usr/bin/env bash
# convlab vs PyTorch on this machine, in one run: training and inference throughput and peak
# memory of the same networks with the same thread count, the fp32 SGEMM peak, and the scaling
# from 1 to N threads, as Markdown tables.
#   bench/compare.sh [THREADS] [MODELS...]        (default: 2 bench-vgg resnet18_small)
# PyTorch comes from a throwaway venv in target/torchvenv (or $TORCH_VENV), never from convlab.
# "convlab (Burn ops)" is the same binary with CONVLAB_KERNELS=burn: Burn 0.22.1's own
# convolution, batch norm and pooling instead of convlab's kernels. With TCH_BIN set to a
# convlab built with `--features tch` (README, "Other backends"), a column for `--device tch`
# (Burn on libtorch, the same kernels as PyTorch) is added. "convlab bf16" is `--precision bf16`
# (bf16 convolutions, needs AVX512-BF16), against PyTorch's bf16 autocast + channels-last.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
shift || true
MODELS=${*:-bench-vgg resnet18_small}
INPUT=3x32x32
source bench/setup.sh
PY="$VENV/bin/python bench/pytorch_peer.py"
gemm=$($PY gemm --size 2048 --threads "$T")
peak=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['gflops_per_sec'])" "$gemm")
echo "$(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs;" \
  "PyTorch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "fp32 SGEMM 2048^3 (PyTorch/oneDNN, $T threads): $(printf %.0f "$peak") GFLOP/s"
echo
TCH_BIN=${TCH_BIN:-}
tch_head=""; tch_rule=""
if [ -n "$TCH_BIN" ]; then tch_head=" convlab tch img/s (/ PyTorch fp32) |"; tch_rule="---|"; fi
echo "| model, $INPUT, $T threads | batch | convlab (Burn ops) img/s | convlab fp32 img/s | PyTorch fp32 img/s | convlab / PyTorch fp32 | convlab bf16 img/s | PyTorch bf16+CL img/s | convlab bf16 / PyTorch bf16+CL | peak RSS convlab / PyTorch MB | convlab fp32 GFLOP/s (% of SGEMM peak) |$tch_head"
echo "|---|---|---|---|---|---|---|---|---|---|---|$tch_rule"
for MODEL in $MODELS; do
  flops=$($BIN models --json | python3 -c "
import json,sys
for m in json.load(sys.stdin):
    if m['name']=='$MODEL': print(m['gflops']*1e9)")
  for what in train infer; do
    B=64; [ $what = infer ] && B=256
    args=(bench $what --model "$MODEL" --input $INPUT --batch $B --threads "$T" --json)
    cb=$(CONVLAB_KERNELS=burn $BIN "${args[@]}")
    c=$($BIN "${args[@]}")
    c16=$($BIN "${args[@]}" --precision bf16)
    p32=$($PY $what --model "$MODEL" --input $INPUT --batch $B --threads "$T" --flops "$flops")
    p16=$($PY $what --model "$MODEL" --input $INPUT --batch $B --threads "$T" --flops "$flops" --precision bf16)
    ct='{}'
    if [ -n "$TCH_BIN" ]; then ct=$("$TCH_BIN" "${args[@]}" --device tch); fi
    python3 - "$MODEL $what" "$B" "$cb" "$c" "$p32" "$p16" "$peak" "$ct" "$c16" <<'PY'
import json, sys
name, b = sys.argv[1], sys.argv[2]
cb, c, p32, p16 = map(json.loads, sys.argv[3:7])
peak = float(sys.argv[7])
ct = json.loads(sys.argv[8])
c16 = json.loads(sys.argv[9])
tch = (f" {ct['images_per_sec']:.0f} ({ct['images_per_sec'] / p32['images_per_sec']:.2f}x) |"
       if ct else "")
print(f"| {name} | {b} | {cb['images_per_sec']:.0f} | {c['images_per_sec']:.0f} | {p32['images_per_sec']:.0f} | "
      f"{c['images_per_sec'] / p32['images_per_sec']:.2f}x | {c16['images_per_sec']:.0f} | "
      f"{p16['images_per_sec']:.0f} | {c16['images_per_sec'] / p16['images_per_sec']:.2f}x | "
      f"{c['peak_rss_mb']:.0f} / {p32['peak_rss_mb']:.0f} | "
      f"{c['gflops_per_sec']:.0f} ({100 * c['gflops_per_sec'] / peak:.0f}%) |{tch}")
PY
  done
done
echo
echo "| training, batch 64 | convlab 1 thread img/s | convlab $T threads img/s | scaling | PyTorch 1 thread | PyTorch $T threads | scaling |"
echo "|---|---|---|---|---|---|---|"
for MODEL in $MODELS; do
  c1=$($BIN bench train --model "$MODEL" --input $INPUT --batch 64 --threads 1 --json)
  cn=$($BIN bench train --model "$MODEL" --input $INPUT --batch 64 --threads "$T" --json)
  p1=$($PY train --model "$MODEL" --input $INPUT --batch 64 --threads 1)
  pn=$($PY train --model "$MODEL" --input $INPUT --batch 64 --threads "$T")
  python3 - "$MODEL" "$c1" "$cn" "$p1" "$pn" <<'PY'
import json, sys
name = sys.argv[1]
c1, cn, p1, pn = (json.loads(a)["images_per_sec"] for a in sys.argv[2:6])
print(f"| {name} | {c1:.0f} | {cn:.0f} | {cn / c1:.2f}x | {p1:.0f} | {pn:.0f} | {pn / p1:.2f}x |")
PY
done
