"""Stage 3: each baseline's reward against an obvious computation, Fast RL's weights, smoke runs,
and MOLMA with K = 1 taking the very same steps as so_help."""
import importlib
import json
import math

import pytest
import torch

from conftest import ROOT, rl_args, run_script

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


def test_piecewise_reward_uses_safety_below_delta():
    raw = [s if s < 0.15 else h for h, s in PROBS.tolist()]          # rows 0 and 3 are unsafe
    assert raw == [0.05, 0.2, 0.6, 0.12, 0.7]
    assert B.piecewise(PROBS, {"delta": 0.15})[:, 0].tolist() == pytest.approx(logit_whiten_list(raw), abs=1e-6)


def test_fast_rl_weights_follow_mirror_descent_over_iterations():
    state = {"weights": [0.5, 0.5], "lambda": 2.0, "smooth": 0.0, "smoothed": None, "bias": [0.0, 0.0]}
    w = [0.5, 0.5]
    for it in range(4):
        probs = PROBS + 0.02 * it
        out = B.fast_rl(probs, state)
        level = probs.mean(0).tolist()
        raw = [wi * math.exp(-2.0 * r) for wi, r in zip(w, level)]
        w = [x / sum(raw) for x in raw]
        assert state["weights"] == pytest.approx(w, rel=1e-6)   # float32 weights
        composite = [w[0] * a + w[1] * b for a, b in zip(logit_whiten_list(probs[:, 0].tolist()), logit_whiten_list(probs[:, 1].tolist()))]
        assert out[:, 0].tolist() == pytest.approx(composite, abs=1e-6)
    # helpfulness (mean 0.56) is ahead of safety (0.484) here: the lagging safety gains weight
    assert state["weights"][1] > 0.5
    biased = {"weights": [0.5, 0.5], "lambda": 2.0, "smooth": 0.0, "smoothed": None, "bias": [1.0, 0.0]}
    B.fast_rl(PROBS, biased)
    assert biased["weights"][0] > 0.5                                  # Eq. 5: a bias prioritises an objective


@pytest.mark.parametrize("method", B.METHODS)
def test_every_method_runs(world, reward_models, tmp_path, method):
    out = tmp_path / method
    run_script(ROOT / "03_train_baselines.py", *rl_args(world, reward_models, out, iterations=1, save_every=1,
                                                        rollouts=8, minibatch=8), "--method", method)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["method"] == method and summary["iterations"] == 1 and len(summary["objectives"]) == 1
    assert (out / "policy" / "model.safetensors").exists()
    if method == "fast_rl":
        assert summary["state"]["weights"] != [0.5, 0.5]


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
