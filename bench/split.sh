# Sourced by the bench scripts (run from the repository root):
#   link_split OUT SRC NTRAIN NVAL CLASS...
# makes OUT/{train,val}/CLASS of symlinks to the first NTRAIN images of SRC/train/CLASS and the
# first NVAL of SRC/test/CLASS, in name order (the same files every run); does nothing if OUT
# exists. SRC is relative to the repository root.
link_split() {
  local out=$1 src=$2 ntrain=$3 nval=$4 c f train test
  shift 4
  [ -d "$out" ] && return 0
  for c in "$@"; do
    mkdir -p "$out/train/$c" "$out/val/$c"
    # Arrays, not `ls | head`: head closing the pipe early kills ls under pipefail.
    train=($(ls "$src/train/$c")); test=($(ls "$src/test/$c"))
    for f in "${train[@]:0:$ntrain}"; do ln -s "$PWD/$src/train/$c/$f" "$out/train/$c/$f"; done
    for f in "${test[@]:0:$nval}"; do ln -s "$PWD/$src/test/$c/$f" "$out/val/$c/$f"; done
  done
}
