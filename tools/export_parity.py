"""Checks convlab's exports against the runtimes that read them (throwaway venv only):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.9.0 torchvision==0.24.0 timm onnx onnxruntime safetensors
    cargo build --release
    /tmp/torchvenv/bin/python tools/export_parity.py [--work target/export-parity] [MODEL ...]

For every registered model (or the ones named) it trains a convlab run for one epoch on a tiny
generated RGB photo folder (so batch-norm statistics are real), then
- `convlab export --format onnx --sample`: `onnx.checker.check_model(full_check=True)`, then
  onnxruntime on the sample input (batch 2, and batch 1 and 3 for the dynamic batch axis),
  compared with the logits convlab computed for it;
- for the torchvision layouts (`--format torchvision`) and resnet50_d (`--format timm`): the
  `.pth` loaded with `torch.load(weights_only=True)` into `torchvision.models.NAME(**kwargs)`
  (the kwargs the export's JSON gives) or `timm.create_model("resnet50d")` with
  `load_state_dict(strict=True)`, run in eval mode on the same input.
Passing is max |difference| <= 1e-4 of the logits' scale (max |logit|). It prints a Markdown
table (README.md has the last one) and exits 1 if any model fails.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target", "release", "convlab")
TORCHVISION = {"alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn",
               "vgg16_bn", "vgg19_bn", "googlenet_tv", "resnet18", "resnet34", "resnet50"}
TOL = 1e-4


def sh(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"convlab {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def photos(path):
    """5 classes x 8 RGB images of 48 x 40 px, each class its own colour pattern."""
    rng = np.random.default_rng(0)
    for c in range(5):
        os.makedirs(os.path.join(path, f"c{c}"), exist_ok=True)
        for i in range(8):
            base = np.array([(c * 50) % 256, (c * 90 + 40) % 256, (255 - c * 40) % 256])
            img = np.clip(base + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(path, f"c{c}", f"{i}.png"))


def rel(a, b):
    scale = max(float(np.abs(b).max()), 1e-6)
    return float(np.abs(a - b).max()) / scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "export-parity"))
    ap.add_argument("models", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "photos")
    if not os.path.isdir(data):
        photos(data)
    models = [m for m in json.loads(sh("models", "--json"))]
    if args.models:
        models = [m for m in models if m["name"] in args.models]
    rows, failed = [], []
    for m in models:
        name = m["name"]
        # 224 px models run at 64 px (every one pools adaptively or globally), the rest at theirs.
        size = 64 if m["input_size"] >= 224 else m["input_size"]
        run = os.path.join(args.work, "runs", name)
        if not os.path.isfile(os.path.join(run, "checkpoints", "best.safetensors")):
            sh("train", "--model", name, "--data", data, "--epochs", "1", "--batch-size", "8",
               "--set", f"model.input_size={size}", "--set", "eval.resize=0",
               "--overwrite", "--out", run)
        out = os.path.join(args.work, f"{name}.onnx")
        sh("export", run, "--format", "onnx", "--sample", "--out", out)
        onnx.checker.check_model(onnx.load(out), full_check=True)
        sample = load_file(out + ".sample.safetensors")
        x, want = sample["input"], sample["logits"]
        sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x})[0]
        onnx_err = rel(got, want)
        for b in (1, 3):  # the dynamic batch axis
            xb = np.concatenate([x] * 2)[:b]
            yb = sess.run(None, {"input": xb})[0]
            onnx_err = max(onnx_err, rel(yb, np.concatenate([want] * 2)[:b]))
        ops = sorted({n.op_type for n in onnx.load(out).graph.node})
        torch_err = None
        if name in TORCHVISION or name == "resnet50_d":
            fmt = "timm" if name == "resnet50_d" else "torchvision"
            pth = os.path.join(args.work, f"{name}.pth")
            sh("export", run, "--format", fmt, "--sample", "--out", pth)
            meta = json.load(open(pth + ".json"))
            if fmt == "timm":
                import timm
                net = timm.create_model(**meta["timm"])
            else:
                tv = "googlenet" if name == "googlenet_tv" else name
                net = getattr(torchvision.models, tv)(**meta["torchvision"])
            net.load_state_dict(torch.load(pth, weights_only=True), strict=True)
            net.eval()
            with torch.no_grad():
                y = net(torch.from_numpy(load_file(pth + ".sample.safetensors")["input"]))
            torch_err = rel(y.numpy(), want)
        ok = onnx_err <= TOL and (torch_err is None or torch_err <= TOL)
        if not ok:
            failed.append(name)
        rows.append((name, size, onnx_err, torch_err, ok, ", ".join(ops)))
        print(f"{name}: onnxruntime {onnx_err:.1e}, torch {torch_err if torch_err is None else f'{torch_err:.1e}'}"
              f" {'ok' if ok else 'FAIL'}", flush=True)
    print()
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}")
    print()
    print("| model | input | onnxruntime max diff / scale | PyTorch strict load, max diff / scale | ONNX ops |")
    print("|---|---|---|---|---|")
    for name, size, oe, te, ok, ops in rows:
        t = "-" if te is None else f"{te:.1e}"
        print(f"| {name} | {size} px | {oe:.1e} | {t} | {ops} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
