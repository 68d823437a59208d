"""The paper's math in common.py against slow, obvious loops and the Aligned-MTL authors' fixture."""
import math

import pytest
import torch

import common as C


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons with the Python-float loops; restored so other test files are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def right_padded_mask(lengths, T):
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


# ---------------------------------------------------------------- Eq. 3.2
def test_ranking_loss_matches_loop():
    c, r = torch.randn(7), torch.randn(7)
    expected = sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c.tolist(), r.tolist())) / 7
    assert C.ranking_loss(c, r).item() == pytest.approx(expected, rel=1e-9)
    assert torch.isfinite(C.ranking_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_cost_model_loss_is_safe_rlhfs_per_pair_formula():
    """safe-rlhf's cost-model loss, written as its trainer does in cost units (cost = -score; sign s = -1 safe,
    +1 unsafe): per pair -logsig(c_unsafer - c_safer) - logsig(s c_safer) - logsig(s c_unsafer), mean over pairs.
    Eq. 3.2 + sign_loss must give the same number on a fixed batch; averaging the sign terms over the 2N answers
    instead (the old rule) gives about half their weight."""
    safer = torch.tensor([1.2, -0.3, 0.4, 2.0, -1.1], dtype=torch.float64)       # linear scores, > 0 means safe
    unsafer = torch.tensor([-0.8, -0.9, 0.7, 1.5, -2.0], dtype=torch.float64)
    safer_ok = torch.tensor([True, True, True, True, False])
    unsafer_ok = torch.tensor([False, False, True, True, False])
    logsig = lambda x: -math.log1p(math.exp(-x))
    per_pair = []
    for i in range(5):
        c_lo, c_hi = -safer[i].item(), -unsafer[i].item()                           # the safer answer's cost is lower
        s_lo, s_hi = (-1 if safer_ok[i] else 1), (-1 if unsafer_ok[i] else 1)
        per_pair.append(-logsig(c_hi - c_lo) - logsig(s_lo * c_lo) - logsig(s_hi * c_hi))
    expected = sum(per_pair) / 5
    got = C.ranking_loss(safer, unsafer) + C.sign_loss(safer, unsafer, safer_ok, unsafer_ok)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    y = torch.cat([safer_ok, unsafer_ok]).double() * 2 - 1
    old = C.ranking_loss(safer, unsafer) - torch.nn.functional.logsigmoid(y * torch.cat([safer, unsafer])).mean()
    assert abs(old.item() - expected) > 0.2


# ---------------------------------------------------------------- Eq. 3.4
def test_logit_whiten_per_objective():
    p = torch.rand(9, 3) * 0.98 + 0.01
    out = C.logit_whiten(p)
    for k in range(3):
        x = [math.log(v / (1 - v)) for v in p[:, k].tolist()]
        mean = sum(x) / len(x)
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / len(x))
        assert out[:, k].tolist() == pytest.approx([(v - mean) / std for v in x], rel=1e-6, abs=1e-6)
    assert C.logit_whiten(p[:, 0]).shape == (9,)
    assert torch.allclose(C.logit_whiten(p[:, 1]), out[:, 1])


def test_logit_whiten_saturated_probabilities_are_finite():
    p = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.5, 0.0], [1.0, 0.3]])
    out = C.logit_whiten(p)
    assert torch.isfinite(out).all()
    assert out[1, 0] > out[2, 0] and out[0, 1] > out[2, 1]        # order is kept
    assert torch.isfinite(C.logit_whiten(torch.tensor([0.7]))).all()  # batch of one: 0, not NaN


# ---------------------------------------------------------------- Eq. 3.3
def test_kl_penalized_rewards_matches_loop():
    B, T, K, beta = 4, 6, 2, 0.1
    scores, lp, ref = torch.randn(B, K), torch.randn(B, T), torch.randn(B, T)
    lengths = [6, 3, 1, 4]
    mask = right_padded_mask(lengths, T)
    out = C.kl_penalized_rewards(scores, lp, ref, mask, beta)
    assert out.shape == (B, T, K)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                want = 0.0
                if t < lengths[b]:
                    want = -beta * (lp[b, t] - ref[b, t]).item()
                    if t == lengths[b] - 1:
                        want += scores[b, k].item()
                assert out[b, t, k].item() == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------- GAE
