"""Measurements run under torchrun by bench/benchmark.py (one per call). Prints one JSON line."""
import argparse
import os
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402
import bookkeeping as bk  # noqa: E402

SHAPES = {
    # the tiny world's base model
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=344),
    # big enough on CPU for the gradient buffers to stand out in the peak memory
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048, vocab_size=8192),
    # microsoft/phi-2's shape (random weights, no download)
    "phi2": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240, vocab_size=51200),
    # phi-2's width and vocabulary with 2 of its 32 layers: host-memory measurements on a CPU machine
    "phi2_wide": dict(hidden_size=2560, num_hidden_layers=2, num_attention_heads=32, intermediate_size=10240,
                      vocab_size=51200),
}


MODEL = None      # --model FOLDER: a real checkpoint (e.g. ./run.sh real's SmolLM2) instead of a random Phi shape


def vocab_size(shape) -> int:
    if MODEL:
        import transformers

        return transformers.AutoConfig.from_pretrained(MODEL).vocab_size
    return SHAPES[shape]["vocab_size"]


def build(shape, head=None, outputs=1):
    """pi_0 / the policy (head None: a causal LM), or a reward model / critic (head "reward" / "critic": the project's
    ScoreModel, as the stages build them, with `outputs` outputs): the folder's weights with a new head, or random."""
    import transformers

    C.set_seed(0)
    if MODEL:
        with C._library_warnings_off():
            if head is None:
                return transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, pad_token_id=0).eval()
            backbone = transformers.AutoModel.from_pretrained(MODEL, dtype=torch.float32)
    else:
        cfg = transformers.PhiConfig(max_position_embeddings=2048, pad_token_id=0, eos_token_id=0, bos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **SHAPES[shape])
        if head is None:
            return transformers.PhiForCausalLM(cfg).eval()
        backbone = transformers.PhiModel(cfg)
    return C.ScoreModel(backbone, [f"objective{i}" for i in range(outputs)], head).eval()


def sync(info):
    if info.device.type == "cuda":
        torch.cuda.synchronize()


def generation(info, a):
    """Tokens per second of sampling a.prompts answers of exactly a.new_tokens tokens, all ranks together."""
    model = build(a.shape)
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    sharded = a.mode != "plain"
    if sharded:
        C.shard_model(model, info)
    else:
        model.to(info.device, dtype)
    n_local = a.prompts // info.world_size
    ids = torch.randint(1, vocab_size(a.shape), (n_local, a.prompt_len), generator=torch.Generator().manual_seed(info.rank)).to(info.device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=True, top_k=0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0, eos_token_id=0,
              synced_gpus=False)
    times = []
    for rep in range(a.repeats + 1):                 # the first is a warm-up
        sync(info)
        C.dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            if sharded:
                with C.unsharded_for_generation(model, fast=(a.mode == "fsdp")):
                    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync(info)
        C.dist.barrier()
        if rep:
            times.append(time.perf_counter() - t0)
        assert out.shape[1] == a.prompt_len + a.new_tokens
    med = sorted(times)[len(times) // 2]
    return {"tokens_per_second": a.prompts * a.new_tokens / med, "median_seconds": med, "repeats": a.repeats}


def synthetic_minibatch(b: int, a, K: int, device):
    """b random answers of exactly a.new_tokens tokens after a.prompt_len prompt tokens, with random pi_0 log-probs
    and K advantages -> (sequences, attention mask, response mask, ref log-probs [b, T], advantages [b, T, K])."""
    P, T = a.prompt_len, a.new_tokens
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, vocab_size(a.shape), (b, P + T), generator=g).to(device)
    mask = torch.ones(b, T, dtype=torch.long, device=device)
    attn = torch.ones(b, P + T, dtype=torch.long, device=device)
    return seq, attn, mask, torch.randn(b, T, generator=g).to(device), torch.randn(b, T, K, generator=g).to(device)


