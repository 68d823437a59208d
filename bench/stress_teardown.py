"""Do finished stages exit 0? Launch the short paths of 01 and 02 many times on one loaded core and count exit codes.

    python bench/stress_teardown.py                         # 40 + 40 + 20 launches, ~25 min on a 2-core machine
    python bench/stress_teardown.py --n01 5 --n02 5 --n02-train 2   # a quick look

Not a test: a measurement of a race. Each launch is `taskset -c CPU torchrun --standalone --nproc_per_node=2` of
  - 01_train_reward.py --dry-run true          (load, shard, report memory, leave)
  - 02_train_molma.py --dry-run true           (five models loaded and sharded, then leave)
  - 02_train_molma.py --iterations 2           (two real iterations, a checkpoint, the final save)
while a busy loop runs on the same core (--load 0 turns it off), so the two ranks and the loader fight for one
core, which is what exposed the teardown abort (docs/design.md, "A clean exit"). Every launch is classified:
  ok               exit 0
  teardown-abort   the stage printed its last line, then a rank died of signal 6 (SIGABRT) at exit
  other            anything else (its output is kept)
The world and two reward models are built into --work first if missing (~2 min). Writes --out (JSON) with every
launch's exit code, class and seconds, and prints the counts. Core dumps of aborted ranks land in --work/cores
when the machine's core_pattern is a plain file name (`ulimit -c unlimited` is set for the launches).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--n01", type=int, default=40, help="launches of 01's dry run")
p.add_argument("--n02", type=int, default=40, help="launches of 02's dry run")
p.add_argument("--n02-train", type=int, default=20, help="launches of a two-iteration 02 run")
p.add_argument("--cpu", default="0", help="taskset CPU list for every launch and for the load")
p.add_argument("--load", type=int, default=1, help="busy-loop processes on the same CPUs (0: none)")
p.add_argument("--work", default="runs/stress", help="folder for the world, the reward models and the launches")
p.add_argument("--out", default="bench/results_stress_teardown.json", help="where the counts are written")
a = p.parse_args()
work = (ROOT / a.work).resolve()
env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def sh(cmd: list, cwd=ROOT, limit_core=False) -> tuple[int, str, float]:
    def pre():
        if limit_core:
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    t = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=pre)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t


world = work / "world"
if not (world / "base" / "config.json").exists():
    print(f"[stress] building the tiny world in {world}")
    rc, text, _ = sh([sys.executable, "00_make_tiny_world.py", "--out", str(world)])
    assert rc == 0, text[-3000:]
for o in ("help", "safe"):
    if not (work / f"rm_{o}" / "run_summary.json").exists():
        print(f"[stress] training rm_{o}")
        rc, text, _ = sh([*TORCHRUN, "01_train_reward.py", "--preset", "tiny", "--objective", o, "--base-model",
                          str(world / "base"), "--data-root", str(world / "data"), "--out", str(work / f"rm_{o}"),
                          "--max-pairs", "560", "--eval-every", "1000", "--max-valid-pairs", "56"])
        assert rc == 0, text[-3000:]

rl = ["--preset", "tiny", "--policy", str(world / "base"), "--data-root", str(world / "data"),
      "--reward-models", f"{work / 'rm_help' / 'model'},{work / 'rm_safe' / 'model'}"]
KINDS = {
    "01 dry run": (a.n01, lambda o: ["01_train_reward.py", "--preset", "tiny", "--objective", "help", "--base-model",
                                     str(world / "base"), "--data-root", str(world / "data"), "--out", o, "--dry-run", "true"]),
    "02 dry run": (a.n02, lambda o: ["02_train_molma.py", *rl, "--out", o, "--dry-run", "true"]),
    "02 two iterations": (a.n02_train, lambda o: ["02_train_molma.py", *rl, "--out", o, "--iterations", "2",
                                                  "--rollouts", "16", "--minibatch", "8", "--max-new-tokens", "16",
                                                  "--save-every", "1"]),
}


def classify(rc: int, text: str) -> str:
    if rc == 0:
        return "ok"
    if "Signal 6 (SIGABRT)" in text or "exitcode  : -6" in text or "terminate called" in text:
        return "teardown-abort"
    return "other"


cores = work / "cores"
cores.mkdir(parents=True, exist_ok=True)
loaders = [subprocess.Popen(["taskset", "-c", a.cpu, sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
launches, t0 = [], time.monotonic()
try:
    # interleaved, so a change in the machine's load during the run touches every kind alike
    plan = [(k, i) for i in range(max(n for n, _ in KINDS.values())) for k, (n, _) in KINDS.items() if i < n]
    for k, i in plan:
        o = work / "launches" / f"{k.replace(' ', '_')}_{i}"
        subprocess.run(["rm", "-rf", str(o)])
        script, *rest = KINDS[k][1](str(o))
        rc, text, secs = sh(["taskset", "-c", a.cpu, *TORCHRUN, str(ROOT / script), *rest], cwd=cores, limit_core=True)
        c = classify(rc, text)
        launches.append({"kind": k, "i": i, "rc": rc, "class": c, "seconds": round(secs, 1)})
        if c != "ok":
            (work / "launches").mkdir(parents=True, exist_ok=True)
            (work / "launches" / f"{k.replace(' ', '_')}_{i}.log").write_text(text)
        print(f"[stress] {k:18s} #{i:<3d} rc={rc:<3d} {c:15s} {secs:5.1f} s", flush=True)
finally:
    for l in loaders:
        l.kill()

counts = {k: {c: sum(1 for l in launches if l["kind"] == k and l["class"] == c) for c in ("ok", "teardown-abort", "other")}
          for k in KINDS}
total = {c: sum(v[c] for v in counts.values()) for c in ("ok", "teardown-abort", "other")}
result = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
          "cpu": a.cpu, "load_processes": a.load, "seconds": round(time.monotonic() - t0), "counts": counts, "total": total,
          "launches": launches}
Path(ROOT / a.out).write_text(json.dumps(result, indent=1) + "\n")
print(f"[stress] {len(launches)} launches in {result['seconds']} s on CPU {a.cpu} with {a.load} busy loop(s): "
      f"{total['ok']} ok, {total['teardown-abort']} teardown aborts, {total['other']} other; per kind: {counts}")
print(f"[stress] written to {a.out}" + (f"; logs of the failures in {work / 'launches'}" if total['ok'] < len(launches) else ""))
