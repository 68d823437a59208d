"""Three objectives end to end on the suite's tiny world, which is of three objectives (00 --objectives help,safe,honest):
UltraFeedback's honesty pairs, RMhonest and a three-headed reward model, MOLMA with K = 3, the baselines that take
three objectives, and the report's columns for honesty."""
import json
import shutil

import pytest

from conftest import ROOT, run_fails, run_script, run_together


@pytest.fixture(scope="module")
def hhh(world, reward_models, tmp_path_factory):
    """The suite's world (of three objectives) with its RMhelp and RMsafe, and two more reward models trained on it
    here, one process each, together (01 on two ranks: test_reward.py): RMhonest and one three-headed model.
    -> {"world", "rm_<objectives>": model folder}."""
    root = tmp_path_factory.mktemp("hhh")
    run_together(*([ROOT / "01_train_reward.py", "--preset", "tiny", "--objective", objective, "--base-model",
                    world / "base", "--data-root", world / "data", "--out", root / f"rm_{objective.replace(',', '_')}",
                    "--max-pairs", "400", "--eval-every", "1000", "--max-valid-pairs", "60"]
                   for objective in ("honest", "help,safe,honest")))
    return {"world": world, "rm_help": reward_models["help"], "rm_safe": reward_models["safe"],
            **{f"rm_{o}": root / f"rm_{o}" / "model" for o in ("honest", "help_safe_honest")}}


def rl(hhh, out, rms, iterations=2):
    return ["--preset", "tiny", "--policy", hhh["world"] / "base", "--data-root", hhh["world"] / "data",
            "--objectives", "help,safe,honest", "--reward-models", rms, "--out", out, "--iterations", str(iterations),
            "--rollouts", "16", "--minibatch", "8", "--max-new-tokens", "24"]


def test_the_world_of_three_objectives_has_claims_hedges_and_honesty_preferences(hhh):
    info = json.loads((hhh["world"] / "world.json").read_text())["base_model_samples"]
    assert 0.03 < info["share_with_a_claim"] < 0.7 and 0.0 < info["share_with_a_hedge"] < 0.5   # pi_0 does both
    assert set(info["truth_correlations"]) == {"help-safe", "help-honest", "safe-honest"}
    summary = json.loads((hhh["rm_honest"].parent / "run_summary.json").read_text())
    assert summary["valid"]["honest/ultrafeedback_honesty/acc_truth"] > 0.7                     # RMhonest learned the honesty truth
    heads = json.loads((hhh["rm_help_safe_honest"] / "config.json").read_text())["id2label"]
    assert sorted(heads.values()) == ["help", "honest", "safe"]


def separate(hhh):
    return ",".join(str(hhh[f"rm_{o}"]) for o in ("help", "safe", "honest"))


@pytest.fixture(scope="module")
def molma_k3(hhh, tmp_path_factory):
    """MOLMA with K = 3 on three separate reward models, 2 iterations: checked below, and the report's MOLMA run."""
    out = tmp_path_factory.mktemp("molma_k3") / "molma"
    run_script(ROOT / "02_train_molma.py", *rl(hhh, out, separate(hhh)), nproc=2)
    return out


@pytest.mark.parametrize("rms", ["separate", "three-headed"])
def test_molma_trains_three_objectives_and_logs_each_truth_and_the_aligner(hhh, molma_k3, tmp_path, rms):
    out = molma_k3
    if rms == "three-headed":
        out = tmp_path / "molma"
        run_script(ROOT / "02_train_molma.py", *rl(hhh, out, str(hhh["rm_help_safe_honest"])), nproc=2)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {"honest/score", "honest/apa_loss", "truth/honest", "amtl/cos", "amtl/cond_after"} <= set(lines[-1])
    assert lines[-1]["amtl/cond_after"] == pytest.approx(1.0, abs=1e-3)


def test_the_baselines_take_three_objectives_and_the_report_has_honesty(hhh, molma_k3, tmp_path):
    rms = separate(hhh)
    runs = tmp_path / "runs"
    shutil.copytree(molma_k3, runs / "molma")
    # one process each, together: what is of three objectives here is each method's rule; the skeleton these share
    # runs on two ranks in test_baselines.py (so_help) and test_architectures.py (so_weighted)
    run_together(*([ROOT / "03_train_baselines.py", *rl(hhh, runs / method, rms, 1), "--method", method, *extra]
                   for method, extra in (("so_weighted", ["--weights", "0.5,0.3,0.2"]), ("fast_rl", []),
                                         ("lagrangian", []))))
    state = json.loads((runs / "so_weighted" / "run_summary.json").read_text())["state"]
    assert state["weights"] == pytest.approx([0.5, 0.3, 0.2])
    assert len(json.loads((runs / "fast_rl" / "run_summary.json").read_text())["state"]["weights"]) == 3
    assert len(json.loads((runs / "lagrangian" / "run_summary.json").read_text())["state"]["lambda"]) == 2   # one per constraint
    bad = run_fails(ROOT / "03_train_baselines.py", *rl(hhh, runs / "pw", rms, 1), "--method", "so_piecewise")
    assert "so_piecewise is Llama 2's rule for two objectives" in bad
    run_script(ROOT / "04_evaluate.py", "--preset", "tiny", "--runs-dir", runs, "--policy", hhh["world"] / "base",
               "--data-root", hhh["world"] / "data", "--reward-models", rms, "--objectives", "help,safe,honest",
               "--num-prompts", "24", "--rm-eval-size", "40", "--bootstrap", "100", "--human-eval-prompts", "0", nproc=2)
    report = json.loads((runs / "report" / "report.json").read_text())
    assert report["objectives"] == ["help", "safe", "honest"]
    assert set(report["win_rates"]["so_weighted"]) == {"help", "safe", "honest"}
    assert "UltraFeedback (honesty)" in report["table2"]
    assert {"true_help", "true_safe", "true_honest", "hypervolume"} <= set(report["truth"]["molma"])
    text = (runs / "report" / "report.md").read_text()
    assert "honesty win rate [95% CI]" in text and "mean true honesty" in text and "| RMhonest |" in text
    answers = [json.loads(l) for l in (runs / "report" / "answers.jsonl").read_text().splitlines()]
    assert {"rm_honest", "true_honest"} <= set(answers[0])
