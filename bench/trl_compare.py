"""The project against what users would pick instead: TRL's GRPOTrainer with two reward models and a KL to a reference
model (beta > 0), beside so_weighted, exact MOLMA and the representation aligner, on the same real checkpoint.

    ./run.sh real                                   # once: SmolLM2-135M-Instruct converted, RMhelp and RMsafe trained
    python3 -m venv bench/.venv-trl && bench/.venv-trl/bin/pip install torch==2.13.0 transformers==5.23.0 trl==1.16.0
    python bench/trl_compare.py                     # 1 process, then 2; writes bench/results_trl.json

Both sides: the same number of sequences per iteration (8: GRPO's 4 prompts x 2 answers, the project's 8 rollouts),
prompts of exactly 16 tokens and answers of exactly 16 (min_new_tokens), optimizer steps on minibatches of 4, fp32,
one thread per process. The two sides run as two processes (torchrun groups) at once, and the controller alternates
them iteration by iteration (one round: so_weighted, MOLMA, MOLMA with the representation aligner, then one GRPO
iteration), so a machine whose speed drifts moves both alike; the first round is a warm-up, the rest give medians.
Each side times generation, scoring (reward models, the reference's and the policy's log-probs; the project's critic
values too) and the update; the project's critic (its forward, backward and AdamW step: APA trains one, GRPO none)
is timed apart. The project never imports TRL: it runs in bench/.venv-trl.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default=str(ROOT / "runs/real/smollm2"))
p.add_argument("--reward-models", default=f"{ROOT / 'runs/real/rm_help/model'},{ROOT / 'runs/real/rm_safe/model'}")
p.add_argument("--trl-python", default=str(HERE / ".venv-trl/bin/python"))
p.add_argument("--nprocs", default="1,2")
p.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up")
p.add_argument("--out", default=str(HERE / "results_trl.json"))
a = p.parse_args()
for need in (a.model, *a.reward_models.split(","), a.trl_python):
    if not Path(need).exists():
        raise SystemExit(f"{need} is missing: see this file's docstring for the set-up (./run.sh real; TRL's venv)")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
METHODS = ["so_weighted", "molma", "molma_representation"]


def start(python, nproc, script, *args):
    return subprocess.Popen([python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             str(script), *map(str, args)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)


def read_until(proc, prefix):
    """The lines of proc's output up to and including the first that starts with prefix (ROUND lines parsed)."""
    rows = []
    for line in proc.stdout:
        if line.startswith("ROUND "):
            rows.append(json.loads(line[6:]))
        if line.startswith(prefix):
            return rows, line
    raise SystemExit(f"a side ended before '{prefix}' (exit {proc.wait()}); run it alone to see why")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure(nproc):
    ours = start(sys.executable, nproc, HERE / "worker.py", "iteration", "--model", a.model, "--prompts", 8,
                 "--minibatch", 4, "--prompt-len", 16, "--new-tokens", 16, "--objectives", 2, "--separate-rms",
                 "--wait-stdin", "--repeats", a.rounds, "--methods", ",".join(METHODS))
    trl = start(a.trl_python, nproc, HERE / "trl_grpo.py", "--model", a.model, "--reward-models", a.reward_models,
                "--prompts", 4, "--generations", 2, "--minibatch", 4, "--prompt-len", 16, "--new-tokens", 16,
                "--rounds", a.rounds + 1)
    versions = json.loads(read_until(trl, "READY ")[1][6:])
    read_until(ours, "READY ")
    rounds = []
    for r in range(a.rounds + 1):
        ours.stdin.write("go\n")
        ours.stdin.flush()
        rows, _ = read_until(ours, "ROUND_END")
        trl.stdin.write("go\n")
        trl.stdin.flush()
        grpo = read_until(trl, "ROUND ")[0][-1]
        rounds.append({"round": r, **{row.pop("method"): row for row in rows}, "grpo": grpo})
        print(f"[compare] {nproc} process(es), round {r}: " + ", ".join(
            f"{n} {rounds[-1][n]['iteration']:.1f} s" for n in [*METHODS, "grpo"]), flush=True)
    for proc in (ours, trl):
        proc.stdin.close()
        proc.wait(timeout=600)
    measured = rounds[1:]
    med = {n: {k: median([r[n][k] for r in measured]) for k in measured[0][n]} for n in [*METHODS, "grpo"]}
    paired = lambda f: median([f(r) for r in measured])     # each round's ratio, then the median over rounds
    ratios = {
        "shared_work_so_weighted_over_grpo": paired(lambda r: (r["so_weighted"]["iteration"] - r["so_weighted"]["critic"])
                                                    / r["grpo"]["iteration"]),
        "so_weighted_over_grpo": paired(lambda r: r["so_weighted"]["iteration"] / r["grpo"]["iteration"]),
        "molma_over_so_weighted": paired(lambda r: r["molma"]["iteration"] / r["so_weighted"]["iteration"]),
        "molma_representation_over_so_weighted": paired(lambda r: r["molma_representation"]["iteration"]
                                                        / r["so_weighted"]["iteration"]),
        **{f"so_weighted_{k}_over_grpo": paired(lambda r, k=k: r["so_weighted"][k] / r["grpo"][k])
           for k in ("generation", "scoring")},
        "so_weighted_policy_update_over_grpo_update": paired(
            lambda r: (r["so_weighted"]["update"] - r["so_weighted"]["critic"]) / r["grpo"]["update"]),
        "critic_share_of_so_weighted_iteration": paired(lambda r: r["so_weighted"]["critic"] / r["so_weighted"]["iteration"]),
    }
    return {"processes": nproc, "versions": versions, "median_seconds": med, "paired_median_ratios": ratios,
            "rounds": rounds}


t0 = time.time()
results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
           "model": a.model, "reward_models": a.reward_models.split(","),
           "settings": "8 sequences per iteration (GRPO 4 prompts x 2), prompts 16 tokens, answers exactly 16, "
                       "minibatch 4, fp32, 1 thread per process; TRL's defaults otherwise (gradient checkpointing on)",
           "runs": []}
for n in a.nprocs.split(","):                  # written after each number of processes: a later failure keeps these
    results["runs"].append(measure(int(n)))
    results["seconds"] = round(time.time() - t0)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
for run in results["runs"]:
    print(f"[compare] {run['processes']} process(es): " + ", ".join(f"{k} {v:.2f}" for k, v in run["paired_median_ratios"].items()))
print(f"[compare] written to {a.out} in {results['seconds']} s")
