# Sourced by the peer-comparison scripts (run from the repository root): builds convlab and
# makes the throwaway PyTorch venv (target/torchvenv, or $TORCH_VENV) if it is missing.
# Sets VENV and BIN. PyTorch is never a dependency of convlab or its tests.
VENV=${TORCH_VENV:-target/torchvenv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.9.0 torchvision==0.24.0
fi
cargo build --release -q
BIN=target/release/convlab
