"""What MOLMA costs over a single objective, and how fast FSDP rollouts are. Not a test: a measurement.

    python bench/benchmark.py                    # CPU, the tiny world's model shape, 2 processes (< 5 min)
    python bench/benchmark.py --shape phi2 --nproc 1 --new-tokens 256 --prompt-len 128   # one GPU, phi-2's shape

Each measurement is one `torchrun bench/worker.py ...` run; models have random weights (no download),
answers a fixed length, so every method does the same generation work. Medians over repeats.
  1. seconds per RL iteration of MOLMA and so_weighted, split into generation / scoring / update, and
     their ratio (same models, prompts, settings; iterations alternate between the two);
     MOLMA with 02 --aligner representation (one backward) is timed beside them, alternated in the same run;
  2. rollout tokens per second: FSDP on --nproc processes (weights gathered once per rollout, FSDP2's
     hooks off) against plain single-process `generate` of the same model and prompts; also FSDP with
     its hooks left on;
  3. peak memory of one policy update with K = 2 objectives against K = 1, and the extra per parameter
     (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, one process, which is coarser:
     freed activation memory gets reused). What MOLMA allocates beyond a single-objective step is the
     [K, D_local] fp32 buffer of objective gradients (common.objective_gradients): 4 K bytes per parameter.
  6. the exact aligner's K = 2 gradients of one minibatch (one process, no FSDP): K backward passes through one
     forward (02's way) against ONE batched backward (torch.autograd.grad(..., is_grads_batched=True)) and a single
     objective's one backward, with each process's peak RSS.
Writes bench/results_<shape>.json and prints the tables for the README.

    python bench/benchmark.py --load-memory      # host memory while 02 loads five phi-2-wide models (~2 min)
    python bench/benchmark.py --model runs/real/smollm2 --prompts 16 --new-tokens 48 --repeats 3   # a real width

  4. --load-memory instead: the peak host RSS of each rank during `02_train_molma.py --dry-run` (load, shard,
     check, exit) with five phi-2-wide random models (hidden 2560, MLP 10240, 2 layers, the tiny world's
     vocabulary) saved in fp16 as phi-2 is on the hub, as a ratio to one model's fp32 size, and scaled to a
     node of 8 GPUs for phi-2 and Llama-2 7B. Writes bench/results_load_memory.json.
  5. --model FOLDER instead: measurements 1, 3 and 6 on a real checkpoint (./run.sh real's SmolLM2-135M-Instruct: its
     weights, new heads random), plus each rank's peak RSS against one model's fp32 size. Writes
     bench/results_real.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--shape", default="tiny", choices=["tiny", "small", "phi2"])
p.add_argument("--nproc", type=int, default=2, help="processes for the FSDP runs (CPU: one per core)")
p.add_argument("--prompts", type=int, default=64, help="rollouts per iteration (the paper's 64)")
p.add_argument("--minibatch", type=int, default=8, help="the paper's 8")
p.add_argument("--prompt-len", type=int, default=16)
p.add_argument("--new-tokens", type=int, default=24)
p.add_argument("--repeats", type=int, default=8)
p.add_argument("--memory-shape", default="small", help="model shape for the memory measurement on CPU")
p.add_argument("--load-memory", action="store_true", help="measure host memory while 02 loads (see above)")
p.add_argument("--model", default="", help="a causal-LM folder: measurements 1 and 3 at its width (see above)")
a = p.parse_args()
gpu = a.shape == "phi2"


def worker(nproc, *args, threads=1):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(HERE / "worker.py"), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[0][7:])


def load_memory():
    """Peak host RSS per rank during 02 --dry-run with phi-2-wide fp16 checkpoints, over one model's fp32 size."""
    import re
    import tempfile

    import torch
    from transformers import PhiConfig, PhiForCausalLM, PhiForSequenceClassification

    sys.path.insert(0, str(HERE.parent))
    import common as C
    import bookkeeping as bk

    import transformers

    transformers.utils.logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="molma_load_memory_"))
    subprocess.run([sys.executable, str(HERE.parent / "00_make_tiny_world.py"), "--out", tmp / "world", "--pretrain-steps", "1",
                    "--pretrain-texts", "64", "--pku-train", "200", "--hh-harmless-train", "600", "--alpaca", "600",
                    "--samples", "2"], check=True, capture_output=True)
    tok = bk.load_tokenizer(str(tmp / "world" / "base"))
    cfg = dict(vocab_size=len(tok), hidden_size=2560, intermediate_size=10240, num_hidden_layers=2, num_attention_heads=32,
               max_position_embeddings=2048, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    folders = {"base": PhiForCausalLM(PhiConfig(**cfg))}
    for o in ("help", "safe"):
        folders[f"rm_{o}"] = PhiForSequenceClassification(PhiConfig(**cfg, num_labels=1, id2label={0: o}, label2id={o: 0}))
    n_params = sum(p.numel() for p in folders["base"].parameters())
    for name, m in folders.items():
        m.to(torch.float16).save_pretrained(tmp / name)                 # as phi-2 and Llama-2 are on the hub
        tok.save_pretrained(tmp / name)
    del folders
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           str(HERE.parent / "02_train_molma.py"), "--policy", tmp / "base", "--data-root", tmp / "world" / "data",
           "--reward-models", f"{tmp / 'rm_help'},{tmp / 'rm_safe'}", "--out", tmp / "run", "--dry-run", "true",
           "--max-prompt-len", "32", "--max-new-tokens", "32"]
    out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"02 --dry-run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    peaks = [float(x) * 2**30 for x in re.findall(r"rank \d+: peak host memory ([\d.]+) GiB", out.stdout)]
    fp32 = 4 * n_params
    ratios = [p / fp32 for p in peaks]
    res = {"parameters_per_model": n_params, "fp32_bytes_per_model": fp32, "nproc": a.nproc, "peak_rss_bytes": peaks,
           "ratio_to_one_fp32_model": ratios}
    # On paper, one node of 8 GPUs: there the shards live in GPU memory, so the host holds rank 0's full fp32 copy
    # of the model being loaded and its reading buffers (rank 0's excess over rank 1 here, in fp32 model sizes) plus
    # each process's libraries (assumed 3 GiB with CUDA). Before this loader every rank held ~6 fp32 copies.
    transient = max(ratios[0] - ratios[-1], 1.0)
    for name, params in (("phi-2", 2.78e9), ("Llama-2 7B", 6.74e9)):
        res[f"node_of_8_{name}_GiB_on_paper"] = round((transient * 4 * params + 8 * 3 * 2**30) / 2**30)
        res[f"node_of_8_{name}_GiB_before"] = round(8 * 6.0 * 4 * params / 2**30)
    (HERE / "results_load_memory.json").write_text(json.dumps(res, indent=2))
    print(f"\n## Host memory while 02 loads ({a.nproc} processes, five {n_params / 1e6:.0f}M-parameter phi-2-wide models "
          f"saved in fp16; one model in fp32 = {fp32 / 2**20:.0f} MiB)\n")
    print("| rank | peak host RSS | / one fp32 model |\n|---|---|---|")
    for r, (p_, x) in enumerate(zip(peaks, ratios)):
        print(f"| {r} | {p_ / 2**20:.0f} MiB | {x:.2f}x |")
    print(f"\nOn paper, host memory of one node of 8 GPUs while loading: phi-2 ~{res['node_of_8_phi-2_GiB_on_paper']} GiB "
          f"(every rank loading in full: ~{res['node_of_8_phi-2_GiB_before']} GiB), Llama-2 7B "
          f"~{res['node_of_8_Llama-2 7B_GiB_on_paper']} GiB (~{res['node_of_8_Llama-2 7B_GiB_before']} GiB)")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


