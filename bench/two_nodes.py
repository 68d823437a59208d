"""Two nodes on one machine: docs/scale.md's multi-node command, run as two torchrun agents, and a node lost mid-run.

    python bench/two_nodes.py                      # every part, ~6 min on a 2-core machine
    python bench/two_nodes.py --parts same         # only part 1; --parts lost, --parts unshared, --parts dry
    python bench/two_nodes.py --parts lost --lose 0  # lose the head node (the rendezvous endpoint) instead

Each "node" is its own torchrun agent, as on a cluster (one per machine), here both on 127.0.0.1:

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:PORT --rdzv-id=ID --max-restarts=1 SCRIPT ...      (once per node)

Parts (the tiny world and two reward models are built into --work first if missing, ~2 min):
  dry       02 --dry-run true on two nodes: the report names both nodes (node 0 and node 1).
  same      01 (RMhelp), 02 (MOLMA) and 03 (so_weighted), a few iterations each, on two nodes and as
            `--standalone --nproc_per_node=2`: the metrics (all but the time/ keys) must be equal, and a Python audit
            hook (sitecustomize.py, see AUDIT) shows which global rank wrote files under --out and read the models'
            weights (*.safetensors, also through safetensors' Rust entry points): rank 0 only; every rank probes
            that it can write --out at start (a file it removes at once).
  lost      02 with --max-restarts 1 on both nodes, a checkpoint every 2 iterations; after iteration 3 node 1's agent
            and its worker are killed (SIGKILL) and node 1 is started again with the same command. The job must end
            with one metrics line per iteration, equal to the standalone run's; it prints the iterations lost.
            --lose 0 kills node 0 instead, the head node whose agent hosts the c10d rendezvous store: node 1's agent
            then fails (RendezvousConnectionError), the job ends, and both nodes are started again with the same
            command, which resumes from the checkpoint (--resume auto).
  unshared  --out on each node's own disk (the same relative path, resolved in two working directories) with a
            checkpoint that only node 0 has: the run must refuse, naming the rank that cannot see it.
Writes --result (JSON) with what each part measured, and exits 1 if a part failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--parts", default="dry,same,lost,unshared", help="comma-separated: dry, same, lost, unshared")
p.add_argument("--work", default="runs/two_nodes", help="folder for the world, the reward models and the runs")
p.add_argument("--result", default="bench/results_two_nodes.json", help="where the measurements are written")
p.add_argument("--shared-store", default="false", choices=["true", "false"],
               help="true: leave out TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, to see torch's default fail in 'lost'")
p.add_argument("--lose", type=int, default=1, choices=[0, 1],
               help="which node 'lost' kills: 1, or 0, the node that hosts the rendezvous endpoint (the job ends)")
a = p.parse_args()
work = (ROOT / a.work).resolve()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
if a.shared_store == "true":
    del ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
PY = [sys.executable, "-m", "torch.distributed.run"]
AUDIT = '''
import os, sys
if os.environ.get("MOLMA_AUDIT") and "RANK" in os.environ:
    _roots = tuple(os.environ["MOLMA_AUDIT_ROOTS"].split(os.pathsep))
    _log = open(os.path.join(os.environ["MOLMA_AUDIT"], f"rank{os.environ['RANK']}.{os.getpid()}.log"), "a", buffering=1)
    def _hook(event, args):
        if event in ("open", "os.rename", "os.remove", "os.mkdir", "shutil.rmtree") and args and isinstance(args[0], str):
            path = os.path.abspath(args[0])
            if path.startswith(_roots):
                mode = args[1] if event == "open" else None
                flags = args[2] if event == "open" and len(args) > 2 else 0
                write = event != "open" or (mode is not None and any(c in mode for c in "wax+")) or (
                    mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                _log.write(f"{'write' if write else 'read'}\\t{event}\\t{path}\\n")
    sys.addaudithook(_hook)
    # safetensors reads and writes in Rust, which raises no audit event: log its entry points too
    import safetensors
    _open, _save = safetensors.safe_open, safetensors.serialize_file
    class _logged_open:          # a header check opens and closes; loading calls get_tensor or get_slice
        def __init__(self, path, *args, **kwargs):
            self._path, self._f = str(path), _open(path, *args, **kwargs)
        def __enter__(self):
            self._f.__enter__()
            return self
        def __exit__(self, *exc):
            return self._f.__exit__(*exc)
        def __getattr__(self, name):
            if name in ("get_tensor", "get_slice", "get_tensors"):
                _hook("open", (self._path, "r", 0))
            return getattr(self._f, name)
    def _logged_save(tensors, path, *args, **kwargs):
        _hook("open", (str(path), "w", 0))
        return _save(tensors, path, *args, **kwargs)
    safetensors.safe_open, safetensors.serialize_file = _logged_open, _logged_save
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list, log: Path, cwd=ROOT, env=None) -> subprocess.Popen:
    f = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def finish(procs, limit=900) -> list[str]:
    t0 = time.monotonic()
    for proc in procs:
        try:
            proc.wait(timeout=max(1, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise SystemExit(f"hung after {limit} s; logs: {[str(q.log) for q in procs]}")
    return [q.log.read_text() for q in procs]


def standalone(script_args: list, log: Path, env=None) -> tuple[int, str]:
    proc = start([*PY, "--standalone", "--nproc_per_node=2", *script_args], log, env=env)
    return proc.wait(), log.read_text()


def two_nodes(script_args: list, logs: Path, max_restarts=0, cwds=(ROOT, ROOT), env=None):
    """Start node 0's agent, then node 1's; -> (the command of each, the two Popen)."""
    port, rid = free_port(), f"bench{time.monotonic_ns()}"
    cmd = [*PY, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id={rid}", f"--max-restarts={max_restarts}", *script_args]
    procs = []
    for node in (0, 1):
        procs.append(start(cmd, logs.with_name(f"{logs.name}.node{node}.log"), cwd=cwds[node], env=env))
        time.sleep(1.0)        # node 0 binds the rendezvous endpoint first, as the head node of a cluster does
    return cmd, procs


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    return [{k: v for k, v in l.items() if not k.startswith("time/")} for l in lines]


def compare(x: list[dict], y: list[dict]) -> dict:
    """Equal line for line? If not, the largest absolute difference of a number."""
    if len(x) != len(y) or [sorted(l) for l in x] != [sorted(l) for l in y]:
        return {"equal": False, "why": f"{len(x)} against {len(y)} lines, or other keys"}
    diff = max((abs(u[k] - v[k]) for u, v in zip(x, y) for k in u
                if isinstance(u[k], (int, float)) and isinstance(v[k], (int, float))), default=0.0)
    return {"equal": x == y, "lines": len(x), "max_abs_diff": diff}


def children(pid: int) -> list[int]:
    """The process ids whose parent is pid (an agent's worker)."""
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


# --- the world and the reward models ------------------------------------------------------------------------------
work.mkdir(parents=True, exist_ok=True)
world = work / "world"
if not (world / "base" / "config.json").exists():
    print(f"[two-nodes] building the tiny world in {world}", flush=True)
    r = subprocess.run([sys.executable, "00_make_tiny_world.py", "--out", str(world)], cwd=ROOT, env=ENV)
    assert r.returncode == 0
rm_args = lambda out: ["01_train_reward.py", "--preset", "tiny", "--objective", "help", "--base-model",
                       str(world / "base"), "--data-root", str(world / "data"), "--out", str(out), "--max-pairs", "560",
                       "--eval-every", "1000", "--max-valid-pairs", "56"]
for o in ("help", "safe"):
    if not (work / f"rm_{o}" / "run_summary.json").exists():
        print(f"[two-nodes] training rm_{o}", flush=True)
        args = rm_args(work / f"rm_{o}")
        args[args.index("help")] = o
        rc, text = standalone(args, work / f"rm_{o}.log")
        assert rc == 0, text[-3000:]
models = [world / "base", work / "rm_help" / "model", work / "rm_safe" / "model"]
rl = lambda out, it=4: ["--preset", "tiny", "--policy", str(world / "base"), "--data-root", str(world / "data"),
                        "--reward-models", f"{models[1]},{models[2]}", "--out", str(out), "--iterations", str(it),
                        "--rollouts", "16", "--minibatch", "8", "--max-new-tokens", "24"]
runs = work / "runs"
shutil.rmtree(runs, ignore_errors=True)
runs.mkdir()
result, failed = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()}, []


