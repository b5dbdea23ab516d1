"""PyTorch's convolutions per layer, for convlab's `conv_layers` example to be read against:
every distinct convolution of a torchvision model (found by forward hooks on the model itself),
forward (no grad), weight gradient and input gradient (`aten.convolution_backward` with one
output asked for), fastest of 7 after 3 warm-up calls, ms. bf16 runs channels-last (what
oneDNN's bf16 kernels want); fp32 runs PyTorch's default NCHW, as `bench/pytorch_peer.py`
trains. Throwaway venv only (bench/setup.sh):
    target/torchvenv/bin/python bench/pytorch_conv_layers.py [THREADS] [BATCH] [PRECISION] [MODEL] [SIZE] [ONLY]
defaults: 2 threads, batch 32, bf16, resnet18, 224 px; ONLY keeps the layers whose description
(`512->512 7px 3x3/1`, as `conv_layers` prints it) contains that text (default "3x3", the
3x3 layers the first measurements used; "->" keeps them all).
"""
import sys
import time

import torch
import torchvision

args = sys.argv[1:]
if len(args) > 6:
    sys.exit(__doc__)
threads = int(args[0]) if len(args) > 0 else 2
batch = int(args[1]) if len(args) > 1 else 32
precision = args[2] if len(args) > 2 else "bf16"
name = args[3] if len(args) > 3 else "resnet18"
size = int(args[4]) if len(args) > 4 else 224
only = args[5] if len(args) > 5 else "3x3"
if precision not in ("fp32", "bf16"):
    sys.exit(f"PRECISION must be fp32 or bf16, not {precision!r}")
torch.set_num_threads(threads)
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format

# Every distinct convolution, in the order the model first runs it, with how often it runs.
model = getattr(torchvision.models, name)()
layers, seen = [], {}
def hook(conv, inputs, _output):
    x = inputs[0]
    key = (conv.in_channels, conv.out_channels, x.shape[2], conv.kernel_size[0], conv.stride[0],
           conv.padding[0])
    if key not in seen:
        seen[key] = 0
        layers.append(key)
    seen[key] += 1
for m in model.modules():
    if isinstance(m, torch.nn.Conv2d):
        m.register_forward_hook(hook)
with torch.no_grad():
    model(torch.zeros(1, 3, size, size))

print(f"torch {torch.__version__}, {threads} threads, {name} at {size} px, batch {batch}, "
      f"{precision}{' channels-last' if precision == 'bf16' else ' NCHW'}")
total = [0.0, 0.0, 0.0]
for cin, cout, h, k, s, p in layers:
    desc = f"{cin}->{cout} {h}px {k}x{k}/{s}"
    if only not in desc:
        continue
    x = torch.randn(batch, cin, h, h).to(dtype).to(memory_format=fmt)
    conv = torch.nn.Conv2d(cin, cout, k, s, p, bias=False).to(dtype).to(memory_format=fmt)
    with torch.no_grad():
        g = torch.randn_like(conv(x))

    def fwd():
        with torch.no_grad():
            conv(x)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, conv.weight, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

    res = []
    for f in (fwd, backward([False, True, False]), backward([True, False, False])):
        for _ in range(3):
            f()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        res.append(min(ts) * 1e3)
    n = seen[(cin, cout, h, k, s, p)]
    total = [t + n * r for t, r in zip(total, res)]
    print(f"{desc} x{n}: fwd {res[0]:.1f} dW {res[1]:.1f} dx {res[2]:.1f} ms")
print(f"total over all occurrences: fwd {total[0]:.1f} dW {total[1]:.1f} dx {total[2]:.1f} ms")
