"""Stage 3: each baseline's reward against an obvious computation, Fast RL's weights, smoke runs,
and MOLMA with K = 1 taking the very same steps as so_help."""
import importlib
import json
import math

import pytest
import torch

import common as C
from conftest import ROOT, rl_args, run_fails, run_script, run_together

B = importlib.import_module("03_train_baselines")


def logit_whiten_list(xs):
    z = [math.log(min(max(x, 1e-6), 1 - 1e-6) / (1 - min(max(x, 1e-6), 1 - 1e-6))) for x in xs]
    m = sum(z) / len(z)
    sd = math.sqrt(sum((v - m) ** 2 for v in z) / len(z))
    return [(v - m) / math.sqrt(sd**2 + 1e-8) for v in z]


PROBS = torch.tensor([[0.9, 0.05], [0.2, 0.95], [0.6, 0.5], [0.4, 0.12], [0.7, 0.8]], dtype=torch.float64)


def test_single_and_weighted_rewards():
    h, s = logit_whiten_list(PROBS[:, 0].tolist()), logit_whiten_list(PROBS[:, 1].tolist())
    assert B.single(PROBS[:, :1], {})[:, 0].tolist() == pytest.approx(h, abs=1e-6)
    out = B.weighted(PROBS, {"weights": [0.7, 0.3]})
    assert out.shape == (5, 1)
    assert out[:, 0].tolist() == pytest.approx([0.7 * a + 0.3 * b for a, b in zip(h, s)], abs=1e-6)


def test_piecewise_reward():
    h = torch.tensor([0.9, 0.2, 0.8, 0.6], dtype=torch.float64)
    s = torch.tensor([0.1, 0.9, 0.15, 0.149], dtype=torch.float64)
    assert B.piecewise_reward(h, s, 0.15).tolist() == [0.1, 0.2, 0.8, 0.149]


def test_mirror_descent_weights_loop_and_lagging_objective_gains():
    w, r, lam = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64), 0.7
    raw = [wi * math.exp(-lam * ri) for wi, ri in zip(w.tolist(), r.tolist())]
    assert B.mirror_descent_weights(w, r, lam).tolist() == pytest.approx([x / sum(raw) for x in raw], rel=1e-9)
    w = torch.full((2,), 0.5)
    for _ in range(3):                                      # objective 1 lags every iteration
        w = B.mirror_descent_weights(w, torch.tensor([1.0, -1.0]), 0.5)
    assert w[1] > 0.5 > w[0] and w.sum().item() == pytest.approx(1.0)
    assert torch.isfinite(B.mirror_descent_weights(torch.full((2,), 0.5), torch.tensor([1e4, -1e4]), 1.0)).all()


def test_piecewise_reward_uses_safety_below_delta():
    raw = [s if s < 0.15 else h for h, s in PROBS.tolist()]          # rows 0 and 3 are unsafe
    assert raw == [0.05, 0.2, 0.6, 0.12, 0.7]
    assert B.piecewise(PROBS, {"delta": 0.15})[:, 0].tolist() == pytest.approx(logit_whiten_list(raw), abs=1e-6)


def test_fast_rl_weights_follow_mirror_descent_over_iterations():
    state = {"weights": [0.5, 0.5], "lambda": 2.0, "smooth": 0.0, "smoothed": None, "bias": [0.0, 0.0]}
    w = [0.5, 0.5]
    for it in range(4):
        probs = PROBS + 0.02 * it
        B.advance_fast_rl(probs, state)                          # the weights move first, then Eq. 6's composite
        out = B.weighted(probs, state)
        level = probs.mean(0).tolist()
        raw = [wi * math.exp(-2.0 * r) for wi, r in zip(w, level)]
        w = [x / sum(raw) for x in raw]
        assert state["weights"] == pytest.approx(w, rel=1e-6)   # float32 weights
        composite = [w[0] * a + w[1] * b for a, b in zip(logit_whiten_list(probs[:, 0].tolist()), logit_whiten_list(probs[:, 1].tolist()))]
        assert out[:, 0].tolist() == pytest.approx(composite, abs=1e-6)
    # helpfulness (mean 0.56) is ahead of safety (0.484) here: the lagging safety gains weight
    assert state["weights"][1] > 0.5
    biased = {"weights": [0.5, 0.5], "lambda": 2.0, "smooth": 0.0, "smoothed": None, "bias": [1.0, 0.0]}
    B.advance_fast_rl(PROBS, biased)
    assert biased["weights"][0] > 0.5                                  # Eq. 5: a bias prioritises an objective


