"""Worker for tests/test_distributed.py, run as `torchrun --nproc_per_node=N tests/dist_worker.py CHECK [CHECK ...]`.

Each check raises on failure; rank 0 prints "CHECK OK".
"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402
import bookkeeping as bk  # noqa: E402


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
    upd, gram, _ = C.amtl_align_sharded(g[:, mine], torch.ones(K, dtype=torch.float64))
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
    upd, gram, _ = C.amtl_align_sharded(local, torch.ones(K))
    C.set_flat_grad(sharded, upd)

    params = [p for p in plain.parameters() if p.requires_grad]
    lk = losses(plain)
    full = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(lk[k], params, retain_graph=True)])
                        for k in range(K)])
    torch.testing.assert_close(gram, full @ full.T, rtol=1e-4, atol=1e-6)
    expected = C.amtl_align(full, torch.ones(K))
    got = torch.cat([p.grad.full_tensor().reshape(-1) for p in sharded.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def synthetic_minibatch(seed, K, b=3, P=4, T=6):
    """A minibatch of rollouts with random tokens, advantages and old values (right-padded answers)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 50, (b, P + T), generator=g)
    lengths = torch.randint(1, T + 1, (b,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    attn = torch.cat([torch.ones(b, P, dtype=torch.long), mask], 1)
    return C.Rollouts(["p"] * b, seq, attn, P, mask, torch.ones(b, dtype=torch.bool),
                      logprobs=torch.randn(b, T, generator=g) * mask, ref_logprobs=torch.randn(b, T, generator=g) * mask - 3,
                      values=torch.randn(b, T, K, generator=g), scores=torch.rand(b, K, generator=g),
                      advantages=torch.randn(b, T, K, generator=g) * mask[..., None])


def molma_policy_step(policy, opt, mb, K, args, omega, aligner="exact"):
    """Algorithm 1, lines 4-14 on one minibatch, composed from common's pieces exactly as 02's loop does."""
    lp = C.response_logprobs(policy, mb.sequences, mb.attention_mask, mb.prompt_len)        # lines 4-5
    apa = C.apa_loss(lp, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)
    if K == 1 and omega is None:                 # 02's and 03's single-objective path: a plain backward
        apa[0].backward()
    elif aligner == "representation":            # 02 --aligner representation: B from dL_k/dlogpi, one backward
        w, _, _ = C.amtl_align_representation(apa, lp, torch.ones(K) if omega is None else omega)
        (apa * w).sum().backward()
    else:
        update, _, _ = C.amtl_align_sharded(C.objective_gradients(policy, apa), torch.ones(K) if omega is None else omega)
        C.set_flat_grad(policy, update)                                                     # lines 6-13
    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
    opt.step()                                                                              # line 14
    opt.zero_grad(set_to_none=True)


def sgd_update(info, K, force_aligner=False, aligner="exact"):
    """One policy step with SGD(lr=1) and no clipping: the parameter change is minus the update.
    Rank r trains on minibatch r. Returns (full update of the sharded policy, plain policy, minibatches)."""
    args = bk.RLArgs(grad_clip=1e9, apa_lambda=0.95)
    plain = tiny_phi()
    policy = C.shard_model(copy.deepcopy(plain), info)
    before = [p.full_tensor().clone() for p in policy.parameters()]
    popt = torch.optim.SGD(policy.parameters(), lr=1.0)
    mbs = [synthetic_minibatch(100 + r, K) for r in range(info.world_size)]
    # force_aligner: the aligner path even for K = 1, to show it equals the plain backward
    molma_policy_step(policy, popt, mbs[info.rank], K, args, torch.ones(K) if force_aligner else None, aligner)
    after = [p.full_tensor() for p in policy.parameters()]
    return torch.cat([(b - a).reshape(-1) for a, b in zip(after, before)]), plain, mbs, args


def hand_gradients(plain, mbs, K, args):
    """[K, D]: for each objective, the gradient of APA_k averaged over the ranks' minibatches."""
    params = list(plain.parameters())
    rows = []
    for k in range(K):
        total = None
        for mb in mbs:
            lp = C.response_logprobs(plain, mb.sequences, mb.attention_mask, mb.prompt_len)
            loss = C.apa_loss(lp, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)[k]
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
            total = g if total is None else total + g
        rows.append(total / len(mbs))
    return torch.stack(rows)


def check_molma_step_update(info):
    """The update of a training step (02's lines 4-14) == amtl_align of the hand-computed full gradients."""
    K = 2
    update, plain, mbs, args = sgd_update(info, K)
    expected = C.amtl_align(hand_gradients(plain, mbs, K, args), torch.ones(K))
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6)


def check_representation_step_update(info):
    """--aligner representation under FSDP2 (each rank its own minibatch): the step's update == G (B_z omega) with G
    the hand-computed gradients and B_z from the Gram matrix of every rank's dL_k/dlogpi, by hand; and for K = 1 the
    plain APA gradient."""
    for K in (2, 3):
        update, plain, mbs, args = sgd_update(info, K, force_aligner=True, aligner="representation")
        gram = 0
        for mb in mbs:                            # E of every rank's rows, by hand on the unsharded copy
            lp = C.response_logprobs(plain, mb.sequences, mb.attention_mask, mb.prompt_len)
            apa = C.apa_loss(lp, mb.ref_logprobs, mb.advantages, mb.mask, args.apa_lambda)
            E = torch.stack([torch.autograd.grad(apa[k], lp, retain_graph=True)[0].reshape(-1) for k in range(K)])
            gram = gram + E @ E.T
        G = hand_gradients(plain, mbs, K, args)
        expected = G.T @ (C.amtl_balance(gram) @ torch.ones(K))
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-6)
        exact = C.amtl_align(G, torch.ones(K))
        assert not torch.allclose(update, exact, rtol=1e-3, atol=1e-6)      # an approximation, not the exact update
    one, plain, mbs, args = sgd_update(info, 1, force_aligner=True, aligner="representation")
    torch.testing.assert_close(one, hand_gradients(plain, mbs, 1, args)[0], rtol=1e-4, atol=1e-6)


