#!/usr/bin/env bash
# Side-by-side training-step benchmark: segtrain and PyTorch alternately, ROUNDS times each,
# on the same model and step (U-Net base 16, depth 4, 3×128×128, batch 8, DiceFocal, AdamW).
# Prints every JSON line; summarise with bench/summarise.py.
#   PYTHON=/path/to/python-with-torch bash bench/side_by_side.sh [ROUNDS] [extra segtrain bench args]
# Both held to AVX2 on an AVX-512 machine (segtrain built without gemm's AVX-512 kernels):
#   cargo build --release --no-default-features --target-dir target/avx2
#   SEGTRAIN_BIN=target/avx2/release/segtrain SEGTRAIN_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 \
#     ONEDNN_MAX_CPU_ISA=AVX2 PYTHON=... bash bench/side_by_side.sh 5
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
shift || true
PYTHON=${PYTHON:-python3}
if [ -z "${SEGTRAIN_BIN:-}" ]; then
  cargo build --release -q
  SEGTRAIN_BIN=./target/release/segtrain
fi
for _ in $(seq "$ROUNDS"); do
  "$SEGTRAIN_BIN" bench --steps 10 "$@"
  OMP_NUM_THREADS=2 "$PYTHON" bench/pytorch_bench.py --steps 10 "$@"
done
