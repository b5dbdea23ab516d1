#!/usr/bin/env bash
# convlab vs PyTorch at the sizes people train photos at (issue 20's workloads), in one run:
# resnet18 at 128 and 224 px, resnet50 and vgg16 at 224 px, bench-vgg at 32 px; training and
# inference throughput, fp32 and bf16, same threads, same batch, as one Markdown table.
#   bench/photo_sizes.sh [THREADS] [STEPS]        (default: 2 threads, 8 timed steps)
# "convlab bf16 AVX512" is `CONVLAB_AMX=0 CONVLAB_VDPBF16PS=on` (the VDPBF16PS kernel, even on
# an Intel CPU where it is slower than f32); "convlab bf16" is what a run gets: the AMX tiles
# where the CPU has them, VDPBF16PS where it beats f32 FMAs (AMD), else f32 (the `unit` column
# says which ran). PyTorch bf16 is
# its autocast + channels-last (oneDNN, AMX where the CPU has it). PyTorch comes from a
# throwaway venv (bench/setup.sh), never from convlab.
# On a CPU without bf16 instructions (no avx512_bf16, no amx_bf16) convlab's bf16 computes in
# fp32 and PyTorch's bf16 is emulated (5-15x slower than its fp32; 40 of this script's 48
# minutes on a 2-core Zen 3), so the bf16 columns are skipped there ("-"); BF16=1 runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
STEPS=${2:-8}
source bench/setup.sh
PY="$VENV/bin/python bench/pytorch_peer.py"
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | { grep -xE 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile' || true; } | xargs)
case " $flags " in
  *" avx512_bf16 "* | *" amx_bf16 "*) BF16=${BF16:-1} ;;
  *) BF16=${BF16:-0} ;;
esac
echo "$(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs ($flags);" \
  "PyTorch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), $T threads, $STEPS timed steps"
echo
echo "| workload | batch | convlab fp32 img/s | PyTorch fp32 img/s | ratio | convlab bf16 AVX512 img/s | convlab bf16 img/s (unit) | PyTorch bf16+CL img/s | ratio | peak RSS fp32 train convlab / PyTorch MB | peak RSS bf16 train convlab / PyTorch MB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
# What convlab says on stderr about the precision that ran (e.g. bf16 computing in fp32),
# printed once after the table instead of between its rows.
notes=$(mktemp)
trap 'rm -f "$notes"' EXIT
while read -r what model size batch; do
  args=(bench "$what" --model "$model" --input "3x${size}x${size}" --batch "$batch" --steps "$STEPS" --threads "$T" --json)
  c32=$($BIN "${args[@]}")
  pargs=("$what" --model "$model" --input "3x${size}x${size}" --batch "$batch" --steps "$STEPS" --threads "$T")
  p32=$($PY "${pargs[@]}")
  c16a=null c16=null p16=null
  if [ "$BF16" = 1 ]; then
    c16a=$(CONVLAB_AMX=0 CONVLAB_VDPBF16PS=on $BIN "${args[@]}" --precision bf16)
    c16=$($BIN "${args[@]}" --precision bf16 2>>"$notes")
    p16=$($PY "${pargs[@]}" --precision bf16)
  fi
  python3 - "$what $model $size px" "$batch" "$c32" "$p32" "$c16a" "$c16" "$p16" <<'PY'
import json, sys
name, b = sys.argv[1], sys.argv[2]
c32, p32, c16a, c16, p16 = map(json.loads, sys.argv[3:8])
ips = lambda r: r["images_per_sec"]
train = name.startswith("train")
rss = lambda c, p: f"{c['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f}" if train and c else "-"
bf16 = (f"{ips(c16a):.1f} | {ips(c16):.1f} ({c16['matrix_unit']}, {c16['activations']} activations) | "
        f"{ips(p16):.1f} | {ips(c16) / ips(p16):.2f}x") if c16 else "- | - | - | -"
print(f"| {name} | {b} | {ips(c32):.1f} | {ips(p32):.1f} | {ips(c32) / ips(p32):.2f}x | "
      f"{bf16} | {rss(c32, p32)} | {rss(c16, p16)} |")
PY
done <<'EOF'
train resnet18 128 32
infer resnet18 128 64
train resnet18 224 32
infer resnet18 224 64
train resnet50 224 16
infer resnet50 224 32
train vgg16 224 8
train bench-vgg 32 64
EOF
if [ -s "$notes" ]; then
  echo
  sort -u "$notes" | sed 's/^/convlab: /'
fi
