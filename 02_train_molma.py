"""Stage 2: MOLMA, multi-objective RL fine-tuning with APA and the AMTL aligner (Sec. 3.3, Algorithm 1).

Five models: pi_0 (frozen reference, phi-2), the policy (starts as pi_0), the critic (pi_0's backbone with
a value head of K outputs, one per objective) and the reward models (RMhelp and RMsafe from
01_train_reward.py, or one multi-headed model). The loop below is Algorithm 1, top to bottom: sample and
answer; score per objective, shape (Eq. 3.4, 3.3), GAE; then per minibatch K APA losses from ONE forward
pass, K gradients, the aligner that turns them into one update G B omega, one step of the policy and one of
the critic. 03_train_baselines.py is the same loop with a single objective and no aligner: reading the two
side by side shows what MOLMA adds. Beyond the paper, --aligner representation computes B from the K x K Gram
matrix of the losses' gradients at the token log-probs they share and takes the update in ONE backward pass, a
single objective's cost (Aligned-MTL-UB; an approximation, docs/representation_aligner.md).

Tiny world (after stages 0 and 1), 2 processes on CPU:
    torchrun --standalone --nproc_per_node=2 02_train_molma.py --preset tiny
    torchrun --standalone --nproc_per_node=2 02_train_molma.py --preset tiny --resume true   # continue
One node of 8 GPUs, phi-2 and the hub datasets (the paper; --minibatch 8 = one rollout per rank):
    torchrun --standalone --nproc_per_node=8 02_train_molma.py
Several nodes (the same command on each, HOST = node 0; --out on a shared filesystem; rollouts and minibatch
must divide by the total ranks; docs/scale.md, "Several nodes"):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        02_train_molma.py --rollouts 64 --minibatch 16

Writes <out>/metrics.jsonl (one line per iteration: per-objective scores, shaped rewards, APA and value
losses, gradient norms; KL, length, EOS rate, the gradients' cosine, the condition number of G before
and after alignment, seconds per phase), <out>/checkpoint/ (resume), <out>/policy/, <out>/run_summary.json.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import common as C

import bookkeeping as bk


@dataclass
class Args(bk.RLArgs):
    """MOLMA: APA per objective, aligned by AMTL (Algorithm 1). The APA hyperparameters (Sec. 4.3) are
    bookkeeping.RLArgs, shared with the baselines so that both train with "the same hyperparameters"."""
    objectives: str = bk.arg("help,safe", "the objectives, K >= 1, each scored by one reward-model output")
    omega: str = bk.arg("", "task importance omega, comma list (default: equal, 1 each, as the AMTL authors sum)")
    aligner: str = bk.arg("exact", "exact: Algorithm 1, B from the K parameter gradients (K backward passes); "
                                  "representation: B from the gradients of the K losses at the token log-probs they "
                                  "share, then ONE backward of sum_k (B omega)_k L_k (Aligned-MTL-UB, beyond the "
                                  "paper: a single objective's cost, an approximation; docs/representation_aligner.md)")
    compare_exact: bool = bk.arg(False, "with --aligner representation: also form the K parameter gradients every "
                                       "minibatch and log amtl/cos_to_exact (the cosine of the update taken to "
                                       "Algorithm 1's) and cond(G) after each B (a diagnostic: it costs what exact "
                                       "costs)")


def main():
    args = bk.parse_args(Args, presets={"tiny": {**bk.RL_TINY, "out": "runs/tiny/molma"}})
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    K = len(objectives)
    if K == 0:
        raise SystemExit(f"--objectives {args.objectives!r} names no objective; give a comma list such as help,safe")
    omega_list = bk.number_list(args.omega, "--omega", K, 1.0)
    if any(w < 0 for w in omega_list) or sum(omega_list) <= 0:      # a negative importance trains towards harm
        raise SystemExit(f"--omega must be non-negative task importances with a positive sum, got {args.omega}")
    if args.aligner not in ("exact", "representation"):
        raise SystemExit(f"--aligner {args.aligner!r} is not one of exact, representation")
    if args.compare_exact and args.aligner != "representation":
        raise SystemExit("--compare-exact compares the representation aligner with the exact one: it needs "
                         "--aligner representation")
    out = Path(args.out or f"runs/{'tiny' if args.preset == 'tiny' else 'paper'}/molma")
    ckpt = out / "checkpoint"
    bk.check_rl_inputs(args, objectives, out)      # before anything loads: tracking, models, objectives, data, --out

    # ------------------------------------------------------------ distributed setup, seeds, resuming
    info = C.setup_distributed(args.peer_timeout)
    bk.lock_run_folder(out, "molma")                           # one writer per folder
    resume = bk.resume_from(ckpt, args.resume, "molma", args)   # auto: continue a checkpoint of the same config
    bk.stop_if_finished(ckpt, args.iterations, out, "molma", args.resume, args)   # finished: nothing to do
    inputs = bk.run_inputs(ckpt, args, resume, "molma")  # the models and data, fingerprinted: changed ones refused
    stop = bk.StopRequest()                    # SIGTERM / SIGUSR1 / Ctrl-C: finish the iteration, checkpoint, exit
    guard = bk.NonFiniteGuard(args.max_nonfinite_steps, "molma", ckpt)   # a non-finite step is skipped, never taken
    local, local_mb = bk.rl_batch_sizes(args, info.world_size)   # rollouts and minibatch rows of this rank
    omega = torch.tensor(omega_list, device=info.device)
    C.set_seed(args.seed)                     # shared by all ranks: the new value head must agree

    # ------------------------------------------------------------ prompts (Table 1: alpaca 60%, hh-rlhf harmless 40%),
    # first: a data problem (too few prompts, a --max-prompt-len the template fills) stops before any model loads
    tokenizer = bk.load_tokenizer(args.policy, args.prompt_template)
    train_prompts = C.load_rl_prompts("train", args.data_root or None, seed=args.seed)
    bk.check_prompt_count(len(train_prompts), args.rollouts, "--rollouts")
    bk.count_cut_prompts(tokenizer, [p for p, _ in train_prompts], args.max_prompt_len, "training prompts",
                        args.prompt_template)

    # ------------------------------------------------------------ the five models, one at a time into FSDP2 shards
    # (rank 0 reads the weights, the other ranks build on the meta device and receive their shards; a resume then
    # reads the checkpoint's shards of the policy and the critic over them). --precision: bf16 compute on GPU, fp32 on CPU.
    dtype = C.compute_dtype(args.precision, info)
    policy = C.load_sharded(lambda: C.load_causal_lm(args.policy, tokenizer), info, dtype)                    # pi_phi
    ref = C.load_sharded(lambda: C.load_causal_lm(args.policy, tokenizer), info, dtype).requires_grad_(False)   # pi_0
    critic = C.load_sharded(lambda: C.load_score_model(args.policy, tokenizer, "critic", objectives), info, dtype)  # V_psi
    reward_heads = C.load_reward_heads([p for p in args.reward_models.split(",") if p], objectives, tokenizer, info,
                                       dtype)
    reward_models = list({id(m): m for m, _ in reward_heads}.values())                               # frozen
    adamw = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, **adamw)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, **adamw)
    models, optimizers = {"policy": policy, "critic": critic}, {"policy": policy_opt, "critic": critic_opt}

    start = 0
    C.set_seed(args.seed + 1 + info.rank)     # sampling: a different stream per rank
    if resume:                                # optimizer moments, each rank's RNG, the iteration to continue from
        start = bk.load_rl_checkpoint(ckpt, models, optimizers)["iteration"]
        C.print0(f"[molma] resumed from {ckpt} at iteration {start}")

    if args.dry_run:                          # everything is loaded, sharded and checked; one iteration measures memory
        C.print0(f"[molma] dry run: {bk.rl_dry_run_plan(args, len(train_prompts), local, local_mb, info, dtype, start)}; "
                 f"training one iteration, saving nothing, to measure the memory a run takes")
    metrics = bk.MetricsLog(out / "metrics.jsonl", info.is_main and not args.dry_run, resume_step=start if resume else None,
                           wandb_project=args.wandb_project, config=asdict(args))     # + samples.jsonl, tensorboard/
    clock = bk.PhaseClock()
    C.print0(f"[molma] {len(train_prompts)} training prompts; {args.iterations} iterations of {args.rollouts} "
             f"rollouts on {info.world_size} ranks; objectives {objectives}, omega {omega_list}")

    # ------------------------------------------------------------ Algorithm 1
    t_train = time.perf_counter()
    for it in tqdm(range(start, args.iterations), desc="molma", disable=not info.is_main, mininterval=5,
                   initial=start, total=args.iterations):
        clock.start()
        # line 3: sample prompts from the dataset and answer them with the current policy (experience memory)
        prompts = C.iteration_prompts(train_prompts, it, args.rollouts, args.seed)[info.rank * local : (info.rank + 1) * local]
        r = C.generate_rollouts(policy, tokenizer, [p for p, _ in prompts], args, info.device)
        clock.lap("generation")

        # log pi_old, log pi_0, V_old per objective, and each reward model's probability sigmoid(r_k)
        C.score_rollouts(r, policy, ref, critic, reward_heads)
        all_scores, all_ended = C.gather_rows(r.scores), C.gather_rows(r.ended.long()).bool()   # [N, K]: every rank's
        # Eq. 3.4: WHITEN(LOGIT(r_k)) over the batch's finished answers; one cut at the length limit: a fixed low score
        shaped = C.shape_finished(all_scores, all_ended, C.logit_whiten, args.truncated_score)
        shaped = shaped[info.rank * local : (info.rank + 1) * local]
        rewards = C.kl_penalized_rewards(shaped, r.logprobs, r.ref_logprobs, r.mask, args.kl_beta)  # Eq. 3.3: [B, T, K]
        r.advantages, r.returns = C.gae(rewards, r.values, r.mask, args.gamma, args.gae_lambda)   # GAE, per objective
        if args.whiten_advantages:            # optional, off by default; the critic's target stays the return (TRL, trlx)
            r.advantages = C.whiten_advantages(r.advantages, r.mask)
        clock.lap("scoring")

        steps = []
        for j in range(0, local, local_mb):                                 # one gradient step per minibatch
            mb = r.rows(j, j + local_mb)
            where = f"iteration {it + 1}, minibatch {j // local_mb + 1}"
            # lines 4-5: the K APA losses (Eq. 3.5) from ONE forward pass of the policy
            logprobs = C.response_logprobs(policy, mb.sequences, mb.attention_mask, mb.prompt_len)
            apa = C.apa_loss(logprobs, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)     # [K]
            losses = {f"{o}/apa_loss": apa[k] for k, o in enumerate(objectives)}
            aligned = agreement = None
            if K == 1:                        # the aligner is the identity for K = 1: plain APA, as so_help
                apa[0].backward()
            elif args.aligner == "exact":
                # lines 6-7: K backward passes through the same graph; each rank keeps only its shards [K, D_local]
                grads = C.objective_gradients(policy, apa)
                if guard.check("policy", {**losses, "the objectives' gradients": grads}, info.device, where):
                    # lines 8-13: M = G^T G (one all-reduce of K x K numbers), B = sqrt(l_min) V S^-1 V^T, G B omega
                    update, gram, B = C.amtl_align_sharded(grads, omega)
                    C.set_flat_grad(policy, update)
                    aligned = (gram, B)
            elif guard.check("policy", losses, info.device, where):    # --aligner representation (beyond the paper)
                # lines 8-12 on e_k = dL_k/dlogpi: M_z = E E^T from the losses alone, no backward through the network
                weights, gram, B = C.amtl_align_representation(apa, logprobs, omega)
                if args.compare_exact:        # a diagnostic: the same update from the K gradients, and its cosine
                    agreement = bk.compare_with_exact(policy, apa, B, omega)
                else:                         # lines 6-7 and 13 in ONE backward: G (B omega) = grad sum_k w_k L_k
                    (apa * weights).sum().backward()
                aligned = (gram, B)
            # line 14: phi <- phi - eta G B omega (clipped; skipped if anything is not finite)
            took, norm = guard.step("policy", policy_opt, policy, args.grad_clip, losses, info.device, where)
            # Eq. 3.6-3.7: the value terms of L_k belong to the critic, a separate network: one step on their sum
            values = C.response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len)
            vloss = C.value_loss(values, mb.returns, mb.mask)                     # [K]
            vloss.sum().backward()
            guard.step("critic", critic_opt, critic, args.grad_clip, {"value_loss": vloss}, info.device, where)
            # ======== end of the minibatch's algorithm; below, what it logs
            steps.append(bk.minibatch_stats(apa, vloss, norm, aligned if took else None, agreement if took else None))
        clock.lap("update")
        if args.dry_run:                      # one real iteration: its peak memory is the run's (nothing was saved)
            bk.dry_run_exit("molma", {"policy": policy, "ref": ref, "critic": critic,
                                     **{f"reward model {i}": m for i, m in enumerate(reward_models)}}, info)

        # ======== end of Algorithm 1's iteration; below, bookkeeping: metrics and samples, checkpoint or stop
        answers = r.answers(tokenizer)
        truth = bk.tiny_world_truth(args, [p for p, _ in prompts], answers, objectives)
        record = bk.iteration_metrics(it + 1, r, rewards, objectives, objectives, steps, info.device, truth)
        bk.log_iteration(metrics, it, args, r, answers, objectives, {**record, **guard.counts(), **clock.laps()}, truth)
        bk.checkpoint_or_stop(it + 1, args.iterations, args.save_every, stop, info.device, lambda: bk.save_rl_checkpoint(
            ckpt, models, optimizers,
            {"iteration": it + 1, "reward_state": {}, "method": "molma", "config": asdict(args), "inputs": inputs},
            keep_previous=args.keep_previous),
            "molma", ckpt, close=[metrics])

    # ------------------------------------------------------------ saving: the trained policy, for evaluation and users
    metrics.close()
    bk.save_pretrained_folder(policy, out / "policy", tokenizer, args.prompt_template)
    memory = bk.peak_rss_per_rank()                    # a collective: every rank's peak host memory, for the summary
    if info.is_main:
        bk.write_run_summary(out, {"method": "molma", "objectives": objectives, "reward_objectives": objectives,
                                  "omega": omega_list, "state": {}, "config": asdict(args),
                                  "world_size": info.world_size, "skipped_rows": C.SKIPPED_ROWS,
                                  "peak_rss_bytes_per_rank": memory}, t_train)
        bk.remove_checkpoint(ckpt, args.keep_checkpoint, "molma")       # unless --keep-checkpoint
    C.teardown()


if __name__ == "__main__":
    main()
