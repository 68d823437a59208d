"""Pieces shared by the numbered scripts of MOLMA (multi-objective language-model alignment).

Read top to bottom:
  1. THE MATH: the paper's equations, each a function of torch tensors alone (copy any one out).
     ARGUMENTS: one documented dataclass per script, parsed by argparse, with named presets.
  2. DISTRIBUTED: process group, rank-aware seeding, FSDP2 sharding, per-objective gradients, saving.
  3. MODELS: loading, prompt format, sequence scores and token log-probs with pad == eos.
  4. DATA: the real datasets (or local files in their exact schemas) mixed as the paper's Table 1.
  5. RL: rollouts under FSDP, the APA step with the AMTL aligner (Algorithm 1), checkpoints, the loop
     shared by MOLMA (02) and the baselines (03).

Equation numbers are those of "Aligning Language Models Using Multi-Objective Deep Reinforcement
Learning" (MOLMA). Shapes: B = batch, T = response tokens (right-padded), K = objectives,
D = flattened parameters.

Reward convention used everywhere: a reward model's linear output s is its *score*; the reward
handed to RL and evaluation is the probability sigmoid(s). So Eq. 3.4's LOGIT gives s back, and
Eq. 4.2's safety threshold delta is a probability (Llama 2 uses 0.15).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# =====================================================================================
# 1. THE MATH
# =====================================================================================


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Eq. 3.2, the binary ranking loss of a reward model, averaged over pairs.

    chosen, rejected: [B] linear scores r(x, y_c), r(x, y_r) -> scalar
    -log sigmoid(r_c - r_r); logsigmoid keeps it finite for any margin.
    """
    return -F.logsigmoid(chosen - rejected).mean()


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
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Eq. 3.6, the critic's loss, one value per objective.

    values: [B, T, K] V_k,psi (carries the gradient); old_values, advantages: [B, T, K] from the
    rollout; mask: [B, T] -> [K]: mean over response tokens of (V_k - (A_k + V_old,k))^2.
    No clipping and no factor 1/2, as written in the paper.
    """
    target = (advantages + old_values).detach()
    return _masked_token_mean((values - target) ** 2, mask)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 7-13 when each rank holds only a shard of every gradient (FSDP).

    local_grads: [K, D_local] this rank's shards of the K objective gradients
    -> (this rank's shard of G B omega: [D_local], the full Gram matrix M: [K, K]).
    M is a sum over parameters, so it is the sum of the ranks' local Gram matrices: one all-reduce
    of K x K numbers; every rank then computes the same B, and forms its own shard of the update.
    No full gradient is ever gathered.
    """
    import torch.distributed as dist

    gram = local_grads @ local_grads.T
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    B = amtl_balance(gram)
    return local_grads.T @ (B @ weights.to(local_grads.dtype)), gram


def condition_number(gram: torch.Tensor) -> float:
    """sigma_max / sigma_min of G from its Gram matrix [K, K] (AMTL's stability criterion).

    Returns inf when G is rank-deficient (sigma_min at or below the truncation tolerance).
    """
    eigvals = torch.linalg.eigvalsh(gram.double())
    tol = eigvals.max().clamp(min=0) * gram.shape[0] * torch.finfo(torch.float32).eps
    if eigvals.max() <= 0 or eigvals.min() <= tol:
        return float("inf")
    return float((eigvals.max() / eigvals.min()).sqrt())


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


# =====================================================================================
# ARGUMENTS: one dataclass per script, each field documented, defaults = the paper's values
# =====================================================================================
import argparse  # noqa: E402
import dataclasses  # noqa: E402


