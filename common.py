"""Pieces shared by the numbered scripts of MOLMA (multi-objective language-model alignment), in three bands:

  A. COMPONENTS TO COPY: the paper's math (Eq. 3.2-3.7), the AMTL aligner and its per-objective gradients,
     FSDP2 setup and sharded loading. Each block needs only torch, math, torch.distributed and the standard
     library: copy one out alone (with the pieces of its own block) and it runs; tests/test_copy_out.py
     proves it for every block, against the functions here.
  B. MODELS, DATA AND ROLLOUTS: loading with pad == eos, scores and log-probs read from lengths, the real
     datasets mixed as Table 1, sampling and scoring the experience of an iteration under FSDP.
  C. OPERATIONS: arguments and their checks, the dry run, metrics, checkpoints, stop requests and the
     non-finite guard: what a long run needs, kept out of the algorithm's way.

No training loop lives here: Algorithm 1 is written out in 02_train_molma.py, the single-objective APA loop
in 03_train_baselines.py; both call these pieces, and the bookkeeping is one call each.

Equation numbers are those of "Aligning Language Models Using Multi-Objective Deep Reinforcement
Learning" (MOLMA). Shapes: B = batch, T = response tokens (right-padded), K = objectives,
D = flattened parameters.

Reward convention used everywhere: a reward model's linear output s is its *score*; the reward
handed to RL and evaluation is the probability sigmoid(s). So Eq. 3.4's LOGIT gives s back, and
Eq. 4.2's safety threshold delta is a probability (Llama 2 uses 0.15).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gzip
import hashlib
import importlib
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
import typing
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import torch
import torch.distributed as dist


# ===============================================================================================================
# A. COMPONENTS TO COPY: the paper's math (Eq. 3.2-3.7), the AMTL aligner and its gradients, FSDP setup
# ===============================================================================================================


# ---- A1. reward models: Eq. 3.2, and safe-rlhf's per-answer sign term of a cost model
def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Eq. 3.2, the binary ranking loss of a reward model, averaged over pairs.

    chosen, rejected: [B] linear scores r(x, y_c), r(x, y_r) -> scalar
    -log sigmoid(r_c - r_r); logsigmoid keeps it finite for any margin.
    """
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def sign_loss(safer: torch.Tensor, unsafer: torch.Tensor, safer_is_safe: torch.Tensor,
              unsafer_is_safe: torch.Tensor) -> torch.Tensor:
    """safe-rlhf's per-answer terms of its cost model (Dai et al. 2023, Eq. 6), in this project's sign: a score > 0
    means safe (cost = -score > 0 means unsafe). Eq. 3.2 alone does not change when every score shifts by a
    constant, so a threshold on the score means nothing; these terms anchor its zero to the labels.

    safer, unsafer: [N] linear safety scores of each pair's two answers; *_is_safe: [N] bool labels -> scalar.
    As safe-rlhf's cost-model loss, per pair: -log sigmoid(y_safer s_safer) - log sigmoid(y_unsafer s_unsafer),
    y = +1 safe / -1 unsafe, averaged over the N PAIRS (so both answers' terms count in full beside Eq. 3.2's
    per-pair mean; add ranking_loss(safer, unsafer) for safe-rlhf's whole loss).
    """
    y_safer, y_unsafer = (x.to(safer.dtype) * 2 - 1 for x in (safer_is_safe, unsafer_is_safe))
    logsig = torch.nn.functional.logsigmoid
    return (-logsig(y_safer * safer) - logsig(y_unsafer * unsafer)).mean()


# ---- A2. reward shaping: Eq. 3.4 over the finished answers, Eq. 3.3's per-token KL penalty
def logit_whiten(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 3.4: WHITEN(LOGIT(r)) over the batch, separately per objective.

    scores: [B] or [B, K] reward-model outputs in probability space (sigmoid of the linear score).
    Returns the same shape. Probabilities are clamped to [eps, 1 - eps] before the logit so that 0
    and 1 stay finite; whitening uses the population variance (correction 0) so B = 1 gives 0, not NaN.
    """
    x = torch.logit(scores.double().clamp(eps, 1 - eps))   # float64: eps must be resolvable near 1
    mean = x.mean(0, keepdim=True)
    var = x.var(0, correction=0, keepdim=True)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).to(scores.dtype)


def shape_finished(scores: torch.Tensor, ended: torch.Tensor, shape, truncated_score: float) -> torch.Tensor:
    """Eq. 3.4 over the answers that ended with EOS only; an answer cut at the length limit gets a fixed low reward.

    scores: [N, K] reward-model probabilities of every rank's rollouts; ended: [N] bool; shape: the method's
    scores -> [n, K'] reward (logit_whiten for MOLMA, a weighted sum for so_weighted). -> [N, K'].
    A cut answer's score is not trusted, so it does not enter the batch's mean and variance either. Its reward is
    truncated_score standard deviations from the finished answers' mean OF THE REWARD THE CRITIC SEES, per column:
    -1 is one deviation below it in every method, whatever the spread of its reward (a whitened reward has mean 0
    and deviation 1, so there it is plainly -1; a weighted sum of correlated whitened rewards has a smaller spread).
    With no spread to measure (one finished answer, or all alike) the deviation counts as 1, the whitened unit.
    If no answer ended, every one gets truncated_score.
    """
    if not ended.any():
        return torch.full_like(shape(scores), truncated_score)
    finished = shape(scores[ended])
    spread = finished.std(0, correction=0)
    spread = torch.where(spread > 1e-6, spread, torch.ones_like(spread))
    out = (finished.mean(0) + truncated_score * spread).expand(scores.shape[0], -1).clone()    # [N, K']
    out[ended] = finished
    return out


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Eq. 3.3: per-token rewards r_bar = r_hat (on the last token) - beta * KL (on every token).

    scores:       [B, K] shaped sequence rewards r_hat (Eq. 3.4 already applied)
    logprobs:     [B, T] log pi_phi of the sampled response tokens
    ref_logprobs: [B, T] log pi_0 of the same tokens
    mask:         [B, T] 1 on response tokens, right-padded
    -> [B, T, K]; zero where mask is 0. The KL estimate log pi_phi - log pi_0 is the per-token
    sample estimate of Ziegler et al.; it is the same for every objective.
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask                                   # [B, T]
    rewards = (-beta * kl).unsqueeze(-1).expand(-1, -1, scores.shape[-1]).clone()
    last = (mask.sum(1).long() - 1).clamp(min=0)                              # last response token
    rows = torch.arange(scores.shape[0], device=scores.device)
    has_tokens = mask.sum(1) > 0
    rewards[rows, last] += scores.to(rewards.dtype) * has_tokens.unsqueeze(-1)
    return rewards * mask.unsqueeze(-1)


# ---- A3. advantages: GAE per objective, and the optional whitening
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al.), one run per objective.

    rewards, values: [B, T, K]; mask: [B, T] right-padded response mask.
    -> (advantages, returns), both [B, T, K], returns = advantages + values; zero where mask is 0.
    Entries where mask is 0 are ignored (they may hold anything, NaN included); the value after
    the last response token is 0 because the episode ends there.
    """
    m = mask.bool().unsqueeze(-1)
    r = torch.where(m, rewards, 0.0)
    v = torch.where(m, values, 0.0)
    T = r.shape[1]
    advantages = torch.zeros_like(r)
    last_gae = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_value = v[:, t + 1] if t + 1 < T else torch.zeros_like(v[:, t])   # 0 past the end
        delta = r[:, t] + gamma * next_value - v[:, t]
        last_gae = delta + gamma * lam * last_gae
        last_gae = torch.where(m[:, t], last_gae, 0.0)                         # nothing flows from padding
        advantages[:, t] = last_gae
    return advantages, advantages + v


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """Optional, not in Eq. 3.5: advantages whitened per objective over the valid tokens of the whole batch.

    advantages: [B, T, K], mask: [B, T] -> [B, T, K], zero where mask is 0. Under torch.distributed the mean
    and variance are over every rank's tokens (one all-reduce of 3K numbers), so the result does not depend
    on how the batch is split. Once per iteration, over the whole batch, as TRL's PPOTrainer does (after GAE, in
    step(), over the response mask; only its earliest versions whitened per minibatch); trlx (the APA authors'
    trainer) whitens per minibatch without a mask, padding included.
    """
    m = mask.to(advantages.dtype).unsqueeze(-1)                               # [B, T, 1]
    stats = torch.stack([(advantages * m).sum((0, 1)), (advantages ** 2 * m).sum((0, 1)),
                         m.sum((0, 1)).expand(advantages.shape[-1])]).double()   # [3, K]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, group=group)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean ** 2).clamp(min=0)
    return ((advantages - mean.to(advantages.dtype)) * torch.rsqrt(var + 1e-8).to(advantages.dtype)) * m


# ---- A4. losses: APA per objective (Eq. 3.5) and the critic's (Eq. 3.6); one block, they share the token mean
def _masked_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, K], [B, T] -> [K]: mean over the response tokens of the whole batch."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum((0, 1)) / m.sum((0, 1)).clamp(min=1)


def apa_loss(
    logprobs: torch.Tensor,
    init_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lam: float = 0.95,
) -> torch.Tensor:
    """Eq. 3.5, the APA policy loss, one value per objective.

    logprobs:      [B, T] log pi_phi(a|s) of the sampled tokens (carries the gradient)
    init_logprobs: [B, T] log pi_0(a|s) of the frozen initial policy (APA's pi_init, not pi_old)
    advantages:    [B, T, K] GAE advantages from the rollout (constants)
    mask:          [B, T]
    -> [K]: mean over response tokens of (log pi_phi - log pi_0 - A_k / lam)^2, as in the APA
    authors' code (sum over response tokens divided by their number).
    """
    log_ratio = (logprobs - init_logprobs.detach()).unsqueeze(-1)             # [B, T, 1]
    return _masked_token_mean((log_ratio - advantages.detach() / lam) ** 2, mask)


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Eq. 3.6, the critic's loss, one value per objective.

    values:  [B, T, K] V_k,psi (carries the gradient)
    returns: [B, T, K] the target A_k + V_old,k: GAE's returns (common.gae's second output), taken BEFORE any
             advantage whitening, as TRL and trlx do: whitening is for the policy loss, the critic regresses on
             the return in its own units
    mask:    [B, T] -> [K]: mean over response tokens of (V_k - R_k)^2. No clipping and no factor 1/2, as written
    in the paper.
    """
    return _masked_token_mean((values - returns.detach()) ** 2, mask)


# ---- A5. the AMTL aligner (Algorithm 1, lines 8-13), on the parameters or on a shared representation, and its
#          condition number; one block
def amtl_balance(gram: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, lines 9-12: the balance transformation B of Aligned-MTL.

    gram: [K, K] task-space Gram matrix M = G^T G of the K objective gradients -> B: [K, K].
    M = V diag(lambda) V^T; eigenvalues at or below max(lambda) * K * eps(float32) are dropped
    (rank truncation, as in the Aligned-MTL authors' solver); B = sqrt(lambda_min) V Sigma^-1 V^T
    over the kept ones, so G B has equal singular values sqrt(lambda_min): condition number 1.
    An all-zero M gives the identity. Never NaN for a finite M.
    """
    K = gram.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(gram.double())                        # line 10
    tol = eigvals.max() * K * torch.finfo(torch.float32).eps
    keep = eigvals > tol
    if not bool(keep.any()):                                                   # zero gradients
        return torch.eye(K, dtype=gram.dtype, device=gram.device)
    lam, V = eigvals[keep], eigvecs[:, keep]
    sigma_inv = torch.diag(lam.rsqrt())                                        # line 11
    B = lam.min().sqrt() * V @ sigma_inv @ V.T                                 # line 12
    return B.to(gram.dtype)