def slow_gae(r, v, n, gamma, lam):
    """Textbook GAE on one episode of n steps, V after the last step = 0."""
    adv = [0.0] * n
    for t in range(n):
        total = 0.0
        for l in range(n - t):
            s = t + l
            v_next = v[s + 1] if s + 1 < n else 0.0
            total += (gamma * lam) ** l * (r[s] + gamma * v_next - v[s])
        adv[t] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_slow_loop_and_ignores_padding_junk(gamma, lam):
    B, T, K = 3, 7, 2
    lengths = [7, 4, 1]
    mask = right_padded_mask(lengths, T)
    rewards, values = torch.randn(B, T, K), torch.randn(B, T, K)
    junk_r, junk_v = rewards.clone(), values.clone()
    junk_r[mask == 0] = float("nan")
    junk_v[mask == 0] = float("inf")
    adv, ret = C.gae(junk_r, junk_v, mask, gamma, lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    for b, n in enumerate(lengths):
        for k in range(K):
            want = slow_gae(rewards[b, :n, k].tolist(), values[b, :n, k].tolist(), n, gamma, lam)
            assert adv[b, :n, k].tolist() == pytest.approx(want, abs=1e-9)
            assert ret[b, :n, k].tolist() == pytest.approx([a + v for a, v in zip(want, values[b, :n, k].tolist())], abs=1e-9)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


# ---------------------------------------------------------------- Eq. 3.5, 3.6
def test_apa_loss_matches_loop_and_stops_gradient_at_pi0():
    B, T, K, lam = 3, 5, 2, 0.95
    lengths = [5, 2, 3]
    mask = right_padded_mask(lengths, T)
    lp = torch.randn(B, T, requires_grad=True)
    init = torch.randn(B, T, requires_grad=True)
    adv = torch.randn(B, T, K)
    out = C.apa_loss(lp, init, adv, mask, lam)
    n_tok = sum(lengths)
    for k in range(K):
        want = sum((lp[b, t] - init[b, t] - adv[b, t, k] / lam).item() ** 2
                   for b in range(B) for t in range(lengths[b])) / n_tok
        assert out[k].item() == pytest.approx(want, rel=1e-9)
    out.sum().backward()
    assert init.grad is None and lp.grad is not None
    assert (lp.grad[mask == 0] == 0).all()


def test_value_loss_matches_loop():
    B, T, K = 2, 4, 3
    lengths = [4, 2]
    mask = right_padded_mask(lengths, T)
    v, old, adv = torch.randn(B, T, K, requires_grad=True), torch.randn(B, T, K), torch.randn(B, T, K)
    out = C.value_loss(v, adv + old, mask)
    for k in range(K):
        want = sum((v[b, t, k] - adv[b, t, k] - old[b, t, k]).item() ** 2
                   for b in range(B) for t in range(lengths[b])) / sum(lengths)
        assert out[k].item() == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- Algorithm 1 (AMTL)
def test_amtl_fixture_from_authors_solver():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])   # two task gradients as rows
    B = C.amtl_balance(J @ J.T)
    assert torch.allclose(B, torch.tensor([[0.78636, 0.33178], [0.33178, 0.48474]]), atol=1e-5)
    assert torch.allclose(C.amtl_align(J, torch.ones(2)), torch.tensor([0.42656, 1.93467, 1.93467]), atol=1e-5)


@pytest.mark.parametrize("K,D,seed", [(2, 5, 0), (3, 10, 1), (4, 50, 2)])
def test_aligned_gradients_orthogonal_with_equal_norms(K, D, seed):
    g = torch.randn(K, D, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1.0, 10.0, 0.1, 3.0][:K])[:, None]
    M = g @ g.T
    B = C.amtl_balance(M)
    aligned = (g.T @ B).T                                  # rows: aligned task gradients
    lam_min = torch.linalg.eigvalsh(M).min()
    assert torch.allclose(aligned @ aligned.T, lam_min * torch.eye(K), atol=1e-8 * M.abs().max())
    assert C.condition_number(aligned @ aligned.T) == pytest.approx(1.0, abs=1e-6)
    assert C.condition_number(M) > 1.0


def test_amtl_k1_is_identity():
    g = torch.randn(1, 8)
    assert torch.allclose(C.amtl_align(g, torch.ones(1)), g[0])