def arg(default, help: str):
    """A dataclass field with its --help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_args(cls, argv=None, presets: dict[str, dict] | None = None):
    """Build an argparse parser from a dataclass; `--preset NAME` swaps in another set of defaults.

    Explicit flags always win over the preset. Booleans take true/false.
    """
    presets = presets or {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None and known.preset not in presets:
        raise SystemExit(f"unknown --preset {known.preset!r}; accepted: {', '.join(presets) or 'none'}")
    overrides = presets.get(known.preset, {})
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", default=None, choices=list(presets),
                            help="a named set of defaults: " + "; ".join(
                                f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in presets.items()))
    for f in dataclasses.fields(cls):
        default = overrides.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kind = type(default) if default is not None else str
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=default,
                                metavar="true|false", help=f.metadata.get("help", ""))
        else:
            parser.add_argument(flag, type=kind, default=default, help=f.metadata.get("help", ""))
    ns = vars(parser.parse_args(argv))
    ns.pop("preset", None)
    args = cls(**ns)
    args.preset = known.preset
    return args


# =====================================================================================
# 2. DISTRIBUTED: process group, seeding, FSDP2, atomic saving
# =====================================================================================
import json  # noqa: E402  (kept beside the code that uses it, so each section reads alone)
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group that torchrun describes; plain `python script.py` makes a group of one.

    gloo on CPU, nccl on GPU (plus gloo for CPU tensors), so every code path is the FSDP one.
    """
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port for a one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    # transformers returns logits as a slice (a view); FSDP2 warns that an in-place op on it would skip
    # its backward hook. Nothing here modifies a model's output in place, so that one warning is noise.
    import warnings

    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if dist.get_rank() != 0:   # one copy of the libraries' reports is enough
        import transformers

        transformers.logging.set_verbosity_error()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def set_seed(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (the only ones this project draws from).

    Scripts call it with the shared seed before building models (new heads must agree on every
    rank) and with seed + rank before sampling (ranks must draw different answers).
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def shard_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """FSDP2: fully_shard each decoder layer, then the root (embeddings, final norm, head).

    bf16 compute with fp32 gradient reduction on GPU; fp32 on CPU. Works with one process too.
    The original class name is kept in the config, because fully_shard renames the class.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.config.architectures = [type(model).__name__]
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {"mesh": mesh}
    if info.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather an FSDP model's full weights onto rank 0's CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def atomic_dir_write(out_dir: str | Path, write) -> None:
    """Call write(tmp_dir), then swap tmp_dir into out_dir.

    A crash while writing leaves the previous out_dir intact; the swap itself is two renames.
    """
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_pretrained(folder: Path, model, state: dict, tokenizer=None) -> None:
    """Rank 0: a Hugging Face save_pretrained folder from a gathered state dict (safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pretrained_folder(model, out_dir, tokenizer=None) -> None:
    """Write an FSDP model as a save_pretrained folder, atomically. Every rank calls it; rank 0 writes."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        atomic_dir_write(out_dir, lambda tmp: write_pretrained(tmp, model, state, tokenizer))
    dist.barrier()


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


class MetricsLog:
    """Rank 0 appends one JSON object per step to <run>/metrics.jsonl; other ranks do nothing.

    resume_step: on resume, lines after that step (written after the last checkpoint) are dropped,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def cosine_schedule(optimizer, total_steps: int, min_ratio: float):
    """Learning rate decaying from its peak to min_ratio of it along a half cosine over total_steps."""
    def factor(step: int) -> float:
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def print0(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of numbers over ranks (counts, sums for means)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# =====================================================================================
# 3. MODELS: prompt format, pad == eos, scores and log-probs read from lengths
# =====================================================================================

QA_TEMPLATE = "Instruct: {prompt}\nOutput:"  # phi-2's QA format (model card)


def format_prompt(prompt: str) -> str:
    return QA_TEMPLATE.format(prompt=prompt.strip())


def load_tokenizer(path: str):
    """phi-2's tokenizer has no pad token: pad with eos, and take every mask from lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token; MOLMA needs one to end answers")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts in QA format, LEFT-padded for generation: -> (input_ids [B, P], attention_mask [B, P]).

    A prompt longer than max_prompt_len keeps its last tokens (the request's end and 'Output:').
    """
    enc = [tokenizer(format_prompt(p), add_special_tokens=False)["input_ids"][-max_prompt_len:] for p in prompts]
    P = max(map(len, enc))
    ids = torch.full((len(enc), P), tokenizer.eos_token_id, dtype=torch.long)  # pad == eos; masked
    mask = torch.zeros(len(enc), P, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, P - len(e):] = torch.tensor(e)
        mask[i, P - len(e):] = 1
    return ids, mask


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[QA prompt | ' ' response | EOS], RIGHT-padded: -> (input_ids [B, L], attention_mask [B, L], n_cut).

    Only the prompt is truncated (from the left), never the answer, as the SHP card advises; an
    answer that alone exceeds max_len is cut at its end, and n_cut counts those, for the caller to log.
    """
    rows, n_cut = [], 0
    for p, r in zip(prompts, responses):
        q = tokenizer(format_prompt(p), add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + r.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(a) > max_len - 1:
            a, n_cut = a[: max_len - 1], n_cut + 1
        rows.append(q[max(0, len(q) - (max_len - len(a))):] + a)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.eos_token_id, dtype=torch.long)  # pad == eos; masked
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
    return model.eval()


def load_sequence_classifier(path: str, tokenizer, labels: list[str] | None = None):
    """A reward model: AutoModelForSequenceClassification, one linear output per objective.

    labels given: a new head (one output per label) on the backbone at path (stage 1's start);
    labels None: a trained reward model, whose config.id2label names the objective of each output.
    config.pad_token_id is set because transformers refuses batches without one; the scores are read
    by sequence_scores at the last real token, never by the library's pad-based pooling.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def load_critic(path: str, tokenizer, objectives: list[str]):
    """The critic: pi_0's backbone with a value head of K outputs per token (token classification)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path, num_labels=len(objectives), id2label=dict(enumerate(objectives)),
                                        label2id={o: i for i, o in enumerate(objectives)})
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def check_same_vocab(tokenizer, path: str, what: str) -> None:
    """Stages share token ids (policy -> reward models); a different tokenizer would silently misread."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(path)
    if other.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{what} at {path} uses a different tokenizer than the policy; MOLMA feeds the policy's "
                         f"token ids to it directly, so both must come from the same base model")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: positions counted over real tokens, as `generate` does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B]: the rightmost real position, from the mask, never from token ids (pad == eos)."""
    L = attention_mask.shape[1]
    idx = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(-1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A reward model's linear scores at the last real token: [B, L] -> [B, num_labels].

    transformers' sequence classifiers pool at the rightmost token that is not pad_token_id; with
    pad == eos that skips a final EOS and depends on the padding. So the per-position scores of
    the `score` head are captured and read at the last real position given by the mask.
    """
    captured = {}
    handle = model.score.register_forward_hook(lambda mod, inp, out: captured.__setitem__("all", out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        handle.remove()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return captured["all"][rows, last_token_index(attention_mask)].float()


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """log pi(a_t | s_t) of every response token: [B, P + T] -> [B, T].

    sequences are [left-padded prompt of width P | right-padded response of width T], as
    `generate` returns them. Logits at position P - 1 + t predict response token t.
    """
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    logits = logits[:, prompt_len - 1 : -1].float()
    return torch.gather(logits.log_softmax(-1), 2, sequences[:, prompt_len:, None]).squeeze(-1)


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V_k(s_t) before every response token, from a token-classification critic: -> [B, T, K]."""
    out = critic(input_ids=sequences, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return out[:, prompt_len - 1 : -1].float()


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, T] generated tokens -> [B, T] mask: tokens up to and including the first EOS.

    Because pad == eos, everything after the first EOS is padding. An answer that never emits EOS
    keeps all T tokens (it was cut at the length limit); callers decide what that costs.
    """
    is_eos = responses == eos_token_id
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after_first_eos).long()


# =====================================================================================
# 4. DATA: the real datasets (or local files in their exact schemas), mixed as Table 1
# =====================================================================================
import gzip  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
from collections import Counter  # noqa: E402

log = logging.getLogger("molma")

# source name -> (hub id, data_dir or None). Local copies live at <data_root>/<hub id>/<data_dir>/<split>.jsonl[.gz]
SOURCES = {
    "pku_help": ("PKU-Alignment/PKU-SafeRLHF", None),      # pairs by better_response_id
    "pku_safe": ("PKU-Alignment/PKU-SafeRLHF", None),      # pairs by safer_response_id
    "hh_helpful": ("Anthropic/hh-rlhf", "helpful-base"),
    "hh_harmless": ("Anthropic/hh-rlhf", "harmless-base"),  # pairs, and RL prompts
    "shp": ("stanfordnlp/SHP", None),
    "alpaca": ("yahma/alpaca-cleaned", None),               # RL prompts only
}
# Table 1. Reward-model pairs per objective, and the MOLMA prompt set.
PAIR_MIXES = {
    "help": {"pku_help": 0.77, "hh_helpful": 0.115, "shp": 0.115},
    "safe": {"pku_safe": 0.875, "hh_harmless": 0.125},
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
    prompt: str      # the user's request (formatted with QA_TEMPLATE at tokenization)
    chosen: str      # the better answer for this pair's objective
    rejected: str
    source: str


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
    opener = gzip.open if files[0].suffix == ".gz" else open
    with opener(files[0], "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
    try:
        if source in ("pku_help", "pku_safe"):
            key = "better_response_id" if source == "pku_help" else "safer_response_id"
            best = int(row[key])
            if best not in (0, 1):
                return f"{key} not 0/1"
            answers = [row["response_0"], row["response_1"]]
            if source == "pku_safe":
                safe = [row["is_response_0_safe"], row["is_response_1_safe"]]
                if not safe[best] and safe[1 - best]:   # safe-rlhf drops these contradictory pairs
                    return "safer answer labelled unsafe"
            prompt, chosen, rejected = row["prompt"], answers[best], answers[1 - best]
        elif source in ("hh_helpful", "hh_harmless"):
            prompt_part, chosen = split_hh(row["chosen"])
            if not row["rejected"].startswith(prompt_part):
                return "transcripts diverge before the last turn"
            rejected = row["rejected"][len(prompt_part):].strip()
            prompt = hh_prompt_text(prompt_part)
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
    return Pair(prompt.strip(), chosen.strip(), rejected.strip(), source)


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


def _check_bad(source: str, n_rows: int, skipped: Counter, max_bad_fraction: float) -> None:
    bad = sum(n for why, n in skipped.items() if not why.startswith("filtered"))
    if skipped:
        log.info("%s: %d rows, skipped %s", source, n_rows, dict(skipped))
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
        raw_split = "test" if split == "test" else "train"
        rows = load_rows(source, raw_split, data_root)
        pairs, skipped = parse_pairs(source, rows)
        _check_bad(source, len(rows), skipped, max_bad_fraction)
        by_source[source] = [p for p in pairs if split == "test" or _in_split(p.prompt, split, {"valid": RM_VALID_FRACTION})]
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
        _check_bad(source, len(rows), skipped, max_bad_fraction)
        by_source[source] = [(p, source) for p in prompts if _in_split(p, split, PROMPT_SPLIT_FRACTIONS)]
    return _mix(by_source, PROMPT_MIX, limit, seed, f"RL prompts ({split})")


# =====================================================================================
# 5. RL: the APA loop of MOLMA (Algorithm 1), shared with the single-objective baselines
# =====================================================================================
import contextlib  # noqa: E402
import time  # noqa: E402


@dataclass
class RLArgs:
    """APA training of a policy from pi_0 against reward models (MOLMA Sec. 3.3, 4.3)."""
    policy: str = arg("microsoft/phi-2", "pi_0: the reference model; the policy and the critic start from it")
    reward_models: str = arg("runs/paper/rm_help/model,runs/paper/rm_safe/model",
                             "comma list of reward-model folders (stage 1); each objective is read from the "
                             "output that the folder's config.id2label names after it")
    data_root: str = arg("", "local copies of the datasets in their hub schemas; empty: read the hub")
    out: str = arg("", "run folder (default: runs/paper/<method>)")
    iterations: int = arg(100, "APA iterations (Sec. 4.3)")
    rollouts: int = arg(64, "prompts answered per iteration, the experience memory (Sec. 4.3)")
    minibatch: int = arg(8, "rollouts per gradient step; one step per minibatch (Sec. 4.3)")
    lr: float = arg(1e-6, "policy learning rate, constant (Sec. 4.3)")
    critic_lr: float = arg(1e-6, "critic learning rate, constant")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    adam_eps: float = arg(1e-5, "AdamW eps")
    weight_decay: float = arg(0.1, "AdamW weight decay (Sec. 4.3)")
    grad_clip: float = arg(1.0, "gradient clipping of the (aligned) policy update and of the critic")
    kl_beta: float = arg(0.01, "beta of the per-token KL penalty, Eq. 3.3")
    apa_lambda: float = arg(0.95, "lambda of the APA loss, Eq. 3.5")
    gamma: float = arg(1.0, "GAE discount")
    gae_lambda: float = arg(0.95, "GAE lambda")
    max_prompt_len: int = arg(256, "prompt tokens kept (from the end)")
    max_new_tokens: int = arg(256, "answer length limit")
    temperature: float = arg(1.0, "sampling temperature (no top-k / top-p: the policy's own distribution)")
    truncated_score: float = arg(-1.0, "shaped score (whitened units, i.e. one std below the batch mean) given "
                                       "to every objective of an answer cut at the length limit without EOS")
    save_every: int = arg(10, "iterations between checkpoints (and at the end)")
    resume: bool = arg(False, "continue from <out>/checkpoint")
    ground_truth: bool = arg(False, "tiny world only: log the true helpfulness and safety of every rollout")
    seed: int = arg(0, "seed")


RL_TINY = dict(policy="runs/tiny/world/base", reward_models="runs/tiny/rm_help/model,runs/tiny/rm_safe/model",
               data_root="runs/tiny/world/data", iterations=60, rollouts=64, minibatch=8, lr=2e-4, critic_lr=1e-3,
               max_prompt_len=32, max_new_tokens=40, save_every=20, ground_truth=True)


def load_reward_heads(paths: list[str], objectives: list[str], tokenizer) -> list[tuple[torch.nn.Module, int]]:
    """For each objective, (reward model, output index) from the folders' config.id2label."""
    models, found = [], {}
    for path in paths:
        check_same_vocab(tokenizer, path, "reward model")
        m = load_sequence_classifier(path, tokenizer)
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
    mask: torch.Tensor               # [B, T] answer tokens up to and including the first EOS
    ended: torch.Tensor              # [B] bool: the answer reached EOS (else it was cut at max_new_tokens)
    logprobs: torch.Tensor = None    # [B, T] log pi_old (the policy that generated them)
    ref_logprobs: torch.Tensor = None  # [B, T] log pi_0
    values: torch.Tensor = None      # [B, T, K] V_old
    scores: torch.Tensor = None      # [B, K] reward-model probabilities sigmoid(score)
    advantages: torch.Tensor = None  # [B, T, K]

    def answers(self, tokenizer) -> list[str]:
        """The answers as text: their tokens up to the first EOS, special tokens dropped."""
        return tokenizer.batch_decode([row[m.bool()] for row, m in zip(self.sequences[:, self.prompt_len:], self.mask)],
                                      skip_special_tokens=True)

    def rows(self, i: int, j: int) -> "Rollouts":
        """Rows i:j, trimmed to their longest answer (a minibatch)."""
        T = int(self.mask[i:j].sum(1).max().clamp(min=1))
        P = self.prompt_len
        return Rollouts(self.prompts[i:j], self.sequences[i:j, : P + T], self.attention_mask[i:j, : P + T], P,
                        self.mask[i:j, :T], self.ended[i:j], self.logprobs[i:j, :T], self.ref_logprobs[i:j, :T],
                        self.values[i:j, :T], self.scores[i:j], self.advantages[i:j, :T])


@torch.no_grad()
def generate_rollouts(policy, tokenizer, prompts: list[str], args: RLArgs, device) -> Rollouts:
    """Sample one answer per prompt (stop at EOS or at max_new_tokens). args: anything with max_prompt_len,
    max_new_tokens and temperature (RLArgs, or 04_evaluate's Args)."""
    ids, pmask = encode_prompts(tokenizer, prompts, args.max_prompt_len)
    ids, pmask = ids.to(device), pmask.to(device)
    with unsharded_for_generation(policy):
        out = policy.generate(input_ids=ids, attention_mask=pmask, do_sample=True, temperature=args.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                              eos_token_id=tokenizer.eos_token_id, synced_gpus=False, use_cache=True)
    answers = out[:, ids.shape[1]:]
    mask = response_mask(answers, tokenizer.eos_token_id)
    ended = ((answers == tokenizer.eos_token_id) & mask.bool()).any(1)
    return Rollouts(prompts, out, torch.cat([pmask, mask], 1), ids.shape[1], mask, ended)


@torch.no_grad()
def score_rollouts(r: Rollouts, policy, ref, critic, reward_heads) -> None:
    """Fill in log pi_old, log pi_0, V_old (per objective) and the reward models' probabilities."""
    r.logprobs = response_logprobs(policy, r.sequences, r.attention_mask, r.prompt_len) * r.mask
    r.ref_logprobs = response_logprobs(ref, r.sequences, r.attention_mask, r.prompt_len) * r.mask
    r.values = response_values(critic, r.sequences, r.attention_mask, r.prompt_len)
    by_model = {}
    for model, _ in reward_heads:                # each reward model runs once, whatever its number of heads
        if id(model) not in by_model:
            by_model[id(model)] = sequence_scores(model, r.sequences, r.attention_mask)
    r.scores = torch.stack([torch.sigmoid(by_model[id(m)][:, i]) for m, i in reward_heads], 1)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (same shape on every rank) in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def apa_step(policy, critic, policy_opt, critic_opt, mb: Rollouts, omega: torch.Tensor, args: RLArgs) -> dict:
    """Algorithm 1, lines 4-14, on one minibatch: K APA losses, K gradients, aligned, one step.

    L_k = APA_k + value_k (Eq. 3.7). The value term belongs to the critic, a separate network, so
    the policy's gradient of L_k is the gradient of APA_k; the critic minimises the sum of its K
    value losses. With K = 1 the aligner is the identity (amtl_align's K = 1 case), so a plain
    backward is used: the single-objective baselines pay nothing for it.
    """
    K = mb.advantages.shape[-1]
    logprobs = response_logprobs(policy, mb.sequences, mb.attention_mask, mb.prompt_len)           # line 5
    apa = apa_loss(logprobs, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)             # Eq. 3.5, [K]
    stats = {}
    if K == 1:
        apa[0].backward()
    else:
        local = objective_gradients(policy, apa)                                                   # lines 6-7
        update, gram = amtl_align_sharded(local, omega)                                            # lines 8-13
        set_flat_grad(policy, update)
        B = amtl_balance(gram)
        norms = gram.diagonal().clamp(min=0).sqrt()
        stats.update({"grad_norms": norms.tolist(), "gram": gram.tolist(),
                      "cond_before": condition_number(gram), "cond_after": condition_number(B.T @ gram @ B)})
    total = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
    policy_opt.step()                                                                              # line 14
    policy_opt.zero_grad(set_to_none=True)
    if K == 1:
        stats["grad_norms"] = [float(full_value(total))]
    values = response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len)
    vloss = value_loss(values, mb.values, mb.advantages, mb.mask)                                  # Eq. 3.6, [K]
    vloss.sum().backward()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
    critic_opt.step()
    critic_opt.zero_grad(set_to_none=True)
    stats.update({"apa_loss": apa.tolist(), "value_loss": vloss.tolist(), "update_norm": float(full_value(total))})
    return stats


def full_value(t):
    """A (possibly DTensor) result, e.g. clip_grad_norm_'s total norm under FSDP, as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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


# ---------------------------------------------------------------- checkpoints: everything needed to continue
def _flatten_optim(osd: dict) -> tuple[dict, list]:
    """{'state': {fqn: {name: tensor}}, 'param_groups': [...]} -> (flat tensors, param_groups).
    Empty on ranks other than 0 (the full state is gathered to rank 0 only)."""
    tensors = {}
    for fqn, st in osd.get("state", {}).items():
        for k, v in st.items():
            tensors[f"{fqn}::{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, osd.get("param_groups", [])


def _unflatten_optim(tensors: dict, param_groups: list) -> dict:
    state = {}
    for key, v in tensors.items():
        fqn, k = key.rsplit("::", 1)
        state.setdefault(fqn, {})[k] = v
    return {"state": state, "param_groups": param_groups}


def save_rl_checkpoint(folder: Path, models: dict, optimizers: dict, tokenizer, trainer_state: dict) -> None:
    """Every rank calls it. models/optimizers: {name: FSDP model / its optimizer}. Rank 0 writes
    <folder>/<name>/ (save_pretrained), optim_<name>.safetensors, rng.safetensors and
    trainer_state.json, all swapped in at once (a crash mid-save keeps the previous checkpoint)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {n: full_state_dict(m) for n, m in models.items()}
    optim = {n: _flatten_optim(get_optimizer_state_dict(models[n], o, options=opts)) for n, o in optimizers.items()}
    rng = {"cpu": gather_rows(torch.get_rng_state()[None])}
    if torch.cuda.is_available():
        rng["cuda"] = gather_rows(torch.cuda.get_rng_state().to(torch.cuda.current_device())[None]).cpu()
    if dist.get_rank() == 0:
        def write(tmp: Path) -> None:
            for n, m in models.items():
                write_pretrained(tmp / n, m, weights[n], tokenizer)
            groups = {}
            for n, (tensors, param_groups) in optim.items():
                save_file(tensors, tmp / f"optim_{n}.safetensors")
                groups[n] = param_groups
            save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "param_groups": groups,
                                                                "world_size": dist.get_world_size()}, indent=2))
        atomic_dir_write(folder, write)
    dist.barrier()


def load_rl_checkpoint(folder: Path, models: dict, optimizers: dict) -> dict:
    """Restore optimizer states and this rank's RNG (weights are loaded from <folder>/<name>/ with
    from_pretrained before sharding). Returns the trainer state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = json.loads((folder / "trainer_state.json").read_text())
    for n, o in optimizers.items():
        osd = _unflatten_optim(load_file(folder / f"optim_{n}.safetensors"), state["param_groups"][n])
        set_optimizer_state_dict(models[n], o, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    rng = load_file(folder / "rng.safetensors")
    if state["world_size"] == dist.get_world_size():
        torch.set_rng_state(rng["cpu"][dist.get_rank()].clone())  # a fresh tensor: a view crashes it
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][dist.get_rank()].clone())
    else:
        log.warning("checkpoint was written by %d ranks, resuming on %d: sampling RNG streams restart from the seed",
                    state["world_size"], dist.get_world_size())
    return state


def run_rl(args: RLArgs, method: str, rm_objectives: list[str], heads: list[str], shape_scores,
           state: dict | None = None, omega: list[float] | None = None) -> None:
    """The APA training loop of MOLMA and of the baselines; they differ only in shape_scores.

    rm_objectives: what the reward models are asked for (their probabilities, [N, len(rm_objectives)]).
    heads: the K objectives the policy and critic optimise (MOLMA: the same; a baseline: one).
    shape_scores(probs [N, K_rm], state) -> [N, K]: the whitened sequence scores r_hat of the whole
        iteration's batch (Eq. 3.4 for MOLMA; Eq. 4.1, 4.2 or Fast RL for the baselines). state is a
        dict it may update (Fast RL's weights); it is logged and checkpointed.
    omega: task importance for Algorithm 1 (default equal: 1 each).
    """
    info = setup_distributed()
    for name, n, d in (("--rollouts", args.rollouts, info.world_size), ("--minibatch", args.minibatch, info.world_size),
                       ("--rollouts", args.rollouts, args.minibatch)):
        if n % d:
            raise SystemExit(f"{name} {n} must be divisible by {d} ({'world size' if d == info.world_size else '--minibatch'})")
    local, local_mb = args.rollouts // info.world_size, args.minibatch // info.world_size
    out = Path(args.out or f"runs/paper/{method}")
    ckpt = out / "checkpoint"
    if args.resume and not (ckpt / "trainer_state.json").exists():
        raise SystemExit(f"--resume: no checkpoint at {ckpt} to continue from")
    resume = args.resume
    K = len(heads)
    omega_t = torch.tensor(omega or [1.0] * K, device=info.device)
    state = state if state is not None else {}
    set_seed(args.seed)                     # shared by all ranks: the new value head must agree

    # the five models: pi_0 (frozen), policy, critic, reward models (frozen)
    tokenizer = load_tokenizer(args.policy)
    policy = load_causal_lm(str(ckpt / "policy") if resume else args.policy, tokenizer)
    ref = load_causal_lm(args.policy, tokenizer).requires_grad_(False)
    critic = load_critic(str(ckpt / "critic") if resume else args.policy, tokenizer, heads)
    reward_heads = load_reward_heads([p for p in args.reward_models.split(",") if p], rm_objectives, tokenizer)
    for m, _ in reward_heads:
        m.requires_grad_(False)
    for m in [policy, ref, critic, *{id(m): m for m, _ in reward_heads}.values()]:
        shard_model(m, info)
    adamw = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, **adamw)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, **adamw)
    models, optimizers = {"policy": policy, "critic": critic}, {"policy": policy_opt, "critic": critic_opt}

    start = 0
    set_seed(args.seed + 1 + info.rank)     # sampling: a different stream per rank
    if resume:
        trainer = load_rl_checkpoint(ckpt, models, optimizers)
        start, state = trainer["iteration"], trainer["reward_state"]
        print0(f"[{method}] resumed from {ckpt} at iteration {start}")
    train_prompts = load_rl_prompts("train", args.data_root or None, seed=args.seed)
    metrics = MetricsLog(out / "metrics.jsonl", info.is_main, resume_step=start if resume else None)
    if args.ground_truth:
        import tiny_world
    from tqdm import tqdm

    print0(f"[{method}] {len(train_prompts)} training prompts; {args.iterations} iterations of {args.rollouts} rollouts "
           f"on {info.world_size} ranks; objectives {heads}")
    t_train = time.perf_counter()
    for it in tqdm(range(start, args.iterations), desc=method, disable=not info.is_main, mininterval=5, initial=start,
                   total=args.iterations):
        t0 = time.perf_counter()
        prompts = iteration_prompts(train_prompts, it, args.rollouts, args.seed)[info.rank * local : (info.rank + 1) * local]
        r = generate_rollouts(policy, tokenizer, [p for p, _ in prompts], args, info.device)
        t1 = time.perf_counter()
        score_rollouts(r, policy, ref, critic, reward_heads)
        all_scores, all_ended = gather_rows(r.scores), gather_rows(r.ended.long()).bool()
        shaped = shape_scores(all_scores, state)                                  # [N, K]: Eq. 3.4 (or 4.1, 4.2)
        shaped = torch.where(all_ended[:, None], shaped, args.truncated_score)    # cut answers: a fixed low score
        shaped = shaped[info.rank * local : (info.rank + 1) * local]
        rewards = kl_penalized_rewards(shaped, r.logprobs, r.ref_logprobs, r.mask, args.kl_beta)   # Eq. 3.3
        r.advantages, _ = gae(rewards, r.values, r.mask, args.gamma, args.gae_lambda)             # per objective
        t2 = time.perf_counter()
        steps = [apa_step(policy, critic, policy_opt, critic_opt, r.rows(j, j + local_mb), omega_t, args)
                 for j in range(0, local, local_mb)]                                              # Algorithm 1, line 3
        t3 = time.perf_counter()

        # ---- metrics: named sums over this rank's rollouts, all-reduced, divided by the global count
        sums = {"n": float(local), "objective/kl": ((r.logprobs - r.ref_logprobs) * r.mask).sum().item(),
                "response/length": r.mask.sum().item(), "response/eos_rate": r.ended.float().sum().item()}
        sums.update({f"{o}/score": r.scores[:, k].sum().item() for k, o in enumerate(rm_objectives)})
        sums.update({f"{h}/shaped_reward": rewards[..., k].sum().item() for k, h in enumerate(heads)})
        if args.ground_truth:
            truth = [tiny_world.ground_truth(p, a) for (p, _), a in zip(prompts, r.answers(tokenizer))]
            sums["truth/help"], sums["truth/safe"] = sum(h for h, _ in truth), sum(s for _, s in truth)
        # minibatch statistics: mean over this rank's minibatches (summed over ranks below, then / world size)
        for key, name in (("apa_loss", "apa_loss"), ("value_loss", "value_loss"), ("grad_norms", "grad_norm")):
            for k, h in enumerate(heads):
                sums[f"{h}/{name}"] = sum(s[key][k] for s in steps) / len(steps)
        tot = dict(zip(sums, all_reduce_sum(list(sums.values()), info.device)))
        rec = {"step": it + 1}
        rec.update({k: v / (info.world_size if k.endswith(("_loss", "grad_norm")) else tot["n"])
                    for k, v in tot.items() if k != "n"})
        if K > 1:
            grams = torch.tensor([s["gram"] for s in steps], dtype=torch.float64)
            norms = grams.diagonal(dim1=1, dim2=2).clamp(min=1e-30).sqrt()
            cos = grams / (norms[:, :, None] * norms[:, None, :])
            iu = torch.triu_indices(K, K, 1)
            rec["amtl/cos"] = cos[:, iu[0], iu[1]].mean().item()
            rec["amtl/cond_before"] = sum(s["cond_before"] for s in steps) / len(steps)
            rec["amtl/cond_after"] = sum(s["cond_after"] for s in steps) / len(steps)
        rec["update_norm"] = sum(s["update_norm"] for s in steps) / len(steps)
        rec.update({f"state/{k}": v for k, v in state.items()})
        rec.update({"time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2, "time/iteration": t3 - t0})
        metrics.write(rec)

        if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
            save_rl_checkpoint(ckpt, models, optimizers, tokenizer,
                               {"iteration": it + 1, "reward_state": state, "method": method, "config": dataclasses.asdict(args)})
    # the trained policy, for evaluation and for users
    save_pretrained_folder(policy, out / "policy", tokenizer)
    if info.is_main:
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
        per_it = sorted(l["time/iteration"] for l in lines)
        summary = {"method": method, "objectives": heads, "reward_objectives": rm_objectives, "omega": omega_t.tolist(),
                   "state": state, "config": dataclasses.asdict(args), "world_size": info.world_size,
                   "iterations": len(lines), "train_seconds_this_process": round(time.perf_counter() - t_train, 1),
                   "train_seconds": round(sum(per_it), 1), "median_seconds_per_iteration": per_it[len(per_it) // 2],
                   "phase_seconds_median": {k: sorted(l[f"time/{k}"] for l in lines)[len(lines) // 2]
                                            for k in ("generation", "scoring", "update")},
                   "final": lines[-1]}
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2))
        print0(f"[{method}] done: {out / 'policy'}; " + ", ".join(
            f"{k}={v:.3f}" for k, v in lines[-1].items() if k.endswith(("score", "kl")) or k.startswith("truth")))
    dist.destroy_process_group()