def amtl_align(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, lines 7-13 on one process: the aligned update G B omega.

    grads: [K, D] one gradient per objective (rows; G = grads^T has them as columns)
    weights: [K] task importance omega (MOLMA: equal importance, 1 each, as the authors sum)
    -> [D]. With K = 1 and omega = [1] it returns the gradient unchanged.
    """
    B = amtl_balance(grads @ grads.T)                                          # lines 8-12
    return grads.T @ (B @ weights.to(grads.dtype))                             # line 13: (G B) omega


def amtl_align_sharded(
    local_grads: torch.Tensor, weights: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 7-13 when each rank holds only a shard of every gradient (FSDP).

    local_grads: [K, D_local] this rank's shards of the K objective gradients
    -> (this rank's shard of G B omega: [D_local], the full Gram matrix M: [K, K], the balance B: [K, K]);
    M and B are what the metrics need (gradient norms, cosines, cond(G) before and after: B^T M B).
    M is a sum over parameters, so it is the sum of the ranks' local Gram matrices: one all-reduce
    of K x K numbers; every rank then computes the same B, and forms its own shard of the update.
    No full gradient is ever gathered.
    """
    gram = local_grads @ local_grads.T
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    B = amtl_balance(gram)
    return local_grads.T @ (B @ weights.to(local_grads.dtype)), gram, B


def amtl_align_representation(
    losses: torch.Tensor, representation: torch.Tensor, weights: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 8-12 on a representation the K losses share (Aligned-MTL-UB; beyond the paper).

    losses:         [K] computed from `representation`, graph kept (e.g. MOLMA's K APA losses)
    representation: [...] e.g. the answers' token log-probs [B, T]: this rank's rows of it
    weights:        [K] task importance omega
    -> (the task weights B omega: [K], constants; the representation's Gram matrix M_z = E E^T: [K, K]; B: [K, K]).
    E's row k is e_k = dL_k/dz, so the parameter gradient is g_k = J^T e_k (J = dz/dphi) and the update
    G B omega = sum_k (B omega)_k g_k is ONE backward pass of sum_k (B omega)_k L_k, where the exact aligner
    needs K. B comes from M_z instead of M = G^T G = E J J^T E^T: the two agree when J J^T = c I (B is blind
    to scale), and in general B balances the gradients at z, not at the parameters. e_k costs a backward
    through the losses alone (not the network). Each rank's z holds its own rows, so M_z is the sum of the
    ranks' local Gram matrices: one all-reduce of K x K numbers.
    """
    E = torch.stack([torch.autograd.grad(losses[k], representation, retain_graph=True)[0].reshape(-1)
                     for k in range(losses.shape[0])])                         # [K, N_local]
    gram = E @ E.T
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    B = amtl_balance(gram)
    return (B @ weights.to(gram.dtype)).detach(), gram, B


def condition_number(gram: torch.Tensor) -> float:
    """sigma_max / sigma_min of G from its Gram matrix [K, K] (AMTL's stability criterion).

    Returns inf when G is rank-deficient (sigma_min at or below the truncation tolerance).
    """
    eigvals = torch.linalg.eigvalsh(gram.double())
    tol = eigvals.max().clamp(min=0) * gram.shape[0] * torch.finfo(torch.float32).eps
    if eigvals.max() <= 0 or eigvals.min() <= tol:
        return float("inf")
    return float((eigvals.max() / eigvals.min()).sqrt())


# ---- A6. K gradients from one forward under FSDP (lines 4-7) and the aligned update as .grad (line 14); one block
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) tensor; a plain tensor is its own shard."""
    return t.to_local() if hasattr(t, "to_local") else t


def objective_gradients(model: torch.nn.Module, losses: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, lines 4-7 under FSDP: K losses from ONE forward -> this rank's gradient shards.

    losses: [K] -> [K, D_local], row k = flattened local shards of grad L_k (every trainable
    parameter, in model.parameters() order). K backward passes reuse the forward's graph
    (retain_graph); FSDP reduce-scatters each, so no rank ever holds a full gradient. Each backward's
    shards are written straight into one [K, D_local] buffer (no per-row copies): the K gradient
    buffers are all the memory MOLMA adds to a single-objective step.
    Call it with no gradient accumulated; it leaves every .grad None.
    The parameters are read after each backward on purpose: between forward and backward FSDP2
    keeps the root's parameters unsharded, and model.parameters() would return those instead.
    """
    K, buf = losses.shape[0], None
    for k in range(K):
        losses[k].backward(retain_graph=k < K - 1)
        params = [p for p in model.parameters() if p.requires_grad]
        if buf is None:
            buf = torch.empty(K, sum(_local(p).numel() for p in params), device=losses.device)
        offset = 0
        for p in params:
            n = _local(p).numel()
            if p.grad is None:
                buf[k, offset : offset + n].zero_()
            else:
                buf[k, offset : offset + n].copy_(_local(p.grad).reshape(-1))
            p.grad = None
            offset += n
    return buf


def set_flat_grad(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Make each parameter's .grad a view of a flat [D_local] update (this rank's shard of G B omega).

    No copy: the optimizer and clip_grad_norm_ read (and scale) the update in place.
    """
    from torch.distributed.tensor import DTensor

    offset = 0
    for p in (p for p in model.parameters() if p.requires_grad):
        local = _local(p)
        view = flat[offset : offset + local.numel()].view(local.shape).to(local.dtype)
        if isinstance(p, DTensor):
            p.grad = DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        else:
            p.grad = view
        offset += local.numel()
    if offset != flat.numel():
        raise ValueError(f"flat update has {flat.numel()} entries, the model's local shards {offset}")


# ---- A7. FSDP2: the process group, a clean exit, sharding, sharded loading; one block
@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(peer_timeout: float = 600.0) -> DistInfo:
    """Join the process group that torchrun describes; plain `python script.py` makes a group of one.

    gloo on CPU, nccl on GPU (plus gloo for CPU tensors), so every code path is the FSDP one. peer_timeout
    (seconds, --peer-timeout): a rank that stops answering (stopped, stuck, its host frozen) is named and the run
    stopped after this long (watch_peers); no collective waits more than twice as long (torch's default: 30
    minutes, and its timeout names no rank).
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for a one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_when_the_launcher_dies()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://"))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent store outlives an attempt under --max-restarts: keys left by the workers of an
            # earlier attempt (gloo's addresses) would send the restarted ones to dead peers, so each attempt gets
            # a prefix. The count is the same on every node as long as no agent was replaced; a replaced agent
            # needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README, "Several nodes"), where rank 0 makes a fresh
            # store for every attempt and no prefix is needed (its new agent counts from 0, the others do not).
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=2 * peer_timeout))   # a backstop: the watch names
        if world_size > 1:
            watch_peers(store, rank, world_size, peer_timeout)
    sys.excepthook = _name_a_lost_peer          # a lost peer is named after the library's traceback
    # transformers returns logits as a slice (a view); FSDP2 warns that an in-place op on it would skip
    # its backward hook. Nothing here modifies a model's output in place, so that one warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def watch_peers(store, rank: int, world_size: int, timeout: float) -> None:
    """A thread on every rank: count a heartbeat in the rendezvous store every few seconds, and read the others'.
    A rank whose count has not moved for `timeout` seconds (SIGSTOP, a hung driver, a frozen host: its threads stop
    with it) is named, with its host, by the lowest rank still beating, and this process exits; torchrun then ends
    the others (or restarts the job, with --max-restarts) instead of every rank waiting in a collective for
    torch's timeout, which names no rank."""
    import threading

    store.set(f"molma_host/{rank}", socket.gethostname())
    period = max(0.5, min(10.0, timeout / 10))

    def beat() -> None:
        count, seen = 0, {}                            # rank -> (its last count, when that count changed)
        while True:
            count += 1
            store.set(f"molma_beat/{rank}", str(count))
            now = time.monotonic()
            try:
                counts = [store.get(f"molma_beat/{r}") if r != rank else b"" for r in range(world_size)]
            except Exception:                          # the store is gone: the run is ending or lost its rank 0
                return
            for r, c in enumerate(counts):
                if r != rank and seen.get(r, (None,))[0] != c:
                    seen[r] = (c, now)
            stuck = [r for r, (_, t) in seen.items() if now - t > timeout]
            if stuck:
                if rank == min(set(range(world_size)) - set(stuck)):
                    hosts = {r: store.get(f"molma_host/{r}").decode() for r in stuck}
                    print(f"[watch] {', '.join(f'rank {r} (host {h})' for r, h in hosts.items())} stopped answering "
                          f"{timeout:.0f} s ago (stopped, stuck or frozen): ending the run, which loses the work since "
                          f"its last checkpoint. Look at that host; run the same command again to continue "
                          f"(--peer-timeout sets the wait)", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(period)

    threading.Thread(target=beat, name="molma-watch-peers", daemon=True).start()


def stop_when_the_launcher_dies() -> None:
    """A torchrun worker asks Linux for SIGTERM when its agent (the parent) dies, so killing the launcher (timeout,
    a scheduler, kill on its process group, which torchrun's workers are not in) stops the job: the SIGTERM takes
    StopRequest's path (finish the iteration, checkpoint, exit) instead of the worker training on, unowned.
    Elsewhere (not Linux) nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                 # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


def _name_a_lost_peer(kind, exc, tb) -> None:
    """After the traceback of a collective that lost its peer (deep inside gloo or NCCL), say in one line what
    happened and what follows, so the cause is the last line a user reads (setup_distributed installs it)."""
    sys.__excepthook__(kind, exc, tb)
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _LOST_PEER):
        print(f"[rank {os.environ.get('RANK', '?')}] lost contact with another rank: its process or its node stopped "
              f"(see that node's log for why). Under torchrun --max-restarts every node's workers start again from "
              f"the last checkpoint in --out once all nodes have rejoined; otherwise run the same command again "
              f"(--resume auto continues from it).", file=sys.stderr, flush=True)


_AT_TEARDOWN: list = []     # callables teardown() runs before the process ends (e.g. releasing a run folder's lock)


def teardown(exit_code: int = 0) -> "NoReturn":
    """Every rank: wait for the others, leave the process group, flush, and end the process with exit_code.

    Call it last, after every file is written and closed (MetricsLog.close()): it does not return.

    Why the process ends with os._exit and not by returning to the interpreter (issue 21; a core dump of the
    abort it prevents, taken under load, showed each step). gloo runs collectives on C++ worker threads
    (`pt_gloo_runloop`) that destroy_process_group() does not stop: FSDP2 and the device mesh keep C++
    references to the group that user code cannot drop (the threads outlive destroy_process_group, `del model`
    and gc.collect()). A worker thread releases a finished work a moment AFTER the caller's wait() returns; the
    barrier's work holds the works before it (AsyncBarrierWork keeps its prior works), among them FSDP's
    all-gathers, whose tensors' Python objects C++ owns. Freeing one takes the GIL. If the main thread has begun
    interpreter finalization by then (Py_FinalizeEx), Python 3.11 ends that thread with pthread_exit, whose
    forced unwinding through a noexcept C++ destructor calls std::terminate: "terminate called without an active
    exception", SIGABRT, exit -6, after all the work was done. So a barrier cannot prevent it (its own work is
    the one released late), and the narrowest safe fix is not to finalize: every file is written and closed by
    the caller, stdout and stderr are flushed here, and os._exit leaves without Python's finalization or C++
    destructors, so no thread can need the GIL of a dying interpreter.
    """
    if dist.is_initialized():
        dist.barrier()                  # no rank leaves while another still waits on a collective with it
        dist.destroy_process_group()
    for release in _AT_TEARDOWN:        # e.g. this process's run folder lock (lock_run_folder)
        release()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken pipe: nothing left to flush into
            pass
    os._exit(exit_code)


def decoder_layers(model: torch.nn.Module, what: str | None = None) -> torch.nn.ModuleList:
    """The transformer blocks FSDP shards one by one: model.model.layers for Phi, Llama, Mistral, Qwen2, Gemma
    (and their classification heads), .h for GPT-2 style models; a clear error for anything else."""
    base = getattr(model, "base_model", model)
    for owner in (base, getattr(base, "model", None), getattr(base, "decoder", None)):
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    raise SystemExit(f"{what or type(model).__name__}: cannot find its decoder layers (looked for .layers, .h, .blocks "
                     f"under its base model): FSDP shards a model per layer. Supported: decoder-only models that keep "
                     f"their blocks in one of those lists (Phi, Llama, Mistral, Qwen2, Gemma, OLMo, Granite, Cohere ...)")


def shard_model(model: torch.nn.Module, info: DistInfo, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: fully_shard each decoder layer, then the root (embeddings, final norm, head).

    dtype bf16: FSDP2 mixed precision, the weights (and AdamW's state) stay fp32 shards, forward and backward
    compute in bf16, and gradients are reduced in fp32. Default: bf16 on GPU, fp32 on CPU. Works with one
    process too. The original class name is kept in the config, because fully_shard renames the class.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not model.config.architectures:      # named before fully_shard renames the class (FSDPPhiForCausalLM)
        model.config.architectures = [type(model).__name__]
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {"mesh": mesh}
    if (dtype or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)) == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def load_sharded(build, info: DistInfo, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a model straight into FSDP2 shards, with about one full copy per node instead of one per rank.

    build(): the full model (from_pretrained, a new head seeded the same on every rank); only rank 0 runs it.
    The other ranks make the same class from rank 0's config on the meta device (no memory), every rank shards
    it, and rank 0's weights are broadcast into the other ranks' shards, one tensor at a time; buffers (rotary
    tables) are copied from rank 0 too. The shards are exactly those of loading on every rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if info.world_size == 1:
        return shard_model(build(), info, dtype)
    model, spec = (build(), None) if info.rank == 0 else (None, None)
    if info.rank == 0:
        spec = (type(model).__module__, type(model).__name__, model.config.to_dict())
    box = [spec]
    dist.broadcast_object_list(box, src=0)
    if info.rank == 0:
        full = model.state_dict()                      # rank 0's full tensors, broadcast after sharding
    else:
        module, name, cfg = box[0]
        cls = getattr(importlib.import_module(module), name)
        with torch.device("meta"):            # a class of transformers, or one that says how (from_config_dict)
            model = (cls.from_config_dict(cfg) if hasattr(cls, "from_config_dict") else
                     cls(cls.config_class.from_dict(cfg))).eval()
        full = {}
    shard_model(model, info, dtype)
    if info.rank != 0:
        model.to_empty(device=info.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for b in model.buffers():
        dist.broadcast(b.data if b.device == info.device else b.data.to(info.device), src=0)
    return model


# ===============================================================================================================
# B. MODELS, DATA AND ROLLOUTS: loading, prompt format, scores and log-probs, Table 1's data, sampling
# ===============================================================================================================


# ---- B1. models: seeds, prompt format, pad == eos, loading, scores and log-probs read from lengths
def set_seed(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (the only ones this project draws from).

    Scripts call it with the shared seed before building models (new heads must agree on every
    rank) and with seed + rank before sampling (ranks must draw different answers).
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_precision(precision: str) -> None:
    if precision not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"--precision must be auto, bf16 or fp32, got {precision!r}")


def compute_dtype(precision: str, info: DistInfo) -> torch.dtype:
    """--precision: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32 -> the dtype models compute in."""
    check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if info.device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


PROMPT_TEMPLATES = {
    "phi2": "Instruct: {prompt}\nOutput:",        # phi-2's QA format (its model card); the paper's runs
    "llama2_chat": "[INST] {prompt} [/INST]",       # Llama-2-chat's format (Figure 5); its tokenizer adds <s> itself
    "plain": "{prompt}\n",                          # a base model without a chat format
    "chat": None,                                   # the tokenizer's own chat template (an instruct model's format)
}
# What stands between the formatted prompt and the answer in a reward model's input. The chat template ends its
# generation prompt with the assistant's header ("<|im_start|>assistant\n"), after which the model writes the answer
# directly: a space there would be a token the policy never generates, and the reward model would read RL's answers
# off the distribution it was trained on. The other formats end on a word ("Output:"), which the answer follows
# after a space.
ANSWER_SEPARATOR = {"chat": ""}


QA_TEMPLATE = PROMPT_TEMPLATES["phi2"]


def format_prompt(prompt: str, template: str = QA_TEMPLATE) -> str:
    return template.format(prompt=prompt.strip())


def prompt_text(tokenizer, prompt: str, template: str) -> str:
    """The prompt as the policy reads it in the run's format (template: --prompt-template, a key of PROMPT_TEMPLATES):
    chat renders the tokenizer's own chat template, one user turn plus the generation prompt."""
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt.strip()}], tokenize=False,
                                             add_generation_prompt=True)
    return format_prompt(prompt, PROMPT_TEMPLATES[template])


def answer_separator(template: str) -> str:
    return ANSWER_SEPARATOR.get(template, " ")


def check_chat_template(tokenizer, path: str) -> None:
    """--prompt-template chat needs a chat template that renders the user's turn and ends with the generation prompt
    (the assistant's header): without it the policy would be asked to continue the user's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"--prompt-template chat: the tokenizer at {path} has no chat template (no chat_template in "
                         f"tokenizer_config.json, no chat_template.jinja); choose phi2, llama2_chat or plain, or give "
                         f"the folder of an instruct model")
    probe = "MOLMA-PROBE-7319"
    try:
        turn = [{"role": "user", "content": probe}]
        with_prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    except Exception as e:       # a template error names only jinja's line
        raise SystemExit(f"--prompt-template chat: the chat template of {path} cannot render one user turn: "
                         f"{type(e).__name__}: {e}") from None
    if probe not in with_prompt:
        raise SystemExit(f"--prompt-template chat: the chat template of {path} drops the user's message")
    end = with_prompt.rstrip()
    # the answer's opening must follow the user's turn: refused when the text ends on the user's words or on the end
    # token, or when a template that reads add_generation_prompt adds nothing for it (Llama 2's template reads no
    # flag: its " [/INST]" opens the answer)
    if end.endswith(probe) or (tokenizer.eos_token and end.endswith(tokenizer.eos_token)) or (
            with_prompt == without and "add_generation_prompt" in tokenizer.chat_template):
        raise SystemExit(f"--prompt-template chat: the chat template of {path} ignores add_generation_prompt (it adds "
                         f"no assistant header after the user's turn), so the model would continue the user's text; "
                         f"fix the template, or choose phi2, llama2_chat or plain")


def load_tokenizer(path: str, template: str = "phi2"):
    """The policy's tokenizer, checked for the prompt format every stage uses (template: --prompt-template, which
    the stages then hand to every function that writes a prompt).

    phi-2's tokenizer has no pad token: pad with eos, and take every mask from lengths. A tokenizer that has
    its own pad token keeps it; nothing here relies on pad == eos or on pad != eos.
    """
    if template not in PROMPT_TEMPLATES:
        raise SystemExit(f"--prompt-template {template!r} is not one of {', '.join(PROMPT_TEMPLATES)}")
    tok = auto_tokenizer(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token; MOLMA needs one to end answers")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if template == "chat":
        check_chat_template(tok, path)
    elif getattr(tok, "chat_template", None):
        print0(f"[format] the tokenizer at {path} has its own chat template, and --prompt-template is {template}: an "
               f"instruct model usually answers coherently only in its own format (--prompt-template chat)")
    quiet_transformers()
    return tok


def quiet_transformers() -> None:
    """The console says what happens once: no per-file "Loading weights" bars (our loaders print one line per
    model), and one copy of the libraries' warnings, from rank 0. Every stage loads its tokenizer first."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if dist.is_initialized() and dist.get_rank() != 0:
        transformers.logging.set_verbosity_error()


def auto_tokenizer(path: str):
    """AutoTokenizer, except for a folder whose tokenizer_config.json names the generic fast tokenizer: that one is
    loaded as it is saved (tokenizer.json), not rebuilt as the model type's own class from its config."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    cfg = folder / "tokenizer_config.json"
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise SystemExit(f"{folder} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there (a folder copied "
                         f"in part?). Copy the tokenizer files from the model it was trained from, or save it again")
    if cfg.exists() and read_json(cfg).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# the files a tokenizer is read from (a fast tokenizer's tokenizer.json; sentencepiece's; BPE's vocab and merges)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "spm.model", "vocab.txt")


def read_json(path: Path) -> dict:
    """A JSON file this project reads (config.json, tokenizer_config.json, run records, reports), or an error naming
    it: an empty or cut-short file is never taken for a finished run or a report."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError("the file is empty")
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path} is not valid JSON ({e}): it was not written whole (a full disk, a crash, a copy cut "
                         f"short) or was damaged since. Restore it, or write it again: a run summary or report by "
                         f"running its stage again (move the file away first), a model folder by saving it again, a "
                         f"checkpoint by resuming from the kept previous one") from None


def write_whole(path: Path, data: str | bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, fsync, then a rename over it (and an fsync of the
    folder). A failed write (a full or read-only disk) leaves the previous file as it was, and says which file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"could not write {path} ({type(e).__name__}: {e}); is the disk full or read-only? "
                         + (f"The previous {path.name} is intact. " if path.exists() else "")
                         + "Free space or fix the mount, then run the same command again.") from None


def special_prefix(tokenizer, template: str) -> list[int]:
    """The ids the tokenizer puts before a text on its own (Llama's <s>; none for phi-2 or Qwen2). None either with
    --prompt-template chat: a chat template writes its own start (Llama 3's and Llama 2's templates write BOS), and
    transformers' apply_chat_template adds no special tokens either."""
    if template == "chat":
        return []
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
    return full[: starts[0]] if starts else []


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _prompt_ids(tokenizer, prompt: str, template: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]


def _prompt_ids_within(tokenizer, prompt: str, budget: int, template: str) -> list[int]:
    """The prompt in its template in at most budget tokens (count_cut_prompts counts the cut ones). A prompt too long loses
    the START of the user's text (the end of a request, or a dialogue's last turn, matters most); the template's
    own tokens ("Instruct:", "Output:") are never cut."""
    ids = _prompt_ids(tokenizer, prompt, template)
    if len(ids) <= budget:
        return ids
    words = tokenizer(prompt.strip(), add_special_tokens=False)["input_ids"]
    keep = max(1, budget - (len(ids) - len(words)))           # the template's tokens come off the budget first
    while True:
        ids = _prompt_ids(tokenizer, tokenizer.decode(words[-keep:]), template)
        if len(ids) <= budget or keep == 1:
            return ids[-budget:]                              # (a template longer than the budget: its end)
        keep -= 1


def count_cut_prompts(tokenizer, prompts: list[str], budget: int, what: str, template: str) -> int:
    """Log, like skipped rows, how many prompts must be cut to fit budget tokens (once, before training); a budget
    the template fills by itself (no room for the user's text) stops the run, naming --max-prompt-len."""
    pre = len(special_prefix(tokenizer, template))
    own = len(_prompt_ids(tokenizer, "", template))               # the template's tokens, around an empty text
    if budget - pre - own < 8:
        fail(f"--max-prompt-len {budget} leaves {max(0, budget - pre - own)} tokens for the user's text: the prompt "
             f"template ({template}) takes {own + pre} by itself. Give --max-prompt-len {pre + own + 64} or more")
    n = sum(len(_prompt_ids(tokenizer, p, template)) > budget - pre for p in prompts)
    if n:
        SKIPPED_ROWS[f"{what} (cut to fit)"] = {f"longer than {budget} tokens": n}
        print0(f"[data] {what}: {n} of {len(prompts)} prompts are longer than {budget} tokens (--max-prompt-len) and "
               f"cut to fit: the start of the user's text is dropped, the template is kept")
    return n


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int, template: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS if the tokenizer adds one | prompt in the template], LEFT-padded for generation:
    -> (input_ids [B, P], attention_mask [B, P]).

    A prompt longer than max_prompt_len loses the start of the user's text, never the template
    (_prompt_ids_within; count_cut_prompts logs how many).
    """
    pre = special_prefix(tokenizer, template)
    enc = [pre + _prompt_ids_within(tokenizer, p, max_prompt_len - len(pre), template) for p in prompts]
    P = max(map(len, enc))
    ids = torch.full((len(enc), P), _pad_id(tokenizer), dtype=torch.long)  # padding is masked, whatever its id
    mask = torch.zeros(len(enc), P, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, P - len(e):] = torch.tensor(e)
        mask[i, P - len(e):] = 1
    return ids, mask


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_len: int,
                 template: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A reward model's input: [BOS if the tokenizer adds one | prompt in the template | ' ' response], RIGHT-padded
    (with --prompt-template chat no space: the answer follows the assistant's header as the policy writes it):
    -> (input_ids [B, L], attention_mask [B, L], n_cut).

    No EOS is appended: the score is read at the answer's last token (sequence_scores), which is where
    transformers' *ForSequenceClassification and its text-classification pipeline pool the same text (the last
    token that is not padding), whatever the tokenizer's pad convention (phi-2: pad == eos; Llama: a real pad).
    So a saved reward model scores the same in this project, in the Auto class, in a pipeline and in TRL.
    Only the user's text in the prompt is truncated (its start, never the template), never the answer, as the SHP
    card advises; an answer that alone exceeds max_len is cut at its end, and n_cut counts those, for the caller
    to log.
    """
    rows, n_cut = [], 0
    pre = special_prefix(tokenizer, template)
    for p, r in zip(prompts, responses):
        a = tokenizer(answer_separator(template) + r.strip(), add_special_tokens=False)["input_ids"]
        if len(a) > max_len - 1 - len(pre):        # at least one prompt token stays
            a, n_cut = a[: max_len - 1 - len(pre)], n_cut + 1
        rows.append(pre + _prompt_ids_within(tokenizer, p, max_len - len(pre) - len(a), template) + a)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), _pad_id(tokenizer), dtype=torch.long)  # padding is masked, whatever its id
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, e in enumerate(rows):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask, n_cut


