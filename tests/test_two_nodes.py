"""docs/scale.md's multi-node command on one machine: two torchrun agents (two "nodes", one worker each) joined by c10d
rendezvous, as on a cluster. The longer version, with 01 and 03 and a file audit per rank: bench/two_nodes.py."""
import os
import signal
import socket
import sys

from conftest import READ_WHEN_RUN, ROOT, SCRIPT_ENV, rl_args, spawn
from test_faults import MOLMA, children, finish, lines_written, metrics, wait_for, without_times

# What docs/scale.md tells cluster users to set: with torch's default (the agents share one TCP store across restarts), a
# node started again after a loss waits for rank 0's address under the new round and never starts (torch's agent).
ENV = {**SCRIPT_ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
assert set(ENV) - set(SCRIPT_ENV) <= set(READ_WHEN_RUN)      # so the suite's launcher may fork the agents


def node_command(script, args, max_restarts=0, rdzv_conf=()):
    """docs/scale.md's several-nodes command for one node of two, each with one worker, rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test{port}", f"--max-restarts={max_restarts}",
            *[f"--rdzv-conf={','.join(rdzv_conf)}"] * bool(rdzv_conf), str(script), *map(str, args)]


def start_node(cmd, log, cwd=ROOT, fresh_workers=False):
    """One node's agent (fresh_workers: it starts its worker itself, as on a cluster); -> Popen or Forked."""
    f = open(log, "w+")
    proc = spawn(cmd, cwd, ENV, stdout=f, fresh_workers=fresh_workers)
    proc.log = f
    return proc


def start_two_nodes(cmd, tmp_path, cwds=(ROOT, ROOT), fresh_workers=(False, False)):
    port = int(next(a for a in cmd if a.startswith("--rdzv-endpoint=")).rsplit(":", 1)[1])
    procs = [start_node(cmd, tmp_path / "node0.log", cwd=cwds[0], fresh_workers=fresh_workers[0])]
    wait_for(lambda: listening(port), procs[0], "node 0's rendezvous endpoint")   # bound first, as by a head node
    procs.append(start_node(cmd, tmp_path / "node1.log", cwd=cwds[1], fresh_workers=fresh_workers[1]))
    return procs


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_lost_node_is_started_again_and_the_job_continues_from_its_checkpoint(world, reward_models, uninterrupted,
                                                                               tmp_path):
    out = tmp_path / "run"
    # The next round waits for the rendezvous to drop the lost node: no heartbeat for keep_alive_interval x
    # keep_alive_max_attempt seconds (torch's default 5 x 3, shorter than a real node takes to come back; 2 x 3 here)
    cmd = node_command(MOLMA, rl_args(world, reward_models, out, iterations=6, save_every=2), max_restarts=1,
                       rdzv_conf=["keep_alive_interval=2", "keep_alive_max_attempt=3"])
    # fresh workers, as on a cluster: node 1 is lost, agent and worker; node 0's worker names the lost peer (its
    # uncaught error reaches Python's excepthook, which torch's multiprocessing wrapper of a forked worker would catch)
    node0, node1 = start_two_nodes(cmd, tmp_path, fresh_workers=(True, True))
    wait_for(lines_written(out, 3), node0, "third iteration")           # a checkpoint at iteration 2 exists
    for pid in [node1.pid, *children(node1.pid)]:                       # the whole node: its agent and its worker
        os.kill(pid, signal.SIGKILL)
    node1.wait()
    node1 = start_node(cmd, tmp_path / "node1.again.log")               # the same command, on the same "machine"
    text0, text1 = finish(node0), finish(node1)
    assert (node0.returncode, node1.returncode) == (0, 0), text0[-3000:] + text1[-3000:]
    assert "lost contact with another rank: its process or its node stopped" in text0   # the survivor says why
    # Rank 0 prints for the job, and the rendezvous gives rank 0 to the node first in (host, pid) order: after pids
    # wrap around, the node started again can be that one (CI saw it), so either node's log may hold these lines.
    assert "[molma] resumed from" in text0 + text1 and "[molma] done" in text0 + text1
    # one line per iteration, and the same numbers as one node of two processes with the same seed
    assert without_times(metrics(out)) == without_times(uninterrupted)


def test_a_node_that_cannot_see_the_checkpoint_says_so_instead_of_starting_over(world, reward_models, tmp_path):
    """--out on each node's own disk: the same relative path in two working directories, a checkpoint on node 0's."""
    disks = [tmp_path / "node0_disk", tmp_path / "node1_disk"]
    out = disks[0] / "out"
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"iteration": 2}')
    disks[1].mkdir()
    cmd = node_command(MOLMA, rl_args(world, reward_models, "out", iterations=6, save_every=2), max_restarts=0)
    procs = start_two_nodes(cmd, tmp_path, cwds=disks)
    text = finish(procs[0]) + finish(procs[1])
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert ("[molma] rank 0 (host " in text and "finds the checkpoint out/checkpoint at iteration 2, but rank 1 (host "
            in text and "finds none there: --out must be on a filesystem every node shares" in text), text[-3000:]
    assert not (disks[1] / "out" / "metrics.jsonl").exists()


def test_the_dry_run_reports_both_nodes(world, reward_models, tmp_path):
    cmd = node_command(MOLMA, rl_args(world, reward_models, tmp_path / "dry"), max_restarts=0) + ["--dry-run", "true"]
    procs = start_two_nodes(cmd, tmp_path)
    text = finish(procs[0]) + finish(procs[1])          # rank 0 (which prints) is on the node first in (host, pid) order
    assert [p.returncode for p in procs] == [0, 0], text[-3000:]
    assert "[molma] dry run: " in text and "on 2 ranks" in text
    assert "rank 0 (node 0, host " in text and "rank 1 (node 1, host " in text and "local rank 0): peak host" in text
