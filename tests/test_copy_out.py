"""Every component of common.py's band A runs when copied out alone (with the pieces of its own block), in a
namespace that holds only torch, torch.distributed, math and standard-library modules, and gives the numbers of
the function in common.py."""
import pytest
import torch

import common as C
from conftest import ROOT, run
from copy_out import BLOCKS, band_a_names, copied

g = torch.Generator().manual_seed(0)
B_, T, K = 4, 6, 2
MASK = (torch.arange(T)[None] < torch.tensor([6, 3, 1, 5])[:, None]).long()


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def same(a, b):
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def gradients(fns):
    """objective_gradients then set_flat_grad of an aligned-like update, on a small model -> (G, the .grads)."""
    model = tiny_model()
    out = model(torch.linspace(-1, 1, 10).view(2, 5))
    G = fns["objective_gradients"](model, torch.stack([out[:, 0].sum(), (out ** 2).mean()]))
    fns["set_flat_grad"](model, G.sum(0))
    return G, tuple(p.grad.clone() for p in model.parameters())


def representation_weights(fns):
    """amtl_align_representation on K = 3 APA-like losses of a shared [2, 5] representation."""
    z = torch.linspace(-1, 1, 10, dtype=torch.float64).view(2, 5).requires_grad_(True)
    target = torch.stack([torch.linspace(0, 1, 10), torch.linspace(1, -1, 10) ** 2, torch.ones(10)]).double().view(3, 2, 5)
    return fns["amtl_align_representation"](((z - target) ** 2).mean((1, 2)), z, torch.ones(3, dtype=torch.float64))


# block -> function of the copied namespace that returns what must equal the same call into common.py
CASES = {
    "ranking_loss (Eq. 3.2)": lambda f, x=rand(8), y=rand(8): f["ranking_loss"](x, y),
    "sign_loss (safe-rlhf's cost model)": lambda f, s=rand(8), u=rand(8), y=torch.rand(8, generator=g) > 0.5,
    z=torch.rand(8, generator=g) > 0.5: f["sign_loss"](s, u, y, z),
    "logit_whiten (Eq. 3.4)": lambda f, p=torch.rand(8, K, generator=g): f["logit_whiten"](p),
    "shape_finished (Eq. 3.4 over finished answers)": lambda f, p=torch.rand(8, K, generator=g),
    e=torch.tensor([1, 0, 1, 1, 0, 1, 1, 1]).bool(): f["shape_finished"](p, e, C.logit_whiten, -1.0),
    "kl_penalized_rewards (Eq. 3.3)": lambda f, s=rand(B_, K), a=rand(B_, T), b=rand(B_, T):
    f["kl_penalized_rewards"](s, a, b, MASK, 0.05),
    "gae": lambda f, r=rand(B_, T, K), v=rand(B_, T, K): f["gae"](r, v, MASK, 1.0, 0.95),
    "whiten_advantages": lambda f, a=rand(B_, T, K): f["whiten_advantages"](a, MASK),
    "APA and value losses (Eq. 3.5-3.6)": lambda f, lp=rand(B_, T), ip=rand(B_, T), adv=rand(B_, T, K),
    v=rand(B_, T, K), ret=rand(B_, T, K): (f["apa_loss"](lp, ip, adv, MASK, 0.95), f["value_loss"](v, ret, MASK)),
    "AMTL aligner (Algorithm 1, lines 8-13)": lambda f, G=rand(3, 20), w=torch.ones(3, dtype=torch.float64):
    (f["amtl_balance"](G @ G.T), f["amtl_align"](G, w), f["amtl_align_sharded"](G, w),
     f["condition_number"](G @ G.T), representation_weights(f)),
    "per-objective gradients (lines 4-7, 14)": gradients,
}


def test_every_band_a_component_is_in_a_copied_block():
    listed = [n for names in BLOCKS.values() for n in names]
    assert sorted(listed) == sorted(band_a_names()), "band A and the copy-out blocks differ: add the new component"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b in CASES])
def test_a_copied_block_runs_alone_and_equals_common(block):
    mine = CASES[block](copied(block))
    theirs = CASES[block](vars(C))
    assert same(mine, theirs), block


@pytest.mark.both_cores
def test_the_copied_fsdp_block_loads_shards_and_exits_through_its_teardown():
    """Under torchrun, 2 processes: setup_distributed, load_sharded (its shard_model, decoder_layers) give the
    logits of common.py's; the copied teardown ends each process with its code (7)."""
    out = run(ROOT / "tests" / "copy_out.py", "fsdp", nproc=2, check=False)
    assert "fsdp block OK (world size 2)" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode != 0 and "exitcode  : 7" in out.stderr, out.stderr[-3000:]
