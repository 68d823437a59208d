"""Stage 2 as a user runs it: a short MOLMA run, its logs and outputs, and an exact resume."""
import json

import pytest

from conftest import ROOT, fail_together, rl_args, run_fails, run_script

SCRIPT = ROOT / "02_train_molma.py"


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def without_times(lines):
    return [{k: v for k, v in l.items() if not k.startswith("time/")} for l in lines]


def test_molma_trains_logs_what_amtl_does_and_resumes_exactly(world, reward_models, uninterrupted_run, tmp_path):
    full, part = uninterrupted_run, tmp_path / "part"          # the fault tests' reference: 6 iterations on 2 ranks
    lines = metrics(full)
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("help/score", "safe/score", "help/shaped_reward", "safe/apa_loss", "help/value_loss", "safe/grad_norm",
                "objective/kl", "response/length", "response/eos_rate", "amtl/cos", "amtl/cond_before",
                "amtl/cond_after", "time/generation", "time/scoring", "time/update", "truth/help", "truth/safe"):
        assert key in lines[-1], key
    assert all(l["amtl/cond_after"] == pytest.approx(1.0, abs=1e-4) for l in lines)   # aligned: condition number 1
    assert all(l["amtl/cond_before"] >= 1.0 for l in lines)
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(full / "policy")
    # the checkpoint: each rank's shards of both models' weights and AdamW state (torch.distributed.checkpoint, in
    # safetensors: the headers say which slice of each tensor a file holds), nothing gathered, nothing pickled
    shards = sorted((full / "checkpoint" / "shards").glob("*.safetensors"))
    assert {f.name.split("-model-")[0] for f in shards} == {"shard-00001", "shard-00002"}
    keys = set()
    for f in shards:
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    assert {"policy/model/lm_head.weight", "critic/model/score.weight", "critic/model/score.bias",
            "policy/optim/lm_head.weight/exp_avg", "critic/optim/score.weight/exp_avg_sq"} <= keys
    assert not list((full / "checkpoint").rglob("*.pt")) and not list((full / "checkpoint").rglob(".metadata"))
    summary = json.loads((full / "run_summary.json").read_text())
    assert summary["iterations"] == 6 and set(summary["phase_seconds_median"]) == {"generation", "scoring", "update"}
    # live curves: TensorBoard event files hold the same scalars under the same names, and the samples as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(full / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    for key in ("help/score", "safe/apa_loss", "amtl/cos", "objective/kl", "truth/safe"):
        assert [e.step for e in ea.Scalars(key)] == [1, 2, 3, 4, 5, 6]
        assert [e.value for e in ea.Scalars(key)] == pytest.approx([l[key] for l in lines], rel=1e-5)
    assert "samples/text_summary" in ea.Tags()["tensors"]
    samples = [json.loads(l) for l in (full / "samples.jsonl").read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {1, 6} and len(samples) == 8            # first and last, 4 each
    assert {"prompt", "answer", "ended_with_eos", "rm_help", "rm_safe", "true_help", "true_safe"} <= set(samples[0])

    # the critic's target is GAE's return whatever the policy sees: iteration 1 (same rollouts, and the critic's steps
    # see only rollouts and targets) gives the same value losses with advantage whitening on as off (the default)
    run_script(SCRIPT, *rl_args(world, reward_models, tmp_path / "white", iterations=1, whiten_advantages="true"), nproc=2)
    white = metrics(tmp_path / "white")[0]
    for o in ("help", "safe"):
        assert white[f"{o}/value_loss"] == lines[0][f"{o}/value_loss"]
        assert white[f"{o}/apa_loss"] != lines[0][f"{o}/apa_loss"]      # the policy does see the whitening

    # interrupted after 2 iterations, then resumed to 4: the same run, step for step (a run's first iterations do not
    # depend on how many follow)
    run_script(SCRIPT, *rl_args(world, reward_models, part, iterations=2, save_every=2), nproc=2)
    run_script(SCRIPT, *rl_args(world, reward_models, part, iterations=4, save_every=2, resume="true"), nproc=2)
    assert without_times(metrics(part)) == without_times(lines[:4])


def test_the_representation_aligner_trains_at_one_backward_and_logs_how_close_it_is_to_exact(world, reward_models,
                                                                                             tmp_path):
    """--aligner representation: cond(E B) = 1 where it aligns (the log-probs' gradients); --compare-exact forms
    the same update from the K gradients, so the run is the same to rounding, and logs its cosine to Algorithm 1's
    update and cond(G) after each B (after the exact B: 1)."""
    fast, check = tmp_path / "fast", tmp_path / "check"
    run_script(SCRIPT, *rl_args(world, reward_models, fast, iterations=3, aligner="representation"), nproc=2)
    run_script(SCRIPT, *rl_args(world, reward_models, check, iterations=3, aligner="representation",
                                compare_exact="true"), nproc=2)
    a, b = metrics(fast), metrics(check)
    assert all(l["amtl/cond_after"] == pytest.approx(1.0, abs=1e-4) for l in a)
    for l in b:
        assert -1.0 <= l["amtl/cos_to_exact"] <= 1.0 and l["amtl/exact_cond_after"] >= 1.0
        assert l["amtl/exact_cond_before"] >= 1.0
    assert any(l["amtl/cos_to_exact"] < 1 - 1e-6 for l in b)           # an approximation: not the exact update
    for x, y in zip(a, b):                    # the diagnostic does not change the training, beyond rounding
        for k in ("help/score", "safe/score", "help/apa_loss", "safe/apa_loss", "objective/kl", "update_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-6), k
    assert not any(k.startswith("amtl/cos_to") for k in a[0])
    config = json.loads((fast / "run_summary.json").read_text())["config"]
    assert config["aligner"] == "representation"
    # a run of one aligner is not resumed as the other; a typo and a diagnostic without its aligner are refused
    resumed, typo, diagnostic = fail_together(
        [SCRIPT, *rl_args(world, reward_models, fast, iterations=4, resume="true")],
        [SCRIPT, *rl_args(world, reward_models, tmp_path / "x", iterations=1, aligner="sum")],
        [SCRIPT, *rl_args(world, reward_models, tmp_path / "y", iterations=1, compare_exact="true")])
    assert "--aligner" in resumed and "--aligner 'sum' is not one of exact, representation" in typo
    assert "--compare-exact compares the representation aligner with the exact one" in diagnostic


def test_molma_one_process_multiheaded_rm_and_three_objectives(world, reward_models, tmp_path):
    # one process, with the two objectives read from one multi-headed reward model
    multi = tmp_path / "rm_multi"
    run_script(ROOT / "01_train_reward.py", "--preset", "tiny", "--objective", "help,safe", "--base-model", world / "base",
               "--data-root", world / "data", "--out", multi, "--max-pairs", "56", "--eval-every", "1000",
               "--max-valid-pairs", "28")
    args = rl_args(world, reward_models, tmp_path / "mh", iterations=1, save_every=1)
    args[args.index("--reward-models") + 1] = str(multi / "model")
    assert "[molma] done" in run_script(SCRIPT, *args)
    # K = 3: a third objective, scored by a copy of RMhelp renamed in its config (K is not hard-coded)
    import shutil
    third = tmp_path / "rm_concise"
    shutil.copytree(reward_models["help"], third)
    cfg = json.loads((third / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "concise"}, {"concise": 0}
    (third / "config.json").write_text(json.dumps(cfg))
    args = rl_args(world, reward_models, tmp_path / "k3", iterations=2, save_every=2, objectives="help,safe,concise")
    args[args.index("--reward-models") + 1] += f",{third}"
    run_script(SCRIPT, *args, nproc=2)
    last = metrics(tmp_path / "k3")[-1]
    assert {"help/apa_loss", "safe/apa_loss", "concise/apa_loss", "concise/score"} <= set(last)
    assert last["amtl/cond_after"] == pytest.approx(1.0, abs=1e-4)


def test_molma_errors_are_clear(world, reward_models, tmp_path):
    cases = [(["--wandb-project", "molma"], "--wandb-project needs the wandb package"),
             (["--objectives", "help,honest"], "no reward model scores ['honest']"),
             (["--resume", "true"], "--resume true: no checkpoint at"),
             (["--minibatch", "6"], "--rollouts 16 must be divisible by 6 (--minibatch)")]
    texts = fail_together(*([SCRIPT, *rl_args(world, reward_models, tmp_path / f"x{i}", iterations=1), *flags]
                            for i, (flags, _) in enumerate(cases)))
    for (flags, message), text in zip(cases, texts):
        assert message in text, (flags, text[-2000:])


def test_dry_run_trains_one_iteration_saves_nothing_and_tells_the_runs_memory(world, reward_models, uninterrupted_run,
                                                                              tmp_path):
    """The dry run loads and checks everything, trains one iteration and writes nothing; the peak memory it prints
    is the run's: each rank's within 25% of what the same arguments' full run measured (run_summary.json)."""
    import re

    out = tmp_path / "dry"
    text = run_script(SCRIPT, *rl_args(world, reward_models, out, iterations=6, save_every=2), "--dry-run", "true",
                      nproc=2)
    assert "[molma] dry run: " in text and "16 rollouts, 8 per rank, minibatches of 4 per rank, on 2 ranks" in text
    assert "[molma] dry run done: the peak memory after one training iteration (nothing was saved)" in text
    assert "policy: 0.1M parameters" in text and "rank 1 (node 0, host " in text and "local rank 1): peak host memory" in text
    assert not list(out.iterdir())                                    # no record, no checkpoint, the lock released
    dry = [float(x) * 2**30 for x in re.findall(r"local rank \d\): peak host memory ([\d.]+) GiB", text)]
    run = json.loads((uninterrupted_run / "run_summary.json").read_text())["peak_rss_bytes_per_rank"]
    assert len(dry) == len(run) == 2 and all(abs(d - r) <= 0.25 * r for d, r in zip(dry, run)), (dry, run)
    assert "--rollouts 16 must be divisible by 6 (--minibatch)" in run_fails(
        SCRIPT, *rl_args(world, reward_models, out, iterations=5), "--dry-run", "true", "--minibatch", "6")
