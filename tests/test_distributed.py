"""The FSDP paths under torchrun with 2 processes (gloo on CPU), and with 1."""
import pytest

from conftest import ROOT, run_script


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("check", ["sharded_aligner", "fsdp_objective_gradients", "molma_step_update",
                                   "representation_step_update", "k1_is_plain_apa", "generation_no_deadlock",
                                   "whiten_advantages_across_ranks", "bf16_aligned_update"])
def test_distributed_aligner(check, nproc):
    assert f"{check} OK (world size {nproc})" in run_script(ROOT / "tests" / "dist_worker.py", check, nproc=nproc)