MODEL_KINDS = {"causal_lm": "ForCausalLM", "sequence_classifier": "ForSequenceClassification",
               "token_classifier": "ForTokenClassification"}


def check_model_folder(path: str, what: str, kind: str | None = None) -> None:
    """Before anything is loaded: a local path must be a model folder of the expected kind with readable weights.

    path: a folder, or a hub id ("org/name", left to from_pretrained). kind: a key of MODEL_KINDS, or None for
    any model (a backbone). Exits with a message naming the flag's value and the fix.
    """
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.exists() and not path.startswith(("/", ".", "~")) and path.count("/") == 1:
        return                                                    # a hub id: from_pretrained fetches it
    if not p.is_dir():
        raise SystemExit(f"{what} {path}: no such folder" + (" (it is a file; give the folder that holds it)" if p.exists() else ""))
    if not (p / "config.json").exists():
        raise SystemExit(f"{what} {path} is not a model folder: no config.json (a save_pretrained folder is expected)")
    cfg = read_json(p / "config.json")
    archs = cfg.get("architectures") or []
    # a ScoreModel's folder names its head (its architectures name a backbone where transformers has no head class)
    found = {"reward": "sequence_classifier", "critic": "token_classifier"}.get(cfg.get("molma_score_head")) or next(
        (k for k, suffix in MODEL_KINDS.items() if archs and archs[0].endswith(suffix)), "other")
    if kind and archs and found != kind:
        raise SystemExit(f"{what} {path} holds a {archs[0]} ({found.replace('_', ' ')}); a {kind.replace('_', ' ')} "
                         f"(*{MODEL_KINDS[kind]}) is expected here")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{what} {path} has no *.safetensors weights (only safetensors are loaded, never pickles)")
    head_rows = None
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:   # checks the header and that the file covers every tensor
                if "score.weight" in st.keys():
                    head_rows = st.get_slice("score.weight").get_shape()[0]
        except Exception as e:
            raise SystemExit(f"{what}: cannot read {f}: {e}. The file is damaged or truncated; write or copy it again")
    labels = cfg.get("id2label") or {}
    if kind == "sequence_classifier" and head_rows is not None and labels and head_rows != len(labels):
        raise SystemExit(f"{what} {path}: its config.json names {len(labels)} objectives ({', '.join(labels.values())}) "
                         f"but its score head has {head_rows} output(s): the config and the weights come from different "
                         f"models. Put the folder's own config.json back, or train the reward model again")
    check_weights_checksum(p, what)


def check_weights_checksum(folder: Path, what: str) -> None:
    """A folder this project wrote records its weights' sha256 in config.json (write_pretrained): compare, once per
    node (LOCAL_RANK 0, or a plain process), and stop naming the file if it changed. A folder from elsewhere records
    none and is not checked."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    recorded = read_json(folder / "config.json").get("molma_weights_sha256") or {}
    if recorded and not all((folder / n).exists() for n in recorded) and list(folder.glob("*.safetensors.index.json")):
        print0(f"[check] {what}: {folder} was saved again in shards (model.safetensors.index.json) since this project "
               f"wrote it, so the weights checksum config.json records does not apply to its files: not checked")
        return
    for name, want in recorded.items():
        f = folder / name
        if not f.exists():
            raise SystemExit(f"{what}: {f} is missing, though {folder / 'config.json'} records its checksum; copy the "
                             f"folder again")
        if _sha256(f) != want:
            raise SystemExit(f"{what}: {f} does not match the sha256 recorded in {folder / 'config.json'} when it was "
                             f"written: the file was damaged or changed since (a bad copy, a disk error, an edit). "
                             f"Copy or write it again; if you changed the weights on purpose, delete "
                             f"molma_weights_sha256 from config.json")


def load_causal_lm(path: str, tokenizer):
    """A causal LM (pi_0, the policy) in fp32, dropout off (RL log-probs must be deterministic)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.architectures = [type(model).__name__]     # what the saved policy is, whatever the folder said
    return model.eval()


@contextlib.contextmanager
def _library_warnings_off():
    """transformers' warnings off for one call (restored after)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


SCORE_HEADS = {"reward": ("ForSequenceClassification", False), "critic": ("ForTokenClassification", True)}


class ScoreModel(torch.nn.Module):
    """A decoder's backbone (transformers' AutoModel) with a linear head on every position: [B, L] -> [B, L, n].

    The reward models (head "reward": one output per objective, read at the answer's last token) and the critic
    (head "critic": K values, read before every answer token) are this one class, so every decoder that loads as
    AutoModelForCausalLM serves as either: transformers 5 has no *ForSequenceClassification for Granite or Cohere and
    no *ForTokenClassification for Gemma 3 or OLMo 2. The weights are named as transformers names those classes (the
    backbone under its base_model_prefix, the head `score`, without a bias for a reward model), so a saved folder loads
    in AutoModelForSequenceClassification (AutoModelForTokenClassification) and its pipeline wherever transformers
    has that class with that layout: config.architectures then names it, else the backbone's class
    (config.molma_score_head says which head the folder holds either way).
    """

    def __init__(self, backbone: torch.nn.Module, labels: list[str], head: str):
        super().__init__()
        suffix, bias = SCORE_HEADS[head]
        self.prefix, self.head, self.config = backbone.base_model_prefix, head, backbone.config
        self.add_module(self.prefix, backbone)
        self.score = torch.nn.Linear(self.config.hidden_size, len(labels), bias=bias)
        torch.nn.init.normal_(self.score.weight, std=getattr(self.config, "initializer_range", 0.02))
        if bias:
            torch.nn.init.zeros_(self.score.bias)
        self.config.id2label, self.config.label2id = dict(enumerate(labels)), {l: i for i, l in enumerate(labels)}
        self.config.molma_score_head = head
        self.config.architectures = [transformers_head_class(self.config, head) or type(backbone).__name__]

    @classmethod
    def from_config_dict(cls, cfg: dict) -> "ScoreModel":
        """The same model with random weights from a saved config's dict (load_sharded builds it on the meta device)."""
        from transformers import AutoConfig, AutoModel

        cfg = dict(cfg)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return cls(AutoModel.from_config(config), [config.id2label[i] for i in range(len(config.id2label))],
                   config.molma_score_head)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **unused) -> torch.Tensor:
        out = getattr(self, self.prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False)
        return self.score(out.last_hidden_state)

    @property
    def base_model(self) -> torch.nn.Module:          # as transformers' models have it (decoder_layers reads it)
        return getattr(self, self.prefix)

    def can_generate(self) -> bool:
        return False


def transformers_head_class(config, head: str) -> str | None:
    """The transformers class that reads a ScoreModel's weights as they are (backbone + `score`), if the architecture
    has one: its name is looked up, then its weight names compared on the meta device (no memory)."""
    import transformers
    from transformers.models.auto import modeling_auto

    suffix, bias = SCORE_HEADS[head]
    table = (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if head == "reward"
             else modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)
    name = table.get(config.model_type)
    if name is None or not hasattr(transformers, name):
        return None
    with torch.device("meta"), _library_warnings_off(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = set(getattr(transformers, name)(config).state_dict())
    prefix = getattr(transformers, name).base_model_prefix + "."
    return name if {k for k in keys if not k.startswith(prefix)} == {"score.weight", *(["score.bias"] if bias else [])} \
        else None


def load_score_model(path: str, tokenizer, head: str, labels: list[str] | None = None) -> ScoreModel:
    """A reward model or the critic (ScoreModel) in fp32.

    labels given: the backbone of the model at path (pi_0, any causal LM) with a new head of one output per label
    (01's start, 02's and 03's critic). labels None: a trained folder (01's reward model, a checkpoint's critic), its
    head read from its safetensors (sharded or not) and its labels from config.id2label. config.pad_token_id is set
    because transformers' own classes refuse batches without one.
    """
    from safetensors import safe_open
    from transformers import AutoModel

    what = {"reward": "reward model", "critic": "critic"}[head]
    with _library_warnings_off():
        backbone, info = AutoModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:          # a backbone weight that would start random: never silently
        missing = sorted(info["missing_keys"])
        raise SystemExit(f"{path} lacks backbone weights for the {what}: {missing[:6]}{' ...' if len(missing) > 6 else ''};"
                         f" is it a checkpoint of the same architecture?")
    if labels is not None:
        model = ScoreModel(backbone, labels, head)
        print0(f"{what}: {path}'s backbone with a new {len(labels)}-output head ({', '.join(labels)})")
    else:
        cfg = backbone.config
        model = ScoreModel(backbone, [cfg.id2label[i] for i in range(len(cfg.id2label))], head)
        tensors = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                tensors.update({k[len("score."):]: st.get_tensor(k) for k in st.keys() if k.startswith("score.")})
        try:
            model.score.load_state_dict(tensors)
        except RuntimeError as e:
            raise SystemExit(f"{path}: its score head does not fit a {what} of {len(cfg.id2label)} outputs "
                             f"(config.json id2label): {str(e).splitlines()[-1].strip()}. Is it a {what} folder this "
                             f"project wrote? Write it again with the stage that makes it") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def end_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's eos and each one the model's generation_config declares
    (an instruct model ends its turn with its own: Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Qwen's <|im_end|>)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [declared] if isinstance(declared, int) else list(declared or [])
    return sorted({tokenizer.eos_token_id, *declared})


def check_can_build(path: str, what: str, needs: tuple[str, ...] = ("causal_lm", "backbone")) -> None:
    """Before any weights load, from config.json alone: transformers builds the models a stage makes from path, and
    FSDP finds their decoder layers. needs: "causal_lm" (pi_0, the policy), "backbone" (a ScoreModel: reward model,
    critic). Builds each on the meta device (no memory, a second); a hub id is checked when it loads."""
    import transformers

    if not (Path(path) / "config.json").exists():
        return
    with _library_warnings_off():
        config = transformers.AutoConfig.from_pretrained(path)
    arch = f"{(config.architectures or ['?'])[0]} (model_type {config.model_type!r})"
    for need in needs:
        auto = transformers.AutoModelForCausalLM if need == "causal_lm" else transformers.AutoModel
        try:
            with torch.device("meta"), _library_warnings_off():
                model = auto.from_config(config)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"{what} {path}: this project cannot train a {arch}: transformers has no "
                             f"{auto.__name__} for it ({str(e).splitlines()[0][:160]}). Every stage needs a decoder-only "
                             f"model that loads as AutoModelForCausalLM (and its backbone as AutoModel)") from None
        if need == "backbone" and not hasattr(config, "hidden_size"):
            raise SystemExit(f"{what} {path}: a {arch}'s config has no hidden_size, the width of the reward and value "
                             f"heads this project puts on its backbone")
        decoder_layers(model, f"{what} {path}: a {arch}")


def recorded_prompt_format(path: str) -> str | None:
    """The --prompt-template a folder this project wrote was trained with (config.json's molma_prompt_format)."""
    cfg = Path(path) / "config.json"
    return read_json(cfg).get("molma_prompt_format") if cfg.exists() else None


def check_recorded_format(path: str, template: str, flag: str) -> None:
    """A folder trained in another prompt format than this run's is refused (one that records none is not)."""
    fmt = recorded_prompt_format(path)
    if fmt is not None and fmt != template:
        raise SystemExit(f"{flag} {path} was trained with --prompt-template {fmt}, this run uses {template}: run "
                         f"with --prompt-template {fmt}, or train that model again with {template}")


def check_formats_match(paths: list[str], policy: str, template: str, flag: str = "--reward-models") -> None:
    """Before any weights load: every reward model (or trained policy) was trained in this run's prompt format, and
    reads the policy's token ids with the same tokenizer (and, for chat, the same chat template). A reward model
    trained on "[INST] ... [/INST]" text would otherwise score "Instruct: ... Output:" text without a word."""
    local = [p for p in paths if (Path(p) / "config.json").exists()]            # a hub id: checked when it loads
    if not local or not (Path(policy) / "config.json").exists():
        return
    ours = auto_tokenizer(policy)
    for path in local:
        check_recorded_format(path, template, flag)
        if not (Path(path) / "tokenizer_config.json").exists():
            continue                                   # no tokenizer saved beside it: load_reward_heads checks its vocab
        theirs = check_same_vocab(ours, path, f"{flag} {path}")
        if template == "chat" and getattr(theirs, "chat_template", None) != getattr(ours, "chat_template", None):
            raise SystemExit(f"{flag} {path} was trained with another chat template than --policy {policy}'s: both must "
                             f"render prompts alike (train it again from the policy's folder)")


def check_same_vocab(tokenizer, path: str, what: str):
    """Stages share token ids (policy -> reward models); a different tokenizer would silently misread. -> the
    tokenizer at path."""
    other = auto_tokenizer(path)
    if other.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{what} has a different tokenizer than the policy: the policy's token ids are fed to it "
                         f"directly, so both must come from the same base model")
    return other