if a.load_memory:
    load_memory()
    raise SystemExit(0)


def gradient_ways(extra: list) -> dict:
    """Measurement 6: the exact aligner's K gradients as K backward passes (02's way) against ONE batched backward
    (is_grads_batched), and a single objective's one backward, each in its own process (peak RSS is per process)."""
    run = ["--objectives", 2, "--minibatch", a.minibatch, "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens,
           "--repeats", a.repeats, *extra]
    res = {m: worker(1, "gradients", *run, "--mode", m, threads=1) for m in ("loop", "batched", "one")}
    res["batched_over_loop"] = res["batched"]["median_seconds"] / res["loop"]["median_seconds"]
    res["loop_over_one"] = res["loop"]["median_seconds"] / res["one"]["median_seconds"]
    return res


def print_gradient_ways(g: dict) -> None:
    n = g["loop"]["parameters"]
    print(f"\n## The K = 2 gradients of one minibatch ({a.minibatch} answers of {a.new_tokens} tokens, one process, no "
          f"FSDP, {n / 1e6:.2f}M parameters)\n")
    print("| way | seconds (median) | peak RSS |\n|---|---|---|")
    for m, label in (("loop", "K backward passes (02)"), ("batched", "one batched backward (is_grads_batched)"),
                     ("one", "one backward of one loss")):
        print(f"| {label} | {g[m]['median_seconds']:.4f} | {g[m]['peak_rss_bytes'] / 2**20:.0f} MiB |")
    print(f"\nbatched / loop: {g['batched_over_loop']:.2f}x; loop / one backward: {g['loop_over_one']:.2f}x; batched "
          f"differs from the loop by at most {g['batched']['max_abs_difference_from_loop']:.1e} (largest gradient entry "
          f"{g['batched']['max_abs_gradient']:.2f})")


