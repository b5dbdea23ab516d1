"""The peer of `convlab bench data`: torchvision's ImageFolder + the same training transforms,
through torch.utils.data.DataLoader with the same number of workers and batch size.

Run from a throwaway venv (never a convlab dependency), e.g. via bench/loader_compare.sh:
    python bench/torchvision_loader.py --data target/data/cifar10 --transform cifar --workers 2

Transforms (the same as convlab's `--transform` presets):
  cifar:    Resize(size) + CenterCrop(size) (no-ops on 32 px CIFAR), RandomCrop(size, padding=4),
            RandomHorizontalFlip, ToTensor, Normalize
  imagenet: RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3), RandomHorizontalFlip,
            ToTensor, Normalize
Prints one JSON object with the same keys as `convlab bench data --json`.
"""
import argparse
import json
import os
import resource
import time

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms as T


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--transform", choices=["cifar", "imagenet"], default="cifar")
    p.add_argument("--size", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int)
    a = p.parse_args()
    torch.set_num_threads(1)
    root = os.path.join(a.data, "train") if os.path.isdir(os.path.join(a.data, "train")) else a.data
    norm = T.Normalize([0.5] * 3, [0.25] * 3)
    if a.transform == "cifar":
        size = a.size or 32
        tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=4),
                        T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        size = a.size or 224
        tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    ds = datasets.ImageFolder(root, transform=tf)
    if a.images and a.images < len(ds):
        ds = Subset(ds, range(a.images))
    dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                    prefetch_factor=4 if a.workers > 0 else None, persistent_workers=False)
    t0 = time.perf_counter()
    n = 0
    checksum = 0.0
    for x, y in dl:
        n += x.shape[0]
        checksum += float(x[0, 0, 0, 0])
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "data": a.data, "transform": a.transform, "size": size, "workers": a.workers,
        "batch": a.batch, "images": n, "seconds": secs, "images_per_sec": n / secs,
        "images_per_sec_per_worker": n / secs / max(a.workers, 1),
        "peak_rss_mb_main_process": rss, "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
