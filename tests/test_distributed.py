"""The FSDP paths under torchrun with 2 processes (gloo on CPU), and with 1."""
import pytest

from conftest import ROOT, aborted_at_exit, run

CHECKS = ["sharded_aligner", "fsdp_objective_gradients", "molma_step_update", "representation_step_update",
          "k1_is_plain_apa", "generation_no_deadlock", "whiten_advantages_across_ranks", "bf16_aligned_update"]
LAUNCHES = {}


def every_check(nproc):
    """All of dist_worker's checks in ONE torchrun per world size (a launch and its imports cost more than most
    checks); the workers stop at the first failure. -> (exit code, everything printed)."""
    if nproc not in LAUNCHES:
        out = run(ROOT / "tests" / "dist_worker.py", *CHECKS, nproc=nproc, check=False)
        LAUNCHES[nproc] = out.returncode, out.stdout + out.stderr
    return LAUNCHES[nproc]


@pytest.mark.both_cores
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("check", CHECKS)
def test_distributed_aligner(check, nproc):
    code, text = every_check(nproc)
    assert f"{check} OK (world size {nproc})" in text, f"exit code {code}:\n{text[-6000:]}"
    if all(f"{c} OK (world size {nproc})" in text for c in CHECKS):          # every check passed: a clean exit too
        assert code == 0, (f"{'teardown abort: ' if aborted_at_exit(text, code) else ''}every check passed, then the "
                           f"launch exited {code}:\n{text[-4000:]}")