def check_k1_is_plain_apa(info):
    """K = 1: the step's update is the plain APA gradient, and the aligner path gives the same."""
    fast, plain, mbs, args = sgd_update(info, 1)
    aligned, _, _, _ = sgd_update(info, 1, force_aligner=True)
    expected = hand_gradients(plain, mbs, 1, args)[0]
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(aligned, expected, rtol=1e-4, atol=1e-6)


def check_generation_no_deadlock(info):
    """Ranks stop generating at very different lengths; weights are gathered once, then resharded,
    and the sampled tokens equal those of the unsharded model with the same RNG state."""
    from torch.distributed.tensor import DTensor

    plain = tiny_phi()
    policy = C.shard_model(copy.deepcopy(plain), info)
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(info.rank))
    mask = torch.ones_like(ids)
    new = 3 if info.rank == 0 else 40
    kw = dict(do_sample=True, top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=0, synced_gpus=False)
    C.set_seed(10 + info.rank)
    with torch.no_grad(), C.unsharded_for_generation(policy):
        out = policy.generate(input_ids=ids, attention_mask=mask, **kw)
    assert out.shape[1] == 5 + new
    assert all(isinstance(p, DTensor) for p in policy.parameters()), "weights must be resharded after generation"
    C.set_seed(10 + info.rank)
    with torch.no_grad():
        ref = plain.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)
    # the ordinary sharded forward and backward (FSDP hooks back on, collectives) work afterwards on every rank
    policy(input_ids=ids).logits.float().mean().backward()
    assert all(isinstance(p.grad, DTensor) for p in policy.parameters()), "gradients must be reduce-scattered shards"
    for fast in (True, False):   # with and without FSDP2's hooks during the rollout: the same tokens
        C.set_seed(10 + info.rank)
        with torch.no_grad(), C.unsharded_for_generation(policy, fast=fast):
            again = policy.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(again, ref)


