#!/usr/bin/env bash
# Two builds of the `conv_layers` example, alternated ROUNDS times on the same layers, with the
# fastest and the median time of each product (forward, weight gradient, input gradient) per
# layer and build. On a VM whose speed drifts by 20-40% over minutes, runs seconds apart and
# their minimum resolve a kernel change that single runs do not.
#   bench/conv_layers_ab.sh OLD_BIN NEW_BIN ROUNDS ONLY PRECISION MODEL SIZE BATCH
# e.g. build the example at two commits, copy each `target/release/examples/conv_layers` aside,
#   bench/conv_layers_ab.sh /tmp/cl_old /tmp/cl_new 5 "px 3x3/1" bf16 resnet18 224 32
# ONLY is CONV_LAYERS_ONLY (a substring of the layer's description; "->" keeps them all).
# Each run uses 2 threads.
set -euo pipefail
if [ $# -lt 8 ]; then
  echo "usage: $0 OLD_BIN NEW_BIN ROUNDS ONLY PRECISION MODEL SIZE BATCH" >&2
  exit 2
fi
OLD=$1 NEW=$2 ROUNDS=$3 ONLY=$4
shift 4
for bin in "$OLD" "$NEW"; do
  [ -x "$bin" ] || { echo "$0: $bin is not an executable conv_layers build" >&2; exit 2; }
done
out=$(mktemp)
for _ in $(seq "$ROUNDS"); do
  for b in old new; do
    bin=$OLD; [ $b = new ] && bin=$NEW
    if ! run=$(CONV_LAYERS_ONLY="$ONLY" "$bin" 2 "$@" 2>&1); then
      echo "$0: $bin 2 $* failed:" >&2; echo "$run" >&2; exit 1
    fi
    echo "$run" | grep -E '^ *[0-9]+->[0-9]+ .* fwd' |
      awk -v b=$b '{print b, $1"_"$2"_"$3, $6, $(NF-6), $(NF-3)}' >> "$out" ||
      { echo "$0: no layer of $* matches ONLY=\"$ONLY\"" >&2; exit 1; }
  done
done
python3 - "$out" <<'PY'
import collections, statistics, sys
d = collections.defaultdict(list)
order = []
for line in open(sys.argv[1]):
    b, layer, f, dw, dx = line.split()
    if layer not in order:
        order.append(layer)
    d[(layer, b)].append((float(f), float(dw), float(dx.rstrip(','))))
print("layer | build | fwd min / median ms | dW min / median | dx min / median")
for layer in order:
    for b in ("old", "new"):
        v = d[(layer, b)]
        cols = [f"{min(x[i] for x in v):.1f} / {statistics.median(x[i] for x in v):.1f}" for i in range(3)]
        print(f"{layer} | {b} | " + " | ".join(cols))
PY
rm -f "$out"
