#!/usr/bin/env bash
# Pretrained weights in, end to end on real photos (issue 18):
#  1. PyTorch trains torchvision's resnet18 from scratch on a CIFAR-10 subset (bench/pretrained_peer.py);
#  2. `convlab import` turns the .pth into a run folder, and convlab's top-1 on the held-out
#     images is compared with PyTorch's on the same images;
#  3. the Flowers photos are fine-tuned from those weights (`--pretrained`) and trained from
#     scratch with the same recipe and epochs, side by side.
# Data: ../shared/data archives unpacked under target/data (see ../shared/data/README.md).
#   bench/pretrained.sh [PEER_EPOCHS] [FINETUNE_EPOCHS]
# Environment: PER_CLASS (CIFAR-10 training images per class for PyTorch, default 1000; 5000 is
# all of it), FLOWERS_TRAIN (Flowers training images for both arms, a seeded subset; default
# all 3,453), SIDE (fine-tuning input side, default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
PE=${1:-8}
FE=${2:-6}
PER_CLASS=${PER_CLASS:-1000}
SIDE=${SIDE:-64}
LIMIT=${FLOWERS_TRAIN:+--set data.limit_train=$FLOWERS_TRAIN}
VENV=${TORCH_VENV:-target/torchvenv}
PY="$VENV/bin/python bench/pretrained_peer.py"
W=target/pretrained-c$PER_CLASS
mkdir -p $W
cargo build --release -q
BIN=target/release/convlab
D=target/data
# A fixed split both sides read: CIFAR-10, PER_CLASS train + 200 held-out images per class.
source bench/split.sh
link_split $W/cifar $D/cifar10 $PER_CLASS 200 $(ls $D/cifar10/train)
MEAN=0.491,0.482,0.447; STD=0.247,0.243,0.261
echo "$(date -u '+%F %H:%M') UTC, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, torch $($VENV/bin/python -c 'import torch; print(torch.__version__)')"
echo "== PyTorch: resnet18 from scratch on CIFAR-10 ($((PER_CLASS * 10)) train), 32 px, $PE epochs"
[ -f $W/cifar_r18.pth ] || $PY train $W/cifar $W/cifar_r18.pth --side 32 --epochs $PE --mean $MEAN --std $STD
echo "PyTorch top-1 on the 2,000 held-out images: $($PY eval $W/cifar $W/cifar_r18.pth --side 32 --mean $MEAN --std $STD)"
rm -rf $W/imported
$BIN import $W/cifar_r18.pth --model resnet18 --out $W/imported --classes $W/cifar_r18.pth.classes.txt \
  --input-size 32 --mean $MEAN --std $STD
echo "convlab top-1 on the same images: $($BIN eval --run $W/imported --data $W/cifar --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print({"top1": r["top1"], "count": r["count"]})')"
echo "== Flowers (${FLOWERS_TRAIN:-3453} training photos, 5 classes, $SIDE px): fine-tuned from those weights vs from scratch, $FE epochs each"
# Same recipe, augmentations, input size and epochs; from scratch gets the from-scratch
# learning rate (0.1 per 256 images) and one rate for all layers.
for how in pretrained scratch; do
  rm -rf $W/flowers-$how-${FLOWERS_TRAIN:-all}-$SIDE
  if [ $how = pretrained ]; then extra="--pretrained $W/imported"; else
    extra="--set finetune.backbone_lr_mult=1.0"; fi
  $BIN train --data $D/flowers --recipe recipes/finetune.toml --epochs $FE \
    --set model.input_size=$SIDE --set 'data.mean=[0.491,0.482,0.447]' --set 'data.std=[0.247,0.243,0.261]' \
    $LIMIT $extra --out $W/flowers-$how-${FLOWERS_TRAIN:-all}-$SIDE | grep -E "^done|^pretrained|^resnet18"
done
