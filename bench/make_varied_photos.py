"""Make an ImageFolder of JPEG photos of many sizes and modes from the Flowers archive.

Used to check that convlab trains and evaluates on real photos of mixed sizes (BENCHMARKS.md).
Run from a throwaway venv (pillow is not a convlab dependency):

    python3 -m venv /tmp/pv && /tmp/pv/bin/pip install pillow
    mkdir -p target/data && tar -xzf ../shared/data/flowers5-jpg.tar.gz -C target/data
    cd target/data && /tmp/pv/bin/python ../../bench/make_varied_photos.py

150 photos per class, each resized to a random size in [40, 500] x [40, 400]; every 7th is
greyscale and every 11th is saved as a CMYK JPEG.
"""
import os
import random

from PIL import Image

random.seed(0)
src, dst = "flowers", "flowers-varied"
n = 0
for c in sorted(d for d in os.listdir(src) if not d.startswith(".")):
    os.makedirs(f"{dst}/{c}", exist_ok=True)
    for f in sorted(x for x in os.listdir(f"{src}/{c}") if x.endswith(".jpg"))[:150]:
        im = Image.open(f"{src}/{c}/{f}").convert("RGB")
        im = im.resize((random.randint(40, 500), random.randint(40, 400)))
        if n % 7 == 0:
            im = im.convert("L")
        if n % 11 == 0:
            im = im.convert("CMYK")
        im.save(f"{dst}/{c}/{f}", quality=85)
        n += 1
print(n, "images written to", dst)