def test_amtl_rank_deficient_and_zero_gradients_are_finite():
    g = torch.randn(1, 6)
    parallel = torch.cat([g, 3 * g])                       # rank 1
    out = C.amtl_align(parallel, torch.ones(2))
    assert torch.isfinite(out).all() and out.norm() > 0
    zero = torch.zeros(3, 6)
    assert torch.equal(C.amtl_balance(zero @ zero.T), torch.eye(3))
    assert torch.equal(C.amtl_align(zero, torch.ones(3)), torch.zeros(6))
    assert C.condition_number(parallel @ parallel.T) == math.inf


def test_amtl_sharded_without_process_group_equals_full():
    g = torch.randn(3, 20)
    upd, gram, _ = C.amtl_align_sharded(g, torch.ones(3))
    assert torch.allclose(upd, C.amtl_align(g, torch.ones(3)))
    assert torch.allclose(gram, g @ g.T)


# ---------------------------------------------------------------- Eq. 4.2 and Fast RL Eq. 4
# ---------------------------------------------------------------- the representation aligner (beyond the paper)
def _apa_at(z, adv, init, mask, lam=0.95):
    """K APA losses of token log-probs z [B, T] (the representation every objective's loss reads)."""
    return C.apa_loss(z, init, adv, mask, lam)


def test_representation_aligner_against_a_slow_loop():
    """E from dL_k/dz written out token by token (Eq. 3.5's derivative: 2 m_t (z_t - z0_t - A_k,t / lam) / N),
    its Gram matrix entry by entry, B from it, the weights B omega: the same as amtl_align_representation's."""
    g = torch.Generator().manual_seed(3)
    B_, T, K, lam = 3, 5, 3, 0.95
    mask = (torch.arange(T)[None] < torch.tensor([5, 2, 4])[:, None]).long()
    z = torch.randn(B_, T, generator=g, dtype=torch.float64, requires_grad=True)
    init, adv = torch.randn(B_, T, generator=g, dtype=torch.float64), torch.randn(B_, T, K, generator=g, dtype=torch.float64)
    omega = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    w, gram, B = C.amtl_align_representation(_apa_at(z, adv, init, mask, lam), z, omega)
    n = int(mask.sum())
    E = [[2 * mask[b, t].item() * (z[b, t].item() - init[b, t].item() - adv[b, t, k].item() / lam) / n
          for b in range(B_) for t in range(T)] for k in range(K)]
    slow = torch.tensor([[sum(a * c for a, c in zip(E[i], E[j])) for j in range(K)] for i in range(K)], dtype=torch.float64)
    torch.testing.assert_close(gram, slow, rtol=1e-12, atol=0)
    torch.testing.assert_close(B, C.amtl_balance(slow), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, C.amtl_balance(slow) @ omega, rtol=1e-10, atol=1e-12)
    assert not w.requires_grad


