#!/usr/bin/env bash
# Fine-tuning against training from scratch where the source weights can transfer (issue 18),
# in the design of Yosinski et al. 2014 ("How transferable are features in deep neural
# networks?"), who split ImageNet's classes into two disjoint halves A and B:
#  1. PyTorch trains torchvision's resnet18 from scratch on CIFAR-10's classes A = airplane,
#     automobile, bird, cat, deer (bench/pretrained_peer.py), 32 px;
#  2. `convlab import` turns the .pth into a run folder; convlab's top-1 on A's held-out images
#     is compared with PyTorch's on the same images;
#  3. the other five classes B = dog, frog, horse, ship, truck (no image and no class shared
#     with A), a few training photos per class, are fine-tuned from those weights
#     (`--pretrained`) and trained from scratch with the same recipe, epochs and seeds, side by
#     side; val is B's 5,000 CIFAR-10 test images.
# Data: ../shared/data/cifar10-jpg.tar.gz unpacked as target/data/cifar10/{train,test}.
#   bench/transfer.sh [PEER_EPOCHS] [FINETUNE_EPOCHS] [SEEDS]
# Environment: PER_CLASS (A's training images per class, default 5000 = all), TARGET_PER_CLASS
# (B's training images per class, default 100), TORCH_VENV (default target/torchvenv).
set -euo pipefail
cd "$(dirname "$0")/.."
PE=${1:-8}
FE=${2:-15}
SEEDS=${3:-3}
PER_CLASS=${PER_CLASS:-5000}
TPC=${TARGET_PER_CLASS:-100}
VENV=${TORCH_VENV:-target/torchvenv}
PY="$VENV/bin/python bench/pretrained_peer.py"
W=target/transfer-a$PER_CLASS
mkdir -p $W
cargo build --release -q
BIN=target/release/convlab
D=target/data/cifar10
A="airplane automobile bird cat deer"
B="dog frog horse ship truck"
# Fixed splits both sides read (symlinks; the same files every run): A's training images and
# 200 held-out per class; B's few training images and all 1,000 test images per class.
source bench/split.sh
link_split $W/a $D $PER_CLASS 200 $A
T=$W/b$TPC
link_split $T $D $TPC 1000 $B
MEAN=0.491,0.482,0.447; STD=0.247,0.243,0.261
echo "$(date -u '+%F %H:%M') UTC, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, torch $($VENV/bin/python -c 'import torch; print(torch.__version__)')"
echo "== PyTorch: resnet18 from scratch on CIFAR-10 classes A ($((PER_CLASS * 5)) train), 32 px, $PE epochs"
[ -f $W/a_r18.pth ] || $PY train $W/a $W/a_r18.pth --side 32 --epochs $PE --mean $MEAN --std $STD
echo "PyTorch top-1 on A's 1,000 held-out images: $($PY eval $W/a $W/a_r18.pth --side 32 --mean $MEAN --std $STD)"
rm -rf $W/imported
$BIN import $W/a_r18.pth --model resnet18 --out $W/imported --classes $W/a_r18.pth.classes.txt \
  --input-size 32 --mean $MEAN --std $STD
echo "convlab top-1 on the same images: $($BIN eval --run $W/imported --data $W/a --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print({"top1": r["top1"], "count": r["count"]})')"
echo "== classes B ($((TPC * 5)) training images, 5,000 val), 32 px: fine-tuned from A's weights vs from scratch, $FE epochs, $SEEDS seeds"
# Same recipe, augmentations, input size, epochs and seeds; from scratch gets one learning rate
# for all layers (the recipe's from-scratch rate).
for seed in $(seq 0 $((SEEDS - 1))); do
  for how in pretrained scratch; do
    out=$W/b$TPC-$how-s$seed
    rm -rf $out
    if [ $how = pretrained ]; then extra="--pretrained $W/imported"; else
      extra="--set finetune.backbone_lr_mult=1.0"; fi
    start=$(date +%s.%N)
    $BIN train --data $T --recipe recipes/finetune.toml --epochs $FE --seed $seed \
      --set model.input_size=32 --set "data.mean=[${MEAN}]" --set "data.std=[${STD}]" \
      $extra --out $out > $out.log 2>&1
    secs=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
    python3 - "$out" "$how" "$seed" "$secs" <<'PY'
import json, sys
out, how, seed, secs = sys.argv[1:]
s = json.load(open(f"{out}/summary.json"))
print(f"{how:10s} seed {seed}: best val top-1 {100 * s['best_val_top1']:.2f}%  final {100 * s['final_val_top1']:.2f}%  {secs} s")
PY
  done
done