def check(part: str, ok: bool, what: str):
    print(f"[two-nodes] {part}: {'ok' if ok else 'FAILED'}: {what}", flush=True)
    if not ok:
        failed.append(f"{part}: {what}")


parts = a.parts.split(",")
if "dry" in parts:
    t = time.monotonic()
    _, procs = two_nodes(["02_train_molma.py", *rl(runs / "dry"), "--dry-run", "true"], runs / "dry")
    text = finish(procs)
    rcs = [q.returncode for q in procs]
    report = [l for l in text[0].splitlines() if "peak host memory" in l]
    result["dry"] = {"exit_codes": rcs, "report": report, "seconds": round(time.monotonic() - t, 1)}
    check("dry", rcs == [0, 0] and any("rank 0 (node 0," in l for l in report) and any("rank 1 (node 1," in l for l in report),
          f"exit codes {rcs}; " + " | ".join(report))

if "same" in parts:
    audit = work / "audit"
    shutil.rmtree(audit, ignore_errors=True)
    (audit / "site").mkdir(parents=True)
    (audit / "site" / "sitecustomize.py").write_text(AUDIT)
    stages = {"01 RMhelp": lambda o: rm_args(o), "02 MOLMA": lambda o: ["02_train_molma.py", *rl(o)],
              "03 so_weighted": lambda o: ["03_train_baselines.py", "--method", "so_weighted", *rl(o)]}
    result["same"] = {}
    for name, args in stages.items():
        key = name.split()[0]
        t = time.monotonic()
        rc, text = standalone(args(runs / f"{key}_standalone"), runs / f"{key}_standalone.log")
        t_single = time.monotonic() - t
        check("same", rc == 0, f"{name} standalone exit {rc}" + ("" if rc == 0 else "\n" + text[-3000:]))
        logs = audit / key
        logs.mkdir()
        env = {**ENV, "MOLMA_AUDIT": str(logs), "PYTHONPATH": os.pathsep.join([str(audit / "site"), ENV.get("PYTHONPATH", "")]),
               "MOLMA_AUDIT_ROOTS": os.pathsep.join(map(str, [runs / f"{key}_two_nodes", *models]))}
        t = time.monotonic()
        _, procs = two_nodes(args(runs / f"{key}_two_nodes"), runs / f"{key}_two_nodes", env=env)
        texts = finish(procs)
        t_two = time.monotonic() - t
        rcs = [q.returncode for q in procs]
        check("same", rcs == [0, 0], f"{name} on two nodes, exit codes {rcs}" + ("" if rcs == [0, 0] else "\n" + texts[0][-3000:] + texts[1][-3000:]))
        c = compare(metrics(runs / f"{key}_standalone"), metrics(runs / f"{key}_two_nodes"))
        touched = {}
        for f in logs.glob("rank*.log"):
            rank = f.name.split(".")[0]
            for line in f.read_text().splitlines():
                kind, _, path = line.split("\t")
                probe = Path(path).name.startswith(".write_test.") or path == str(runs / f"{key}_two_nodes")
                if probe:        # every rank checks at start that it can write --out (check_output_folder)
                    touched.setdefault(f"{rank} write probes", set()).add(str(Path(path).relative_to(work)))
                elif kind == "write" or path.endswith((".safetensors", ".safetensors.index.json")):
                    touched.setdefault(f"{rank} {kind}s", set()).add(str(Path(path).relative_to(work)))
        touched = {k: sorted(v) for k, v in sorted(touched.items())}
        result["same"][name] = {**c, "seconds_standalone": round(t_single, 1), "seconds_two_nodes": round(t_two, 1),
                                "files_touched_by_rank": {k: (len(v), v[:6]) for k, v in touched.items()}}
        check("same", c.get("equal", False), f"{name}: metrics of two nodes against standalone: {c}")
        check("same", bool(touched) and all(k.startswith("rank0 ") for k in touched if not k.endswith("probes")),
              f"{name}: who wrote files under --out or read weights (*.safetensors): {sorted(touched)}")

