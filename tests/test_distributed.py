"""The FSDP paths under torchrun with 2 processes (gloo on CPU), and with 1."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def torchrun(nproc, *args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("check", ["sharded_aligner", "fsdp_objective_gradients", "apa_step_update",
                                   "k1_is_plain_apa", "generation_no_deadlock"])
def test_distributed_aligner(check, nproc):
    assert f"{check} OK (world size {nproc})" in torchrun(nproc, "tests/dist_worker.py", check)