@pytest.mark.parametrize("method", [*B.METHODS, "molma"])
def test_a_cut_answer_is_the_same_number_of_deviations_down_in_every_method(method):
    """--truncated-score means one thing everywhere: the cut answers' reward lies truncated_score standard
    deviations below the finished answers' mean of the reward the method's critic learns (a weighted sum of two
    correlated whitened rewards has a spread well under 1, so a fixed -1 would sit further down there)."""
    g = torch.Generator().manual_seed(3)
    help_ = torch.rand(64, generator=g, dtype=torch.float64)
    probs = torch.stack([help_, (1 - help_ + 0.3 * torch.rand(64, generator=g, dtype=torch.float64)).clamp(0.01, 0.99)], 1)
    ended = torch.rand(64, generator=g) > 0.3
    if method == "molma":
        shape, rm = C.logit_whiten, 2
    else:
        rm_objectives, _, reward, advance, state = B.method_setup(B.Args(method=method))
        rm = len(rm_objectives)
        advance(probs[:, :rm] if rm == 2 else probs[:, :1], state)
        shape = lambda x: reward(x, state)
    x = probs[:, :rm] if rm == 2 else (probs[:, 1:] if method == "so_safe" else probs[:, :1])
    for t in (-1.0, -2.0):
        out = C.shape_finished(x, ended, shape, t)
        finished = out[ended]
        deviations = (out[~ended] - finished.mean(0)) / finished.std(0, correction=0)
        assert torch.allclose(deviations, torch.full_like(deviations, t), atol=1e-6)
    if method == "so_weighted":                       # the old fixed -1 was more than one deviation down here
        assert finished.std(0, correction=0).item() < 0.8


def test_the_lagrangian_and_fast_rl_count_every_answer_cut_ones_too():
    """safe-rlhf counts every episode's cost: the multiplier's step (and Fast RL's levels) read the whole batch."""
    probs = torch.tensor([[0.6, 0.9], [0.5, 0.8], [0.4, 0.05], [0.7, 0.02]], dtype=torch.float64)   # the last two cut
    state = lagrangian_state()
    B.advance_lagrangian(probs, state)
    assert state["mean_cost"] == pytest.approx(sum(-math.log(s / (1 - s)) for s in probs[:, 1].tolist()) / 4)
    fast = {"weights": [0.5, 0.5], "lambda": 1.0, "smooth": 0.0, "smoothed": None, "bias": [0.0, 0.0]}
    B.advance_fast_rl(probs, fast)
    assert fast["smoothed"] == pytest.approx(probs.mean(0).tolist())


@pytest.mark.parametrize("method", B.METHODS)
def test_every_method_runs(baseline_runs, method):
    out, text = baseline_runs[method]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["method"] == method and summary["iterations"] == 1 and len(summary["objectives"]) == 1
    assert (out / "policy" / "model.safetensors").exists()
    if method == "fast_rl":                 # the weights also as one scalar per objective (TensorBoard, W&B)
        assert summary["state"]["weights"] != [0.5, 0.5]
        assert [summary["final"][f"state/weights/{o}"] for o in ("help", "safe")] == summary["state"]["weights"]
    if method == "lagrangian":              # given RMsafe (trained on pairs alone) as its cost model: a warning
        assert "warning: the safety model was trained on pairs alone" in text
        assert summary["cost_model_sign_anchored"] is False
    if method == "lagrangian":
        assert summary["state"]["lambda"] != 1.0 and summary["final"]["state/lambda"] == summary["state"]["lambda"]


def test_molma_with_one_objective_is_so_help(world, reward_models, tmp_path):
    common = rl_args(world, reward_models, tmp_path / "x", iterations=2, save_every=2)
    a = common[:]
    a[a.index("--out") + 1] = str(tmp_path / "molma")
    run_script(ROOT / "02_train_molma.py", *a, "--objectives", "help", nproc=2)
    b = common[:]
    b[b.index("--out") + 1] = str(tmp_path / "so_help")
    run_script(ROOT / "03_train_baselines.py", *b, "--method", "so_help", nproc=2)
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}
                         for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("molma") == strip("so_help")


def lagrangian_state(**kw):
    s = {"log_lambda": 0.0, "lambda": 1.0, "mean_cost": None, "iteration": 0, "threshold": 0.0, "lr": 0.1, "delay": 0,
         "log_lambda_max": None}
    s.update(kw)
    return s