if "lost" in parts:
    rc, text = standalone(["02_train_molma.py", *rl(runs / "lost_reference", 6), "--save-every", "2"], runs / "lost_reference.log")
    check("lost", rc == 0, f"the uninterrupted reference, exit {rc}")
    out = runs / "lost"
    t = time.monotonic()
    cmd, procs = two_nodes(["02_train_molma.py", *rl(out, 6), "--save-every", "2"], out, max_restarts=1)
    f = out / "metrics.jsonl"
    while not (f.exists() and len([l for l in f.read_text().splitlines() if l.endswith("}")]) >= 3):
        if any(q.poll() is not None for q in procs) or time.monotonic() - t > 600:
            finish(procs, limit=1)
            raise SystemExit(f"ended or hung before iteration 3: {[q.log for q in procs]}")
        time.sleep(0.05)
    written = len(f.read_text().splitlines())
    ckpt = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["iteration"]
    workers = children(procs[a.lose].pid)
    for pid in [procs[a.lose].pid, *workers]:         # the whole node: its agent and its worker
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    procs[a.lose].wait()
    print(f"[two-nodes] lost: killed node {a.lose} (agent {procs[a.lose].pid}, worker {workers}) after {written} iterations, "
          f"checkpoint at {ckpt}", flush=True)
    survivor_said = []
    if a.lose == 1:            # the survivor's agent restarts its worker and waits for a node 1 to join again
        time.sleep(2.0)
        print("[two-nodes] lost: starting node 1 again with the same command", flush=True)
        both = [procs[0], start(cmd, out.with_name("lost.node1.restarted.log"))]
    else:                      # node 0 hosted the rendezvous store: node 1's agent cannot go on, the job ends
        finish([procs[1]], limit=300)
        survivor_said = [l for l in procs[1].log.read_text().splitlines() if "Error" in l and not l.startswith(" ")][-2:]
        print(f"[two-nodes] lost: node 1 ended with exit {procs[1].returncode}: {survivor_said}; starting both nodes "
              f"again with the same command", flush=True)
        both = []
        for node in (0, 1):
            both.append(start(cmd, out.with_name(f"lost.node{node}.rerun.log")))
            time.sleep(1.0)
    texts = finish(both, limit=300)
    rcs = [q.returncode for q in both]
    lines = metrics(out)
    c = compare(metrics(runs / "lost_reference"), lines)
    result["lost"] = {"node_lost": a.lose, "survivor_said": survivor_said, "exit_codes": rcs, "iterations_written_before_the_kill": written, "checkpoint_iteration": ckpt,
                      "iterations_lost": written - ckpt, "seconds_kill_to_end": round(time.monotonic() - killed_at, 1),
                      "seconds_total": round(time.monotonic() - t, 1), "compare_with_standalone": c,
                      "what_node_0_printed": [l for l in texts[0].splitlines() if "[molma]" in l or "failed" in l.lower()][-12:]}
    check("lost", rcs == [0, 0] and "[molma] resumed from" in texts[0] and c.get("equal", False),
          f"node {a.lose} lost; exit codes {rcs}; {len(lines)} metrics lines; against standalone {c}; iterations lost {written - ckpt}")

