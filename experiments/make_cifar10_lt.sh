#!/usr/bin/env bash
# Builds CIFAR-10-LT (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of
# Samples"): the CIFAR-10 training set cut to a long tail, class i (CIFAR's order, airplane
# first) keeping n_i = floor(5000 * RATIO^(-i/9)) images (the first n_i by file name), and the
# full balanced test set. Symbolic links into the unpacked JPEG archive; nothing is copied.
#   experiments/make_cifar10_lt.sh [RATIO] [SRC] [DEST]
# defaults: RATIO 100, SRC target/data/cifar10 (unpacked from ../shared/data/cifar10-jpg.tar.gz
# when absent), DEST target/data/cifar10-lt-r<RATIO>.
set -euo pipefail
ratio=${1:-100}
src=${2:-target/data/cifar10}
dest=${3:-target/data/cifar10-lt-r$ratio}
if [ ! -d "$src/train" ]; then
    mkdir -p "$src"
    tar -xzf ../shared/data/cifar10-jpg.tar.gz -C "$src"
fi
src=$(cd "$src" && pwd)
rm -rf "$dest"
mkdir -p "$dest/train"
ln -s "$src/test" "$dest/test"
i=0
for dir in "$src"/train/*/; do
    class=$(basename "$dir")
    n=$(python3 -c "import math; print(math.floor(5000 * $ratio ** (-$i / 9)))")
    mkdir -p "$dest/train/$class"
    # awk rather than head, which would close the pipe early (a failure under pipefail).
    find "$dir" -maxdepth 1 -type f -name '*.jpg' | sort | awk -v n="$n" 'NR <= n' |
        while read -r f; do ln -s "$f" "$dest/train/$class/"; done
    echo "$class: $n"
    i=$((i + 1))
done
