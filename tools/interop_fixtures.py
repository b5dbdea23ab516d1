"""Makes the interop parity fixtures in tests/fixtures/interop/ (run once, in a throwaway venv):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.9.0 torchvision==0.24.0 timm safetensors
    /tmp/torchvenv/bin/python tools/interop_fixtures.py

For every torchvision-layout model (and timm's resnet50d), the script fills each state-dict
tensor with a formula that convlab's test computes too (`fill` below, `formula` in
tests/interop.rs), runs the model in eval mode on a formula input, and writes the key names,
shapes and logits as JSON: a few KB per model instead of hundreds of MB of weights. It also
writes small real `.pth` files (zip and legacy pickle, nested, f16, a whole pickled module)
and a `.safetensors` file for the reader tests. PyTorch is never a dependency of convlab or of
its tests: they only read these files.
"""
import json
import math
import os

import numpy as np
import torch
import torchvision

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "interop")
K = 7  # classes
SIDE = 64  # input side: every model here pools adaptively, so a small input keeps CI fast


M64 = (1 << 64) - 1


def uniform(n, seed):
    """n values in [-1, 1): splitmix64 of (seed << 32) + i, exact in integers on both sides."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed << 32)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -52) - 1.0


def fill(name, shape):
    """The value of every tensor, from its name and shape only (tests/interop.rs: `formula`)."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(n, sum(name.encode()))
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * u * u
    elif name.endswith("running_mean"):
        v = 0.1 * u
    elif len(shape) >= 2:  # He-uniform: variance 2 / fan_in
        v = u * math.sqrt(6.0 / int(np.prod(shape[1:])))
    elif name.endswith("weight"):  # batch-norm scale
        v = 0.6 + 0.1 * u
    else:
        v = 0.1 * u
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def image(shape):
    n = int(np.prod(shape))
    return torch.from_numpy(uniform(n, 12345).astype(np.float32).reshape(shape))


def build(name):
    if name == "googlenet":
        return torchvision.models.googlenet(num_classes=K, aux_logits=True, transform_input=False, init_weights=False)
    if name == "resnet50d":
        import timm
        return timm.create_model("resnet50d", num_classes=K)
    return getattr(torchvision.models, name)(num_classes=K)


MODELS = [  # (convlab name, torch name, naming)
    ("alexnet", "alexnet", "torchvision"),
    ("vgg11", "vgg11", "torchvision"),
    ("vgg13", "vgg13", "torchvision"),
    ("vgg16", "vgg16", "torchvision"),
    ("vgg19", "vgg19", "torchvision"),
    ("vgg11_bn", "vgg11_bn", "torchvision"),
    ("vgg13_bn", "vgg13_bn", "torchvision"),
    ("vgg16_bn", "vgg16_bn", "torchvision"),
    ("vgg19_bn", "vgg19_bn", "torchvision"),
    ("googlenet_tv", "googlenet", "torchvision"),
    ("resnet18", "resnet18", "torchvision"),
    ("resnet34", "resnet34", "torchvision"),
    ("resnet50", "resnet50", "torchvision"),
    ("resnet50_d", "resnet50d", "timm"),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    for convlab, tname, naming in MODELS:
        m = build(tname).eval()
        sd = m.state_dict()
        new = {}
        for k, v in sd.items():
            new[k] = v if k.endswith("num_batches_tracked") else fill(k, list(v.shape))
        m.load_state_dict(new, strict=True)
        x = image([2, 3, SIDE, SIDE])
        with torch.no_grad():
            y = m(x)
        fx = {
            "model": convlab,
            "torch_model": tname,
            "naming": naming,
            "num_classes": K,
            "input_shape": [2, 3, SIDE, SIDE],
            "keys": [[k, list(v.shape)] for k, v in sd.items()],
            "logits": [float(v) for v in y.flatten()],
            "made_with": f"torch {torch.__version__}, torchvision {torchvision.__version__}",
        }
        with open(os.path.join(OUT, f"{convlab}.json"), "w") as f:
            json.dump(fx, f)
        print(convlab, len(sd), "keys, logits scale", float(y.abs().max()))

    # Reader fixtures: a small state dict in every container convlab reads.
    small = {
        "conv.weight": fill("conv.weight", [4, 3, 3, 3]),
        "bn.weight": fill("bn.weight", [4]),
        "bn.bias": fill("bn.bias", [4]),
        "bn.running_mean": fill("bn.running_mean", [4]),
        "bn.running_var": fill("bn.running_var", [4]),
        "bn.num_batches_tracked": torch.tensor(5),
        "fc.weight": fill("fc.weight", [2, 4]),
    }
    torch.save(small, os.path.join(OUT, "small_zip.pth"))
    torch.save(small, os.path.join(OUT, "small_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save({"state_dict": small, "epoch": 3}, os.path.join(OUT, "small_nested.pth"))
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in small.items()},
               os.path.join(OUT, "small_f16.pth"))
    # A transposed (non-contiguous) view must be read as its logical values.
    torch.save({"fc.weight": fill("fc.weight", [4, 2]).t()}, os.path.join(OUT, "small_strided.pth"))
    whole = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(whole, os.path.join(OUT, "whole_module.pth"))
    from safetensors.torch import save_file
    save_file({k: v for k, v in small.items() if v.is_floating_point()}, os.path.join(OUT, "small.safetensors"))


if __name__ == "__main__":
    main()
