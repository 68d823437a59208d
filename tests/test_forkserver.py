"""The suite's launcher (tests/forkserver.py) forks each one-process script, torchrun launcher and most torchrun
workers from an interpreter that has imported torch and transformers once. These tests hold it to what a user's fresh
`python SCRIPT` and `torchrun SCRIPT` do."""
import hashlib
import json
import struct
import sys

import pytest

import conftest
from conftest import ROOT, rl_args, run, run_together
from test_faults import metrics, sha, without_times

MOLMA = ROOT / "02_train_molma.py"


def files(folder):
    """sha(folder) but the records that hold times (and the manifests that hold their checksums); a safetensors file
    by its content: its header as a sorted dict, then its data (safetensors writes a header's metadata map, which
    torch.distributed.checkpoint fills with several keys, in an order that differs from process to process)."""
    out = {}
    for name, h in sha(folder).items():
        if name.startswith("tensorboard/") or name.rsplit("/", 1)[-1] in (
                "metrics.jsonl", "run_summary.json", "trainer_state.json", "manifest.json"):
            continue
        if name.endswith(".safetensors"):
            raw = (folder / name).read_bytes()
            n = struct.unpack("<Q", raw[:8])[0]
            h = hashlib.sha256(json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode() + raw[8 + n:]).hexdigest()
        out[name] = h
    return out


@pytest.mark.parametrize("nproc", [None, 2])
def test_a_forked_run_writes_what_a_fresh_interpreter_writes(world, reward_models, tmp_path, nproc):
    forked, fresh = tmp_path / "forked", tmp_path / "fresh"
    commands = [MOLMA, *rl_args(world, reward_models, forked, iterations=2, save_every=1)], \
               [MOLMA, *rl_args(world, reward_models, fresh, iterations=2, save_every=1)]
    if nproc is None:
        a, b = run_together(*commands, fresh=(1,))
    else:                        # a forked torchrun and its forked workers; a fresh torchrun and the workers it starts
        a, b = run(*commands[0], nproc=nproc), run(*commands[1], nproc=nproc, fresh=True)
    assert files(forked) == files(fresh)
    assert {"policy/model.safetensors", "checkpoint/rng.safetensors", "samples.jsonl"} <= set(files(fresh)) and any(
        n.startswith("checkpoint/shards/") for n in files(fresh))    # weights, optimizer and rng states, samples
    assert without_times(metrics(forked)) == without_times(metrics(fresh))
    assert [l for l in a.stdout.splitlines() if l.startswith("[data]")] == \
           [l for l in b.stdout.splitlines() if l.startswith("[data]")] != []


def test_a_forked_failure_exits_and_speaks_as_a_fresh_one():
    forked, fresh = run_together([MOLMA, "--iterations", "0"], [MOLMA, "--iterations", "0"], check=False, fresh=(1,))
    assert forked.returncode == fresh.returncode != 0
    assert forked.stderr == fresh.stderr and "--iterations must be positive, got 0" in fresh.stderr
    assert forked.stdout == fresh.stdout


def test_the_launcher_forks_where_it_can_and_not_where_the_environment_differs(tmp_path):
    if conftest.forkserver() is None:
        pytest.skip("MOLMA_TEST_FORKSERVER=0: every launch is a fresh interpreter")
    script = tmp_path / "where.py"      # a forked process starts with torch imported, a fresh interpreter without
    script.write_text("import os, sys\nprint('preloaded' if 'torch' in sys.modules else 'fresh', os.getppid())\n")
    cmd = [sys.executable, str(script)]
    for env, forked in [(conftest.SCRIPT_ENV, True), ({**conftest.SCRIPT_ENV, "MOLMA_SOMETHING_ELSE": "1"}, False)]:
        proc = conftest.spawn(cmd, ROOT, env)          # a variable the server was not started with: a fresh process
        assert isinstance(proc, conftest.Forked) is forked
        assert conftest.finish(proc, cmd).stdout.split()[0] == ("preloaded" if forked else "fresh")
    # a torchrun's workers, children of their agent either way: forked by it (torch's launcher API, start method
    # fork), or (fresh_workers) started as fresh interpreters, as by a user's torchrun
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    for fresh_workers, expected in [(False, "preloaded"), (True, "fresh")]:
        proc = conftest.spawn(torchrun, ROOT, conftest.SCRIPT_ENV, fresh_workers=fresh_workers)
        workers = [l.split() for l in conftest.finish(proc, torchrun).stdout.splitlines() if l.startswith(expected)]
        assert len(workers) == 2 and all(parent == str(proc.pid) for _, parent in workers)