if "unshared" in parts:
    node_dirs = [work / "node0_disk", work / "node1_disk"]
    for d in node_dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    # a checkpoint only node 0 has: the lost-node run's, or a fresh 2-iteration run's
    src = runs / "lost"
    if not (src / "checkpoint").exists():
        rc, _ = standalone(["02_train_molma.py", *rl(runs / "lost", 2), "--save-every", "2"], runs / "unshared_src.log")
    shutil.copytree(src, node_dirs[0] / "out")
    args = ["02_train_molma.py", *rl(Path("out"), 6), "--save-every", "2"]
    args[0] = str(ROOT / args[0])
    _, procs = two_nodes(args, runs / "unshared", cwds=node_dirs)
    texts = finish(procs)
    rcs = [q.returncode for q in procs]
    said = [l for l in "\n".join(texts).splitlines() if "finds the checkpoint" in l][:1]
    result["unshared"] = {"exit_codes": rcs, "message": said}
    check("unshared", all(r != 0 for r in rcs) and bool(said) and "rank 1" in said[0]
          and not (node_dirs[1] / "out" / "metrics.jsonl").exists(), f"exit codes {rcs}; {said}")

(ROOT / a.result).write_text(json.dumps(result, indent=1, default=str) + "\n")
print(f"[two-nodes] written to {a.result}; " + ("all parts ok" if not failed else f"{len(failed)} FAILED: {failed}"))
sys.exit(1 if failed else 0)