def print_iteration(it: dict, digits: int) -> None:
    med = it["median_seconds"]
    print("| seconds per iteration (median) | generation | scoring | update | total |\n|---|---|---|---|---|")
    for m in med:
        print(f"| {m} | " + " | ".join(f"{med[m][k]:.{digits}f}" for k in ("generation", "scoring", "update", "iteration"))
              + " |")
    for m in (m for m in med if m.startswith("molma")):
        paired = it[f"{m}_over_so_weighted_paired_median"]          # NaN: the methods ran in separate processes
        print(f"\n{m} / so_weighted: {it[f'{m}_over_so_weighted']:.2f}x per iteration (medians"
              + (f"; {paired:.2f}x median of the alternated rounds' ratios" if paired == paired else "")
              + f"), {it[f'{m}_over_so_weighted_update']:.2f}x per update phase")


def real_width():
    """Seconds per iteration of MOLMA and so_weighted alternated, their split, each rank's peak RSS, and the step memory
    of K = 2 against K = 1, on the --model checkpoint."""
    t0 = time.time()
    model = ["--model", a.model]
    run = ["--prompts", a.prompts, "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens, "--repeats", a.repeats]
    it = worker(a.nproc, "iteration", *run, "--minibatch", a.minibatch, *model)
    mem = {K: worker(1, "step_memory", "--objectives", K, "--minibatch", a.minibatch, "--prompt-len", a.prompt_len,
                     "--new-tokens", a.new_tokens, "--repeats", 2, *model) for K in (1, 2)}
    grads = gradient_ways(model)
    n = it["model_parameters"]
    res = {"config": vars(a), "model": a.model, "parameters": n, "fp32_bytes": 4 * n, "iteration": it, "gradients": grads,
           "peak_rss_over_fp32_model": [x / (4 * n) for x in it["peak_rss_bytes_per_rank"]],
           "step_memory": {"K1": mem[1], "K2": mem[2], "extra_bytes": mem[2]["peak_rss_bytes"] - mem[1]["peak_rss_bytes"]},
           "seconds": round(time.time() - t0, 1)}
    (HERE / "results_real.json").write_text(json.dumps(res, indent=2))
    print(f"\n## {a.model}: {n / 1e6:.1f}M parameters (fp32 {4 * n / 2**20:.0f} MiB), {a.nproc} processes, "
          f"{a.prompts} rollouts of {a.new_tokens} tokens, minibatch {a.minibatch}, {it['device']}\n")
    print_iteration(it, 2)
    print("peak RSS per rank: " + ", ".join(f"{b / 2**30:.2f} GiB ({r:.1f}x one fp32 model)" for b, r in
                                            zip(it["peak_rss_bytes_per_rank"], res["peak_rss_over_fp32_model"])))
    e = res["step_memory"]
    print(f"step memory (one process, peak RSS): K=1 {mem[1]['peak_rss_bytes'] / 2**20:.0f} MiB, K=2 "
          f"{mem[2]['peak_rss_bytes'] / 2**20:.0f} MiB, extra {e['extra_bytes'] / 2**20:.0f} MiB = "
          f"{e['extra_bytes'] / n:.1f} bytes per parameter; step {mem[1]['median_step_seconds']:.2f} s vs "
          f"{mem[2]['median_step_seconds']:.2f} s")
    print_gradient_ways(grads)
    print(f"(took {res['seconds']} s; written to {HERE / 'results_real.json'})")


if a.model:
    real_width()
    raise SystemExit(0)

t0 = time.time()
common = ["--shape", a.shape, "--prompts", a.prompts, "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens, "--repeats", a.repeats]
results = {"config": vars(a)}
if gpu:   # phi-2's shape: the two methods in separate processes (two critics and optimizers do not fit beside the rest)
    names = ("molma", "molma_representation", "so_weighted")
    its = [worker(a.nproc, "iteration", *common, "--minibatch", a.minibatch, "--methods", m) for m in names]
    med = {n: i["median_seconds"][n] for n, i in zip(names, its)}
    results["iteration"] = {**its[0], "median_seconds": med}
    for n in names[:2]:
        results["iteration"][f"{n}_over_so_weighted"] = med[n]["iteration"] / med["so_weighted"]["iteration"]
        results["iteration"][f"{n}_over_so_weighted_update"] = med[n]["update"] / med["so_weighted"]["update"]
        results["iteration"][f"{n}_over_so_weighted_paired_median"] = float("nan")    # separate processes: unpaired
else:
    results["iteration"] = worker(a.nproc, "iteration", *common, "--minibatch", a.minibatch)
gen = ["--shape", a.shape, "--prompts", a.prompts, "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens, "--repeats", a.repeats]
results["generation"] = {
    "plain_1_process": worker(1, "generation", *gen, "--mode", "plain", threads=a.nproc),
    f"fsdp_{a.nproc}_processes": worker(a.nproc, "generation", *gen, "--mode", "fsdp"),
    f"fsdp_{a.nproc}_processes_hooks_on": worker(a.nproc, "generation", *gen, "--mode", "fsdp_hooks"),
}
mshape = a.shape if gpu else a.memory_shape
mem = {K: worker(a.nproc if gpu else 1, "step_memory", "--shape", mshape, "--objectives", K, "--minibatch", a.minibatch,
                 "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens, "--repeats", 3, threads=1) for K in (1, 2)}
key = "peak_bytes_over_resting" if gpu else "peak_rss_bytes"
extra = mem[2][key] - mem[1][key]
results["step_memory"] = {"shape": mshape, "K1": mem[1], "K2": mem[2], "measure": key, "extra_bytes": extra,
                          "extra_bytes_per_local_param": extra / mem[2]["local_params"]}
results["gradients"] = gradient_ways(["--shape", a.shape])
results["seconds"] = round(time.time() - t0, 1)
(HERE / f"results_{a.shape}.json").write_text(json.dumps(results, indent=2))

it = results["iteration"]["median_seconds"]
g = results["generation"]
plain = g["plain_1_process"]["tokens_per_second"]
print(f"\n## {a.shape} shape, {a.nproc} process(es), {results['iteration'].get('gpu', results['iteration']['device'])}\n")
print_iteration(results["iteration"], 3)
print()
print("| rollout generation | tokens/s | vs plain |\n|---|---|---|")
for n, r in g.items():
    print(f"| {n} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / plain:.2f}x |")
m = results["step_memory"]
print(f"\nPeak memory of one update ({m['measure']}, {m['shape']} shape, {m['K2']['local_params']:,} parameters per rank): "
      f"K=1 {m['K1'][key] / 2**20:.0f} MiB, K=2 {m['K2'][key] / 2**20:.0f} MiB, extra {m['extra_bytes'] / 2**20:.0f} MiB = "
      f"{m['extra_bytes_per_local_param']:.1f} bytes per parameter (one fp32 gradient buffer per objective: 4 bytes each)")
print_gradient_ways(results["gradients"])
print(f"\n(benchmark took {results['seconds']} s; written to {HERE / f'results_{a.shape}.json'})")
