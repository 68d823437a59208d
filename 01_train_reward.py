"""Stage 1: train the reward models RMhelp and RMsafe (MOLMA Sec. 3.2, Sec. 4.3; Table 1 data).

The base model's language head is replaced by a linear layer with one output per objective
(AutoModelForSequenceClassification), trained with the binary ranking loss of Eq. 3.2 on the
Table 1 mix of its objective. `--objective help,safe` trains one multi-headed model instead (MORM
article): one backbone, one output per objective, the weighted sum of the per-head ranking losses,
each head seeing only the pairs of its own objective.

Tiny world (after 00_make_tiny_world.py), 2 processes on CPU:
    torchrun --standalone --nproc_per_node=2 01_train_reward.py --preset tiny --objective help
    torchrun --standalone --nproc_per_node=2 01_train_reward.py --preset tiny --objective safe
    torchrun --standalone --nproc_per_node=2 01_train_reward.py --preset tiny --objective safe \\
        --safety-labels true --out runs/tiny/rm_cost          # the Lagrangian's cost model (safe-rlhf)
One node of 8 GPUs, phi-2 and the hub datasets (the paper):
    torchrun --standalone --nproc_per_node=8 01_train_reward.py --objective help --batch-size 32
Several nodes (the same command on each, HOST = node 0; --out on a shared filesystem; docs/scale.md, "Several nodes"):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        01_train_reward.py --objective help --batch-size 32
(The paper's batch of 28 pairs does not divide over 8 ranks; 32 is the nearest that does.)

Writes <out>/model (save_pretrained, safetensors, + tokenizer), <out>/metrics.jsonl and
<out>/run_summary.json. The reward used downstream is sigmoid(score) (see common.py). <out>/checkpoint (model,
AdamW, step; every --save-every steps, at the end, and on SIGTERM / SIGUSR1 / Ctrl-C) lets the same command
continue an interrupted run (--resume auto), as in stages 2 and 3.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import common as C

import bookkeeping as bk


@dataclass
class Args(bk.CheckedArgs):
    """Train a reward model with the binary ranking loss (Eq. 3.2)."""
    objective: str = bk.arg("help", "help, safe, honest (UltraFeedback's honesty ratings; the tiny world of three "
                                   "objectives has them), or a comma list (help,safe) for one multi-headed model")
    loss_weights: str = bk.arg("", "multi-headed only: comma list of per-head loss weights (default: equal)")
    base_model: str = bk.arg("microsoft/phi-2", "backbone to start from (hub id or save_pretrained folder)")
    data_root: str = bk.arg("", "local copies of the datasets in their hub schemas; empty: read the hub")
    prompt_template: str = bk.arg("phi2", "prompt format, the same in every stage: phi2, llama2_chat, plain, or "
                                           "chat (the tokenizer's own chat template)")
    precision: str = bk.arg("auto", "auto: bf16 compute with fp32 weights on GPU, fp32 on CPU; or bf16 / fp32")
    out: str = bk.arg("", "run folder (default: runs/paper/rm_<objective>; with --preset tiny, runs/tiny/rm_<objective>)")
    lr: bk.Positive[float] = bk.arg(1e-5, "peak learning rate (Sec. 4.3)")
    min_lr_ratio: bk.Unit[float] = bk.arg(0.1, "cosine decay down to this fraction of lr (Sec. 4.3)")
    beta1: bk.Beta[float] = bk.arg(0.9, "AdamW beta1")
    beta2: bk.Beta[float] = bk.arg(0.95, "AdamW beta2")
    adam_eps: bk.Positive[float] = bk.arg(1e-5, "AdamW eps")
    weight_decay: bk.NonNegative[float] = bk.arg(0.0, "AdamW weight decay")
    batch_size: bk.Positive[int] = bk.arg(28, "pairs per optimizer step, over all ranks (must divide by the world size)")
    epochs: bk.Positive[int] = bk.arg(1, "passes over the training pairs")
    grad_clip: bk.Positive[float] = bk.arg(1.0, "gradient clipping (global norm)")
    max_len: bk.Positive[int] = bk.arg(512, "tokens per prompt + answer; only the prompt is truncated")
    max_pairs: bk.NonNegative[int] = bk.arg(0, "cap on training pairs per objective after mixing (0: all)")
    eval_every: bk.Positive[int] = bk.arg(500, "steps between validation passes")
    max_valid_pairs: bk.Positive[int] = bk.arg(1000, "cap on validation pairs per objective")
    save_every: bk.Positive[int] = bk.arg(500, "steps between checkpoints (<out>/checkpoint); one is also written when a signal "
                                             "(SIGTERM, SIGUSR1, Ctrl-C) stops the run")
    resume: str = bk.arg("auto", "auto|true|false. auto: continue from <out>/checkpoint when there is one (with the "
                                "same arguments), else start; true: a checkpoint is required; false: start over")
    peer_timeout: bk.Positive[float] = bk.arg(600.0, "seconds without a heartbeat from a rank (stopped, stuck, its "
                                                   "host frozen) before the run names it and stops; no collective "
                                                   "waits more than twice this")
    max_nonfinite_steps: bk.Positive[int] = bk.arg(3, "stop after this many optimizer steps in a row with a non-finite "
                                                      "loss (each is skipped: the weights never see it)")
    dry_run: bool = bk.arg(False, "load, shard and check everything, train one step saving nothing, print sizes and "
                                 "the peak memory it took (a run's own stays near it), and exit")
    keep_checkpoint: bool = bk.arg(False, "keep <out>/checkpoint (weights and optimizer state, ~4x the model) after the "
                                           "final save, to train further later; by default it is removed once the "
                                           "run's model and summary are written")
    safety_labels: bool = bk.arg(False, "safe head: also fit the score's sign to PKU-SafeRLHF's per-answer labels "
                                       "(is_response_*_safe), as safe-rlhf's cost model does, so score > 0 means "
                                       "safe and 03's Lagrangian threshold means something (common.sign_loss)")
    ground_truth: bool = bk.arg(False, "tiny world only: also report accuracy against tiny_world.ground_truth")
    wandb_project: str = bk.arg("", "also log to this Weights & Biases project (needs `pip install wandb`)")
    seed: int = bk.arg(0, "seed")


PRESETS = {"tiny": dict(base_model="runs/tiny/world/base", data_root="runs/tiny/world/data", lr=3e-4,
                        max_len=96, eval_every=40, max_valid_pairs=400, ground_truth=True)}


# ---------------------------------------------------------------- the pieces of the loop
def pairs_for(objectives: list[str], split: str, limit: int | None, data_root: str | None, seed: int) -> list:
    """Table 1's mix of each objective's pairs -> [(head, Pair)], the head being the objective's output."""
    tagged = []
    for head, obj in enumerate(objectives):
        tagged += [(head, p) for p in C.load_preference_pairs(obj, split, data_root, limit=limit, seed=seed)]
    return tagged


