#!/usr/bin/env bash
# Side-by-side training-step benchmark: segtrain and PyTorch alternately, ROUNDS times each,
# on the same model and step (U-Net base 16, depth 4, 3×128×128, batch 8, DiceFocal, AdamW).
# Prints every JSON line; summarise with bench/summarise.py.
#   PYTHON=/path/to/python-with-torch bash bench/side_by_side.sh [ROUNDS] [extra segtrain bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
shift || true
PYTHON=${PYTHON:-python3}
cargo build --release -q
for _ in $(seq "$ROUNDS"); do
  ./target/release/segtrain bench --steps 10 "$@"
  OMP_NUM_THREADS=2 "$PYTHON" bench/pytorch_bench.py --steps 10 "$@"
done
