"""Stage 2: MOLMA, multi-objective RL fine-tuning with APA and the AMTL aligner (Sec. 3.3, Algorithm 1).

Five models: pi_0 (frozen reference, phi-2), the policy (starts as pi_0), the critic (pi_0's backbone
with a value head of K outputs, one per objective) and the reward models (RMhelp and RMsafe from
01_train_reward.py, or one multi-headed model). Each iteration (common.run_rl):
  1. sample --rollouts prompts of the MOLMA mix (Table 1) and answer them with the policy;
  2. score every answer with each reward model (probabilities), WHITEN(LOGIT(.)) per objective over
     the batch (Eq. 3.4), add the per-token KL penalty (Eq. 3.3), GAE per objective;
  3. per minibatch: K APA losses (Eq. 3.5) from one forward pass, K backward passes, the distributed
     AMTL aligner turns the K gradients into one update G B omega (Algorithm 1); the critic takes one
     step on the sum of its K value losses (Eq. 3.6).

Tiny world (after stages 0 and 1), 2 processes on CPU:
    torchrun --standalone --nproc_per_node=2 02_train_molma.py --preset tiny
    torchrun --standalone --nproc_per_node=2 02_train_molma.py --preset tiny --resume true   # continue
One node of 8 GPUs, phi-2 and the hub datasets (the paper; --minibatch 8 = one rollout per rank):
    torchrun --standalone --nproc_per_node=8 02_train_molma.py
Several nodes (on each, HOST = node 0; rollouts and minibatch must divide by the total ranks):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        02_train_molma.py --rollouts 64 --minibatch 16

Writes <out>/metrics.jsonl (one line per iteration: per-objective scores, shaped rewards, APA and value
losses, gradient norms; KL, length, EOS rate, the gradients' cosine, the condition number of G before
and after alignment, seconds per phase), <out>/checkpoint/ (resume), <out>/policy/, <out>/run_summary.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import common as C


@dataclass
class Args(C.RLArgs):
    """MOLMA: APA per objective, aligned by AMTL (Algorithm 1)."""
    objectives: str = C.arg("help,safe", "the objectives, K >= 1, each scored by one reward-model output")
    omega: str = C.arg("", "task importance omega, comma list (default: equal, 1 each, as the AMTL authors sum)")


args = C.parse_args(Args, presets={"tiny": {**C.RL_TINY, "out": "runs/tiny/molma"}})
objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
omega = [float(w) for w in args.omega.split(",")] if args.omega else None
if omega is not None and len(omega) != len(objectives):
    raise SystemExit(f"--omega has {len(omega)} values for {len(objectives)} objectives")


def molma_scores(probs, state):
    """Eq. 3.4: the vector reward, WHITEN(LOGIT(r)) of each objective over the batch: [N, K] -> [N, K]."""
    return C.logit_whiten(probs)


C.run_rl(args, "molma", objectives, objectives, molma_scores, omega=omega)