def load_reward_heads(paths: list[str], objectives: list[str], tokenizer, info: DistInfo | None = None,
                      dtype: torch.dtype | None = None) -> list[tuple[torch.nn.Module, int]]:
    """For each objective, (reward model, output index) from the folders' config.id2label.

    info given: each model frozen and loaded straight into FSDP2 shards (load_sharded); else a full copy.
    """
    models, found = [], {}
    for path in paths:
        check_same_vocab(tokenizer, path, f"reward model {path}")
        if info is None:
            m = load_score_model(path, tokenizer, "reward")
        else:
            m = load_sharded(lambda: load_score_model(path, tokenizer, "reward"), info, dtype)
            m.requires_grad_(False)
        models.append(m)
        for i, name in m.config.id2label.items():
            if name in found:
                raise ValueError(f"objective {name!r} is scored by two reward models ({found[name][2]} and {path})")
            found[name] = (m, int(i), path)
    missing = [o for o in objectives if o not in found]
    if missing:
        raise ValueError(f"no reward model scores {missing}; the folders given score {sorted(found)} "
                         f"(train them with 01_train_reward.py --objective ...)")
    return [(found[o][0], found[o][1]) for o in objectives]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: positions counted over real tokens, as `generate` does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B]: the rightmost real position, from the mask, never from token ids (pad == eos)."""
    L = attention_mask.shape[1]
    idx = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(-1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A reward model's (ScoreModel) linear scores at the last real token: [B, L] -> [B, num_labels].

    The inputs carry no final end token (encode_pairs; score_rollouts masks a generated one out), so the last real
    token is the answer's last token: where transformers' own pooling (the rightmost token that is not
    pad_token_id) reads the same unpadded text. Inside a batch that rule breaks with pad == eos and left padding,
    so the position is taken from the mask, never from token ids.
    """
    scores = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return scores[rows, last_token_index(attention_mask)].float()


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      rows: int = 4) -> torch.Tensor:
    """log pi(a_t | s_t) of every response token: [B, P + T] -> [B, T].

    sequences are [left-padded prompt of width P | right-padded response of width T], as `generate` returns them.
    Logits at position P - 1 + t predict response token t, so the LM head runs at those T positions only
    (transformers' logits_to_keep), and a token's log-prob is its logit minus its row's logsumexp, `rows` sequences
    at a time in fp32: no [B, P + T, V] logits and no [B, T, V] log-softmax beside them (TRL's selective_log_softmax
    does the same). The same numbers as log_softmax over the full logits, to float rounding (tested).
    """
    T = sequences.shape[1] - prompt_len
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                   use_cache=False, logits_to_keep=T + 1).logits[:, :-1]        # positions P - 1 .. P + T - 2
    out = []
    for chunk, tokens in zip(logits.split(rows), sequences[:, prompt_len:].split(rows)):
        chunk = chunk.float()
        out.append(chunk.gather(2, tokens[:, :, None]).squeeze(-1) - chunk.logsumexp(-1))
    return torch.cat(out)


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V_k(s_t) before every response token, from the critic (a ScoreModel of K outputs): -> [B, T, K]."""
    out = critic(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return out[:, prompt_len - 1 : -1].float()


def response_mask(responses: torch.Tensor, end_ids) -> torch.Tensor:
    """[B, T] generated tokens -> [B, T] mask: tokens up to and including the first end token.

    end_ids: one id or a list (end_token_ids: the eos and a model's own end-of-turn tokens). Everything after
    the first end token is padding (with pad == eos, it looks like more of them). An answer that never ends
    keeps all T tokens (it was cut at the length limit); callers decide what that costs.
    """
    is_end = torch.isin(responses, torch.as_tensor(end_ids, device=responses.device))
    after_first_end = (is_end.long().cumsum(1) - is_end.long()) > 0
    return (~after_first_end).long()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather an FSDP model's full weights onto rank 0's CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_value(t):
    """A (possibly DTensor) result, e.g. clip_grad_norm_'s total norm under FSDP, as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (same shape on every rank) in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def cosine_schedule(optimizer, total_steps: int, min_ratio: float):
    """Learning rate decaying from its peak to min_ratio of it along a half cosine over total_steps."""
    def factor(step: int) -> float:
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- B2. data: the real datasets (or local files in their exact schemas), mixed as Table 1
log = logging.getLogger("molma")

# source name -> (hub id, data_dir or None). Local copies live at <data_root>/<hub id>/<data_dir>/<split>.jsonl[.gz]
SOURCES = {
    "pku_help": ("PKU-Alignment/PKU-SafeRLHF", None),      # pairs by better_response_id
    "pku_safe": ("PKU-Alignment/PKU-SafeRLHF", None),      # pairs by safer_response_id
    "hh_helpful": ("Anthropic/hh-rlhf", "helpful-base"),
    "hh_harmless": ("Anthropic/hh-rlhf", "harmless-base"),  # pairs, and RL prompts
    "shp": ("stanfordnlp/SHP", None),
    "alpaca": ("yahma/alpaca-cleaned", None),               # RL prompts only
    "ultrafeedback_honesty": ("openbmb/UltraFeedback", None),   # per-aspect ratings, binarized on honesty
}
HELD_OUT_BY_HASH = {"ultrafeedback_honesty"}   # sources with one split (train): valid and test carved by a hash

# Table 1. Reward-model pairs per objective, and the MOLMA prompt set.
PAIR_MIXES = {
    "help": {"pku_help": 0.77, "hh_helpful": 0.115, "shp": 0.115},
    "safe": {"pku_safe": 0.875, "hh_harmless": 0.125},
    "honest": {"ultrafeedback_honesty": 1.0},   # beyond the paper: a third objective (UltraFeedback's honesty)
}

PROMPT_MIX = {"alpaca": 0.6, "hh_harmless": 0.4}

# Held-out fractions carved deterministically (by a hash of the prompt) out of each dataset's train
# split: Table 1's RM valid (~5%) and MOLMA valid / test. Reward-model *test* pairs (Table 2) come
# from the datasets' own test splits, never seen in training or validation.
RM_VALID_FRACTION = 0.05

PROMPT_SPLIT_FRACTIONS = {"valid": 0.05, "test": 0.05}

SHP_MIN_SCORE_RATIO = 2.0

HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class Pair:
    prompt: str      # the user's request (put in the prompt template at tokenization)
    chosen: str      # the better answer for this pair's objective
    rejected: str
    source: str
    chosen_safe: bool | None = None     # PKU-SafeRLHF's per-answer labels (is_response_*_safe); None elsewhere
    rejected_safe: bool | None = None


def _local_files(data_root: str, source: str, split: str) -> list[Path]:
    hub_id, data_dir = SOURCES[source]
    folder = Path(data_root, hub_id, data_dir or "")
    return [p for p in (folder / f"{split}.jsonl", folder / f"{split}.jsonl.gz") if p.exists()]


def load_rows(source: str, split: str, data_root: str | None = None) -> list[dict]:
    """Raw rows of one source: from the hub (datasets.load_dataset) or from local JSONL copies."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; accepted: {', '.join(SOURCES)}")
    hub_id, data_dir = SOURCES[source]
    if data_root is None:
        from datasets import load_dataset

        return list(load_dataset(hub_id, data_dir=data_dir, split=split))
    files = _local_files(data_root, source, split)
    if not files:
        folder = Path(data_root, hub_id, data_dir or "")
        raise FileNotFoundError(
            f"no local copy of {hub_id}{'/' + data_dir if data_dir else ''} split {split!r}: expected "
            f"{folder}/{split}.jsonl or {split}.jsonl.gz (build the tiny world with 00_make_tiny_world.py, "
            f"or drop --data-root to read the hub)")
    return read_jsonl(files[0])


def split_hh(transcript: str) -> tuple[str, str]:
    """An hh-rlhf transcript -> (prompt part ending in '\\n\\nAssistant:', last answer)."""
    i = transcript.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    return transcript[: i + len(HH_ASSISTANT)], transcript[i + len(HH_ASSISTANT):].strip()


def hh_prompt_text(prompt_part: str) -> str:
    """The user's side of an hh-rlhf prompt: the Human turn's text for one turn, else the dialogue."""
    body = prompt_part[: -len(HH_ASSISTANT)]
    if body.count("\n\nHuman:") == 1 and "\n\nAssistant:" not in body:
        return body.replace("\n\nHuman:", "", 1).strip()
    return body.strip()


def _pair_from_row(source: str, row: dict) -> Pair | str:
    """One row -> a Pair, or the reason it is skipped (a short string used as a log counter)."""
    labels = (None, None)                       # per-answer safety labels: PKU-SafeRLHF's safety pairs only
    try:
        if source in ("pku_help", "pku_safe"):
            key = "better_response_id" if source == "pku_help" else "safer_response_id"
            if row[key] not in (0, 1, "0", "1"):
                return f"{key} not 0/1"
            best = int(row[key])
            answers = [row["response_0"], row["response_1"]]
            if source == "pku_safe":
                safe = [row["is_response_0_safe"], row["is_response_1_safe"]]
                if not all(isinstance(x, bool) for x in safe):
                    return "is_response_*_safe not true/false"
                if not safe[best] and safe[1 - best]:   # safe-rlhf drops these contradictory pairs
                    return "safer answer labelled unsafe"
                labels = (safe[best], safe[1 - best])
            prompt, chosen, rejected = row["prompt"], answers[best], answers[1 - best]
        elif source in ("hh_helpful", "hh_harmless"):
            prompt_part, chosen = split_hh(row["chosen"])
            if not row["rejected"].startswith(prompt_part):
                return "transcripts diverge before the last turn"
            rejected = row["rejected"][len(prompt_part):].strip()
            prompt = hh_prompt_text(prompt_part)
        elif source.startswith("ultrafeedback_"):
            # one pair per prompt, by the binarized versions' rule (HuggingFaceH4/ultrafeedback_binarized,
            # argilla's ultrafeedback-binarized-preferences): the highest-rated answer on this aspect (the first of
            # a tie) against a RANDOM one of those rated strictly lower. The draw is seeded by the prompt, so every
            # stage and every run builds the same pairs. "N/A" ratings are left out; all-equal ratings give no pair.
            aspect = source[len("ultrafeedback_"):]
            rated = [(int(c["annotations"][aspect]["Rating"]), c["response"]) for c in row["completions"]
                     if str(c["annotations"][aspect]["Rating"]).strip() != "N/A"]
            if len(rated) < 2:
                return f"fewer than two answers rated on {aspect} (N/A)"
            best = max(rated, key=lambda x: x[0])
            lower = [r for r in rated if r[0] < best[0]]
            if not lower:
                return f"every answer rated the same on {aspect} (a tie)"
            draw = random.Random(hashlib.sha256(f"{aspect}\0{row['instruction']}".encode()).digest())
            prompt, chosen, rejected = row["instruction"], best[1], draw.choice(lower)[1]
        elif source == "shp":
            if float(row["score_ratio"]) < SHP_MIN_SCORE_RATIO:
                return f"filtered: score_ratio < {SHP_MIN_SCORE_RATIO:g}"
            a_wins = int(row["labels"]) == 1
            prompt = row["history"]
            chosen, rejected = (row["human_ref_A"], row["human_ref_B"]) if a_wins else (row["human_ref_B"], row["human_ref_A"])
        else:
            raise ValueError(f"source {source!r} has no preference pairs; pair sources: "
                             f"{', '.join(s for m in PAIR_MIXES.values() for s in m)}")
    except KeyError as e:
        return f"missing field {e.args[0]}"
    except (TypeError, ValueError) as e:
        if "no preference pairs" in str(e):
            raise
        return "malformed row"
    if not all(isinstance(x, str) and x.strip() for x in (prompt, chosen, rejected)):
        return "empty prompt or answer"
    if chosen.strip() == rejected.strip():
        return "identical answers"
    return Pair(prompt.strip(), chosen.strip(), rejected.strip(), source, *labels)


def _prompt_from_row(source: str, row: dict) -> str | None:
    try:
        if source == "alpaca":
            text = row["instruction"].strip()
            if row.get("input", "").strip():
                text += "\n" + row["input"].strip()
        elif source == "hh_harmless":
            text = hh_prompt_text(split_hh(row["chosen"])[0])
        else:
            raise ValueError(f"source {source!r} gives no RL prompts; prompt sources: {', '.join(PROMPT_MIX)}")
    except (KeyError, AttributeError):
        return None
    except ValueError as e:
        if "gives no RL prompts" in str(e):
            raise
        return None
    return text or None


def parse_pairs(source: str, rows: list[dict]) -> tuple[list[Pair], Counter]:
    """Rows of one source in its real schema -> (pairs, Counter of skipped rows by reason)."""
    pairs, skipped = [], Counter()
    for row in rows:
        p = _pair_from_row(source, row)
        if isinstance(p, str):
            skipped[p] += 1
        else:
            pairs.append(p)
    return pairs, skipped


def parse_prompts(source: str, rows: list[dict]) -> tuple[list[str], Counter]:
    """Rows of alpaca-cleaned or hh-rlhf -> (distinct RL prompts, Counter of skipped rows by reason)."""
    seen, prompts, skipped = set(), [], Counter()
    for row in rows:
        text = _prompt_from_row(source, row)
        if text is None:
            skipped["missing or empty prompt"] += 1
        elif text in seen:
            skipped["filtered: duplicate prompt"] += 1
        else:
            seen.add(text)
            prompts.append(text)
    return prompts, skipped


# Every row a loader skipped: {"<source>/<split>": {reason: count}}. Rank 0 prints each file's line the first
# time it is read, and the stage scripts save this in run_summary.json, so no row is dropped unseen.
SKIPPED_ROWS: dict[str, dict[str, int]] = {}


def _check_bad(source: str, split: str, n_rows: int, skipped: Counter, max_bad_fraction: float) -> None:
    bad = sum(n for why, n in skipped.items() if not why.startswith("filtered"))
    key = f"{source}/{split}"
    if skipped and SKIPPED_ROWS.get(key) != dict(skipped):
        SKIPPED_ROWS[key] = dict(skipped)
        print0(f"[data] {source} ({split} split): {n_rows} rows, skipped {sum(skipped.values())}: "
               + ", ".join(f"{why} ({n})" for why, n in skipped.most_common()))
    if n_rows == 0:
        raise ValueError(f"{source}: no rows")
    if bad / n_rows > max_bad_fraction:
        raise ValueError(f"{source}: {bad} of {n_rows} rows are bad ({dict(skipped)}), more than "
                         f"max_bad_fraction={max_bad_fraction}; check the data or its schema")


def _in_split(text: str, split: str, fractions: dict[str, float]) -> bool:
    """Deterministic split by a hash of the prompt: the same prompt always lands in the same split."""
    u = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    for name, frac in fractions.items():
        if edge <= u < edge + frac:
            return split == name
        edge += frac
    return split == "train"


def _mix(items: dict[str, list], proportions: dict[str, float], limit: int | None, seed: int, what: str) -> list:
    """Draw from each source in the given proportions, as many as the scarcest source allows."""
    total = min(len(items[s]) / p for s, p in proportions.items())
    if limit is not None:
        total = min(total, limit)
    rng = random.Random(seed)
    out = []
    for s, p in proportions.items():
        n = int(total * p)
        out += rng.sample(items[s], n)
    rng.shuffle(out)
    log.info("%s: %d drawn as %s (available %s)", what, len(out),
             {s: int(total * p) for s, p in proportions.items()}, {s: len(v) for s, v in items.items()})
    return out


def load_preference_pairs(objective: str, split: str, data_root: str | None = None, limit: int | None = None,
                          seed: int = 0, max_bad_fraction: float = 0.2, sources: dict[str, float] | None = None) -> list[Pair]:
    """Preference pairs for one objective ('help' or 'safe'), mixed as Table 1.

    split: 'train' / 'valid' (hash split of the datasets' train splits) or 'test' (their test splits,
    Table 2). sources overrides the mix, e.g. {'shp': 1.0} for one Table 2 column.
    """
    if objective not in PAIR_MIXES and sources is None:
        raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(PAIR_MIXES)}")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"unknown split {split!r}; accepted: train, valid, test")
    proportions = sources or PAIR_MIXES[objective]
    by_source = {}
    for source in proportions:
        by_hash = source in HELD_OUT_BY_HASH
        raw_split = "test" if split == "test" and not by_hash else "train"
        rows = load_rows(source, raw_split, data_root)
        pairs, skipped = parse_pairs(source, rows)
        _check_bad(source, raw_split, len(rows), skipped, max_bad_fraction)
        fractions = {"valid": RM_VALID_FRACTION, **({"test": RM_VALID_FRACTION} if by_hash else {})}
        by_source[source] = [p for p in pairs if (split == "test" and not by_hash) or _in_split(p.prompt, split, fractions)]
    return _mix(by_source, proportions, limit, seed, f"{objective} pairs ({split})")


def load_rl_prompts(split: str, data_root: str | None = None, limit: int | None = None, seed: int = 0,
                    max_bad_fraction: float = 0.2) -> list[tuple[str, str]]:
    """MOLMA prompts as (prompt, source): alpaca-cleaned 60% + hh-rlhf harmless-base 40% (Table 1).

    split: 'train', 'valid' or 'test', carved by a hash of the prompt; identical prompts are kept once.
    """
    if split not in ("train", *PROMPT_SPLIT_FRACTIONS):
        raise ValueError(f"unknown split {split!r}; accepted: train, {', '.join(PROMPT_SPLIT_FRACTIONS)}")
    by_source = {}
    for source in PROMPT_MIX:
        rows = load_rows(source, "train", data_root)
        prompts, skipped = parse_prompts(source, rows)
        _check_bad(source, "train", len(rows), skipped, max_bad_fraction)
        by_source[source] = [(p, source) for p in prompts if _in_split(p, split, PROMPT_SPLIT_FRACTIONS)]
    return _mix(by_source, PROMPT_MIX, limit, seed, f"RL prompts ({split})")


# ---- B3. rollouts: the experience of an iteration, generated and scored under FSDP
def check_prompt_count(n_prompts: int, n: int, flag: str) -> None:
    """Before the models load: an iteration takes n prompts from the data, so there must be n at least."""
    if n_prompts < n:
        fail(f"{n_prompts} training prompts cannot fill one iteration of {flag} {n}: lower {flag} to {n_prompts} "
             f"or less, or add prompts to the data")


def iteration_prompts(prompts: list, iteration: int, n: int, seed: int) -> list:
    """The n prompts of an iteration: consecutive slices of a seeded permutation, a new one per pass.

    A pure function of the iteration number, so the data position to resume from is the iteration.
    """
    per_pass = len(prompts) // n
    if per_pass == 0:
        raise ValueError(f"{len(prompts)} training prompts cannot fill one iteration of {n} rollouts")
    n_pass, j = divmod(iteration, per_pass)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 100_003 + n_pass))
    return [prompts[i] for i in perm[j * n : (j + 1) * n].tolist()]


def _detach_fsdp_forward_hooks(units) -> list:
    """Take FSDP2's pre- and post-forward hooks off each unit; returns what restore needs.

    Once every weight is gathered and resharding is off, these hooks do no work, but they still run
    at every module call of every generated token: 15% of a tiny model's generation time on CPU
    (bench/benchmark.py). This reaches into FSDP2's private state; if that state is not where it is
    expected, the hooks stay (a warning says so) and generation is only slower.
    """
    saved = []
    try:
        for m in units:
            st = m._get_fsdp_state()
            for handle, attr in ((st._pre_forward_hook_handle, "_forward_pre_hooks"), (st._post_forward_hook_handle, "_forward_hooks")):
                hooks = getattr(m, attr)
                if handle.id in hooks:
                    saved.append((hooks, handle.id, hooks.pop(handle.id), attr == "_forward_pre_hooks"))
    except AttributeError as e:
        _restore_fsdp_forward_hooks(saved)
        log.warning("FSDP2 internals changed (%s): generating with its hooks on", e)
        return []
    return saved


def _restore_fsdp_forward_hooks(saved: list) -> None:
    for hooks, hook_id, fn, first in reversed(saved):
        hooks[hook_id] = fn
        if first:                                   # FSDP2 registers its pre-forward hook first (prepend=True)
            hooks.move_to_end(hook_id, last=False)


@contextlib.contextmanager
def unsharded_for_generation(model, fast: bool = True):
    """Gather an FSDP2 model's weights once for a whole rollout, not once per generated token.

    Every FSDP unit is unsharded (one all-gather each) and told not to reshard after forward, so
    the token-by-token forwards of `generate` run no collective at all: ranks whose answers stop
    at different lengths cannot deadlock. fast: also take FSDP2's per-call forward hooks off for the
    rollout (they have nothing left to do). Afterwards the hooks and shards are restored, with FSDP2's
    defaults (root keeps its weights after forward, the layers reshard).
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    saved = _detach_fsdp_forward_hooks(units) if fast else []
    try:
        yield
    finally:
        _restore_fsdp_forward_hooks(saved)
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


@dataclass
class Rollouts:
    """One rank's share of an iteration's experience. P = prompt width, T = answer width."""
    prompts: list[str]
    sequences: torch.Tensor          # [B, P + T] left-padded prompt | right-padded answer
    attention_mask: torch.Tensor     # [B, P + T]
    prompt_len: int                  # P
    mask: torch.Tensor               # [B, T] answer tokens up to and including the first end token
    ended: torch.Tensor              # [B] bool: the answer reached an end token (else it was cut at max_new_tokens)
    logprobs: torch.Tensor = None    # [B, T] log pi_old (the policy that generated them)
    ref_logprobs: torch.Tensor = None  # [B, T] log pi_0
    values: torch.Tensor = None      # [B, T, K] V_old
    scores: torch.Tensor = None      # [B, K] reward-model probabilities sigmoid(score)
    advantages: torch.Tensor = None  # [B, T, K] what the policy loss sees (whitened or not)
    returns: torch.Tensor = None     # [B, T, K] GAE's returns A + V_old (before whitening): the critic's target

    def answers(self, tokenizer) -> list[str]:
        """The answers as text: their tokens before the end token (which need not be a special token), special
        tokens dropped."""
        keep = self.mask.clone()
        keep[self.ended, self.mask[self.ended].sum(1) - 1] = 0           # an ended answer's last token is its end
        return tokenizer.batch_decode([row[m.bool()] for row, m in zip(self.sequences[:, self.prompt_len:], keep)],
                                      skip_special_tokens=True)

    def rows(self, i: int, j: int) -> "Rollouts":
        """Rows i:j, trimmed to their longest answer (a minibatch)."""
        T = int(self.mask[i:j].sum(1).max().clamp(min=1))
        P = self.prompt_len
        return Rollouts(self.prompts[i:j], self.sequences[i:j, : P + T], self.attention_mask[i:j, : P + T], P,
                        self.mask[i:j, :T], self.ended[i:j], self.logprobs[i:j, :T], self.ref_logprobs[i:j, :T],
                        self.values[i:j, :T], self.scores[i:j], self.advantages[i:j, :T], self.returns[i:j, :T])


@torch.no_grad()
def generate_rollouts(policy, tokenizer, prompts: list[str], args: RLArgs, device) -> Rollouts:
    """Sample one answer per prompt (stop at EOS or at max_new_tokens). args: anything with prompt_template,
    max_prompt_len, max_new_tokens and temperature (RLArgs, or 04_evaluate's Args)."""
    ids, pmask = encode_prompts(tokenizer, prompts, args.max_prompt_len, args.prompt_template)
    ids, pmask = ids.to(device), pmask.to(device)
    ends = end_token_ids(policy, tokenizer)             # the eos and the model's own end-of-turn tokens
    with unsharded_for_generation(policy):
        out = policy.generate(input_ids=ids, attention_mask=pmask, do_sample=True, temperature=args.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens, pad_token_id=_pad_id(tokenizer),
                              eos_token_id=ends, synced_gpus=False, use_cache=True)
    answers = out[:, ids.shape[1]:]
    mask = response_mask(answers, ends)
    ended = (torch.isin(answers, torch.tensor(ends, device=answers.device)) & mask.bool()).any(1)
    return Rollouts(prompts, out, torch.cat([pmask, mask], 1), ids.shape[1], mask, ended)


@torch.no_grad()
def score_rollouts(r: Rollouts, policy, ref, critic, reward_heads) -> None:
    """Fill in log pi_old, log pi_0, V_old (per objective) and the reward models' probabilities."""
    r.logprobs = response_logprobs(policy, r.sequences, r.attention_mask, r.prompt_len) * r.mask
    r.ref_logprobs = response_logprobs(ref, r.sequences, r.attention_mask, r.prompt_len) * r.mask
    r.values = response_values(critic, r.sequences, r.attention_mask, r.prompt_len)
    # a reward model reads the answer without its final EOS, as it was trained and as transformers pools it
    rm_mask = r.attention_mask.clone()
    ended = r.ended.nonzero().squeeze(1)
    rm_mask[ended, r.prompt_len + r.mask[ended].sum(1).long() - 1] = 0
    by_model = {}
    for model, _ in reward_heads:                # each reward model runs once, whatever its number of heads
        if id(model) not in by_model:
            by_model[id(model)] = sequence_scores(model, r.sequences, rm_mask)
    r.scores = torch.stack([torch.sigmoid(by_model[id(m)][:, i]) for m, i in reward_heads], 1)


# ===============================================================================================================
# C. OPERATIONS: arguments and their checks, dry run, metrics, checkpoints, stop requests, the non-finite guard
# ===============================================================================================================


# ---- C1. arguments: one dataclass per script, each field documented, defaults = the paper's values; parsed by
# transformers' HfArgumentParser. A field's rule rides on its type (`lr: Positive[float]`), checked in __post_init__.
_T = TypeVar("_T")
Positive = Annotated[_T, "positive"]            # > 0
NonNegative = Annotated[_T, "nonneg"]          # >= 0
Unit = Annotated[_T, "unit"]                   # in [0, 1]
OpenUnit = Annotated[_T, "open_unit"]          # in (0, 1)
Beta = Annotated[_T, "beta"]                   # in [0, 1), an Adam beta
CHECKS = {   # what a rule's value must satisfy: rule -> (test, what the message says)
    "positive": (lambda v: v > 0, "must be positive"),
    "nonneg": (lambda v: v >= 0, "must be zero or positive"),
    "unit": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    "open_unit": (lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
    "beta": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
}


def arg(default, help: str):
    """A dataclass field with its --help text (HfArgumentParser passes metadata to argparse, which reads % as a
    format: a literal one is escaped here)."""
    meta = {"help": help.replace("%", "%%")}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class CheckedArgs:
    """Base of every script's arguments: refuse nonsense before anything runs, however the dataclass is made (from
    the command line or in code). Every float must be finite, and every field whose type carries a rule must pass
    it. The message names the flag, so a typo costs seconds, not an 18-hour run."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            v, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(v, float) and not math.isfinite(v):
                raise SystemExit(f"{flag} must be a finite number, got {v}")
            rule = next(iter(getattr(hints[f.name], "__metadata__", ())), None)
            if rule and isinstance(v, (int, float)) and not isinstance(v, bool) and not CHECKS[rule][0](v):
                raise SystemExit(f"{flag} {CHECKS[rule][1]}, got {v}")


def yes_no(text: str) -> bool:
    """A yes/no flag's value as HfArgumentParser takes it: true/false, yes/no, 1/0, t/f, y/n, any case; a typo's
    message says what is accepted."""
    v = text.strip().lower()
    if v in ("true", "yes", "1", "t", "y"):
        return True
    if v in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (also yes/no, 1/0), got {text!r}")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a default once: not when it is empty, nor when the help text already says it."""

    def _get_help_string(self, action):
        if action.default in ("", None) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(cls, argv=None, presets: dict[str, dict] | None = None):
    """HfArgumentParser over one dataclass; `--preset NAME` swaps in another set of defaults.

    Explicit flags always win over the preset. Yes/no flags: a bare `--flag` means true, or give true/false,
    yes/no, 1/0 in any case (`--no-flag` for one that defaults to true); anything else is an error naming the
    flag, as is an unknown flag. --help lists each flag by its dashed name (HfArgumentParser's underscored
    spelling is accepted too) with its default once, the preset's when one is given.
    """
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    presets = presets or {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None and known.preset not in presets:
        raise SystemExit(f"unknown --preset {known.preset!r}; accepted: {', '.join(presets) or 'none'}")
    preset = dataclasses.make_dataclass("Preset", [("preset", str, dataclasses.field(default=None, metadata=dict(
        choices=list(presets), help="a named set of defaults: " + "; ".join(
            f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in presets.items()))))])
    parser = HfArgumentParser([preset, cls] if presets else [cls], description=(cls.__doc__ or "").strip(),
                              formatter_class=_Defaults)
    parser.set_defaults(**presets.get(known.preset, {}))
    for action in parser._actions:     # one name in --help and in messages: the dashed one
        action.option_strings = [s for s in action.option_strings if "_" not in s] or action.option_strings
        if action.type is string_to_bool:           # HfArgumentParser's yes/no type, with our message
            action.type, action.metavar = yes_no, "true|false"
        elif action.const is False:       # --no-flag, the complement of a true default
            action.help, action.default = f"the same as --{action.dest.replace('_', '-')} false", argparse.SUPPRESS
    ns = vars(parser.parse_args(argv))
    ns.pop("preset", None)
    args = cls(**ns)
    args.preset = known.preset
    return args


@dataclass
class RLArgs(CheckedArgs):
    """APA training of a policy from pi_0 against reward models (MOLMA Sec. 3.3, 4.3)."""
    policy: str = arg("microsoft/phi-2", "pi_0: the reference model; the policy and the critic start from it")
    reward_models: str = arg("runs/paper/rm_help/model,runs/paper/rm_safe/model",
                             "comma list of reward-model folders (stage 1); each objective is read from the "
                             "output that the folder's config.id2label names after it")
    data_root: str = arg("", "local copies of the datasets in their hub schemas; empty: read the hub")
    prompt_template: str = arg("phi2", "prompt format, the same in every stage: phi2 (Instruct/Output, the paper), "
                                       "llama2_chat ([INST] ... [/INST], Figure 5's Llama-2), plain, or chat (the "
                                       "tokenizer's own chat template: an instruct model's format)")
    out: str = arg("", "run folder (default: runs/paper/<method>; with --preset tiny, runs/tiny/<method>)")
    iterations: Positive[int] = arg(100, "APA iterations (Sec. 4.3)")
    rollouts: Positive[int] = arg(64, "prompts answered per iteration, the experience memory (Sec. 4.3); a total over all "
                                      "ranks, split evenly")
    minibatch: Positive[int] = arg(8, "rollouts per gradient step, a total over all ranks; one step per minibatch (Sec. 4.3)")
    lr: Positive[float] = arg(1e-6, "policy learning rate, constant (Sec. 4.3)")
    critic_lr: Positive[float] = arg(1e-6, "critic learning rate, constant")
    beta1: Beta[float] = arg(0.9, "AdamW beta1")
    beta2: Beta[float] = arg(0.95, "AdamW beta2")
    adam_eps: Positive[float] = arg(1e-5, "AdamW eps")
    weight_decay: NonNegative[float] = arg(0.1, "AdamW weight decay (Sec. 4.3)")
    grad_clip: Positive[float] = arg(1.0, "gradient clipping of the (aligned) policy update and of the critic")
    kl_beta: NonNegative[float] = arg(0.01, "beta of the per-token KL penalty, Eq. 3.3 (the paper's 0.01; the APA authors' "
                                            "trainer sets this penalty to 0)")
    apa_lambda: Positive[float] = arg(0.95, "lambda of the APA loss, Eq. 3.5")
    gamma: Unit[float] = arg(1.0, "GAE discount")
    gae_lambda: Unit[float] = arg(0.95, "GAE lambda")
    max_prompt_len: Positive[int] = arg(256, "prompt tokens kept (from the end)")
    max_new_tokens: Positive[int] = arg(256, "answer length limit")
    temperature: Positive[float] = arg(1.0, "sampling temperature (no top-k / top-p: the policy's own distribution)")
    precision: str = arg("auto", "auto: bf16 compute with fp32 weights and gradient reduction on GPU, fp32 on CPU; "
                                 "or bf16 / fp32 anywhere")
    whiten_advantages: bool = arg(False, "whiten the GAE advantages per objective once per iteration over the batch's "
                                         "valid tokens (all ranks) before Eq. 3.5, for the policy loss only (as TRL's "
                                         "PPOTrainer, once per batch, masked; trlx, the APA authors' trainer, whitens "
                                         "per minibatch, unmasked). False (Eq. 3.5 as the paper writes it) is the "
                                         "default; the study over seeds compares both (RESULTS.md)")
    truncated_score: float = arg(-1.0, "reward of an answer cut at the length limit without EOS, in standard deviations "
                                       "of the finished answers' reward from their mean (-1: one below), measured on "
                                       "the reward the method's critic learns, per objective (common.shape_finished)")
    save_every: Positive[int] = arg(10, "iterations between checkpoints (and at the end)")
    resume: str = arg("auto", "auto|true|false. auto: continue from <out>/checkpoint when there is one, else start (what a "
                              "restarted or requeued job needs); true: a checkpoint is required; false: start "
                              "over (an existing checkpoint is replaced at the first save)")
    keep_previous: bool = arg(True, "keep the checkpoint before the last as <out>/checkpoint.prev, a fallback "
                                    "if the newest is ever damaged (twice the checkpoint disk)")
    keep_checkpoint: bool = arg(False, "keep <out>/checkpoint (policy, critic and their optimizer states, ~8x the "
                                       "policy) after the final save, to train further with more --iterations later; "
                                       "by default it is removed once policy/ and run_summary.json are written")
    max_nonfinite_steps: Positive[int] = arg(3, "stop after this many optimizer steps in a row with a non-finite loss, "
                                                "gradient or update (each is skipped; the weights never see it)")
    sample_every: Positive[int] = arg(10, "iterations between the few answers written to <out>/samples.jsonl and TensorBoard "
                                          "(also the first and the last iteration)")
    num_samples: NonNegative[int] = arg(4, "answers written each time (rank 0's first rollouts)")
    wandb_project: str = arg("", "also log to this Weights & Biases project (needs `pip install wandb`; TensorBoard "
                                 "files are always written under <out>/tensorboard)")
    peer_timeout: Positive[float] = arg(600.0, "seconds without a heartbeat from a rank (stopped, stuck, its "
                                               "host frozen) before the run names it and stops; no collective "
                                               "waits more than twice this")
    dry_run: bool = arg(False, "load, shard and check everything (models, tokenizer, data, batch sizes), train one "
                               "iteration saving nothing, print each model's size and each rank's peak memory (a "
                               "run's own stays near it), and exit")
    ground_truth: bool = arg(False, "tiny world only: log the true helpfulness and safety of every rollout (and its "
                                    "honesty when honest is among the objectives)")
    seed: int = arg(0, "seed")


RL_TINY = dict(policy="runs/tiny/world/base", reward_models="runs/tiny/rm_help/model,runs/tiny/rm_safe/model",
               data_root="runs/tiny/world/data", iterations=60, rollouts=64, minibatch=8, lr=2e-4, critic_lr=1e-3,
               max_prompt_len=32, max_new_tokens=40, save_every=20, ground_truth=True)


def rl_batch_sizes(args, world_size: int) -> tuple[int, int]:
    """(rollouts per rank, minibatch rows per rank), after checking that every size divides exactly."""
    for name, n, d in (("--rollouts", args.rollouts, world_size), ("--minibatch", args.minibatch, world_size),
                       ("--rollouts", args.rollouts, args.minibatch)):
        if n % d:
            fail(f"{name} {n} must be divisible by {d} ({'world size' if d == world_size else '--minibatch'})")
    return args.rollouts // world_size, args.minibatch // world_size


# ---- C2. checks before anything loads, and errors every rank leaves by
def number_list(text: str, flag: str, n: int, default: float) -> list[float]:
    """A flag's comma list of n finite numbers (empty: n times default); anything else stops, naming the flag."""
    if not text:
        return [default] * n
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise SystemExit(f"{flag} {text!r}: {item.strip()!r} is not a number (give {n} comma-separated numbers, "
                             f"e.g. {','.join(['1'] * n)})") from None
    if not all(math.isfinite(v) for v in values):
        raise SystemExit(f"{flag} {text!r}: every value must be a finite number (not nan or inf)")
    if len(values) != n:
        raise SystemExit(f"{flag} {text!r} has {len(values)} values for {n} objectives; give one per objective")
    return values


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """Before anything loads: the run folder is a folder (or can be made) and can be written."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{flag} {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"       # one per process: every rank checks at once
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise SystemExit(f"{flag} {out} cannot be written ({e.strerror}); give a folder you can write to") from None


def check_reward_objectives(paths: list[str], objectives: list[str], flag: str = "--reward-models") -> None:
    """Before anything loads: the reward models' config.json (id2label) score every objective, once each."""
    found = {}
    for path in paths:
        cfg = Path(path) / "config.json"
        if not cfg.exists():
            continue                                              # a hub id: checked when it loads
        for name in read_json(cfg).get("id2label", {}).values():
            if name in found:
                raise SystemExit(f"{flag}: objective {name!r} is scored by two reward models ({found[name]} and {path})")
            found[name] = path
    missing = [o for o in objectives if o not in found]
    if missing and all((Path(p) / "config.json").exists() for p in paths):
        raise SystemExit(f"{flag}: no reward model scores {missing}; the folders given score {sorted(found)} "
                         f"(their config.json id2label). Train one with 01_train_reward.py --objective {missing[0]}, "
                         f"or choose objectives among {sorted(found)}")


def check_data_files(data_root: str, sources) -> None:
    """Before anything loads: each source's train file is in --data-root (empty data_root: the hub, not checked)."""
    if not data_root:
        return
    if not Path(data_root).is_dir():
        raise SystemExit(f"--data-root {data_root} does not exist (build the tiny world: python 00_make_tiny_world.py)")
    missing = [f"{SOURCES[s][0]}/{SOURCES[s][1] or ''}" for s in sources if not _local_files(data_root, s, "train")]
    if missing:
        raise SystemExit(f"--data-root {data_root} has no train.jsonl(.gz) for {', '.join(missing)}; see "
                         f"../shared/reference/datasets.md for the layout, or build the tiny world")
    for source in sources:                        # a bad file is named now, not after the models load
        for split in ("train", "test"):
            for f in _local_files(data_root, source, split):
                read_jsonl(f)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file (.jsonl or .jsonl.gz), or a stop naming the file (and line) of data that is not
    JSON Lines of objects: bytes that are not UTF-8, a line that is not JSON or not an object, a .gz cut short, a file
    with no rows."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SystemExit(f"{path}, line {n}: not UTF-8 text (byte {line[e.start]:#04x} at column "
                                     f"{e.start + 1}); JSON Lines must be UTF-8: convert the file (e.g. iconv -f latin1 "
                                     f"-t utf-8) or copy it again") from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError as e:
                    raise SystemExit(f"{path}, line {n}: not JSON ({e}); each line must be one JSON object: fix or "
                                     f"remove the line, or copy the file again") from None
                if not isinstance(row, dict):
                    raise SystemExit(f"{path}, line {n}: a JSON {type(row).__name__}, not an object; each line must be "
                                     f"one record like {{\"instruction\": ..., ...}} (../shared/reference/datasets.md)")
                rows.append(row)
    except (EOFError, OSError) as e:              # gzip: a file cut short, or not gzip at all
        raise SystemExit(f"{path}: cannot be read to its end ({type(e).__name__}: {e or 'compressed data cut short'}); "
                         f"copy or download it again") from None
    if not rows:
        raise SystemExit(f"{path} holds no rows: an empty file (a failed copy or export?); put the data back, or remove "
                         f"the file")
    return rows


def check_tracking(wandb_project: str) -> None:
    """--wandb-project needs the wandb package: checked at start, before anything loads or is written."""
    if wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("--wandb-project needs the wandb package, which this project does not install: "
                             "pip install wandb (and wandb login, or WANDB_MODE=offline), or drop the flag") from None


def check_rl_inputs(args, objectives: list[str], out: Path) -> None:
    """02 and 03, before anything loads: tracking, the policy and reward-model folders, what the reward models score,
    the data files and the output folder (each check names its flag and the fix)."""
    check_tracking(args.wandb_project)
    check_model_folder(args.policy, "--policy", "causal_lm")
    check_can_build(args.policy, "--policy")                  # pi_0 and the policy; the critic on its backbone
    for path in args.reward_models.split(","):
        check_model_folder(path, "--reward-models", "sequence_classifier")
        check_can_build(path, "--reward-models", ("backbone",))
    check_reward_objectives(args.reward_models.split(","), objectives)
    check_formats_match(args.reward_models.split(","), args.policy, args.prompt_template)
    check_recorded_format(args.policy, args.prompt_template, "--policy")        # e.g. a policy trained before
    check_data_files(args.data_root, PROMPT_MIX)
    check_output_folder(out)


def fail(message: str) -> NoReturn:
    """Stop every rank (each calls it at the same point); only rank 0 prints the message (one copy, not one per rank).
    Under torch.distributed the ranks leave through teardown(1): a plain SystemExit would let the interpreter
    finalize with gloo's threads alive, which can abort the process (exit -6) after the message (see teardown)."""
    if not dist.is_initialized():
        raise SystemExit(message)
    if dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)
    teardown(1)


def print0(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of numbers over ranks (counts, sums for means)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---- C3. the dry run
def peak_host_memory_report(models: dict, info: DistInfo) -> str:
    """A collective: each model's size and every rank's peak resident host memory (and GPU memory) so far."""
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}   # full sizes (DTensor numel)
    mine = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host": socket.gethostname(),
            "node": os.environ.get("GROUP_RANK", "0"), "local": info.local_rank,   # GROUP_RANK: torchrun's node rank
            "gpu": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    ranks = [None] * info.world_size
    dist.all_gather_object(ranks, mine)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    lines = [f"  {n}: {s / 1e6:.1f}M parameters, {gib(4 * s)} in fp32" for n, s in sizes.items()]
    lines += [f"  rank {r} (node {d['node']}, host {d['host']}, local rank {d['local']}): peak host memory {gib(d['rss'])}"
              + (f", GPU {gib(d['gpu'])}" if d["gpu"] is not None else "") for r, d in enumerate(ranks)]
    return "\n".join(lines)


def dry_run_exit(tag: str, models: dict, info: DistInfo, measured: str = "one training iteration") -> NoReturn:
    """--dry-run, after `measured` (02, 03: one training iteration, 01: one step; nothing saved): print each model's
    size and each rank's peak memory so far, which a run's own peak (run_summary.json) stays near, and exit 0."""
    print0(f"[{tag}] dry run done: the peak memory after {measured} (nothing was saved):\n"
           + peak_host_memory_report(models, info))
    teardown(0)


def rl_dry_run_plan(args, n_prompts: int, local: int, local_mb: int, info: DistInfo, dtype, start: int) -> str:
    return (f"{n_prompts} training prompts; {args.iterations} iterations of {args.rollouts} rollouts, {local} per rank, "
            f"minibatches of {local_mb} per rank, on {info.world_size} ranks ({info.device.type}, {dtype}); "
            f"{'resuming' if start else 'starting'} at iteration {start}")


# ---- C4. metrics: metrics.jsonl, samples, TensorBoard (and W&B), the run summary
def _keep_upto(path: Path, step: int, key: str) -> None:
    """Drop the JSON lines of path whose `key` is past step (and a last line cut short by a killed process)."""
    kept = []
    for l in path.read_text().splitlines():
        try:
            if l and json.loads(l).get(key, 0) <= step:
                kept.append(l)
        except ValueError:
            continue
    write_whole(path, "".join(l + "\n" for l in kept))


class MetricsLog:
    """A run's record, written by rank 0 (other ranks do nothing):
      <run>/metrics.jsonl   one JSON object per step: what the report reads;
      <run>/samples.jsonl   a few answers with their scores every so often (samples());
      <run>/tensorboard/    the same scalars (same names) and samples as text, live: `tensorboard --logdir runs`;
      Weights & Biases      when wandb_project is given: a mirror of the TensorBoard files (sync_tensorboard), so
                            one logging path (the wandb package is then required).

    resume_step: on resume, what was written after that step (after the last checkpoint) is dropped, so
    the files read as one uninterrupted run (TensorBoard is told to purge those steps too).
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None, tensorboard: bool = True,
                 wandb_project: str = "", config: dict | None = None):
        self.path, self.enabled = Path(path), enabled
        self.samples_path = self.path.with_name("samples.jsonl")
        self.tb = self.wandb = None
        problem = [None]                             # every rank builds its MetricsLog at the same point
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self._keep_an_earlier_record()
            for p, key in ((self.path, "step"), (self.samples_path, "iteration")):
                if resume_step is not None and p.exists():
                    _keep_upto(p, resume_step, key)
            if resume_step:
                problem[0] = self._incomplete(resume_step, tensorboard)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            fail(problem[0])
        if not enabled:
            return
        if not self.path.exists():
            self.path.write_text("")
        if wandb_project:          # first: W&B mirrors the TensorBoard writer made below (sync_tensorboard)
            if not tensorboard:
                raise ValueError("W&B mirrors TensorBoard here: wandb_project needs tensorboard=True")
            check_tracking(wandb_project)
            import wandb

            # named by the run folder's last three parts (whiten_true/seed0/molma: unique in a study), grouped by
            # its parent folder; WANDB_NAME / WANDB_RUN_GROUP in the environment win
            parts = self.path.parent.resolve().parts
            self.wandb = wandb.init(project=wandb_project, name=os.environ.get("WANDB_NAME", "/".join(parts[-3:])),
                                    group=os.environ.get("WANDB_RUN_GROUP", "/".join(parts[-3:-1])),
                                    config=config or {}, resume="allow", sync_tensorboard=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f"TensorBoard logging needs the tensorboard package ({e}); "
                                 f"pip install -r requirements.txt") from None
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
            _quiet_writer_thread_errors()

    def _keep_an_earlier_record(self) -> None:
        """A fresh run in a folder that holds another run's record (no checkpoint to continue it, or --resume
        false): that record is kept beside it, renamed with the time, never replaced without a word."""
        old = [p for p in (self.path, self.samples_path, self.path.parent / "tensorboard")
               if p.exists() and (p.is_dir() or p.stat().st_size)]
        if not old:
            self.path.unlink(missing_ok=True)
            self.samples_path.unlink(missing_ok=True)
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for p in old:
            to = p.with_name(f"{p.stem}.replaced-{stamp}{p.suffix}")
            p.rename(to)
            moved.append(to.name)
        self.samples_path.unlink(missing_ok=True)
        print(f"[metrics] {self.path.parent} held the record of an earlier run and no checkpoint continues it: this "
              f"run starts fresh, the old record is kept as {', '.join(moved)}", flush=True)

    def _incomplete(self, step: int, tensorboard: bool) -> str | None:
        """On resume: metrics.jsonl must hold every step up to the checkpoint's, once each, and TensorBoard's
        event files must exist, or the resumed record would silently miss the first part of the run. -> what is
        wrong and what to do, or None."""
        have = [json.loads(l).get("step") for l in (self.path.read_text().splitlines() if self.path.exists() else [])]
        tb = self.path.parent / "tensorboard"
        events = list(tb.glob("events.out.tfevents.*")) if tb.is_dir() else []
        if have != list(range(1, step + 1)) or (tensorboard and not events):
            what = (f"{self.path} holds {_ranges(have) or 'no step'} of the checkpoint's 1-{step}"
                    if have != list(range(1, step + 1)) else f"{tb} has no event files")
            return (
                f"cannot resume in {self.path.parent}: {what}. The record of the run up to its checkpoint is "
                f"incomplete (was the folder moved, copied in part or cleaned while the run trained?), and continuing "
                f"would leave a record that misses part of the run. What to do: put the missing files back (from the "
                f"moved or original folder), or start a new run with another --out (or --resume false here; the "
                f"old record is then kept beside it).")
        return None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self.path.exists():               # a moved or deleted run folder: never recreate half of it
            raise SystemExit(f"{self.path} has disappeared while the run trained (the run folder {self.path.parent} "
                             f"was moved or deleted?). Stopping rather than writing a partial record there. Move the "
                             f"folder back and run the same command again to continue from its last checkpoint.")
        with self._on_disk(self.path):            # a full or read-only disk, a lost mount: named, the run stopped
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            with self._on_disk(self.path.parent / "tensorboard"):
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, step)
                self.tb.flush()

    @staticmethod
    @contextlib.contextmanager
    def _on_disk(path: Path):
        """A write to path (or TensorBoard's writer thread, which hands its error to the next call): an OSError stops
        the run with the file and what to do; a cut last line is dropped when the run resumes (_keep_upto)."""
        try:
            yield
        except OSError as e:
            raise SystemExit(f"could not write {path} ({type(e).__name__}: {e}); is the disk full or read-only? The "
                             f"last checkpoint is intact. Free space or fix the mount, then run the same command again "
                             f"to continue from it.") from None

    def samples(self, iteration: int, rows: list[dict]) -> None:
        """Append rows (prompt, answer, scores...) of one iteration to samples.jsonl and TensorBoard's text tab."""
        if not self.enabled or not rows:
            return
        with self._on_disk(self.samples_path):
            with self.samples_path.open("a") as f:
                f.write("".join(json.dumps({"iteration": iteration, **r}) + "\n" for r in rows))
        if self.tb is not None:
            cols = list(rows[0])
            table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
                "| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]).replace("|", "/").replace("\n", " ")
                                  for c in cols) + " |" for r in rows)
            with self._on_disk(self.path.parent / "tensorboard"):
                self.tb.add_text("samples", table, iteration)
                self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread re-raises a write error (a full disk) and Python prints it as a bare traceback; the
    next call in the main thread gets the same error, which MetricsLog turns into its message. Only that one is shown."""
    import threading

    default = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            default(args)

    if getattr(threading.excepthook, "__name__", "") != "hook":
        threading.excepthook = hook


def _ranges(steps: list) -> str:
    """[1, 2, 3, 7, 8] -> 'steps 1-3, 7-8'."""
    if not steps:
        return ""
    parts, start, prev = [], steps[0], steps[0]
    for x in steps[1:] + [None]:
        if x is not None and isinstance(prev, int) and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = x
    return "steps " + ", ".join(parts)


def iteration_metrics(step: int, r: Rollouts, rewards: torch.Tensor, rm_objectives: list[str], heads: list[str],
                      steps: list[dict], device, truth: list[dict[str, float]] | None = None) -> dict:
    """One line of metrics.jsonl (a collective: every rank calls it).

    Rollout statistics are means over every rank's rollouts (named sums, one all-reduce, divided by the
    global count); minibatch statistics (steps: one dict per minibatch with apa_loss, value_loss and
    grad_norms, each a list of K) are means over minibatches, then over ranks.
    rewards: [B, T, K] the per-token rewards of Eq. 3.3; truth: tiny world only, {objective: true score} per rollout.
    """
    sums = {"n": float(len(r.prompts)), "objective/kl": ((r.logprobs - r.ref_logprobs) * r.mask).sum().item(),
            "response/length": r.mask.sum().item(), "response/eos_rate": r.ended.float().sum().item()}
    sums.update({f"{o}/score": r.scores[:, k].sum().item() for k, o in enumerate(rm_objectives)})
    sums.update({f"{h}/shaped_reward": rewards[..., k].sum().item() for k, h in enumerate(heads)})
    if truth is not None:
        sums.update({f"truth/{k}": sum(t[k] for t in truth) for k in truth[0]})
    for key, name in (("apa_loss", "apa_loss"), ("value_loss", "value_loss"), ("grad_norms", "grad_norm")):
        for k, h in enumerate(heads):
            sums[f"{h}/{name}"] = sum(s[key][k] for s in steps) / len(steps)
    tot = dict(zip(sums, all_reduce_sum(list(sums.values()), device)))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rec = {"step": step}
    rec.update({k: v / (world if k.endswith(("_loss", "grad_norm")) else tot["n"]) for k, v in tot.items() if k != "n"})
    rec["update_norm"] = sum(s["update_norm"] for s in steps) / len(steps)
    if "gram" in steps[0]:                    # MOLMA, K > 1: what the aligner saw, averaged over minibatches
        K = len(heads)
        grams = torch.tensor([s["gram"] for s in steps], dtype=torch.float64)             # [minibatches, K, K]
        norms = grams.diagonal(dim1=1, dim2=2).clamp(min=1e-30).sqrt()
        cos = grams / (norms[:, :, None] * norms[:, None, :])
        iu = torch.triu_indices(K, K, 1)
        rec["amtl/cos"] = cos[:, iu[0], iu[1]].mean().item()              # < 0: the objectives' gradients conflict
        if K > 2:                             # and each pair's, e.g. amtl/cos/help-honest
            rec.update({f"amtl/cos/{heads[a]}-{heads[b]}": cos[:, a, b].mean().item() for a, b in zip(*iu.tolist())})
        rec["amtl/cond_before"] = sum(s["cond_before"] for s in steps) / len(steps)
        rec["amtl/cond_after"] = sum(s["cond_after"] for s in steps) / len(steps)     # 1 after alignment
    agreed = [s["agreement"] for s in steps if "agreement" in s]     # 02 --compare-exact, over the steps taken
    if agreed:
        rec.update({f"amtl/{k}": sum(a[k] for a in agreed) / len(agreed) for k in agreed[0]})
    return rec


def sample_rows(r: Rollouts, answers: list[str], rm_objectives: list[str], n: int,
                truth: list[dict[str, float]] | None = None) -> list[dict]:
    """The first n of this rank's rollouts as rows for MetricsLog.samples: the prompt, the answer, whether it
    ended with EOS, each reward model's probability and (tiny world) the true scores."""
    rows = []
    for i in range(min(n, len(answers))):
        row = {"prompt": r.prompts[i], "answer": answers[i], "ended_with_eos": bool(r.ended[i])}   # as in answers.jsonl
        row.update({f"rm_{o}": float(r.scores[i, k]) for k, o in enumerate(rm_objectives)})
        if truth is not None:
            row.update({f"true_{k}": v for k, v in truth[i].items()})
        rows.append(row)
    return rows


