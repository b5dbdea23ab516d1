#!/usr/bin/env bash
# convlab fp32 against PyTorch fp32 training, alternated: ROUNDS pairs of runs back to back, each
# pair's ratio, and the median ratio. On a VM whose speed drifts by 10-25% over minutes (other
# tenants), one pair measured seconds apart is fairer than one measurement each, and the median
# over pairs is steadier than any single run of compare.sh.
#   bench/alternate.sh [ROUNDS] [THREADS] [MODELS...]   (default: 5 2 bench-vgg resnet18_small)
# WHAT=infer alternates inference (batch 256) instead of training (batch 64).
# PyTorch from the throwaway venv of bench/setup.sh, as in compare.sh. With TCH_BIN set to a
# convlab built with `--features tch`, each round also runs it with `--device tch` (the same
# libtorch as the peer) and a second table gives its ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
T=${2:-2}
shift $(($# < 2 ? $# : 2))
MODELS=${*:-bench-vgg resnet18_small}
INPUT=3x32x32
WHAT=${WHAT:-train}
case $WHAT in
  train) B=64 ;;
  infer) B=256 ;;
  *) echo "WHAT=$WHAT: expected train or infer" >&2; exit 2 ;;
esac
source bench/setup.sh
PY="$VENV/bin/python bench/pytorch_peer.py"
echo "$(date -u '+%F %H:%M') UTC, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs;" \
  "$WHAT img/s, batch $B, $T threads, convlab fp32 (default build)${TCH_BIN:+, convlab tch} then PyTorch fp32, $ROUNDS rounds"
echo
TCH_BIN=${TCH_BIN:-}
table() { # $1: title of the convlab column; then model, rounds, convlab JSONs, PyTorch JSONs
  python3 - "$@" <<'PY'
import json, statistics, sys
what, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = [json.loads(a)["images_per_sec"] for a in sys.argv[4:4 + n]]
p = [json.loads(a)["images_per_sec"] for a in sys.argv[4 + n:4 + 2 * n]]
r = [a / b for a, b in zip(c, p)]
fmt = lambda xs, f: ", ".join(f.format(x) for x in xs)
print(f"| {name} | {what} | {fmt(c, '{:.0f}')} | {fmt(p, '{:.0f}')} | {fmt(r, '{:.2f}')} | "
      f"**{statistics.median(r):.2f}x** |")
PY
}
echo "| model | convlab | convlab img/s per round | PyTorch img/s per round | ratio per round | median ratio |"
echo "|---|---|---|---|---|---|"
for MODEL in $MODELS; do
  args=(bench "$WHAT" --model "$MODEL" --input $INPUT --batch $B --threads "$T" --json)
  c_all=(); t_all=(); p_all=()
  for _ in $(seq "$ROUNDS"); do
    c_all+=("$($BIN "${args[@]}")")
    if [ -n "$TCH_BIN" ]; then t_all+=("$("$TCH_BIN" "${args[@]}" --device tch)"); fi
    p_all+=("$($PY "$WHAT" --model "$MODEL" --input $INPUT --batch $B --threads "$T")")
  done
  table "fp32 (default build)" "$MODEL" "$ROUNDS" "${c_all[@]}" "${p_all[@]}"
  if [ -n "$TCH_BIN" ]; then table "tch" "$MODEL" "$ROUNDS" "${t_all[@]}" "${p_all[@]}"; fi
done
