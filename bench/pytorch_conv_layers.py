"""PyTorch's bf16 channels-last convolutions per layer, for convlab's `conv_layers` example to
be read against: resnet18's 3x3 layers at 224 px, forward (no grad), weight gradient and input
gradient (`aten.convolution_backward` with one output asked for), fastest of 7 after 3 warm-up
calls, ms. Throwaway venv only (bench/setup.sh):
    target/torchvenv/bin/python bench/pytorch_conv_layers.py [THREADS] [BATCH]
"""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
torch.set_num_threads(threads)
layers = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2),
          (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1)]
print(f"torch {torch.__version__}, {threads} threads, batch {batch}, bf16 channels-last")
for cin, cout, h, s in layers:
    cl = torch.channels_last
    x = torch.randn(batch, cin, h, h).to(torch.bfloat16).to(memory_format=cl)
    conv = torch.nn.Conv2d(cin, cout, 3, s, 1, bias=False).to(torch.bfloat16).to(memory_format=cl)
    with torch.no_grad():
        g = torch.randn_like(conv(x))

    def fwd():
        with torch.no_grad():
            conv(x)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, conv.weight, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, mask)

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
    print(f"{cin}->{cout} {h}px 3x3/{s}: fwd {res[0]:.1f} dW {res[1]:.1f} dx {res[2]:.1f} ms")
