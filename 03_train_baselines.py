"""Stage 3: the single-objective baselines (MOLMA Sec. 4.3) and Fast RL, with MOLMA's APA machinery.

Every method turns the reward models' scores into ONE reward and trains a single-objective critic,
with "the same hyperparameters as MOLMA training" (Sec. 4.3) and the same APA loop as 02_train_molma.py,
written out in main() below: with one objective there is one loss, one backward and no aligner. Reading
main() beside 02's loop shows what MOLMA adds (K losses, K gradient shards, the AMTL aligner).
  so_help       RMhelp alone: WHITEN(LOGIT(r_help)), standard RLHF with APA
  so_safe       RMsafe alone
  so_weighted   Eq. 4.1: sum_k w_k r_bar_k, the weighted sum of the shaped rewards (w = 1/K by default;
                --weights 0.7,0.3 gives any other point of Figure 4; weights are normalised to sum to 1,
                so the KL penalty of Eq. 3.3 enters once)
  so_piecewise  Eq. 4.2: r_safe where r_safe < delta, else r_help, then WHITEN(LOGIT(.)) (Llama 2)
  fast_rl       Fast RL (Eq. 4-7): weights start at 1/K and follow mirror descent each iteration,
                w_i <- w_i exp(-lambda smooth(r_i) + b_i) / Z, so the lagging objective gains weight;
                composite reward sum_i w_i r_hat_i (Eq. 6) with the KL penalty (Eq. 7)
  lagrangian    Safe RLHF's PPO-Lagrangian (Dai et al. 2023), on APA: maximise helpfulness subject to
                E[cost] <= --cost-threshold, cost = minus the cost model's linear score (RMsafe's objective
                trained with 01 --safety-labels true, so cost > 0 means "labelled unsafe"; ./run.sh passes
                runs/tiny/rm_cost as the safety model). Not in the MOLMA paper; the
                field's standard for this trade-off. Departures from safe-rlhf, on purpose: APA with one critic
                on the combined reward (safe-rlhf: PPO with a reward critic and a cost critic, the advantages
                combined); lambda updated once per iteration from that iteration's mean cost over every
                answer, cut ones too (safe-rlhf: every PPO step, from a window of recent episodes, every episode
                counted); the KL penalty added once to the combined reward.

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import common as C

import bookkeeping as bk

METHODS = ("so_help", "so_safe", "so_weighted", "so_piecewise", "fast_rl", "lagrangian")
OBJECTIVE_SETS = ("help,safe", "help,safe,honest")   # what the scalarised methods combine, in this order


@dataclass
class Args(bk.RLArgs):
    """A single-objective baseline trained with APA."""
    method: str = bk.arg("so_weighted", f"one of {', '.join(METHODS)}")
    objectives: str = bk.arg("help,safe", "what so_weighted, fast_rl and lagrangian combine, in this order: help,safe (the "
                                         "paper's) or help,safe,honest (three objectives)")
    weights: str = bk.arg("", "so_weighted: one weight per objective, e.g. 0.7,0.3 (default: 1/K each, Eq. 4.1)")
    delta: float = bk.arg(0.15, "so_piecewise: safety threshold in probability space (Eq. 4.2). Llama 2 uses 0.15; "
                               "the paper sets it from RMsafe's accuracy")
    fastrl_lambda: float = bk.arg(1.0, "fast_rl: mirror-descent step lambda (Eq. 4)")
    fastrl_smooth: float = bk.arg(0.0, "fast_rl: smooth(r_i) = exponential moving average with this decay (0: none, Eq. 5)")
    fastrl_bias: str = bk.arg("", "fast_rl: per-objective bias b_i, comma list (default 0, Eq. 5)")
    cost_threshold: float = bk.arg(0.0, "lagrangian: d of each constraint mean cost <= d, cost = minus the safety "
                                       "model's linear score (safe-rlhf: d = 0). Give a safety model trained with "
                                       "01 --safety-labels true: its cost > 0 means 'labelled unsafe' (agreement in "
                                       "its run_summary's test_sign); a model trained on pairs alone has no zero")
    lambda_init: bk.Positive[float] = bk.arg(1.0, "lagrangian: initial Lagrange multiplier")
    lambda_lr: bk.Positive[float] = bk.arg(0.1, "lagrangian: learning rate of the dual ascent on log lambda")
    lambda_max: bk.NonNegative[float] = bk.arg(0.0, "lagrangian: cap on lambda (0: none)")
    lambda_delay: bk.NonNegative[int] = bk.arg(0, "lagrangian: iterations before lambda starts to move")


# ---------------------------------------------------------------- the baselines' own math (used by this script only)
def piecewise_reward(help_scores: torch.Tensor, safe_scores: torch.Tensor, delta: float) -> torch.Tensor:
    """Eq. 4.2 before LOGIT/WHITEN: r_safe where r_safe < delta, else r_help.

    help_scores, safe_scores: [B] probabilities -> [B] probabilities.
    """
    return torch.where(safe_scores < delta, safe_scores, help_scores)


def mirror_descent_weights(weights: torch.Tensor, rewards: torch.Tensor, lam: float) -> torch.Tensor:
    """Fast RL, Eq. 4: w_i <- w_i exp(-lam r_i) / Z, so the lagging objective gains weight.

    weights: [K] on the simplex; rewards: [K] each objective's (normalized) reward -> [K].
    Computed in log space so large lam * r does not overflow.
    """
    logits = torch.log(weights) - lam * rewards
    return torch.softmax(logits, dim=0)


def lagrange_log_lambda_step(log_lambda: float, mean_cost: float, threshold: float, lr: float,
                             log_lambda_max: float | None = None) -> float:
    """Safe RLHF's dual ascent on the Lagrange multiplier (PPO-Lagrangian, Dai et al. 2023).

    One SGD step on L(log lambda) = -(J_C - d) * exp(log lambda): log lambda += lr * (J_C - d) * lambda,
    then capped at log_lambda_max. J_C: the batch's mean cost; d: the threshold of the constraint J_C <= d.
    lambda = exp(log lambda) stays positive; it grows while the constraint is violated, shrinks otherwise.
    """
    log_lambda = log_lambda + lr * (mean_cost - threshold) * math.exp(log_lambda)
    return min(log_lambda, log_lambda_max) if log_lambda_max is not None else log_lambda


# ---------------------------------------------------------------- each method's reward: [n, K_rm] probabilities -> [n, 1]
# Called once per iteration with the FINISHED answers' probabilities and the method's state (its parameters); the cut
# answers' reward is set from it by common.shape_finished. Fast RL's weights and the Lagrangian's multipliers move
# first, once per iteration, by their advance_* function, which sees EVERY answer of the batch, cut ones included
# (safe-rlhf counts every episode's cost): their papers' once-per-iteration update, so the state is checkpointed and
# logged (state/...).
def single(probs, state):
    """so_help / so_safe: Eq. 3.4 on the one objective."""
    return C.logit_whiten(probs)


def weighted(probs, state):
    """Eq. 4.1: sum_k w_k r_hat_k; the KL penalty is added once by kl_penalized_rewards (sum w = 1)."""
    w = torch.tensor(state["weights"], device=probs.device)
    return (C.logit_whiten(probs) * w).sum(1, keepdim=True)


def piecewise(probs, state):
    """Eq. 4.2: safety below delta, else helpfulness; then WHITEN(LOGIT(.))."""
    return C.logit_whiten(piecewise_reward(probs[:, 0], probs[:, 1], state["delta"]))[:, None]


def advance_fast_rl(probs, state):
    """Fast RL, Eq. 4-5: the weights' mirror-descent step. It needs each objective's level, so it reads the batch
    mean of the reward-model probabilities of every answer (the whitened rewards have mean 0 by construction)."""
    lam, decay = state["lambda"], state["smooth"]
    level = probs.mean(0)
    if decay > 0 and state.get("smoothed") is not None:                       # Eq. 5's smooth(r_i)
        level = decay * torch.tensor(state["smoothed"], device=probs.device) + (1 - decay) * level
    state["smoothed"] = level.tolist()
    bias = torch.tensor(state["bias"], device=probs.device)
    w = mirror_descent_weights(torch.tensor(state["weights"], device=probs.device), level - bias / lam, lam)  # Eq. 4 / 5
    state["weights"] = w.tolist()                                             # w_pre <- w_cur


def advance_lagrangian(probs, state):
    """Safe RLHF's dual ascent on log lambda (lagrange_log_lambda_step), once per iteration after --lambda-delay
    iterations, from the batch's mean cost over every answer. cost = -s_safe, minus the safety model's linear score
    (LOGIT of its probability). Trained with 01 --safety-labels true (safe-rlhf's per-answer terms, common.sign_loss),
    cost > 0 means the model calls the answer unsafe in the sense of PKU-SafeRLHF's labels, and the constraint
    mean cost <= d has that meaning. With three objectives, one constraint and one multiplier per objective after
    helpfulness (safety, honesty), each moved by its own mean cost."""
    listed = lambda v: v if isinstance(v, list) else [v]     # one number per constraint; one constraint: a number
    packed = lambda v: v[0] if len(v) == 1 else v
    costs = -torch.logit(probs[:, 1:].double().clamp(1e-6, 1 - 1e-6))           # [N, K - 1]
    mean_costs = [costs[:, j].mean().item() for j in range(costs.shape[1])]
    log_lambdas = listed(state["log_lambda"])
    if state["iteration"] >= state["delay"]:
        log_lambdas = [lagrange_log_lambda_step(l, c, state["threshold"], state["lr"], state["log_lambda_max"])
                       for l, c in zip(log_lambdas, mean_costs)]
    state.update({"mean_cost": packed(mean_costs), "log_lambda": packed(log_lambdas),
                  "lambda": packed([math.exp(l) for l in log_lambdas])})
    state["iteration"] += 1


def lagrangian(probs, state):
    """Safe RLHF's objective: (r_help - sum_j lambda_j cost_j) / (1 + sum_j lambda_j), each term after Eq. 3.4's
    shaping. WHITEN(cost) = -WHITEN(LOGIT(p_safe)), so the shaped reward is (r_hat_help + lambda r_hat_safe) /
    (1 + lambda). The KL penalty is added once after."""
    lambdas = state["lambda"] if isinstance(state["lambda"], list) else [state["lambda"]]
    shaped = C.logit_whiten(probs)                                               # [n, K]: r_hat_help, -c_hat_j
    penalty = sum(l * shaped[:, j + 1] for j, l in enumerate(lambdas))
    return ((shaped[:, 0] + penalty) / (1 + sum(lambdas)))[:, None]


def no_update(probs, state):
    """so_help, so_safe, so_weighted, so_piecewise: fixed parameters."""


def method_setup(args):
    """-> (reward-model objectives, critic heads, reward function, state update, initial state) of args.method."""
    if args.objectives not in OBJECTIVE_SETS:
        raise SystemExit(f"--objectives must be one of {', '.join(OBJECTIVE_SETS)}, got {args.objectives!r}")
    K_ALL = args.objectives.split(",")
    if args.method in ("so_help", "so_safe"):
        objective = args.method[3:]
        return [objective], [objective], single, no_update, {}
    if args.method == "so_weighted":
        w = bk.number_list(args.weights, "--weights", len(K_ALL), 1.0 / len(K_ALL))
        if min(w) < 0 or sum(w) <= 0:
            raise SystemExit(f"--weights must be non-negative with a positive sum, got {w}")
        return K_ALL, ["reward"], weighted, no_update, {"weights": [x / sum(w) for x in w]}
    if args.method == "so_piecewise":
        if len(K_ALL) != 2:
            raise SystemExit("so_piecewise is Llama 2's rule for two objectives (safety below delta, else "
                             "helpfulness); it has no third objective to gate. With help,safe,honest use so_weighted, "
                             "fast_rl or lagrangian")
        if not 0 < args.delta < 1:
            raise SystemExit(f"--delta is a probability in (0, 1), got {args.delta}")
        return K_ALL, ["reward"], piecewise, no_update, {"delta": args.delta}
    if args.method == "lagrangian":
        per = (lambda v: v) if len(K_ALL) == 2 else (lambda v: [v] * (len(K_ALL) - 1))    # one per constraint
        return K_ALL, ["reward"], lagrangian, advance_lagrangian, {
            "log_lambda": per(math.log(args.lambda_init)), "lambda": per(args.lambda_init), "mean_cost": None,
            "iteration": 0,
            "threshold": args.cost_threshold, "lr": args.lambda_lr, "delay": args.lambda_delay,
            "log_lambda_max": math.log(args.lambda_max) if args.lambda_max > 0 else None}
    if not math.isfinite(args.fastrl_lambda) or args.fastrl_lambda <= 0:
        raise SystemExit("--fastrl-lambda must be positive")
    # Fast RL's composite (its Eq. 6) is Eq. 4.1's weighted sum, with the weights advance_fast_rl moves (Eq. 4-5)
    return K_ALL, ["reward"], weighted, advance_fast_rl, {"weights": [1.0 / len(K_ALL)] * len(K_ALL), "lambda": args.fastrl_lambda,
                                        "smooth": args.fastrl_smooth, "smoothed": None,
                                        "bias": bk.number_list(args.fastrl_bias, "--fastrl-bias", len(K_ALL), 0.0)}


def main():
    args = bk.parse_args(Args, presets={"tiny": {**bk.RL_TINY}})
    if args.method not in METHODS:
        raise SystemExit(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
    method = args.method
    rm_objectives, heads, shape_scores, advance, state = method_setup(args)     # heads: the ONE objective the critic learns
    out = Path(args.out or f"runs/{'tiny' if args.preset == 'tiny' else 'paper'}/{method}")
    ckpt = out / "checkpoint"
    bk.check_rl_inputs(args, rm_objectives, out)

    # ------------------------------------------------------------ distributed setup, seeds, resuming
    info = C.setup_distributed(args.peer_timeout)
    bk.lock_run_folder(out, method)                    # one writer per folder
    resume = bk.resume_from(ckpt, args.resume, method, args)
    bk.stop_if_finished(ckpt, args.iterations, out, method, args.resume, args)   # finished: nothing to do
    inputs = bk.run_inputs(ckpt, args, resume, method)   # the models and data, fingerprinted: changed ones refused
    stop = bk.StopRequest()
    guard = bk.NonFiniteGuard(args.max_nonfinite_steps, method, ckpt)
    local, local_mb = bk.rl_batch_sizes(args, info.world_size)
    C.set_seed(args.seed)                     # shared by all ranks: the new value head must agree

    # ------------------------------------------------------------ prompts (Table 1), first: as 02
    tokenizer = bk.load_tokenizer(args.policy, args.prompt_template)
    train_prompts = C.load_rl_prompts("train", args.data_root or None, seed=args.seed)
    bk.check_prompt_count(len(train_prompts), args.rollouts, "--rollouts")
    bk.count_cut_prompts(tokenizer, [p for p, _ in train_prompts], args.max_prompt_len, "training prompts",
                        args.prompt_template)

    # ------------------------------------------------------------ the five models (the critic has one output)
    dtype = C.compute_dtype(args.precision, info)                       # into FSDP2 shards, one model at a time
    policy = C.load_sharded(lambda: C.load_causal_lm(args.policy, tokenizer), info, dtype)
    ref = C.load_sharded(lambda: C.load_causal_lm(args.policy, tokenizer), info, dtype).requires_grad_(False)
    critic = C.load_sharded(lambda: C.load_score_model(args.policy, tokenizer, "critic", heads), info, dtype)
    reward_heads = C.load_reward_heads([p for p in args.reward_models.split(",") if p], rm_objectives, tokenizer,
                                       info, dtype)
    reward_models = list({id(m): m for m, _ in reward_heads}.values())
    cost_anchored = method == "lagrangian" and bool(getattr(reward_heads[1][0].config, "safety_labels", False))
    if method == "lagrangian" and not cost_anchored:
        C.print0("[lagrangian] warning: the safety model was trained on pairs alone (Eq. 3.2), which leaves its zero "
                 "arbitrary, so --cost-threshold means nothing measurable; train one with 01_train_reward.py "
                 "--objective safe --safety-labels true and give it in --reward-models")
    if method == "lagrangian" and "honest" in rm_objectives:
        C.print0("[lagrangian] note: honesty's constraint reads RMhonest, trained on UltraFeedback's ratings alone (no "
                 "per-answer labels), so its zero, and --cost-threshold for it, are relative, not 'labelled dishonest'")
    adamw = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, **adamw)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, **adamw)
    models, optimizers = {"policy": policy, "critic": critic}, {"policy": policy_opt, "critic": critic_opt}

    start = 0
    C.set_seed(args.seed + 1 + info.rank)     # sampling: a different stream per rank
    if resume:                                # also restores the method's state (Fast RL's weights)
        trainer = bk.load_rl_checkpoint(ckpt, models, optimizers)
        start, state = trainer["iteration"], trainer["reward_state"]
        C.print0(f"[{method}] resumed from {ckpt} at iteration {start}")

    if args.dry_run:                          # everything is loaded, sharded and checked; one iteration measures memory
        C.print0(f"[{method}] dry run: {bk.rl_dry_run_plan(args, len(train_prompts), local, local_mb, info, dtype, start)}; "
                 f"training one iteration, saving nothing, to measure the memory a run takes")
    metrics = bk.MetricsLog(out / "metrics.jsonl", info.is_main and not args.dry_run, resume_step=start if resume else None,
                           wandb_project=args.wandb_project, config=asdict(args))     # + samples.jsonl, tensorboard/
    clock = bk.PhaseClock()
    C.print0(f"[{method}] {len(train_prompts)} training prompts; {args.iterations} iterations of {args.rollouts} "
             f"rollouts on {info.world_size} ranks; reward models {rm_objectives} -> one reward")

    # ------------------------------------------------------------ the single-objective APA loop (02's, with K = 1)
    t_train = time.perf_counter()
    for it in tqdm(range(start, args.iterations), desc=method, disable=not info.is_main, mininterval=5,
                   initial=start, total=args.iterations):
        clock.start()
        prompts = C.iteration_prompts(train_prompts, it, args.rollouts, args.seed)[info.rank * local : (info.rank + 1) * local]
        r = C.generate_rollouts(policy, tokenizer, [p for p, _ in prompts], args, info.device)
        clock.lap("generation")

        C.score_rollouts(r, policy, ref, critic, reward_heads)
        all_scores, all_ended = C.gather_rows(r.scores), C.gather_rows(r.ended.long()).bool()
        advance(all_scores, state)            # Fast RL's weights, the Lagrangian's lambda: once, from every answer
        # [N, 1]: the method's one reward over the finished answers; one cut at the length limit: truncated_score
        # deviations of that reward below the finished answers' mean
        shaped = C.shape_finished(all_scores, all_ended, lambda x: shape_scores(x, state), args.truncated_score)
        shaped = shaped[info.rank * local : (info.rank + 1) * local]
        rewards = C.kl_penalized_rewards(shaped, r.logprobs, r.ref_logprobs, r.mask, args.kl_beta)   # Eq. 3.3
        r.advantages, r.returns = C.gae(rewards, r.values, r.mask, args.gamma, args.gae_lambda)
        if args.whiten_advantages:        # the policy loss only: the critic's target stays the return (TRL, trlx)
            r.advantages = C.whiten_advantages(r.advantages, r.mask)
        clock.lap("scoring")

        steps = []
        for j in range(0, local, local_mb):
            mb = r.rows(j, j + local_mb)
            where = f"iteration {it + 1}, minibatch {j // local_mb + 1}"
            logprobs = C.response_logprobs(policy, mb.sequences, mb.attention_mask, mb.prompt_len)
            apa = C.apa_loss(logprobs, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)     # Eq. 3.5, [1]
            apa[0].backward()                                                 # one objective: no aligner
            _, norm = guard.step("policy", policy_opt, policy, args.grad_clip, {f"{heads[0]}/apa_loss": apa},
                                 info.device, where)
            values = C.response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len)
            vloss = C.value_loss(values, mb.returns, mb.mask)                         # Eq. 3.6, [1]
            vloss.sum().backward()
            guard.step("critic", critic_opt, critic, args.grad_clip, {"value_loss": vloss}, info.device, where)
            # ======== end of the minibatch's algorithm; below, what it logs
            steps.append(bk.minibatch_stats(apa, vloss, norm))
        clock.lap("update")
        if args.dry_run:                      # one real iteration: its peak memory is the run's (nothing was saved)
            bk.dry_run_exit(method, {"policy": policy, "ref": ref, "critic": critic,
                                    **{f"reward model {i}": m for i, m in enumerate(reward_models)}}, info)

        # ======== end of the iteration's algorithm; below, bookkeeping: metrics and samples, checkpoint or stop
        answers = r.answers(tokenizer)
        truth = bk.tiny_world_truth(args, [p for p, _ in prompts], answers, rm_objectives + args.objectives.split(","))
        record = bk.iteration_metrics(it + 1, r, rewards, rm_objectives, heads, steps, info.device, truth)
        record.update(bk.state_scalars(state, rm_objectives))                      # e.g. Fast RL's weights, lambda
        bk.log_iteration(metrics, it, args, r, answers, rm_objectives, {**record, **guard.counts(), **clock.laps()}, truth)
        bk.checkpoint_or_stop(it + 1, args.iterations, args.save_every, stop, info.device, lambda: bk.save_rl_checkpoint(
            ckpt, models, optimizers,
            {"iteration": it + 1, "reward_state": state, "method": method, "config": asdict(args), "inputs": inputs},
            keep_previous=args.keep_previous),
            method, ckpt, close=[metrics])

    # ------------------------------------------------------------ saving
    metrics.close()
    bk.save_pretrained_folder(policy, out / "policy", tokenizer, args.prompt_template)
    memory = bk.peak_rss_per_rank()                    # a collective: every rank's peak host memory, for the summary
    if info.is_main:
        bk.write_run_summary(out, {"method": method, "objectives": heads, "reward_objectives": rm_objectives,
                                  "omega": [1.0], "state": state, "config": asdict(args), "world_size": info.world_size,
                                  "skipped_rows": C.SKIPPED_ROWS, "peak_rss_bytes_per_rank": memory,
                                  **({"cost_model_sign_anchored": cost_anchored} if method == "lagrangian" else {})}, t_train)
        bk.remove_checkpoint(ckpt, args.keep_checkpoint, method)        # unless --keep-checkpoint
    C.teardown()


if __name__ == "__main__":
    main()
