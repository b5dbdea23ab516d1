# Sourced by the bench scripts (run from the repository root):
#   link_split OUT SRC NTRAIN NVAL CLASS...
# makes OUT/{train,val}/CLASS of symlinks to the first NTRAIN images of SRC/train/CLASS and the
# first NVAL of SRC/test/CLASS, in name order (the same files every run); does nothing if OUT
# exists. SRC is relative to the repository root. The split is built beside OUT and renamed
# into place, so an interrupted run leaves no half-made OUT that a later run would reuse.
link_split() {
  local out=$1 src=$2 ntrain=$3 nval=$4 c f train test
  shift 4
  [ -d "$out" ] && return 0
  local tmp="$out.partial"
  rm -rf "$tmp"
  for c in "$@"; do
    for d in "$src/train/$c" "$src/test/$c"; do
      [ -d "$d" ] || { echo "link_split: no folder $d (unpack the data as README.md says)" >&2; return 1; }
    done
    mkdir -p "$tmp/train/$c" "$tmp/val/$c"
    # Arrays, not `ls | head`: head closing the pipe early kills ls under pipefail.
    train=($(ls "$src/train/$c")); test=($(ls "$src/test/$c"))
    for f in "${train[@]:0:$ntrain}"; do ln -s "$PWD/$src/train/$c/$f" "$tmp/train/$c/$f"; done
    for f in "${test[@]:0:$nval}"; do ln -s "$PWD/$src/test/$c/$f" "$tmp/val/$c/$f"; done
  done
  mv "$tmp" "$out"
}