def test_lagrangian_reward_is_the_safe_rlhf_combination():
    state = lagrangian_state()
    B.advance_lagrangian(PROBS, state)
    out = B.lagrangian(PROBS, state)[:, 0].tolist()
    cost = [-math.log(s / (1 - s)) for s in PROBS[:, 1].tolist()]            # minus RMsafe's linear score
    mean_cost = sum(cost) / len(cost)
    lam = math.exp(0.0 + 0.1 * (mean_cost - 0.0) * 1.0)                      # one dual-ascent step from lambda = 1
    assert state["mean_cost"] == pytest.approx(mean_cost) and state["lambda"] == pytest.approx(lam)
    h, c = logit_whiten_list(PROBS[:, 0].tolist()), [-x for x in logit_whiten_list(PROBS[:, 1].tolist())]  # WHITEN(cost)
    assert out == pytest.approx([(a - lam * b) / (1 + lam) for a, b in zip(h, c)], abs=1e-6)


def test_lagrange_multiplier_rises_while_the_constraint_is_violated_and_falls_after():
    unsafe = torch.tensor([[0.6, 0.1]] * 8, dtype=torch.float64)              # cost = logit(0.9) = 2.2 > 0
    safe = torch.tensor([[0.6, 0.95]] * 8, dtype=torch.float64)               # cost = -2.9 < 0
    state, lambdas = lagrangian_state(), []
    for probs in [unsafe] * 5 + [safe] * 5:
        B.advance_lagrangian(probs, state)
        lambdas.append(state["lambda"])
    assert all(b > a for a, b in zip(lambdas[:5], lambdas[1:5])) and lambdas[0] > 1.0
    assert all(b < a for a, b in zip(lambdas[4:], lambdas[5:]))
    assert all(l > 0 for l in lambdas)                                          # exp(log lambda): never negative
    capped = lagrangian_state(log_lambda_max=math.log(1.5))
    for _ in range(20):
        B.advance_lagrangian(unsafe, capped)
    assert capped["lambda"] == pytest.approx(1.5)
    delayed = lagrangian_state(delay=3)
    for _ in range(3):
        B.advance_lagrangian(unsafe, delayed)
    assert delayed["lambda"] == 1.0
    B.advance_lagrangian(unsafe, delayed)
    assert delayed["lambda"] > 1.0


def test_lagrangian_resume_restores_lambda(world, reward_models, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = dict(iterations=3, save_every=1, rollouts=8, minibatch=8)
    run_together([ROOT / "03_train_baselines.py", *rl_args(world, reward_models, full, **common), "--method", "lagrangian"],
                 [ROOT / "03_train_baselines.py", *rl_args(world, reward_models, part, **{**common, "iterations": 1}),
                  "--method", "lagrangian"])
    run_script(ROOT / "03_train_baselines.py", *rl_args(world, reward_models, part, **common), "--method", "lagrangian")
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = strip(full), strip(part)
    assert a == b and len({l["state/lambda"] for l in a}) == 3                # lambda moved, and resumed exactly


def test_a_finished_run_removes_its_checkpoint_and_is_recognised_by_its_summary(world, reward_models, tmp_path):
    """By default (--keep-checkpoint false) the resume checkpoint goes once policy/ and run_summary.json are written.
    The same command again has nothing to do; a longer run, a changed flag or another method in the folder is refused
    (no checkpoint to continue from), and nothing in the folder changes."""
    out = tmp_path / "so_help"
    args = [ROOT / "03_train_baselines.py", *rl_args(world, reward_models, out, iterations=1, rollouts=8,
                                                     keep_checkpoint="false"), "--method", "so_help"]
    text = run_script(*args)
    assert f"removed the resume checkpoint {out / 'checkpoint'}" in text and not list(out.glob("checkpoint*"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_script(*args)
    assert "[so_help] nothing to do: the run in" in again
    longer, changed, molma = (run_fails(*c) for c in (     # one after another: one writer per folder
        [*args, "--iterations", "2"], [*args, "--kl-beta", "0.2"],
        [ROOT / "02_train_molma.py", *rl_args(world, reward_models, out, iterations=1, rollouts=8)]))
    assert "its checkpoint was removed at its end" in longer and "--iterations: 1 -> 2" in longer
    assert "--keep-checkpoint true" in longer and "--kl-beta: " in changed
    assert f"{out} holds a finished so_help run, not a molma one" in molma
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