def batch_scores(model, tokenizer, batch: list, args: Args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[(head, Pair)] -> (chosen scores [n], rejected scores [n]) of each pair's own head."""
    n = len(batch)
    prompts = [p.prompt for _, p in batch] * 2
    answers = [p.chosen for _, p in batch] + [p.rejected for _, p in batch]
    ids, mask, _ = C.encode_pairs(tokenizer, prompts, answers, args.max_len, args.prompt_template)
    scores = C.sequence_scores(model, ids.to(device), mask.to(device))      # [2n, heads]
    heads = torch.tensor([h for h, _ in batch] * 2, device=device)
    s = scores.gather(1, heads[:, None]).squeeze(1)
    return s[:n], s[n:]


def labelled_pairs(batch: list, chosen: torch.Tensor, rejected: torch.Tensor, safe_head: int):
    """The safe head's pairs whose two answers carry safety labels -> (chosen [m], rejected [m], their labels
    [m] bool, [m] bool); chosen is the safer answer."""
    rows = [i for i, (h, p) in enumerate(batch) if h == safe_head and p.chosen_safe is not None]
    label = lambda which: torch.tensor([getattr(batch[i][1], which) for i in rows], dtype=torch.bool,
                                       device=chosen.device)
    return chosen[rows], rejected[rows], label("chosen_safe"), label("rejected_safe")


@torch.no_grad()
def evaluate(model, tokenizer, pairs: list, objectives: list[str], args: Args, info: C.DistInfo) -> dict:
    """Accuracy (chosen scored above rejected) per objective and source, over all ranks; for the safe head, how often
    the score's sign agrees with the answers' safety labels. With --ground-truth (the tiny world), also against the
    world's true scores (pairs whose truths tie are left out)."""
    W = None
    if args.ground_truth:                          # the tiny world only: never imported at paper scale
        import tiny_world as W
    local_bs = args.batch_size // info.world_size
    keys = sorted({(objectives[h], p.source) for h, p in pairs})
    counts = {k: [0.0, 0.0, 0.0, 0.0] for k in keys}      # correct, total, correct vs truth, total vs truth
    signs = [0.0, 0.0, 0.0]            # labelled answers: score > 0 agrees with the label; with the truth; how many
    mine = pairs[info.rank :: info.world_size]
    n_batches = math.ceil(len(pairs) / info.world_size / local_bs)   # the same on every rank (FSDP collectives)
    for i in range(n_batches):
        batch = mine[i * local_bs : (i + 1) * local_bs] or pairs[:1]   # a rank out of pairs scores a dummy
        c, r = batch_scores(model, tokenizer, batch, args, info.device)
        if i * local_bs >= len(mine):
            continue
        for (h, p), sc, sr in zip(batch, c.tolist(), r.tolist()):
            if objectives[h] == "safe" and p.chosen_safe is not None:
                for a, score, label in ((p.chosen, sc, p.chosen_safe), (p.rejected, sr, p.rejected_safe)):
                    signs[0] += (score > 0) == label
                    signs[1] += bool(W) and (score > 0) == (W.ground_truth(p.prompt, a)[1] > 0.5)
                    signs[2] += 1
        for (h, p), win in zip(batch, (c > r).tolist()):
            k = counts[(objectives[h], p.source)]
            k[0] += win
            k[1] += 1
            if W:
                tc, tr = (W.truths(p.prompt, a, (objectives[h],))[0] for a in (p.chosen, p.rejected))
                if abs(tc - tr) > 1e-9:
                    k[2] += win == (tc > tr)
                    k[3] += 1
    flat = bk.all_reduce_sum([x for k in keys for x in counts[k]] + signs, info.device)
    signs, flat = flat[-3:], flat[:-3]
    result = {}
    if signs[2]:     # the meaning of the safe score's zero: how often "score > 0" (cost < 0) says "safe" rightly
        result["safe/sign_agrees_label"] = signs[0] / signs[2]
        result["safe/labelled_answers"] = int(signs[2])
        if W:
            result["safe/sign_agrees_truth"] = signs[1] / signs[2]
    for i, (obj, src) in enumerate(keys):
        c, n, cg, ng = flat[4 * i : 4 * i + 4]
        result[f"{obj}/{src}/acc"] = c / max(n, 1)
        result[f"{obj}/{src}/n"] = int(n)
        if W:
            result[f"{obj}/{src}/acc_truth"] = cg / max(ng, 1)
    for obj in objectives:
        c = sum(flat[4 * i] for i, k in enumerate(keys) if k[0] == obj)
        n = sum(flat[4 * i + 1] for i, k in enumerate(keys) if k[0] == obj)
        result[f"{obj}/acc"] = c / max(n, 1)
    return result


def main():
    args = bk.parse_args(Args, presets=PRESETS)

    # ---------------------------------------------------------------- setup
    objectives = [o.strip() for o in args.objective.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in C.PAIR_MIXES]
    if not objectives or unknown:
        raise SystemExit(f"--objective {args.objective!r}: unknown {unknown}; accepted: {', '.join(C.PAIR_MIXES)} "
                         f"or a comma list of them")
    weights = bk.number_list(args.loss_weights, "--loss-weights", len(objectives), 1.0 / len(objectives))
    if args.safety_labels and "safe" not in objectives:
        raise SystemExit("--safety-labels true trains the safe head's sign; --objective has no 'safe'")
    out = Path(args.out or f"runs/{'tiny' if args.preset == 'tiny' else 'paper'}/rm_{'_'.join(objectives)}")
    data_root = args.data_root or None
    bk.check_model_folder(args.base_model, "--base-model")
    bk.check_can_build(args.base_model, "--base-model", ("backbone",))     # from its config: a head on its backbone
    bk.check_data_files(data_root, [src for o in objectives for src in C.PAIR_MIXES[o]])
    bk.check_tracking(args.wandb_project)
    bk.check_output_folder(out)

    ckpt = out / "checkpoint"

    info = C.setup_distributed(args.peer_timeout)
    bk.lock_run_folder(out, "01")                   # one writer per folder
    resume = bk.resume_from(ckpt, args.resume, "01", args)   # auto: continue a checkpoint of the same config
    bk.stop_if_finished(ckpt, None, out, "01", args.resume, args)   # a finished run: nothing to do
    inputs = bk.run_inputs(ckpt, args, resume, "01")     # the base model and data, fingerprinted: changed ones refused
    stop = bk.StopRequest()                         # SIGTERM / SIGUSR1 / Ctrl-C: finish the step, checkpoint, exit
    if args.batch_size % info.world_size:
        ok = [b for b in range(max(info.world_size, args.batch_size - 8), args.batch_size + 9)
              if b % info.world_size == 0]
        bk.fail(f"--batch-size {args.batch_size} does not divide over {info.world_size} processes; "
               f"use one of {ok} or a world size that divides it")
    local_bs = args.batch_size // info.world_size
    C.set_seed(args.seed)                          # same seed on every rank: the new heads must agree
    guard = bk.NonFiniteGuard(args.max_nonfinite_steps, "01", ckpt)   # a non-finite step is skipped, never taken
    t_start = time.time()

    # ---------------------------------------------------------------- data: Table 1 mix per objective, tagged by head
    train = pairs_for(objectives, "train", args.max_pairs or None, data_root, args.seed)
    valid = pairs_for(objectives, "valid", args.max_valid_pairs, data_root, args.seed)
    random.Random(args.seed).shuffle(train)
    steps_per_epoch = len(train) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    if total_steps == 0:
        bk.fail(f"{len(train)} training pairs cannot fill one batch of --batch-size {args.batch_size} "
               f"(or --epochs is 0); lower the batch size or add data")
    C.print0(f"[01] {objectives}: {len(train)} training pairs ({len(train) - steps_per_epoch * args.batch_size} left out "
             f"per epoch to keep full batches), {len(valid)} validation pairs, {total_steps} steps on "
             f"{info.world_size} ranks")

    # ---------------------------------------------------------------- models
    tokenizer = bk.load_tokenizer(args.base_model, args.prompt_template)
    # rank 0 reads the weights, the other ranks build on the meta device and receive their shards (one full copy per
    # node); a resume then reads the checkpoint's shards over them
    model = C.load_sharded(lambda: C.load_score_model(args.base_model, tokenizer, "reward", labels=objectives), info,
                           C.compute_dtype(args.precision, info))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    schedule = C.cosine_schedule(optimizer, total_steps, args.min_lr_ratio)     # Sec. 4.3: cosine down to 10%
    start = 0
    if resume:                                     # AdamW's moments, the step to continue from, the schedule there
        state = bk.load_rl_checkpoint(ckpt, {"model": model}, {"model": optimizer})
        start = state["iteration"]
        if "scheduler" not in state:
            raise SystemExit(f"{ckpt} was written by an earlier version of 01 (no scheduler state): start over with "
                             f"--resume false")
        schedule.load_state_dict(state["scheduler"])        # the cosine schedule where it stopped
        C.print0(f"[01] resumed from {ckpt} at step {start} of {total_steps}")


    # ---------------------------------------------------------------- the loop
    if args.dry_run:           # loaded, sharded, data and batch sizes checked; one step measures memory
        C.print0(f"[01] dry run: {total_steps} steps of {args.batch_size} pairs ({local_bs} per rank) on "
                 f"{info.world_size} ranks; training one step, saving nothing, to measure the memory a run takes")
    metrics = bk.MetricsLog(out / "metrics.jsonl", info.is_main and not args.dry_run,
                           resume_step=start if resume else None, wandb_project=args.wandb_project, config=asdict(args))
    bar = tqdm(total=total_steps, initial=start, desc="reward model", disable=not info.is_main or args.dry_run,
               mininterval=5)
    final = None
    for step in range(start, total_steps):
        epoch, b = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(args.seed + epoch).shuffle(order)        # the same order on every rank, and on resume
        global_batch = [train[i] for i in order[b * args.batch_size : (b + 1) * args.batch_size]]
        batch = global_batch[info.rank * local_bs : (info.rank + 1) * local_bs]
        chosen, rejected = batch_scores(model, tokenizer, batch, args, info.device)
        heads = torch.tensor([h for h, _ in batch], device=info.device)
        # Eq. 3.2 per head; the multi-headed model sums them with the loss weights (MORM article)
        loss = sum(w * C.ranking_loss(chosen[heads == h], rejected[heads == h])
                   for h, w in enumerate(weights) if (heads == h).any())
        if args.safety_labels:            # safe-rlhf's cost model: each labelled answer's score takes its label's sign
            safer, unsafer, safer_ok, unsafer_ok = labelled_pairs(batch, chosen, rejected, objectives.index("safe"))
            if len(safer):                        # per pair, as safe-rlhf: both answers' sign terms beside Eq. 3.2's
                loss = loss + weights[objectives.index("safe")] * C.sign_loss(safer, unsafer, safer_ok, unsafer_ok)
        loss.backward()
        # clip, then step, or skip a non-finite step (the weights never see it), and zero the gradients
        _, grad_norm = guard.step("reward model", optimizer, model, args.grad_clip, {"loss": loss}, info.device,
                                  f"step {step + 1}")
        schedule.step()
        if args.dry_run:                          # one real step: its peak memory is the run's (nothing was saved)
            bk.dry_run_exit("01", {"reward model": model}, info, "one training step")
        # ======== end of the step; below, bookkeeping: metrics, validation, checkpoint or stop
        acc = (chosen > rejected).float().mean().item()
        record = {"step": step + 1, "epoch": epoch, "loss": loss.item(), "train_acc": acc, "lr": schedule.get_last_lr()[0],
                  "grad_norm": grad_norm}
        if (step + 1) % args.eval_every == 0 or step + 1 == total_steps:
            final = evaluate(model, tokenizer, valid, objectives, args, info)
            record.update({f"valid/{k}": v for k, v in final.items()})
            if info.is_main:
                bar.write(f"[01] step {step + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in record.items()
                                                                 if k.endswith("acc")))
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bk.checkpoint_or_stop(step + 1, total_steps, args.save_every, stop, info.device, lambda: bk.save_rl_checkpoint(
            ckpt, {"model": model}, {"model": optimizer},
            {"iteration": step + 1, "config": asdict(args), "inputs": inputs,
             "scheduler": schedule.state_dict()}, keep_previous=True), "01", ckpt, close=[bar, metrics],
            unit="step")
    bar.close()
    metrics.close()
    if final is None:                             # resumed after the last step: its validation again
        final = evaluate(model, tokenizer, valid, objectives, args, info)

    # ---------------------------------------------------------------- saving (final: the last step's validation)
    summary = {"objectives": objectives, "loss_weights": weights, "config": asdict(args), "world_size": info.world_size,
               "segments": bk.run_segments(),
               "train_pairs": len(train), "valid_pairs": len(valid), "steps": total_steps,
               "train_seconds": round(time.time() - t_start, 1), "valid": final,
               "skipped_steps_nonfinite": guard.skipped["reward model"], "skipped_rows": C.SKIPPED_ROWS}
    if "safe" in objectives:   # what the zero means, on the labelled answers of the held-out test split (Table 2's)
        head = objectives.index("safe")
        test = [(head, p) for p in C.load_preference_pairs("safe", "test", data_root, limit=args.max_valid_pairs,
                                                           seed=args.seed)]
        summary["test_sign"] = {k: v for k, v in evaluate(model, tokenizer, test, objectives, args, info).items()
                                if k.startswith("safe/sign") or k == "safe/labelled_answers"}
    if args.safety_labels:
        model.config.safety_labels = True         # 03's Lagrangian checks it: this model's zero has a meaning
    bk.save_pretrained_folder(model, out / "model", tokenizer, args.prompt_template)
    if info.is_main:
        bk.write_whole(out / "run_summary.json", json.dumps(summary, indent=2))
        C.print0(f"[01] saved {out / 'model'} in {summary['train_seconds']}s; valid accuracy: "
                 + ", ".join(f"{k}={v:.3f}" for k, v in final.items() if "acc" in k or "sign" in k)
                 + ("; test answers, score > 0 agrees with the safety label: "
                    + ", ".join(f"{k.split('_')[-1]} {v:.3f}" for k, v in summary["test_sign"].items() if "agrees" in k)
                    if "safe" in objectives else ""))
        bk.remove_checkpoint(ckpt, args.keep_checkpoint, "01")           # unless --keep-checkpoint
    C.teardown()


if __name__ == "__main__":
    main()