def step_memory(info, a):
    """Peak memory of one policy update (forward, K backward passes, alignment, AdamW step) per rank."""
    K = a.objectives
    policy = C.shard_model(build(a.shape), info)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    n_params = sum(C._local(p).numel() for p in policy.parameters())
    P = a.prompt_len
    seq, attn, mask, ref, adv = synthetic_minibatch(a.minibatch // info.world_size, a, K, info.device)

    def step():
        lp = C.response_logprobs(policy, seq, attn, P)
        apa = C.apa_loss(lp, ref, adv, mask, 0.95)
        if K == 1:
            apa[0].backward()
        else:
            upd, _, _ = C.amtl_align_sharded(C.objective_gradients(policy, apa), torch.ones(K, device=info.device))
            C.set_flat_grad(policy, upd)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def high_water_mark() -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    # the first step from a clean start: its peak over what was resident (CPU: freed memory stays with the allocator,
    # so a later step's own peak hides under the first one's); AdamW's state, allocated here, is the same either way
    Path("/proc/self/clear_refs").write_text("5")      # Linux: the peak (VmHWM) starts again from what is resident now
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    step()                                            # optimizer state allocated, as in training
    first_step_peak = high_water_mark() - before
    Path("/proc/self/clear_refs").write_text("5")
    resting = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if info.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(a.repeats):
        sync(info)
        t0 = time.perf_counter()
        step()
        sync(info)
        times.append(time.perf_counter() - t0)
    res = {"local_params": n_params, "median_step_seconds": sorted(times)[len(times) // 2]}
    if info.device.type == "cuda":
        res["peak_bytes_over_resting"] = torch.cuda.max_memory_allocated() - base
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["step_peak_bytes_over_resting"] = high_water_mark() - resting     # later steps, over the allocator's cache
    res["first_step_peak_bytes_over_resident"] = first_step_peak
    return res


def checkpoint_memory(info, a):
    """Each rank's host memory during one resume checkpoint of 02 (the policy, the K-output critic, both AdamW
    states: bookkeeping.save_rl_checkpoint as the stage calls it): its peak resident memory during the save (VmHWM, reset
    just before) against what was resident before: what a node must hold beyond training."""
    import inspect
    import tempfile

    def rss_now() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def high_water_mark() -> int:                     # VmHWM: the peak resident memory since the last reset
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    policy, critic = C.shard_model(build(a.shape), info), C.shard_model(build(a.shape, "critic", a.objectives), info)
    models = {"policy": policy, "critic": critic}
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-6) for n, m in models.items()}
    for m, o in zip(models.values(), optimizers.values()):       # AdamW's state allocated, as after a first step
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        o.step()
        o.zero_grad(set_to_none=True)
    folder = Path(tempfile.mkdtemp(prefix="molma_ckpt_")) if info.is_main else None
    box = [str(folder)]
    dist.broadcast_object_list(box, src=0)
    folder = Path(box[0]) / "checkpoint"
    params = sum(p.numel() for m in models.values() for p in m.parameters())
    state = {"iteration": 1, "config": {}, "inputs": {}}
    kwargs = {"tokenizer": None, "template": "phi2"} if "tokenizer" in inspect.signature(bk.save_rl_checkpoint).parameters else {}
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak starts again from what is resident now
    resident, peak_before = rss_now(), high_water_mark()
    t0 = time.perf_counter()
    bk.save_rl_checkpoint(folder, models, optimizers, trainer_state=state, **kwargs)
    seconds = time.perf_counter() - t0
    peak = high_water_mark()
    res = {"parameters_policy_and_critic": params, "fp32_bytes_one_model": 4 * sum(p.numel() for p in policy.parameters()),
           "resident_bytes_before_save": resident, "peak_bytes_before_save": peak_before, "peak_bytes_after_save": peak,
           "save_seconds": seconds, "checkpoint_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}
    every = [None] * info.world_size
    dist.all_gather_object(every, res)
    if info.is_main:
        import shutil

        shutil.rmtree(folder.parent, ignore_errors=True)
    return {"per_rank": every}


def gradients(info, a):
    """The exact aligner's K gradients of one minibatch on one process without FSDP, three ways, against one
    backward: loop (K backward passes through one forward, common.objective_gradients, as 02 does), batched (ONE
    backward of the K losses with the K unit vectors as a batch of output gradients:
    torch.autograd.grad(..., is_grads_batched=True), which vmaps the backward), one (a single objective's one
    backward, what the representation aligner costs). Median seconds of forward + gradients, the process's peak RSS,
    and (batched) the largest difference from the loop's gradients."""
    K = a.objectives
    policy = build(a.shape).to(info.device)
    params = [p for p in policy.parameters() if p.requires_grad]
    P = a.prompt_len
    seq, attn, mask, ref, adv = synthetic_minibatch(a.minibatch, a, K, info.device)

    def grads():
        apa = C.apa_loss(C.response_logprobs(policy, seq, attn, P), ref, adv, mask, 0.95)
        if a.mode == "loop":
            return C.objective_gradients(policy, apa)
        if a.mode == "batched":
            eye = torch.eye(K, device=info.device)
            return torch.cat([x.reshape(K, -1) for x in torch.autograd.grad(apa, params, eye, is_grads_batched=True)], 1)
        return torch.cat([x.reshape(-1) for x in torch.autograd.grad(apa.sum(), params)])[None]

    times = []
    for rep in range(a.repeats + 1):                 # the first is a warm-up
        sync(info)
        t0 = time.perf_counter()
        G = grads()
        sync(info)
        if rep:
            times.append(time.perf_counter() - t0)
    res = {"mode": a.mode, "parameters": sum(p.numel() for p in params), "median_seconds": sorted(times)[len(times) // 2],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if a.mode == "batched":
        a.mode = "loop"
        loop = grads()
        a.mode = "batched"
        res["max_abs_difference_from_loop"] = float((G - loop).abs().max())
        res["max_abs_gradient"] = float(loop.abs().max())
    if info.device.type == "cuda":
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return res


def minibatch_step(policy, critic, popt, copt, mb, omega, args, aligner="exact"):
    """One minibatch of the loops in 02_train_molma.py (K > 1: K gradients, aligned; or with --aligner
    representation, B from dL_k/dlogpi and one backward) and 03_train_baselines.py (K = 1: one backward), from the
    same common.py pieces, without their metrics. Its parts are labelled for --profile (record_function)."""
    label = torch.profiler.record_function
    with label("policy forward (log-probs, APA)"):
        logprobs = C.response_logprobs(policy, mb.sequences, mb.attention_mask, mb.prompt_len)
        apa = C.apa_loss(logprobs, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)
    backward = label("policy backward (and the aligner)")
    backward.__enter__()
    if len(apa) == 1:
        apa[0].backward()
    elif aligner == "representation":
        weights, gram, _ = C.amtl_align_representation(apa, logprobs, omega)
        (apa * weights).sum().backward()
        C.condition_number(gram)                  # 02 logs it every step
    else:
        update, gram, _ = C.amtl_align_sharded(C.objective_gradients(policy, apa), omega)
        C.set_flat_grad(policy, update)
        C.condition_number(gram)                  # 02 logs it every step
    backward.__exit__(None, None, None)
    with label("policy clip and AdamW step"):
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        popt.step()
        popt.zero_grad(set_to_none=True)
    t_critic = time.perf_counter()
    with label("critic forward and backward"):
        vloss = C.value_loss(C.response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len), mb.returns,
                             mb.mask)
        vloss.sum().backward()
    with label("critic clip and AdamW step"):
        torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
        copt.step()
        copt.zero_grad(set_to_none=True)
    return time.perf_counter() - t_critic           # the critic's share of the minibatch


def profile_summary(prof, phases: dict, top: int = 25) -> dict:
    """One profiled round: its phases' seconds (under the profiler), each labelled part of the update (minibatch_step's
    record_function labels, summed over minibatches) and the operators with the most time of their own."""
    events = prof.key_averages()
    parts = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith(("policy ", "critic "))}
    ops = sorted((e for e in events if not e.key.startswith(("policy ", "critic ", "ProfilerStep"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"phases_seconds": phases, "update_parts_seconds": parts,
            "top_ops_self_seconds": [{"op": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count}
                                     for e in ops]}


def iteration(info, a):
    """Seconds per RL iteration of MOLMA (K objectives, aligned) and of so_weighted (one reward), side by
    side: the same random-weight models, prompts and settings, iterations alternating between the two.
    Answers have exactly --new-tokens tokens, so both do the same generation work."""
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    K = a.objectives
    policy, ref = build(a.shape), build(a.shape).requires_grad_(False)
    # one critic per output count (MOLMA's two aligners share theirs) and one policy optimizer for every method:
    # each step costs what its own would, in less memory (room for another process beside this one)
    by_outputs = {k: build(a.shape, "critic", k) for k in {K if n.startswith("molma") else 1 for n in a.methods.split(",")}}
    critics = {n: by_outputs[K if n.startswith("molma") else 1] for n in a.methods.split(",")}
    # one reward model with K outputs, or (--separate-rms) K reward models of one output, as RMhelp and RMsafe
    rms = [build(a.shape, "reward", 1 if a.separate_rms else K).requires_grad_(False)
           for _ in range(K if a.separate_rms else 1)]
    heads = [(rms[k], 0) for k in range(K)] if a.separate_rms else [(rms[0], k) for k in range(K)]
    for m in (policy, ref, *rms, *by_outputs.values()):
        C.shard_model(m, info)
    args = bk.RLArgs(rollouts=a.prompts, minibatch=a.minibatch, max_new_tokens=a.new_tokens, max_prompt_len=a.prompt_len)
    adamw = dict(lr=1e-6, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    shared = torch.optim.AdamW(policy.parameters(), **adamw)
    popt = {n: shared for n in critics}
    by_critic = {id(c): torch.optim.AdamW(c.parameters(), **adamw) for c in by_outputs.values()}
    copt = {n: by_critic[id(c)] for n, c in critics.items()}
    local, local_mb = a.prompts // info.world_size, a.minibatch // info.world_size
    vocab = vocab_size(a.shape)

    class Tok:  # what generate_rollouts needs of a tokenizer, for random token prompts
        eos_token_id = 0

    times = {n: {"generation": [], "scoring": [], "update": [], "critic": [], "iteration": []} for n in critics}
    C.set_seed(1 + info.rank)
    if a.wait_stdin and info.is_main:
        print("READY " + json.dumps({"world_size": info.world_size, "torch": torch.__version__}), flush=True)
    profiles = {}
    for it in range(a.repeats + 1 + a.profile):     # a warm-up, the timed rounds, then (--profile) one profiled
        profiled = a.profile and it == a.repeats + 1
        if a.wait_stdin:                             # bench/trl_compare.py alternates this process with another
            go = [sys.stdin.readline() if info.is_main else None]
            dist.broadcast_object_list(go, src=0)
            if not go[0]:
                break
        for name in critics:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else None
            if prof:
                prof.__enter__()
            sync(info)
            t0 = time.perf_counter()
            ids = torch.randint(1, vocab, (local, a.prompt_len)).to(info.device)
            with torch.no_grad(), C.unsharded_for_generation(policy):
                out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                      max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0,
                                      eos_token_id=0, synced_gpus=False)
            mask = torch.ones(local, a.new_tokens, dtype=torch.long, device=info.device)
            r = C.Rollouts(["p"] * local, out, torch.ones_like(out), a.prompt_len, mask, torch.ones(local, dtype=torch.bool))
            sync(info)
            t1 = time.perf_counter()
            C.score_rollouts(r, policy, ref, critics[name], heads)
            scores = C.gather_rows(r.scores)
            shaped = C.logit_whiten(scores) if name.startswith("molma") else C.logit_whiten(scores).mean(1, keepdim=True)
            shaped = shaped[info.rank * local : (info.rank + 1) * local]
            if name == "so_weighted":
                r.values = r.values[..., :1]
            rewards = C.kl_penalized_rewards(shaped, r.logprobs, r.ref_logprobs, r.mask, args.kl_beta)
            r.advantages, r.returns = C.gae(rewards, r.values, r.mask, args.gamma, args.gae_lambda)
            sync(info)
            t2 = time.perf_counter()
            omega = torch.ones(r.advantages.shape[-1], device=info.device)
            critic = 0.0
            for j in range(0, local, local_mb):
                critic += minibatch_step(policy, critics[name], popt[name], copt[name], r.rows(j, j + local_mb), omega,
                                         args, "representation" if name == "molma_representation" else "exact")
            sync(info)
            t3 = time.perf_counter()
            this = {"generation": t1 - t0, "scoring": t2 - t1, "update": t3 - t2, "critic": critic, "iteration": t3 - t0}
            if prof:
                prof.__exit__(None, None, None)
                profiles[name] = profile_summary(prof, this)
                continue
            if it:                                   # the first round is a warm-up
                for k, v in this.items():
                    times[name][k].append(v)
            if a.wait_stdin and info.is_main:
                print("ROUND " + json.dumps({"method": name, **this}), flush=True)
        if a.wait_stdin and info.is_main:
            print("ROUND_END", flush=True)
    med = {n: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for n, t in times.items()}
    first = next(iter(med))
    res = {"median_seconds": med, "generated_tokens_per_second": a.prompts * a.new_tokens / med[first]["generation"]}
    for n in (n for n in med if n.startswith("molma") and "so_weighted" in med):
        res[f"{n}_over_so_weighted"] = med[n]["iteration"] / med["so_weighted"]["iteration"]
        res[f"{n}_over_so_weighted_update"] = med[n]["update"] / med["so_weighted"]["update"]
    # per iteration, paired: the ratio of each alternated round, then its median (what a shared machine's load moves
    # least: both methods of a round ran back to back)
    for n in (n for n in med if n.startswith("molma") and "so_weighted" in med):
        pairs = sorted(x / y for x, y in zip(times[n]["iteration"], times["so_weighted"]["iteration"]))
        res[f"{n}_over_so_weighted_paired_median"] = pairs[len(pairs) // 2]
    if profiles:
        res["profiles"] = profiles
    res["model_parameters"] = sum(p.numel() for p in policy.parameters())        # a DTensor counts its full size
    res["peak_rss_bytes_per_rank"] = bk.peak_rss_per_rank()
    if info.device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["generation", "step_memory", "iteration", "gradients", "checkpoint_memory"])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--mode", default="fsdp", help="generation: plain | fsdp | fsdp_hooks; gradients: loop | batched | one")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--objectives", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--methods", default="molma,molma_representation,so_weighted",
                   help="iteration: which to time (alternating)")
    p.add_argument("--model", default="", help="a causal-LM folder to measure instead of a random --shape")
    p.add_argument("--separate-rms", action="store_true", help="iteration: K reward models of one output each (as "
                                                                "RMhelp and RMsafe) instead of one with K outputs")
    p.add_argument("--wait-stdin", action="store_true", help="iteration: each round waits for a line on stdin and prints "
                                                              "its times (bench/trl_compare.py)")
    p.add_argument("--profile", action="store_true", help="iteration: after the timed rounds, one more round of each "
                                                           "method under torch.profiler: the seconds of each labelled "
                                                           "part of the update and the operators that took the most")
    p.add_argument("--vocab", type=int, default=0, help="the shape's vocabulary size instead of its own (e.g. 49152: "
                                                          "SmolLM2's, 262144: Gemma 3's)")
    a = p.parse_args()
    MODEL = a.model or None
    if a.vocab:
        SHAPES[a.shape] = {**SHAPES[a.shape], "vocab_size": a.vocab}
    info = C.setup_distributed()
    res = {"generation": generation, "step_memory": step_memory, "iteration": iteration, "gradients": gradients,
           "checkpoint_memory": checkpoint_memory}[a.what](info, a)
    res.update({"what": a.what, "shape": a.shape, "world_size": info.world_size, "device": str(info.device),
                **{k: v for k, v in vars(a).items() if k != "what"}})
    if info.is_main:
        print("RESULT " + json.dumps(res), flush=True)
    C.teardown()
