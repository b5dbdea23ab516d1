"""The PyTorch peer of `convlab bench`: the same networks, the same step, the same threads.

Run from a throwaway venv (never a convlab dependency), e.g. via bench/compare.sh:
    python bench/pytorch_peer.py train --model bench-vgg --input 3x32x32 --batch 64 --threads 2
    python bench/pytorch_peer.py gemm --size 2048 --threads 2

`train`: forward, cross-entropy, backward, SGD momentum 0.9 update (convlab's step).
`infer`: forward in eval mode under torch.inference_mode().
`--precision bf16` runs under torch.autocast('cpu', dtype=torch.bfloat16) with channels-last
tensors (PyTorch's best CPU configuration); fp32 is its default.
Prints one JSON object with convlab's keys: model, input, batch, threads, device,
images_per_sec, ms_per_step, peak_rss_mb, gflops_per_sec (from convlab's FLOP count when
--flops is given), plus precision.
`gemm`: a square fp32 matmul, GFLOP/s = 2 n^3 / seconds (the machine's practical peak).
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn


def bench_vgg(c, classes):
    layers, cin = [], c
    for v in [64, 64, "M", 128, 128, "M", 256, 256, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18_small(c, classes):
    """convlab's resnet18_small: the ResNet paper's CIFAR design (3x3 stem, no pool) with
    resnet18's four stages of two basic blocks at widths 16-32-64-128."""
    layers = [nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    cin = 16
    for i, w in enumerate([16, 32, 64, 128]):
        for j in range(2):
            layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def build(name, c, classes):
    if name == "bench-vgg":
        return bench_vgg(c, classes)
    if name == "resnet18_small":
        return resnet18_small(c, classes)
    import torchvision.models as tvm
    m = getattr(tvm, name)(num_classes=classes)
    if c != 3:
        raise SystemExit(f"{name}: the torchvision layout takes 3 channels")
    return m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "infer", "gemm"])
    p.add_argument("--model", default="bench-vgg")
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--flops", type=float, default=0.0, help="forward FLOPs per image (convlab's)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--accum", type=int, default=1,
                   help="train: backward passes per optimiser step (convlab's grad_accum_steps)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.what == "gemm":
        x, y = torch.randn(a.size, a.size), torch.randn(a.size, a.size)
        for _ in range(3):
            x @ y
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        print(json.dumps({"what": "gemm", "size": a.size, "threads": a.threads,
                          "gflops_per_sec": 2 * a.size ** 3 / s / 1e9, "torch": torch.__version__}))
        return
    c, h, w = (int(v) for v in a.input.split("x"))
    model = build(a.model, c, a.classes)
    x = torch.randn(a.batch, c, h, w)
    labels = torch.arange(a.batch) % a.classes
    bf16 = a.precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        if a.what != "train":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                with torch.inference_mode():
                    model(x)
            return
        opt.zero_grad(set_to_none=True)
        # Gradient accumulation as PyTorch users write it: each slice's mean loss weighted by
        # its share of the batch, one backward pass a slice, one update.
        for xs, ys in zip(torch.tensor_split(x, a.accum), torch.tensor_split(labels, a.accum)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(xs)
                loss = loss_fn(out.float(), ys)
                if a.accum > 1:
                    loss = loss * (len(ys) / a.batch)
            loss.backward()
        opt.step()

    model.train(a.what == "train")
    for _ in range(3):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    mult = 3.0 if a.what == "train" else 1.0
    print(json.dumps({
        "model": a.model, "input": a.input, "batch": a.batch, "accum": a.accum, "threads": a.threads,
        "device": "cpu", "precision": a.precision, "images_per_sec": a.batch / s,
        "ms_per_step": 1e3 * s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflops_per_sec": a.flops * a.batch * mult / s / 1e9, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
