#!/usr/bin/env bash
# MOLMA, end to end.
#   ./run.sh          tiny world on this machine: every stage 00 -> 04 as torchrun, then prints the report
#   ./run.sh test     the whole test suite
#   ./run.sh paper    the paper's scale: phi-2, the real datasets, 8 GPUs on one node (see README)
# Set-up (all modes): creates .venv if missing and installs the pinned requirements.txt into it.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[run.sh] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.installed-requirements; then
  echo "[run.sh] installing requirements.txt into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.installed-requirements
fi
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1

NPROC=${NPROC:-2}                      # processes for the tiny world (one per CPU core here)
RUN=${RUN:-runs/tiny}                  # where the tiny world and its runs go
torchrun_tiny() { OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node="$NPROC" "$@"; }

case "${1:-tiny}" in
  test)
    exec python -m pytest -q tests
    ;;
  tiny)
    python 00_make_tiny_world.py --out "$RUN/world"
    echo "[run.sh] stages 01-04 are added to this job as their issues land"
    ;;
  paper)
    # One node of 8 GPUs. For several nodes, see the README's expanded commands (--nnodes, --rdzv-endpoint).
    GPUS=${GPUS:-8}
    OUT=${OUT_DIR:-runs/paper}
    torchrun --standalone --nproc_per_node="$GPUS" 01_train_reward.py --objective help --out "$OUT/rm_help"
    torchrun --standalone --nproc_per_node="$GPUS" 01_train_reward.py --objective safe --out "$OUT/rm_safe"
    ;;
  *)
    echo "usage: ./run.sh [tiny|test|paper]" >&2
    exit 2
    ;;
esac
