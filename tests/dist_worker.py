"""Worker for tests/test_distributed.py, run as `torchrun --nproc_per_node=N tests/dist_worker.py CHECK`.

Each check raises on failure; rank 0 prints "CHECK OK".
"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402


def tiny_phi(seed=0):
    from transformers import PhiConfig, PhiForCausalLM

    C.set_seed(seed)
    cfg = PhiConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=0)
    return PhiForCausalLM(cfg).eval()


def check_sharded_aligner(info):
    """amtl_align_sharded on row-split shards == amtl_align of the full [K, D] gradients."""
    K, D = 3, 101
    g = torch.randn(K, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    chunks = torch.tensor_split(torch.arange(D), info.world_size)
    mine = chunks[info.rank]
    upd, gram = C.amtl_align_sharded(g[:, mine], torch.ones(K, dtype=torch.float64))
    full = C.amtl_align(g, torch.ones(K, dtype=torch.float64))
    torch.testing.assert_close(gram, g @ g.T)
    torch.testing.assert_close(upd, full[mine])


def check_fsdp_objective_gradients(info):
    """One forward + K backwards under FSDP2, aligned shard by shard == aligner of full gradients."""
    K = 2
    plain = tiny_phi()
    sharded = C.shard_model(copy.deepcopy(plain), info)
    ids = torch.randint(1, 50, (4, 9), generator=torch.Generator().manual_seed(3))
    weights = torch.tensor([0.3, -0.7, 1.1, 0.5])

    def losses(model):
        logp = model(input_ids=ids).logits.log_softmax(-1)[:, :-1]
        tok = torch.gather(logp, 2, ids[:, 1:, None]).squeeze(-1)     # [4, 8]
        return torch.stack([tok.mean(), (tok * weights[:, None]).mean() ** 2])[:K]

    local = C.objective_gradients(sharded, losses(sharded))
    upd, gram = C.amtl_align_sharded(local, torch.ones(K))
    C.set_flat_grad(sharded, upd)

    params = [p for p in plain.parameters() if p.requires_grad]
    lk = losses(plain)
    full = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(lk[k], params, retain_graph=True)])
                        for k in range(K)])
    torch.testing.assert_close(gram, full @ full.T, rtol=1e-4, atol=1e-6)
    expected = C.amtl_align(full, torch.ones(K))
    got = torch.cat([p.grad.full_tensor().reshape(-1) for p in sharded.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    check = sys.argv[1]
    info = C.setup_distributed()
    {"sharded_aligner": check_sharded_aligner, "fsdp_objective_gradients": check_fsdp_objective_gradients}[check](info)
    dist.barrier()
    if info.is_main:
        print(f"{check} OK (world size {info.world_size})")
    dist.destroy_process_group()
