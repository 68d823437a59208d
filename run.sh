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
# `python -m torch.distributed.run` is torchrun; called this way it survives a moved or renamed .venv
torchrun_tiny() { OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"; }

case "${1:-tiny}" in
  test)
    exec python -m pytest -q tests
    ;;
  tiny)
    start=$SECONDS
    python 00_make_tiny_world.py --out "$RUN/world"
    for objective in help safe; do
      torchrun_tiny 01_train_reward.py --preset tiny --objective $objective \
        --base-model "$RUN/world/base" --data-root "$RUN/world/data" --out "$RUN/rm_$objective"
    done
    rl=(--preset tiny --policy "$RUN/world/base" --data-root "$RUN/world/data"
        --reward-models "$RUN/rm_help/model,$RUN/rm_safe/model")
    torchrun_tiny 02_train_molma.py "${rl[@]}" --out "$RUN/molma"
    for method in so_help so_safe so_weighted so_piecewise fast_rl lagrangian; do
      torchrun_tiny 03_train_baselines.py "${rl[@]}" --method $method --out "$RUN/$method"
    done
    torchrun_tiny 04_evaluate.py --preset tiny --runs-dir "$RUN" --policy "$RUN/world/base" \
      --data-root "$RUN/world/data" --reward-models "$RUN/rm_help/model,$RUN/rm_safe/model"
    echo "[run.sh] all stages done in $((SECONDS - start)) s. The report: $RUN/report/report.md"
    ;;
  paper)
    # One node of 8 GPUs. For several nodes, see the README's expanded commands (--nnodes, --rdzv-endpoint).
    # The paper's reward-model batch of 28 does not divide over 8 ranks: 32 is the nearest that does.
    GPUS=${GPUS:-8}
    OUT=${OUT_DIR:-runs/paper}
    # A worker lost to a fault is restarted from the last checkpoint (--resume auto is the default); on
    # SIGTERM / SIGUSR1 the workers finish the iteration and checkpoint, which can take one iteration's
    # time (~11 min at paper scale): torchrun must wait that long before it kills them.
    tr() { python -m torch.distributed.run --standalone --nproc_per_node="$GPUS" --max-restarts=3 \
             --shutdown-timeout=900 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "$@"; }
    tr 01_train_reward.py --objective help --batch-size 32 --out "$OUT/rm_help"
    tr 01_train_reward.py --objective safe --batch-size 32 --out "$OUT/rm_safe"
    tr 02_train_molma.py --reward-models "$OUT/rm_help/model,$OUT/rm_safe/model" --out "$OUT/molma"
    for method in so_help so_safe so_weighted so_piecewise; do
      tr 03_train_baselines.py --method $method --reward-models "$OUT/rm_help/model,$OUT/rm_safe/model" --out "$OUT/$method"
    done
    tr 04_evaluate.py --runs-dir "$OUT" --reward-models "$OUT/rm_help/model,$OUT/rm_safe/model"
    echo "[run.sh] the report: $OUT/report/report.md"
    ;;
  *)
    echo "usage: ./run.sh [tiny|test|paper]" >&2
    exit 2
    ;;
esac
