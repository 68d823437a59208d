"""Stage 4: the statistics against obvious computations, and the report of a tiny smoke pipeline."""
import importlib
import itertools
import json
import random
import shutil

import pytest
import torch

from conftest import ROOT, rl_args, run_fails, run_script

E = importlib.import_module("04_evaluate")


def test_win_rate_counts_ties_as_half():
    a = torch.tensor([0.9, 0.5, 0.2, 0.7])
    b = torch.tensor([0.1, 0.5, 0.3, 0.7])
    assert E.win_rate(a, b).item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_bootstrap_interval_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g), torch.rand(50, generator=g)
    lo, hi = E.bootstrap_ci(a, b, 400, seed=3)
    # the same resamples, drawn and scored one by one
    idx = torch.randint(0, 50, (400, 50), generator=torch.Generator().manual_seed(3))
    rates = sorted(sum(1.0 if a[i] > b[i] else 0.5 if a[i] == b[i] else 0.0 for i in row.tolist()) / 50 for row in idx)
    assert (lo, hi) == pytest.approx((rates[int(0.025 * 399)], rates[399 - int(0.025 * 399)]))
    assert lo <= E.win_rate(a, b).item() <= hi


def test_hypervolume_against_a_grid_count():
    rng = random.Random(1)
    pts = [(rng.random(), rng.random()) for _ in range(12)]
    n = 400
    grid = sum(any(x < px and y < py for px, py in pts)
               for x, y in itertools.product([(i + 0.5) / n for i in range(n)], repeat=2)) / n**2
    assert E.hypervolume(pts) == pytest.approx(grid, abs=5e-3)
    assert E.hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    assert E.hypervolume([(0.5, 0.5), (0.4, 0.4)]) == pytest.approx(0.25)        # a dominated point adds nothing


def test_pareto_front():
    pts = {"a": (0.2, 0.9), "b": (0.5, 0.5), "c": (0.4, 0.4), "d": (0.9, 0.1), "e": (0.5, 0.5)}
    assert E.pareto_front(pts) == ["a", "b", "d", "e"]


def test_report_from_a_smoke_pipeline(world, reward_models, tmp_path):
    runs = tmp_path / "runs"
    for script, name, extra in [("02_train_molma.py", "molma", []), ("03_train_baselines.py", "so_weighted", ["--method", "so_weighted"]),
                                ("03_train_baselines.py", "so_weighted_w0.8", ["--method", "so_weighted", "--weights", "0.8,0.2"])]:
        run_script(ROOT / script, *rl_args(world, reward_models, runs / name, iterations=1, save_every=1, rollouts=8), *extra)
    (runs / "so_help").mkdir()                                 # a folder that holds no model
    args = ["--preset", "tiny", "--runs-dir", runs, "--policy", world / "base", "--data-root", world / "data",
            "--reward-models", f"{reward_models['help']},{reward_models['safe']}", "--num-prompts", "24",
            "--rm-eval-size", "40", "--bootstrap", "200"]
    bad = run_fails(ROOT / "04_evaluate.py", *args)
    assert "so_help: " in bad and "is not a model (no config.json)" in bad
    shutil.rmtree(runs / "so_help")
    run_script(ROOT / "04_evaluate.py", *args, nproc=2)
    report = runs / "report"
    text = (report / "report.md").read_text()
    for section in ("Table 2", "Figure 2a", "Figure 3", "Figure 4", "Table 3", "ground truth"):
        assert section in text
    assert "Missing runs (not found, left out): so_help, so_safe, so_piecewise, fast_rl." in text
    data = json.loads((report / "report.json").read_text())
    assert set(data["win_rates"]) == {"reference", "so_weighted", "so_weighted_w0.8"}
    lines = [json.loads(l) for l in (report / "answers.jsonl").read_text().splitlines()]
    n = data["sampling"]["num_prompts"]                       # 24 capped, then split 60/40 by Table 1, each floored
    assert 22 <= n <= 24 and len(lines) == 4 * n and {"prompt", "model", "answer", "rm_help", "rm_safe", "true_help", "true_safe"} <= set(lines[0])
    # the win rate in the report is the one recomputed from the raw answers
    by = lambda m: [l["rm_help"] for l in lines if l["model"] == m]
    recomputed = E.win_rate(torch.tensor(by("molma"), dtype=torch.float64), torch.tensor(by("reference"), dtype=torch.float64)).item()
    assert data["win_rates"]["reference"]["help"]["win_rate"] == pytest.approx(recomputed)
    from PIL import Image
    for png in ("fig2a_win_rates.png", "fig3_reward_distributions.png", "fig4_weight_sweep.png", "fig_truth_pareto.png",
                "fig_training_curves.png"):
        with Image.open(report / png) as im:
            assert im.format == "PNG" and im.size[0] > 200
    # the same seed gives the same report
    first = (report / "answers.jsonl").read_text()
    run_script(ROOT / "04_evaluate.py", *args, nproc=2)
    assert (report / "answers.jsonl").read_text() == first