def check_bf16_aligned_update(info):
    """--precision bf16 on CPU (FSDP2 mixed precision over gloo): K backward passes through bf16 activations,
    fp32 gradient shards, the aligned update written into the fp32 weights' .grad; it matches the fp32 reference
    within bf16 tolerance, and generation in bf16 works. Nothing turns non-finite."""
    K = 2
    args = bk.RLArgs(grad_clip=1e9, apa_lambda=0.95)
    plain = tiny_phi()
    policy = C.shard_model(copy.deepcopy(plain), info, torch.bfloat16)
    before = [p.full_tensor().clone() for p in policy.parameters()]
    assert all(p.dtype == torch.float32 for p in before)                    # the weights stay fp32
    popt = torch.optim.SGD(policy.parameters(), lr=1.0)
    mbs = [synthetic_minibatch(100 + r, K) for r in range(info.world_size)]
    molma_policy_step(policy, popt, mbs[info.rank], K, args, torch.ones(K))
    after = [p.full_tensor() for p in policy.parameters()]
    update = torch.cat([(b - a).reshape(-1) for a, b in zip(after, before)])
    expected = C.amtl_align(hand_gradients(plain, mbs, K, args), torch.ones(K))
    assert torch.isfinite(update).all() and all(torch.isfinite(p).all() for p in after)
    cos = torch.nn.functional.cosine_similarity(update, expected, dim=0).item()
    ratio = (update.norm() / expected.norm()).item()
    assert cos > 0.99 and abs(ratio - 1) < 0.05, (cos, ratio)             # bf16 keeps ~3 significant digits
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(info.rank))
    with torch.no_grad():
        assert policy(input_ids=ids).logits.dtype == torch.bfloat16          # the forward really ran in bf16
    with torch.no_grad(), C.unsharded_for_generation(policy):
        out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                              max_new_tokens=6, min_new_tokens=6, pad_token_id=0, eos_token_id=0, synced_gpus=False)
    assert out.shape == (2, 11) and ((out >= 0) & (out < 50)).all()
    if info.is_main:
        print(f"bf16 vs fp32 aligned update: cosine {cos:.5f}, norm ratio {ratio:.4f}")


def check_whiten_advantages_across_ranks(info):
    """Each rank whitens its rows; together they equal whitening the whole batch in one process."""
    g = torch.Generator().manual_seed(11)
    adv = torch.randn(6, 7, 2, generator=g, dtype=torch.float64)
    mask = (torch.arange(7)[None] < torch.randint(1, 8, (6,), generator=g)[:, None]).long()
    rows = torch.tensor_split(torch.arange(6), info.world_size)[info.rank]
    mine = C.whiten_advantages(adv[rows], mask[rows])
    # the whole batch, without any collective
    m = mask.double().unsqueeze(-1)
    mean = (adv * m).sum((0, 1)) / m.sum()
    var = ((adv - mean) ** 2 * m).sum((0, 1)) / m.sum()
    torch.testing.assert_close(mine, ((adv - mean) / (var + 1e-8).sqrt() * m)[rows])


if __name__ == "__main__":
    names = sys.argv[1:]                   # one or more checks, run in this order in one process group
    info = C.setup_distributed()
    checks = {"sharded_aligner": check_sharded_aligner, "fsdp_objective_gradients": check_fsdp_objective_gradients,
              "molma_step_update": check_molma_step_update, "k1_is_plain_apa": check_k1_is_plain_apa,
              "representation_step_update": check_representation_step_update,
              "generation_no_deadlock": check_generation_no_deadlock,
              "whiten_advantages_across_ranks": check_whiten_advantages_across_ranks,
              "bf16_aligned_update": check_bf16_aligned_update}
    for check in names:                    # a failure raises: torchrun stops every rank, the checks after it unrun
        checks[check](info)
        dist.barrier()
        if info.is_main:
            print(f"{check} OK (world size {info.world_size})", flush=True)
    C.teardown()
