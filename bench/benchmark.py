"""What MOLMA costs over a single objective, and how fast FSDP rollouts are. Not a test: a measurement.

    python bench/benchmark.py                    # CPU, the tiny world's model shape, 2 processes (< 5 min)
    python bench/benchmark.py --shape phi2 --nproc 1 --new-tokens 256 --prompt-len 128   # one GPU, phi-2's shape

Each measurement is one `torchrun bench/worker.py ...` run; models have random weights (no download),
answers a fixed length, so every method does the same generation work. Medians over repeats.
  1. seconds per RL iteration of MOLMA and so_weighted, split into generation / scoring / update, and
     their ratio (same models, prompts, settings; iterations alternate between the two);
  2. rollout tokens per second: FSDP on --nproc processes (weights gathered once per rollout, FSDP2's
     hooks off) against plain single-process `generate` of the same model and prompts; also FSDP with
     its hooks left on;
  3. peak memory of one policy update with K = 2 objectives against K = 1, and the extra per parameter
     (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, one process, which is coarser:
     freed activation memory gets reused). What MOLMA allocates beyond a single-objective step is the
     [K, D_local] fp32 buffer of objective gradients (common.objective_gradients): 4 K bytes per parameter.
Writes bench/results_<shape>.json and prints the tables for the README.
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


t0 = time.time()
common = ["--shape", a.shape, "--prompts", a.prompts, "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens, "--repeats", a.repeats]
results = {"config": vars(a)}
if gpu:   # phi-2's shape: the two methods in separate processes (two critics and optimizers do not fit beside the rest)
    its = [worker(a.nproc, "iteration", *common, "--minibatch", a.minibatch, "--methods", m) for m in ("molma", "so_weighted")]
    med = {**its[0]["median_seconds"], **its[1]["median_seconds"]}
    results["iteration"] = {**its[0], "median_seconds": med, "molma_over_so_weighted": med["molma"]["iteration"] / med["so_weighted"]["iteration"]}
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
results["seconds"] = round(time.time() - t0, 1)
(HERE / f"results_{a.shape}.json").write_text(json.dumps(results, indent=2))

it = results["iteration"]["median_seconds"]
g = results["generation"]
plain = g["plain_1_process"]["tokens_per_second"]
print(f"\n## {a.shape} shape, {a.nproc} process(es), {results['iteration'].get('gpu', results['iteration']['device'])}\n")
print("| seconds per iteration (median) | generation | scoring | update | total |\n|---|---|---|---|---|")
for n in ("molma", "so_weighted"):
    print(f"| {n} | {it[n]['generation']:.3f} | {it[n]['scoring']:.3f} | {it[n]['update']:.3f} | {it[n]['iteration']:.3f} |")
print(f"\nMOLMA / so_weighted per iteration: {results['iteration']['molma_over_so_weighted']:.2f}x\n")
print("| rollout generation | tokens/s | vs plain |\n|---|---|---|")
for n, r in g.items():
    print(f"| {n} | {r['tokens_per_second']:.0f} | {r['tokens_per_second'] / plain:.2f}x |")
m = results["step_memory"]
print(f"\nPeak memory of one update ({m['measure']}, {m['shape']} shape, {m['K2']['local_params']:,} parameters per rank): "
      f"K=1 {m['K1'][key] / 2**20:.0f} MiB, K=2 {m['K2'][key] / 2**20:.0f} MiB, extra {m['extra_bytes'] / 2**20:.0f} MiB = "
      f"{m['extra_bytes_per_local_param']:.1f} bytes per parameter (one fp32 gradient buffer per objective: 4 bytes each)")
print(f"\n(benchmark took {results['seconds']} s; written to {HERE / f'results_{a.shape}.json'})")