def peak_rss_per_rank() -> list[int]:
    """A collective: every rank's peak resident host memory so far, in bytes, in rank order (run_summary.json)."""
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [int(mine.item())]
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)                                   # gloo: CPU tensors
    return [int(x.item()) for x in parts]


def write_run_summary(out: Path, summary: dict, t_train: float) -> None:
    """Rank 0: <out>/run_summary.json from metrics.jsonl (times, the last line) plus the run's own fields."""
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    per_it = sorted(l["time/iteration"] for l in lines)
    summary = {**summary, "iterations": len(lines), "train_seconds_this_process": round(time.perf_counter() - t_train, 1),
               "train_seconds": round(sum(per_it), 1), "median_seconds_per_iteration": per_it[len(per_it) // 2],
               "phase_seconds_median": {k: sorted(l[f"time/{k}"] for l in lines)[len(lines) // 2]
                                        for k in ("generation", "scoring", "update")},
               "final": lines[-1], "segments": run_segments()}
    write_whole(out / "run_summary.json", json.dumps(summary, indent=2))
    print0(f"[{summary['method']}] done: {out / 'policy'}; " + ", ".join(
        f"{k}={v:.3f}" for k, v in lines[-1].items() if k.endswith(("score", "kl")) or k.startswith("truth")))


def compare_with_exact(policy: torch.nn.Module, losses: torch.Tensor, B: torch.Tensor, omega: torch.Tensor) -> dict:
    """02 --compare-exact (a diagnostic that costs the exact aligner's K backward passes; a collective): the
    representation aligner's update formed from the K parameter gradients, G (B omega), set as the policy's .grad
    (the update one backward of sum_k (B omega)_k L_k gives, to rounding), and how it stands to Algorithm 1's
    G B_exact omega: their cosine, and cond(G) before alignment and after each B (after B_exact: 1)."""
    grads = objective_gradients(policy, losses)                                # [K, D_local]
    exact, gram, _ = amtl_align_sharded(grads, omega)
    update = grads.T @ (B @ omega.to(B.dtype)).to(grads.dtype)
    set_flat_grad(policy, update)
    dots = torch.stack([update @ exact, update @ update, exact @ exact]).double()
    if dist.is_initialized():
        dist.all_reduce(dots)                                                  # sums over every rank's shard
    gram = gram.double()
    return {"cos_to_exact": float(dots[0] / (dots[1] * dots[2]).sqrt().clamp(min=1e-300)),
            "exact_cond_before": condition_number(gram),
            "exact_cond_after": condition_number(B.double().T @ gram @ B.double())}


def minibatch_stats(apa: torch.Tensor, vloss: torch.Tensor, update_norm: float, aligned: tuple | None = None,
                    agreement: dict | None = None) -> dict:
    """What one minibatch logs: the K APA and value losses, the update's norm and, for K > 1, what the aligner saw
    (aligned: (M, B), or None when the step was skipped: NaN then): the objectives' gradient norms, M, and
    cond(G) before and after alignment. M is G^T G, or for the representation aligner E E^T (norms and cosines of
    dL_k/dlogpi); agreement: compare_with_exact's numbers. With one objective the gradient norm is the update's."""
    K = apa.numel()
    stats = {"apa_loss": apa.tolist(), "value_loss": vloss.tolist(), "update_norm": update_norm}
    if agreement is not None:
        stats["agreement"] = agreement
    if K == 1:
        stats["grad_norms"] = [update_norm]
    elif aligned is not None:
        gram, B = aligned
        stats.update({"grad_norms": gram.diagonal().clamp(min=0).sqrt().tolist(), "gram": gram.tolist(),
                      "cond_before": condition_number(gram), "cond_after": condition_number(B.T @ gram @ B)})
    else:
        nan = float("nan")
        stats.update({"grad_norms": [nan] * K, "gram": [[nan] * K] * K, "cond_before": nan, "cond_after": nan})
    return stats


class PhaseClock:
    """Seconds per phase of an iteration: start(), then lap(name) at the end of each phase; laps() -> the
    metrics' {time/<name>: s, ..., time/iteration: s}."""

    def start(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.times = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{name}"], self.t = now - self.t, now

    def laps(self) -> dict:
        return {**self.times, "time/iteration": self.t - self.t0}


def state_scalars(state: dict, objectives: list[str]) -> dict:
    """A method's state (e.g. Fast RL's weights, lambda) as metrics: state/<name>, and a list of one number per
    objective also as state/<name>/<objective>, one scalar each for TensorBoard."""
    rec = {f"state/{k}": v for k, v in state.items()}
    rec.update({f"state/{k}/{o}": x for k, v in state.items() if isinstance(v, list) and len(v) == len(objectives)
                for o, x in zip(objectives, v)})
    return rec


def log_iteration(metrics: MetricsLog, it: int, args, r: Rollouts, answers: list[str], rm_objectives: list[str],
                  record: dict, truth: list[dict[str, float]] | None = None) -> None:
    """The bookkeeping of one RL iteration (02 and 03), on rank 0: its metrics.jsonl line (record: iteration_metrics
    and what the script adds), a warning when no answer ended, and every --sample-every iterations a few answers
    in samples.jsonl, with their true scores when the script hands them (truth, tiny world)."""
    metrics.write(record)
    if record["response/eos_rate"] == 0 and (it == 0 or (it + 1) % 10 == 0):   # every answer cut: nothing to learn from
        print0(f"[warning] iteration {it + 1}: no answer ended with EOS within --max-new-tokens {args.max_new_tokens}: "
               f"every one is cut and gets the same --truncated-score, so the reward models teach the policy nothing "
               f"(only the KL penalty moves it). Raise --max-new-tokens (the tiny preset uses {RL_TINY['max_new_tokens']}).")
    if it == 0 or (it + 1) % args.sample_every == 0 or it + 1 == args.iterations:     # what the policy says
        metrics.samples(it + 1, sample_rows(r, answers, rm_objectives, args.num_samples, truth))


# ---- C5. checkpoints: written atomically with a manifest, verified, resumed under the same arguments; one writer per folder
def atomic_dir_write(out_dir: str | Path, write, keep_previous: bool = False, in_run_folder: bool = False) -> None:
    """Call write(tmp_dir), then swap tmp_dir into out_dir.

    A crash while writing leaves the previous out_dir intact; the swap itself is two renames.
    keep_previous: the replaced out_dir is kept as <out_dir>.prev (replacing an older one) instead of deleted.
    in_run_folder: out_dir's parent is a run's folder, which exists while the run holds its lock: if it is gone
    (moved or deleted mid-run), stop rather than recreate a folder with half a run in it.
    """
    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir, in_run_folder)
    try:
        write(tmp)
    except Exception as e:                     # a full disk, a quota, a lost mount: say so, keep what was there
        raise SystemExit(_not_written(out_dir, tmp, e)) from e
    _publish(tmp, out_dir, keep_previous)


def _fresh_tmp(out_dir: Path, in_run_folder: bool) -> Path:
    """An empty <out_dir>.tmp to write into (a run folder that disappeared mid-run: stop, see atomic_dir_write)."""
    if in_run_folder and not out_dir.parent.is_dir():
        raise SystemExit(f"the run folder {out_dir.parent} has disappeared while the run trained (moved or deleted?); "
                         f"not writing {out_dir.name} there. Move the folder back and run the same command again to "
                         f"continue from its last checkpoint.")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _not_written(out_dir: Path, tmp: Path, e: Exception) -> str:
    """Remove the partial tmp; -> the message: which file, why, and that the previous out_dir is intact."""
    shutil.rmtree(tmp, ignore_errors=True)
    what = getattr(e, "filename", None) or tmp
    return (f"could not write {what} ({type(e).__name__}: {e}); is the disk full? Nothing was replaced: "
            + (f"the previous {out_dir} is intact" if out_dir.exists() else f"{out_dir} was not written")
            + f", and the partial {tmp.name} was removed. Free space, then run the same command again.")


def _publish(tmp: Path, out_dir: Path, keep_previous: bool) -> None:
    """fsync tmp's files and folders, then swap it into out_dir with two renames (the replaced one kept as .prev)."""
    old = out_dir.with_name(out_dir.name + (".prev" if keep_previous else ".old"))
    fsync_tree(tmp)                            # on disk before a rename publishes it: a power loss must not leave
    shutil.rmtree(old, ignore_errors=True)     # a manifest that names data never written
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)                        # killed between the renames: resume_from takes up the complete tmp
    _fsync_path(out_dir.parent)                # the renames themselves
    if not keep_previous:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under folder, then every folder (deepest first), so their data and names are on disk."""
    paths = sorted(Path(folder).rglob("*"), key=lambda p: -len(p.parts))
    for p in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [Path(folder)]:
        _fsync_path(p)


def write_pretrained(folder: Path, model, state: dict, tokenizer=None, template: str | None = None) -> None:
    """Rank 0: a Hugging Face save_pretrained folder from a gathered state dict (safetensors), with the tokenizer
    and the prompt format (template: --prompt-template) it was trained in."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    if template:              # the format travels with the model (check_formats_match reads it)
        model.config.molma_prompt_format = template
    # and the weights' checksum, checked whenever the project reads the folder back (check_model_folder): a file
    # damaged behind an intact header loads without an error anywhere else
    model.config.molma_weights_sha256 = {"model.safetensors": _sha256(folder / "model.safetensors")}
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file with an error that names the file (a truncated download or save, a full disk)."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:       # SafetensorError, OSError: the library's message alone names no file
        raise SystemExit(f"cannot read {path}: {e}. The file is damaged or truncated; restore it, or write it again "
                         f"(for a checkpoint: resume from the kept previous one, or start over with --resume false)")


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """A collective: raise before a model with a non-finite weight can be written anywhere."""
    bad = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        bad += (~torch.isfinite(_local(p.detach()))).sum()
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(f"refusing to save {what}: {int(bad.item())} weights are not finite (NaN or inf); "
                           f"nothing was written, earlier checkpoints are untouched")


def save_pretrained_folder(model, out_dir, tokenizer=None, template: str | None = None) -> None:
    """Write an FSDP model as a save_pretrained folder (write_pretrained), atomically. Every rank calls it; rank 0
    writes."""
    check_finite_weights(model, str(out_dir))
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        atomic_dir_write(out_dir, lambda tmp: write_pretrained(tmp, model, state, tokenizer, template),
                         in_run_folder=True)
    dist.barrier()


def _sharded_state(models: dict, optimizers: dict) -> tuple[dict, dict]:
    """-> ({"<name>/model/<fqn>": this rank's shard, "<name>/optim/<fqn>/<exp_avg|exp_avg_sq|step>": ...},
    {name: AdamW's param_groups}): every model's weights and optimizer state as this rank holds them (DTensor
    shards, nothing gathered), in one flat dict of tensors for torch.distributed.checkpoint. A fresh optimizer's
    state is made (zeros) so that a resume has shards to load into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat, groups = {}, {}
    for n, m in models.items():
        flat.update({f"{n}/model/{k}": v for k, v in get_model_state_dict(m).items()})
        if n in optimizers:
            osd = get_optimizer_state_dict(m, optimizers[n])
            for fqn, st in osd["state"].items():
                flat.update({f"{n}/optim/{fqn}/{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()})
            groups[n] = osd["param_groups"]
    return flat, groups


def _files_of_about(flat: dict, world_size: int, nbytes: int) -> dict[str, int]:
    """{key: file number}: consecutive keys in files of about nbytes per rank. The writer holds one file's bytes at a
    time (safetensors serializes a file in memory), so this bounds a save's memory beyond the shards themselves; the
    same numbers on every rank (DTensor sizes are global)."""
    index, size, n = {}, 0.0, 1
    for k, v in flat.items():
        b = v.numel() * v.element_size() / (world_size if hasattr(v, "full_tensor") else 1)
        if size and size + b > nbytes:
            n, size = n + 1, 0.0
        index[k], size = n, size + b
    return index


def save_rl_checkpoint(folder: Path, models: dict, optimizers: dict, trainer_state: dict,
                       keep_previous: bool = False) -> None:
    """Every rank calls it. models/optimizers: {name: FSDP model / its optimizer}.

    Each rank writes its own shards of every model's weights and AdamW state to <folder>/shards/ through
    torch.distributed.checkpoint in safetensors (HuggingFaceStorageWriter; nothing is gathered on one rank, nothing
    pickled, and a resume on another number of ranks reshards it), and hashes what it wrote; rank 0 adds
    rng.safetensors (every rank's RNG), trainer_state.json (with AdamW's param_groups) and manifest.json (every
    file's size and sha256, checked before a resume), then swaps the folder in at once: a crash mid-save keeps the
    previous checkpoint. Models with a non-finite weight are refused before anything is written. keep_previous: the
    replaced checkpoint stays as <folder>.prev. The final weights are a save_pretrained folder of their own."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    for n, m in models.items():
        check_finite_weights(m, f"the checkpoint's {n}")
    flat, groups = _sharded_state(models, optimizers)
    rng = {"cpu": gather_rows(torch.get_rng_state()[None])}
    if torch.cuda.is_available():
        rng["cuda"] = gather_rows(torch.cuda.get_rng_state().to(torch.cuda.current_device())[None]).cpu()
    rank, problem = dist.get_rank(), [None]
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        try:
            _fresh_tmp(folder, in_run_folder=True)
        except SystemExit as e:
            problem[0] = str(e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        fail(problem[0])
    try:
        files = _files_of_about(flat, dist.get_world_size(), 2**28)   # 256 MiB a file
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "shards"), fqn_to_index_mapping=files,
                                                                    save_distributed=True))
        mine = sorted((tmp / "shards").glob(f"shard-{rank + 1:05d}-*.safetensors"))   # the files this rank wrote
        for f in mine:
            _fsync_path(f)
        hashes = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in mine}
    except (Exception, dcp.api.CheckpointException) as e:   # any rank's failure (a full disk) reaches every rank
        first = next(iter(getattr(e, "failures", {}).items()), None)      # {rank: (exception, traceback)}
        hashes = {"error": f"rank {first[0]}: {type(first[1][0]).__name__}: {first[1][0]}" if first else
                           f"{type(e).__name__}: {e}"}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, hashes)
    errors = [h["error"] for h in every if "error" in h]
    if rank == 0:
        try:
            if errors:
                raise OSError(errors[0])
            save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            write_whole(tmp / "trainer_state.json", json.dumps({**trainer_state, "param_groups": groups,
                                                                "world_size": dist.get_world_size(),
                                                                "segments": run_segments()}, indent=2))
            write_manifest(tmp, {k: v for h in every for k, v in h.items()})
            _publish(tmp, folder, keep_previous)
        except (OSError, SystemExit) as e:
            problem[0] = _not_written(folder, tmp, e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        fail(problem[0])


def _sha256(path: Path) -> str:
    """A file's sha256, read once per process for each version of it (its path, size and modification time): a stage
    checks a folder's recorded checksum and then fingerprints the same file as one of the run's inputs."""
    st = Path(path).stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, known: dict | None = None) -> None:
    """<folder>/manifest.json: {relative path: {bytes, sha256}} of every file in the folder. known: entries already
    computed (each rank hashes the shards it wrote), the rest are hashed here."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    known = known or {}
    manifest = {rel: known.get(rel) or {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in files for rel in [p.relative_to(folder).as_posix()]}
    write_whole(folder / "manifest.json", json.dumps(manifest, indent=1))


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder against its manifest (empty: nothing)."""
    mf = folder / "manifest.json"
    if not mf.exists():
        return [f"{mf} is missing (the checkpoint was not completely written)"]
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        return [f"{mf} is not valid JSON ({e})"]
    problems = []
    for rel, want in manifest.items():
        p = folder / rel
        if not p.exists():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or overwritten)")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{p} does not match its sha256 in the manifest (damaged)")
    return problems


