"""The PyTorch side of bench/pretrained.sh (a throwaway venv; never a dependency of convlab).

    train DATA OUT.pth --side S --epochs E   trains torchvision's resnet18 from scratch on
                                             DATA/train (ImageFolder), saves its state dict
    eval DATA WEIGHTS --side S               top-1 on DATA/val with torchvision's evaluation
                                             transform (shorter side to ceil(S*256/224),
                                             centre crop S), printed as JSON

Normalisation: the mean/std given by --mean/--std (the same numbers go to `convlab import`).
"""
import argparse
import json
import math
import time

import torch
import torchvision
from torchvision import transforms as T


def loader(root, side, train, mean, std, batch):
    if train:
        tf = T.Compose([T.RandomResizedCrop(side, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    else:
        tf = T.Compose([T.Resize(math.ceil(side * 256 / 224)), T.CenterCrop(side), T.ToTensor(), T.Normalize(mean, std)])
    ds = torchvision.datasets.ImageFolder(root, tf)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=train, num_workers=2, drop_last=train)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "eval"])
    p.add_argument("data")
    p.add_argument("weights")
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--mean", default="0.485,0.456,0.406")
    p.add_argument("--std", default="0.229,0.224,0.225")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    mean = [float(v) for v in a.mean.split(",")]
    std = [float(v) for v in a.std.split(",")]
    if a.what == "train":
        ds, dl = loader(f"{a.data}/train", a.side, True, mean, std, 64)
        m = torchvision.models.resnet18(num_classes=len(ds.classes))
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        steps = a.epochs * len(dl)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps, pct_start=0.15)
        t0 = time.time()
        for e in range(a.epochs):
            m.train()
            for x, y in dl:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y, label_smoothing=0.1).backward()
                opt.step()
                sched.step()
            print(f"epoch {e + 1}/{a.epochs} {time.time() - t0:.0f} s", flush=True)
        torch.save(m.state_dict(), a.weights)
        with open(a.weights + ".classes.txt", "w") as f:
            f.write("\n".join(ds.classes) + "\n")
    else:
        ds, dl = loader(f"{a.data}/val", a.side, False, mean, std, 100)
        m = torchvision.models.resnet18(num_classes=len(ds.classes))
        m.load_state_dict(torch.load(a.weights), strict=True)
        m.eval()
        correct = 0
        with torch.no_grad():
            for x, y in dl:
                correct += int((m(x).argmax(1) == y).sum())
        print(json.dumps({"top1": correct / len(ds), "count": len(ds)}))


if __name__ == "__main__":
    main()
