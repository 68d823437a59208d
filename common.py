"""The pieces the numbered scripts of MOLMA (multi-objective language-model alignment) share to do the paper's work:

  A. COMPONENTS TO COPY: the paper's math (Eq. 3.2-3.7), the AMTL aligner and its per-objective gradients, FSDP2
     setup and sharded loading. Each block needs only torch, math, torch.distributed and the standard library: copy
     one out alone (with the pieces of its own block) and it runs (tests/test_copy_out.py proves it for every block).
  B. MODELS, DATA AND ROLLOUTS: loading with pad == eos, scores and log-probs read from lengths, the real datasets
     mixed as Table 1, sampling and scoring the experience of an iteration under FSDP.
The bookkeeping of a long run (arguments, checks, metrics, checkpoints, stops) is bookkeeping.py's; no training loop
lives here: Algorithm 1 is written out in 02_train_molma.py, the single-objective APA loop in 03_train_baselines.py.

Equation numbers are those of "Aligning Language Models Using Multi-Objective Deep Reinforcement Learning" (MOLMA).
Shapes: B = batch, T = response tokens (right-padded), K = objectives, D = flattened parameters. A reward model's
linear output s is its *score*; the reward handed to RL and evaluation is sigmoid(s), so Eq. 3.4's LOGIT gives s
back and Eq. 4.2's safety threshold delta is a probability (Llama 2 uses 0.15).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import importlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import socket
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist


# ==== A. COMPONENTS TO COPY: the paper's math (Eq. 3.2-3.7), the AMTL aligner and its gradients, FSDP setup ====


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
            # torchrun's agent store outlives an attempt under --max-restarts: a prefix per attempt keeps the
            # restarted workers from the dead ones' keys (a replaced agent: docs/scale.md, "Several nodes")
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

    Call it last, after every file is written and closed: it does not return. A script's process ends with
    os._exit, not a return to the interpreter, because gloo's worker threads can release FSDP's last works after
    Python has begun to finalize, which aborts a finished run (SIGABRT; docs/design.md, "A clean exit"). In a
    multiprocessing child (e.g. torch's launcher with a function entrypoint), which never finalizes Python, it
    raises SystemExit(exit_code): the stage's main() can run inside a caller's process.
    """
    if dist.is_initialized():
        dist.barrier()                  # no rank leaves while another still waits on a collective with it
        dist.destroy_process_group()
    while _AT_TEARDOWN:                 # e.g. this process's run folder lock (lock_run_folder), released once
        _AT_TEARDOWN.pop()()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken pipe: nothing left to flush into
            pass
    if multiprocessing.parent_process() is not None:
        raise SystemExit(exit_code)
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


# ==== B. MODELS, DATA AND ROLLOUTS: loading, prompt format, scores and log-probs, Table 1's data, sampling ====
# ---- B1. models: seeds, prompt format, pad == eos, loading, scores and log-probs read from lengths
def set_seed(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (the only ones drawn from): the shared seed before building models (new
    heads must agree on every rank), seed + rank before sampling (ranks must draw different answers)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def print0(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


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


# ---- B3. rollouts: the experience of an iteration, generated and scored under FSDP
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
def generate_rollouts(policy, tokenizer, prompts: list[str], args, device) -> Rollouts:
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
