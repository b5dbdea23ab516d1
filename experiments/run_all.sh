#!/usr/bin/env bash
# Runs every shipped experiment into experiments/results/<name>/ (cells are ignored by git;
# results.md, results.csv and cells.csv are committed). Resumable: run it again after an
# interruption and only the missing cells train.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
for e in ${@:-ensemble pooling kernels tricks regularisation depth init precision grad_accum}; do
  ./target/release/convlab experiment experiments/$e.toml --out experiments/results/$e --threads 2
done