def _linear_policy(J):
    """z = J phi: a 'network' whose token log-probs have the Jacobian J [N, D] (N tokens, D parameters)."""
    phi = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(9), dtype=torch.float64, requires_grad=True)
    return phi, (J @ phi).view(2, J.shape[0] // 2)


@pytest.mark.parametrize("K", [2, 3])
def test_representation_aligner_equals_exact_when_the_jacobian_rows_are_orthogonal(K):
    """J J^T = c I (orthogonal rows of equal norm): M = G^T G = c M_z, and B is blind to scale, so ONE backward of
    sum_k (B omega)_k L_k is Algorithm 1's G B omega. With a generic J the two differ (the test can fail)."""
    g = torch.Generator().manual_seed(K)
    N, D = 8, 20
    mask = torch.ones(2, N // 2, dtype=torch.long)
    init, adv = torch.randn(2, N // 2, generator=g, dtype=torch.float64), torch.randn(2, N // 2, K, generator=g, dtype=torch.float64)
    omega = torch.ones(K, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(D, N, generator=g, dtype=torch.float64))       # [D, N], orthonormal columns
    for J, agree in ((3.0 * Q.T, True), (torch.randn(N, D, generator=g, dtype=torch.float64), False)):
        phi, z = _linear_policy(J)
        losses = _apa_at(z, adv, init, mask)
        G = torch.stack([torch.autograd.grad(losses[k], phi, retain_graph=True)[0] for k in range(K)])   # [K, D]
        exact = C.amtl_align(G, omega)
        w, _, _ = C.amtl_align_representation(losses, z, omega)
        (one_backward,) = torch.autograd.grad((losses * w).sum(), phi)
        torch.testing.assert_close(one_backward, G.T @ w, rtol=1e-10, atol=1e-14)     # the one backward is G (B omega)
        close = torch.allclose(one_backward, exact, rtol=1e-8, atol=1e-12)
        assert close == agree, (J.shape, (one_backward - exact).norm() / exact.norm())


def test_representation_aligner_k1_is_the_plain_gradient():
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    losses = _apa_at(z, torch.randn(2, 4, 1, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64),
                     torch.ones(2, 4, dtype=torch.long))
    w, _, B = C.amtl_align_representation(losses, z, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(B, torch.ones(1, 1, dtype=torch.float64))
    torch.testing.assert_close(w, torch.ones(1, dtype=torch.float64))


def test_representation_aligner_balances_e_and_stays_finite_when_rank_deficient():
    """E B has equal singular values (cond 1 at z, what B promises there); two identical objectives (rank 1)
    and all-zero gradients give finite weights."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask, init = torch.ones(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.float64)
    adv = torch.randn(3, 4, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
    _, gram, B = C.amtl_align_representation(_apa_at(z, adv, init, mask), z, torch.ones(3, dtype=torch.float64))
    assert C.condition_number(gram) > 1.5 and C.condition_number(B.T @ gram @ B) == pytest.approx(1.0, abs=1e-6)
    same = adv[..., :1].expand(3, 4, 2)
    w, _, _ = C.amtl_align_representation(_apa_at(z, same, init, mask), z, torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(w).all() and w.abs().sum() > 0
    zero = z.detach().clone().requires_grad_(True)
    w, _, B = C.amtl_align_representation(_apa_at(zero, torch.zeros(3, 4, 2, dtype=torch.float64), zero.detach(), mask),
                                          zero, torch.ones(2, dtype=torch.float64))
    assert torch.equal(B, torch.eye(2, dtype=torch.float64)) and torch.isfinite(w).all()


def test_last_token_index_from_mask_left_and_right_padding():
    m = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    assert C.last_token_index(m).tolist() == [4, 5, 1]
    assert C.position_ids_from_mask(m)[0].tolist() == [0, 0, 0, 1, 2, 2]


def test_whiten_advantages_against_a_plain_loop():
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(3, 5, 2, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = C.whiten_advantages(adv, mask)
    for k in range(2):
        vals = [adv[b, t, k].item() for b in range(3) for t in range(5) if mask[b, t]]
        mean = sum(vals) / len(vals)
        sd = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        for b in range(3):
            for t in range(5):
                want = (adv[b, t, k].item() - mean) / (sd**2 + 1e-8) ** 0.5 if mask[b, t] else 0.0
                assert out[b, t, k].item() == pytest.approx(want, abs=1e-9)


def test_shaping_whitens_over_the_finished_answers_only():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.01, 0.99], [0.3, 0.4]], dtype=torch.float64)
    ended = torch.tensor([True, True, False, True])
    out = C.shape_finished(probs, ended, C.logit_whiten, -1.0)
    torch.testing.assert_close(out[ended], C.logit_whiten(probs[ended]))      # the cut answer moves no statistic
    assert out[2].tolist() == pytest.approx([-1.0, -1.0], abs=1e-6)      # one deviation of a whitened reward down
    one = C.shape_finished(probs, torch.tensor([True, False, False, False]), C.logit_whiten, -1.0)
    assert one[1:].tolist() == [[-1.0, -1.0]] * 3                            # no spread to measure: the whitened unit
    assert (C.shape_finished(probs, torch.zeros(4, dtype=torch.bool), C.logit_whiten, -1.0) == -1.0).all()


def test_amtl_balances_but_does_not_promise_every_objective_improves():
    """README: AMTL equalises the singular values of G B; it is not a guarantee that no objective gets worse."""
    g = torch.tensor([[1.0, 0.0], [-3.0, 0.5]], dtype=torch.float64)      # rows: the objectives' gradients
    update = C.amtl_align(g, torch.ones(2, dtype=torch.float64))
    assert (g[0] @ update).item() == pytest.approx(-0.0699, abs=1e-3)          # objective 1 gets worse
    B = C.amtl_balance(g @ g.T)
    assert C.condition_number(B.T @ (g @ g.T) @ B) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- masks from lengths (pad == eos)
def test_response_mask_keeps_first_eos_and_drops_the_rest():
    eos = 0
    resp = torch.tensor([[5, 6, eos, eos, eos], [5, eos, 7, eos, 8], [5, 6, 7, 8, 9], [eos, eos, eos, eos, eos]])
    assert C.response_mask(resp, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]
