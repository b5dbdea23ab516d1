"""Make an ImageFolder of JPEG photos of many sizes and modes from the Flowers archive.

Used to check that convlab trains and evaluates on real photos of mixed sizes (BENCHMARKS.md).
Run from a throwaway venv (pillow is not a convlab dependency):

    python3 -m venv /tmp/pv && /tmp/pv/bin/pip install pillow
    mkdir -p target/data && tar -xzf ../shared/data/flowers5-jpg.tar.gz -C target/data
    cd target/data && /tmp/pv/bin/python ../../bench/make_varied_photos.py [DST [PER_CLASS W0 W1 H0 H1]]

PER_CLASS photos per class (150), each resized to a random size in [W0, W1] x [H0, H1]
([40, 500] x [40, 400]); every 7th is greyscale and every 11th is saved as a CMYK JPEG.
Photo-sized inputs for bench/loader_e2e.sh (decoding cost grows with the pixels):

    /tmp/pv/bin/python ../../bench/make_varied_photos.py flowers-large 150 320 640 240 480
"""
import os
import random
import sys

from PIL import Image

random.seed(0)
args = sys.argv[1:]
if len(args) not in (0, 1, 6):
    sys.exit("usage: make_varied_photos.py [DST [PER_CLASS W0 W1 H0 H1]]")
dst = args[0] if args else "flowers-varied"
per_class, w0, w1, h0, h1 = map(int, args[1:6]) if len(args) > 1 else (150, 40, 500, 40, 400)
src = "flowers"
n = 0
for c in sorted(d for d in os.listdir(src) if not d.startswith(".")):
    os.makedirs(f"{dst}/{c}", exist_ok=True)
    for f in sorted(x for x in os.listdir(f"{src}/{c}") if x.endswith(".jpg"))[:per_class]:
        im = Image.open(f"{src}/{c}/{f}").convert("RGB")
        im = im.resize((random.randint(w0, w1), random.randint(h0, h1)))
        if n % 7 == 0:
            im = im.convert("L")
        if n % 11 == 0:
            im = im.convert("CMYK")
        im.save(f"{dst}/{c}/{f}", quality=85)
        n += 1
print(n, "images written to", dst)
