"""Output error of Winograd F(2x2, 3x3) and F(4x4, 3x3) on bf16-rounded operands, against the
direct method on the same rounding: the numbers beside `Tile` in src/kernels/winograd.rs.

One 4x4 output block of a 64-channel 3x3 convolution, random normal input and 0.1-scaled
normal weights (seed 0); the transformed operands (or, for the direct method, the input and
weights) rounded to bf16 to nearest even as convlab's kernels do, products summed exactly.
Prints each method's mean absolute error over the mean output magnitude.

    target/torchvenv/bin/python bench/winograd_bf16_error.py   (numpy from bench/setup.sh's venv)
"""
import numpy as np


def bf16(x):
    """Round to the nearest bf16 (ties to even), back as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


# F(2x2, 3x3): Bᵀ, G, Aᵀ (Lavin & Gray, 2016).
BT2 = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G2 = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
AT2 = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
# F(4x4, 3x3).
BT4 = np.array(
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G4 = np.array(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
AT4 = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float64)


def direct(d, g, m):
    return np.array([[np.sum(d[:, i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])


def winograd(d, g, bt, gm, at, rounding):
    u = np.einsum("ij,cjk,lk->cil", gm, g, gm)
    v = np.einsum("ij,cjk,lk->cil", bt, d, bt)
    return at @ np.sum(rounding(u) * rounding(v), 0) @ at.T


rng = np.random.default_rng(0)
C = 64
d = rng.standard_normal((C, 6, 6))
g = rng.standard_normal((C, 3, 3)) * 0.1
exact = direct(d, g, 4)
scale = np.abs(exact).mean()
err = lambda y: np.abs(y - exact).mean() / scale
f2 = np.zeros((4, 4))
for a in range(2):
    for b in range(2):
        f2[2 * a:2 * a + 2, 2 * b:2 * b + 2] = winograd(
            d[:, 2 * a:2 * a + 4, 2 * b:2 * b + 4], g, BT2, G2, AT2, bf16)
print(f"direct, bf16 operands:          {err(direct(bf16(d), bf16(g), 4)):.2e}")
print(f"F(2x2, 3x3), bf16 operands:     {err(f2):.2e}")
print(f"F(4x4, 3x3), bf16 operands:     {err(winograd(d, g, BT4, G4, AT4, bf16)):.2e}")
print(f"F(4x4, 3x3), exact (float64):   {err(winograd(d, g, BT4, G4, AT4, lambda x: x)):.2e}")