def checkpoint_iteration(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return None


# What a resumed run may change: how long it runs and how it is recorded, never what it computes. Every other
# field of its arguments (objectives and their order, omega, method and weights, rollouts, minibatch, learning
# rates, beta, lambda, whitening, seed, models, template, precision, ...) must equal the checkpoint's.
MAY_CHANGE_ON_RESUME = ("iterations", "save_every", "sample_every", "num_samples", "wandb_project", "resume",
                        "keep_previous", "keep_checkpoint", "peer_timeout", "max_nonfinite_steps", "dry_run", "out")


PATH_FLAGS = ("policy", "reward_models", "base_model", "data_root")    # compared as the files they name


def _real_paths(value) -> list[str]:
    """A path flag's comma list, each item as its real path when it exists here (a hub id as it is)."""
    return [os.path.realpath(os.path.expanduser(p)) if Path(p).expanduser().exists() else p
            for p in str(value or "").split(",") if p]


def config_changes(old: dict, args) -> list[str]:
    """The fields that differ between a checkpoint's arguments (old) and a new command's (args, its dataclass), as
    'flag: old -> new'. Not a change: a path spelled another way (absolute, relative, a trailing slash, through a
    symlink: the same real path), and a flag the checkpoint does not know (added by a code update) at its default."""
    new = dataclasses.asdict(args)
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    changed = []
    for k in sorted(set(old) | set(new)):
        if k in MAY_CHANGE_ON_RESUME or (k not in old and new.get(k) == defaults.get(k)):
            continue
        if k in PATH_FLAGS and _real_paths(old.get(k)) == _real_paths(new.get(k)):
            continue
        if old.get(k) != new.get(k):
            changed.append(f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}")
    return changed


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _input_files(args) -> dict[str, str]:
    """{real path of a file the run reads: the flag that names it}: each model folder's weights and config.json, and
    each data file under --data-root (a hub id, or the hub's datasets, have no local file to fingerprint)."""
    files = {}
    for flag in PATH_FLAGS:
        for p in _real_paths(getattr(args, flag, "")):
            folder = Path(p)
            if not folder.is_dir():
                continue
            found = (sorted(folder.rglob("*.jsonl")) + sorted(folder.rglob("*.jsonl.gz")) if flag == "data_root" else
                     sorted(folder.glob("*.safetensors")) + [folder / "config.json"])
            files.update({str(f): f"--{flag.replace('_', '-')}" for f in found if f.is_file()})
    return files


def run_inputs(ckpt: Path, args, resume: bool, tag: str) -> dict | None:
    """Every rank, after resume_from: what the run reads, fingerprinted (size, mtime, sha256) at its first start and
    kept in every checkpoint; -> that record (rank 0; None elsewhere). On resume, a model folder or data file that
    changed since is refused, naming it: a run continued against another reward model or data set would mix two runs
    without a word. A file with the recorded size and time is taken as the same; any other is hashed."""
    record, problem = None, [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        now = _input_files(args)
        if not resume:
            record = {f: {"flag": flag, **_fingerprint(Path(f))} for f, flag in now.items()}
        else:
            record = read_json(ckpt / "trainer_state.json").get("inputs")
            changed = []
            for f, old in (record or {}).items():
                p = Path(f)
                if not p.is_file():
                    changed.append(f"{old['flag']}: {f} is gone")
                elif (p.stat().st_size, p.stat().st_mtime_ns) != (old["size"], old["mtime_ns"]):
                    now_sha = _sha256(p)                 # a copy has another time: the same bytes are the same file
                    if now_sha != old["sha256"]:
                        changed.append(f"{old['flag']}: {f} has changed (sha256 {old['sha256'][:12]}... -> "
                                       f"{now_sha[:12]}...)")
            changed += [f"{flag}: {f} is new" for f, flag in now.items() if record is not None and f not in record]
            if changed:
                problem[0] = (f"[{tag}] what the run reads has changed since its checkpoint at {ckpt} was written:\n  "
                              + "\n  ".join(changed) + "\nContinuing would train against other inputs than the run "
                              f"started with. What to do: put the original files back to continue, or start a new run "
                              f"(another --out, or --resume false).")
            record = record if record is not None else {f: {"flag": fl, **_fingerprint(Path(f))} for f, fl in now.items()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        fail(problem[0])
    return record


def check_resume_config(ckpt: Path, args, tag: str) -> None:
    """Refuse to continue a checkpoint under other arguments than it was trained with (see MAY_CHANGE_ON_RESUME)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    finished = (ckpt.parent / "run_summary.json").exists()
    # never advise --resume false where it would overwrite a finished run
    fresh = "another --out" if finished else "another --out, or --resume false (the checkpoint is replaced)"
    if state.get("method") not in (None, tag):
        script = "02_train_molma.py" if state["method"] == "molma" else "03_train_baselines.py"
        fail(f"[{tag}] {ckpt.parent} holds a{' finished' if finished else 'n unfinished'} {state['method']} run "
             f"({script}), not a {tag} one: this command would mix two methods in one folder. What to do: give this run "
             f"{fresh}" + (f"; to continue the {state['method']} run, run {script} with its arguments"
                                   if not finished else "") + ".")
    old = state.get("config")
    if old is None:
        return                                     # a checkpoint from before configurations were saved
    changes = config_changes(old, args)
    if changes:
        fail(f"[{tag}] the checkpoint at {ckpt} was trained with other arguments; resuming would mix two runs:\n  "
             + "\n  ".join(changes) + f"\nWhat to do: run with the checkpoint's values to continue it, or start a "
             f"new run with {fresh}" + (" (this folder's run is finished: keep it)" if finished else "") + ". Only "
             f"{', '.join('--' + f.replace('_', '-') for f in MAY_CHANGE_ON_RESUME)} may change on resume.")


def resume_from(ckpt: Path, mode: str, tag: str, args=None) -> bool:
    """Decide from --resume (auto / true / false) whether to continue from ckpt; every rank calls it.

    A checkpoint is verified against its manifest on rank 0 before it is used; a damaged one stops the
    run with the file's name and what to do (the kept previous checkpoint, or --resume false). args (the new
    command's arguments, a dataclass) must match the checkpoint's (check_resume_config).
    """
    if mode not in ("auto", "true", "false"):
        raise SystemExit(f"--resume must be auto, true or false, got {mode!r}")
    if mode != "false":
        recover_interrupted_save(ckpt, tag)
    it, prev = checkpoint_iteration(ckpt), ckpt.with_name(ckpt.name + ".prev")
    if dist.is_initialized() and dist.get_world_size() > 1:      # every rank reads the checkpoint: all must see it
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (it, socket.gethostname()))
        blind = [f"rank {r} (host {h})" for r, (i, h) in enumerate(seen) if i != seen[0][0]]
        if blind:
            fail(f"[{tag}] rank 0 (host {seen[0][1]}) finds the checkpoint {ckpt} at iteration {seen[0][0]}, but "
                 f"{', '.join(blind)} finds {'none' if seen[0][0] is not None else 'another one'} there: --out must be "
                 f"on a filesystem every node shares (an absolute path on a shared mount), or the run would mix a "
                 f"restart with a fresh start")
    if mode == "false":
        if it is not None:
            print0(f"[{tag}] --resume false: starting over; the checkpoint at {ckpt} (iteration {it}) is discarded "
                   f"and replaced at the first save")
        return False
    if it is None:
        prev_it = checkpoint_iteration(prev)
        if prev_it is not None:       # left by an interrupted save, and recover_interrupted_save did not verify it
            fail(f"[{tag}] no checkpoint at {ckpt}; the previous one at {prev} (iteration {prev_it}) does not match its "
                 f"manifest: " + "; ".join(verify_checkpoint(prev)[:3]) + ". What to do: restore it from a copy, or "
                 f"start over with --resume false")
        if mode == "true":
            fail(f"--resume true: no checkpoint at {ckpt} to continue from (--resume auto starts fresh when there is none)")
        return False
    problems = [None]
    if dist.get_rank() == 0:
        problems[0] = verify_checkpoint(ckpt)
    dist.broadcast_object_list(problems, src=0)
    if problems[0]:
        prev_it = checkpoint_iteration(prev)
        fallback = (f"the previous checkpoint is kept at {prev} (iteration {prev_it}): move it to {ckpt} to resume "
                    f"from there, or " if prev_it is not None else "")
        fail(f"[{tag}] the checkpoint at {ckpt} is damaged and cannot be resumed: " + "; ".join(problems[0][:3])
             + f". What to do: {fallback}start over with --resume false.")
    if args is not None:
        check_resume_config(ckpt, args, tag)
    return True


def recover_interrupted_save(ckpt: Path, tag: str) -> None:
    """A save killed between atomic_dir_write's two renames leaves no <ckpt>, the replaced one as <ckpt>.prev (or
    .old) and the new one complete in <ckpt>.tmp. Rank 0 takes up the newest of them that verifies against its
    manifest, says so, and every rank waits for it; a partial .tmp (no manifest, or damaged) is never taken."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not ckpt.exists():
            candidates = []
            for suffix in (".tmp", ".prev", ".old"):
                c = ckpt.with_name(ckpt.name + suffix)
                it = checkpoint_iteration(c)
                if it is not None and not verify_checkpoint(c):
                    candidates.append((it, suffix != ".tmp", c))      # the newest; at a tie the just-written one
            if candidates:
                it, _, c = max(candidates)
                print0(f"[{tag}] no checkpoint at {ckpt}: the last save was interrupted between its two renames. "
                       f"{c} holds a complete checkpoint (iteration {it}, every file matches its manifest): taking it up")
                c.rename(ckpt)
                _fsync_path(ckpt.parent)
    if dist.is_initialized():
        dist.barrier()


def stop_if_finished(ckpt: Path, iterations: int | None, out: Path, tag: str, resume: str, args) -> None:
    """Every rank, after resume_from: a finished run leaves nothing to do. Say so and end the process with 0, changing
    no file (a shorter --iterations never truncates or rewrites a longer run). Finished: a checkpoint past --iterations
    (or at it, with the run's summary written), or a summary whose checkpoint was removed at the end
    (--keep-checkpoint false): then the command must be the run's own (its method and arguments, as
    check_resume_config asks of a checkpoint), and cannot train further. resume: --resume (false starts over: nothing
    is checked). iterations: None where the run's length is not a flag (01)."""
    it = checkpoint_iteration(ckpt)
    summary_file = out / "run_summary.json"
    if resume == "false" or (it is None and not summary_file.exists()):
        return
    if it is None:
        summary = read_json(summary_file)
        if summary.get("method") not in (None, tag):
            fail(f"[{tag}] {out} holds a finished {summary['method']} run, not a {tag} one: this command would mix two "
                 f"methods in one folder. What to do: give this run another --out.")
        changes = config_changes(summary.get("config") or {}, args)
        done = (summary.get("config") or {}).get("iterations")
        if changes or (iterations is not None and done is not None and iterations > done):
            fail(f"[{tag}] {out} holds a finished run, and its checkpoint was removed at its end (--keep-checkpoint "
                 f"false), so it cannot continue under this command:\n  " + "\n  ".join(
                     changes or [f"--iterations: {done} -> {iterations}"]) + f"\nWhat to do: another --out for a new run "
                 f"(or --resume false, which replaces this one); to extend a run, train it with --keep-checkpoint true.")
        print0(f"[{tag}] nothing to do: the run in {out} is finished (run_summary.json; its checkpoint was removed at "
               f"its end); every file in {out} is left as it was. For a new run, another --out.")
        teardown(0)
    if iterations is None or it < iterations or (it == iterations and not summary_file.exists()):
        return
    print0(f"[{tag}] nothing to do: the checkpoint at {ckpt} is at iteration {it}, "
           + (f"past --iterations {iterations}" if it > iterations else f"the end of --iterations {iterations}, and the "
              f"run is finished") + f"; every file in {out} is left as it was. To train further, give --iterations "
           f"above {it}; for a shorter run, another --out.")
    teardown(0)


def remove_checkpoint(ckpt: Path, keep: bool, tag: str) -> None:
    """Rank 0, once the run's final model and summary are written: the resume checkpoint (and the previous one) is
    removed, unless --keep-checkpoint; stop_if_finished then recognises the finished run by its summary."""
    if keep or not any(ckpt.with_name(ckpt.name + s).exists() for s in ("", ".prev", ".old", ".tmp")):
        return
    for suffix in (".tmp", ".old", ".prev", ""):           # the checkpoint itself last: a crash leaves a resumable one
        shutil.rmtree(ckpt.with_name(ckpt.name + suffix), ignore_errors=True)
    _fsync_path(ckpt.parent)
    print0(f"[{tag}] removed the resume checkpoint {ckpt} (the run is finished; --keep-checkpoint true keeps it)")


def load_rl_checkpoint(folder: Path, models: dict, optimizers: dict) -> dict:
    """Every rank: each model's weights and AdamW state, read shard by shard into this rank's shards (the models are
    built and sharded first, from pi_0; torch.distributed.checkpoint reshards a checkpoint written by another number
    of ranks), and this rank's RNG. Returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_json(folder / "trainer_state.json")
    flat, _ = _sharded_state(models, optimizers)
    try:
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(folder / "shards")))
    except Exception as e:          # a checkpoint of another layout or model (the manifest verified its bytes)
        fail(f"cannot load the checkpoint {folder}: {type(e).__name__}: {str(e)[:300]}. Was it written for these models "
             f"and this version? Start over with --resume false, or give another --out")
    for n, m in models.items():
        set_model_state_dict(m, {k[len(f"{n}/model/"):]: v for k, v in flat.items() if k.startswith(f"{n}/model/")})
        if n in optimizers:
            osd = {}
            for k, v in flat.items():
                if k.startswith(f"{n}/optim/"):
                    fqn, name = k[len(f"{n}/optim/"):].rsplit("/", 1)
                    osd.setdefault(fqn, {})[name] = v
            set_optimizer_state_dict(m, optimizers[n], {"state": osd, "param_groups": state["param_groups"][n]})
    rng = read_safetensors(folder / "rng.safetensors")
    if state["world_size"] == dist.get_world_size():
        torch.set_rng_state(rng["cpu"][dist.get_rank()].clone())  # a fresh tensor: a view crashes it
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][dist.get_rank()].clone())
    else:
        print0(f"[resume] the checkpoint was written by {state['world_size']} ranks, this run has "
               f"{dist.get_world_size()}. The run continues from iteration {state['iteration']} with the same "
               f"arguments, and what it computes per step is the same math (means over the batch and minibatch, one "
               f"aligner), but it will not repeat what an uninterrupted {state['world_size']}-rank run would have done: "
               f"(1) sampling: each rank's random stream restarts from --seed + 1 + rank, so other answers are drawn; "
               f"(2) minibatches: each is the next rows of every rank's share of the rollouts, so which rollouts share "
               f"a gradient step changes with the number of ranks. Both segments are recorded (run_summary.json, "
               f"'segments').")
    RUN_SEGMENTS[:] = state.get("segments") or [{"from_iteration": 0, "world_size": state["world_size"]}]
    if RUN_SEGMENTS[-1]["world_size"] != dist.get_world_size():
        RUN_SEGMENTS.append({"from_iteration": state["iteration"], "world_size": dist.get_world_size()})
    return state


RUN_SEGMENTS: list[dict] = []   # [{from_iteration, world_size}]: one per stretch of a run on one number of ranks


def run_segments() -> list[dict]:
    """This run's stretches by world size (a fresh run: one), for checkpoints and run_summary.json."""
    return list(RUN_SEGMENTS) or [{"from_iteration": 0, "world_size": dist.get_world_size() if dist.is_initialized() else 1}]


def lock_run_folder(out: Path, tag: str) -> None:
    """One writer per folder: rank 0 holds an exclusive kernel lock (flock) on <out>/.lock for the whole run, and
    writes its owner there (host, pid, start time) for the message a second run gets; every rank stops if it is held.

    The kernel drops the lock with the process however it ends (a crash, SIGKILL, a requeued container whose pid
    namespace is gone), so a dead run's lock is never in the way and a pid reused in another namespace is never taken
    for a live run. Across nodes it needs a filesystem whose flock reaches every node (NFSv4, Lustre mounted with
    -o flock, GPFS); the README's "Several nodes" says so.
    """
    import fcntl

    message = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".lock"
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(os.read(fd, 4096) or b"{}")
                except ValueError:
                    owner = {}
                os.close(fd)
                message[0] = (f"[{tag}] {out} is in use by another run (host {owner.get('host')}, pid "
                              f"{owner.get('pid')}, started {owner.get('started')}): two runs in one folder would mix "
                              f"their metrics and checkpoints. Wait for it, or use another --out.")
                break
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:                     # its holder removed it as we opened it: lock the file there now
                os.close(fd)
                continue
            left = os.read(fd, 4096)
            if left.strip():                 # a run that ended without releasing it (killed, crashed, lost its node)
                print0(f"[{tag}] taking over {lock}: the run that left it is no longer running ({left.decode(errors='replace')})")
            me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            _AT_TEARDOWN.append(lambda: (lock.unlink(missing_ok=True), os.close(fd)))   # unlocked with the unlink
            break
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        fail(message[0])


def checkpoint_or_stop(done: int, total: int, save_every: int, stop: "StopRequest", device, save, tag: str, ckpt: Path,
                       close: list, unit: str = "iteration") -> None:
    """The end of every iteration (01: every step), a collective: save() a checkpoint every save_every, at the
    end, and when some rank got a stop signal; after a signal, close what is open (a progress bar, the metrics
    log), say how to continue, and end the process with 128 + the signal's number."""
    signum = stop.agreed(device)              # did any rank get SIGTERM / SIGUSR1 / Ctrl-C? (the same answer on all)
    if done % save_every == 0 or done == total or signum:
        save()
    if signum:
        for c in close:
            c.close()
        print0(f"[{tag}] stopped by signal {signum} after {unit} {done} of {total}: checkpoint written to {ckpt}. "
               f"Run the same command again to continue from there (--resume auto).")
        teardown(128 + signum)


# ---- C6. stop requests (preemption, Ctrl-C) and the non-finite guard
class StopRequest:
    """SIGTERM and SIGUSR1 (what cluster schedulers send before a preemption; torchrun forwards them to the
    workers), SIGHUP (the terminal that started the run closed) and SIGINT (Ctrl-C, which a terminal sends to torchrun and its workers alike) only set a flag. The
    loop asks at the end of every iteration whether any rank got one (one all-reduce), so every rank finishes the
    same iteration, a checkpoint is written, and the run exits. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = 0
        for name in ("SIGTERM", "SIGUSR1", "SIGHUP", "SIGINT"):
            signal.signal(getattr(signal, name), self._set)

    def _set(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not dist.is_initialized() or dist.get_rank() == 0:
                print("\n[stop] Ctrl-C: finishing this iteration and writing a checkpoint (Ctrl-C again: stop now, "
                      "losing the work since the last checkpoint)", file=sys.stderr, flush=True)
        self.signum = signum

    def agreed(self, device) -> int:
        """A collective: the signal number that some rank received, 0 if none did."""
        t = torch.tensor([float(self.signum)], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def first_nonfinite(named: dict[str, torch.Tensor], device) -> str | None:
    """A collective: the first name whose value holds a NaN or inf on some rank, or None. Every rank gets the
    same answer (one all-reduce), so all skip or all take the optimizer step."""
    flags = torch.tensor([0.0 if bool(torch.isfinite(full_value(v).detach()).all()) else 1.0 for v in named.values()],
                         dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return next((name for name, f in zip(named, flags.tolist()) if f), None)


class NonFiniteGuard:
    """Owns an optimizer step: clip, check, step or skip, zero the gradients. A step whose loss, gradient or update
    is not finite on some rank is skipped on every rank (the weights and AdamW's moments never see it) and counted;
    after `limit` skipped steps in a row of one optimizer, the run stops, naming the first non-finite quantity."""

    def __init__(self, limit: int, tag: str, ckpt: Path):
        self.limit, self.tag, self.ckpt = limit, tag, ckpt
        self.skipped, self.streak, self.first, self.pending = Counter(), Counter(), {}, set()

    def check(self, what: str, named: dict[str, torch.Tensor], device, where: str) -> bool:
        """A collective: True when every value is finite on every rank; else `what`'s next step() is a skip."""
        bad = first_nonfinite(named, device)
        if bad is None:
            return True
        self.pending.add(what)
        self.first.setdefault(what, f"{bad} ({where})")
        return False

    def step(self, what: str, optimizer, model: torch.nn.Module, max_norm: float, named: dict[str, torch.Tensor],
             device, where: str) -> tuple[bool, float]:
        """Clip model's gradients to max_norm; take optimizer's step when named and the norm are finite on every
        rank (and no check() of this step failed), else skip it; zero the gradients. -> (whether the step was
        taken, the norm before clipping: NaN when an earlier check() failed and nothing was clipped)."""
        norm = torch.tensor(float("nan"))
        if what not in self.pending:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            self.check(what, {**named, f"the {what}'s gradient norm": norm}, device, where)
        taken = what not in self.pending
        if not taken:
            self.pending.discard(what)
            self.skipped[what] += 1
            self.streak[what] += 1
            if self.streak[what] >= self.limit:
                self._stop(what)
        else:
            optimizer.step()
            self.streak[what] = 0
            self.first.pop(what, None)
        optimizer.zero_grad(set_to_none=True)
        return taken, float(full_value(norm))

    def counts(self) -> dict:
        """The steps skipped so far, per optimizer, as metrics."""
        return {f"nonfinite/skipped_{w}_steps": self.skipped[w] for w in ("policy", "critic")}

    def _stop(self, what: str) -> NoReturn:
        it = checkpoint_iteration(self.ckpt)
        fail(f"[{self.tag}] stopped: {self.streak[what]} {what} optimizer steps in a row had non-finite numbers (each "
             f"was skipped, so no weight took them in). The first: {self.first[what]}. Nothing was saved since; "
             + (f"the last checkpoint, {self.ckpt} (iteration {it}), is untouched. " if it is not None else
                "there is no checkpoint yet. ")
             + "Find the source (a reward model returning inf or NaN, a learning rate too high, a bf16 "
               "overflow), fix it, and rerun the same command to continue (--max-nonfinite-steps sets the limit).")
