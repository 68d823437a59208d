"""Stage 3: the single-objective baselines (MOLMA Sec. 4.3) and Fast RL, with MOLMA's APA machinery.

Every method turns the reward models' scores into ONE reward and trains a single-objective critic,
with "the same hyperparameters as MOLMA training" (Sec. 4.3) and the same loop (common.run_rl):
  so_help       RMhelp alone: WHITEN(LOGIT(r_help)), standard RLHF with APA
  so_safe       RMsafe alone
  so_weighted   Eq. 4.1: sum_k w_k r_bar_k, the weighted sum of the shaped rewards (w = 1/K by default;
                --weights 0.7,0.3 gives any other point of Figure 4; weights are normalised to sum to 1,
                so the KL penalty of Eq. 3.3 enters once)
  so_piecewise  Eq. 4.2: r_safe where r_safe < delta, else r_help, then WHITEN(LOGIT(.)) (Llama 2)
  fast_rl       Fast RL (Eq. 4-7): weights start at 1/K and follow mirror descent each iteration,
                w_i <- w_i exp(-lambda smooth(r_i) + b_i) / Z, so the lagging objective gains weight;
                composite reward sum_i w_i r_hat_i (Eq. 6) with the KL penalty (Eq. 7)

Tiny world (after stages 0 and 1), 2 processes on CPU:
    torchrun --standalone --nproc_per_node=2 03_train_baselines.py --preset tiny --method so_weighted
    for w in 0.1 0.3 0.7 0.9; do                                     # Figure 4's weight sweep
      torchrun --standalone --nproc_per_node=2 03_train_baselines.py --preset tiny --method so_weighted \\
          --weights $w,$(python -c "print(round(1-$w, 2))") --out runs/tiny/so_weighted_w$w; done
One node of 8 GPUs (the paper):
    torchrun --standalone --nproc_per_node=8 03_train_baselines.py --method so_piecewise
Several nodes: as for 02_train_molma.py (--nnodes, --rdzv-endpoint).

Writes the same files as stage 2, so that 04_evaluate.py treats every run alike; run_summary.json
records the method, its weights (Fast RL: the final ones; metrics.jsonl has them every iteration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import common as C

METHODS = ("so_help", "so_safe", "so_weighted", "so_piecewise", "fast_rl")
K_ALL = ["help", "safe"]          # the objectives the scalarised methods combine, in this order


@dataclass
class Args(C.RLArgs):
    """A single-objective baseline trained with APA."""
    method: str = C.arg("so_weighted", f"one of {', '.join(METHODS)}")
    weights: str = C.arg("", "so_weighted: help,safe weights (default: 1/K each, Eq. 4.1)")
    delta: float = C.arg(0.15, "so_piecewise: safety threshold in probability space (Eq. 4.2). Llama 2 uses 0.15; "
                               "the paper sets it from RMsafe's accuracy")
    fastrl_lambda: float = C.arg(1.0, "fast_rl: mirror-descent step lambda (Eq. 4)")
    fastrl_smooth: float = C.arg(0.0, "fast_rl: smooth(r_i) = exponential moving average with this decay (0: none, Eq. 5)")
    fastrl_bias: str = C.arg("", "fast_rl: per-objective bias b_i, comma list (default 0, Eq. 5)")


# ---------------------------------------------------------------- each method's reward: [N, K_rm] probabilities -> [N, 1]
# Pure functions of the batch's probabilities and the method's state (its parameters, Fast RL's weights).
def single(probs, state):
    """so_help / so_safe: Eq. 3.4 on the one objective."""
    return C.logit_whiten(probs)


def weighted(probs, state):
    """Eq. 4.1: sum_k w_k r_hat_k; the KL penalty is added once by kl_penalized_rewards (sum w = 1)."""
    w = torch.tensor(state["weights"], device=probs.device)
    return (C.logit_whiten(probs) * w).sum(1, keepdim=True)


def piecewise(probs, state):
    """Eq. 4.2: safety below delta, else helpfulness; then WHITEN(LOGIT(.))."""
    return C.logit_whiten(C.piecewise_reward(probs[:, 0], probs[:, 1], state["delta"]))[:, None]


def fast_rl(probs, state):
    """Fast RL, Eq. 4-6. The weight update needs each objective's level, so it reads the batch mean of the
    reward-model probabilities (the whitened rewards have mean 0 by construction); the composite uses the
    whitened rewards, as every method here does."""
    lam, decay = state["lambda"], state["smooth"]
    level = probs.mean(0)
    if decay > 0 and state.get("smoothed") is not None:                       # Eq. 5's smooth(r_i)
        level = decay * torch.tensor(state["smoothed"], device=probs.device) + (1 - decay) * level
    state["smoothed"] = level.tolist()
    bias = torch.tensor(state["bias"], device=probs.device)
    w = C.mirror_descent_weights(torch.tensor(state["weights"], device=probs.device), level - bias / lam, lam)  # Eq. 4 / 5
    state["weights"] = w.tolist()                                             # w_pre <- w_cur
    return (C.logit_whiten(probs) * w).sum(1, keepdim=True)                   # Eq. 6; Eq. 7's KL is added after


def parse_list(text, n, what, default):
    values = [float(x) for x in text.split(",")] if text else [default] * n
    if len(values) != n:
        raise SystemExit(f"{what} needs {n} comma-separated values, got {text!r}")
    return values


def method_setup(args):
    """-> (reward-model objectives, critic heads, reward function, initial state) of args.method."""
    if args.method in ("so_help", "so_safe"):
        objective = args.method[3:]
        return [objective], [objective], single, {}
    if args.method == "so_weighted":
        w = parse_list(args.weights, len(K_ALL), "--weights", 1.0 / len(K_ALL))
        if min(w) < 0 or sum(w) <= 0:
            raise SystemExit(f"--weights must be non-negative with a positive sum, got {w}")
        return K_ALL, ["reward"], weighted, {"weights": [x / sum(w) for x in w]}
    if args.method == "so_piecewise":
        if not 0 < args.delta < 1:
            raise SystemExit(f"--delta is a probability in (0, 1), got {args.delta}")
        return K_ALL, ["reward"], piecewise, {"delta": args.delta}
    if not math.isfinite(args.fastrl_lambda) or args.fastrl_lambda <= 0:
        raise SystemExit("--fastrl-lambda must be positive")
    return K_ALL, ["reward"], fast_rl, {"weights": [1.0 / len(K_ALL)] * len(K_ALL), "lambda": args.fastrl_lambda,
                                        "smooth": args.fastrl_smooth, "smoothed": None,
                                        "bias": parse_list(args.fastrl_bias, len(K_ALL), "--fastrl-bias", 0.0)}


if __name__ == "__main__":
    args = C.parse_args(Args, presets={"tiny": {**C.RL_TINY}})
    if args.method not in METHODS:
        raise SystemExit(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
    if not args.out:
        args.out = f"runs/{'tiny' if args.preset == 'tiny' else 'paper'}/{args.method}"
    rm_objectives, heads, shape, state = method_setup(args)
    C.run_rl(args, args.method, rm_objectives, heads, shape, state=state)
