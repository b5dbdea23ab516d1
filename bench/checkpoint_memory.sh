#!/usr/bin/env bash
# Peak memory and seconds of the commands that read or write a large model's checkpoint, two
# convlab binaries alternated: a vgg16 run trained for one step (1.07 GB checkpoint: weights and
# SGD's momentum), resumed for one more epoch, evaluated, exported to ONNX, and torchvision's
# VGG-16 state dict imported. The seconds include fsync of the checkpoint and move with the disk.
#   bench/checkpoint_memory.sh OLD_BIN NEW_BIN VGG16_PTH [ROUNDS]
#   (VGG16_PTH: torchvision's vgg16 state_dict(), e.g. written by `convlab export --format
#   torchvision` of an imported or trained vgg16, or by torchvision in the bench venv)
set -euo pipefail
OLD=${1:?usage: bench/checkpoint_memory.sh OLD_BIN NEW_BIN VGG16_PTH [ROUNDS]}
NEW=${2:?usage: bench/checkpoint_memory.sh OLD_BIN NEW_BIN VGG16_PTH [ROUNDS]}
PTH=${3:?usage: bench/checkpoint_memory.sh OLD_BIN NEW_BIN VGG16_PTH [ROUNDS]}
R=${4:-2}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
train=(train --model vgg16 --epochs 1 --batch-size 8 --set model.input_size=32
  --set data.limit_train=8 --set data.limit_val=8)
# The run every binary reads, made by the old one (so that both can read it).
"$OLD" "${train[@]}" --out "$W/run" > /dev/null
measure() { /usr/bin/time -f '%M %e' "$@" 2>&1 > /dev/null | tail -1 |
  awk '{printf "%.0f MB %.1f s", $1 / 1024, $2}'; }
echo "$(date -u '+%F %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
echo
echo "| round | binary | train | train --resume | eval | export onnx | import |"
echo "|---|---|---|---|---|---|---|"
for r in $(seq "$R"); do
  for B in "$OLD" "$NEW"; do
    rm -rf "$W/t" "$W/r" "$W/i"
    cp -r "$W/run" "$W/r"
    t=$(measure "$B" "${train[@]}" --out "$W/t")
    s=$(measure "$B" train --resume "$W/r" --set epochs=2)
    e=$(measure "$B" eval --run "$W/run")
    x=$(measure "$B" export "$W/run" --format onnx --out "$W/m.onnx")
    i=$(measure "$B" import --model vgg16 --out "$W/i" "$PTH")
    echo "| $r | $(basename "$B") | $t | $s | $e | $x | $i |"
  done
done
