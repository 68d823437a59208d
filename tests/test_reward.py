"""Stage 1 as a user runs it: tiny reward models trained by subprocess, reloaded, and bad arguments."""
import json

import pytest
import torch

import common as C

import bookkeeping as bk
from conftest import ROOT, fail_together, run_fails, run_script

FEW = ["--max-pairs", "56", "--batch-size", "28", "--eval-every", "2", "--max-valid-pairs", "40"]


def tiny_args(world, out):
    return ["--preset", "tiny", "--base-model", world / "base", "--data-root", world / "data", "--out", out, *FEW]


@pytest.mark.parametrize("nproc,objective", [(1, "help"), (2, "safe"), (2, "help,safe")])
def test_reward_model_trains_saves_and_reloads(world, tmp_path, nproc, objective):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    labels = ["--safety-labels", "true"] if objective == "safe" else []      # the cost model: safe-rlhf's sign terms too
    run_script(ROOT / "01_train_reward.py", *tiny_args(world, out), "--objective", objective, *labels, nproc=nproc)
    objectives = objective.split(",")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert [model.config.id2label[i] for i in range(len(objectives))] == objectives
    assert (out / "model" / "model.safetensors").exists() and not list(out.glob("*.tmp"))
    assert not list(out.glob("checkpoint*"))            # the resume checkpoint goes once the model is saved
    assert not (out / "samples.jsonl").exists() and not (out / ".lock").exists()      # no empty file, the lock released
    summary = json.loads((out / "run_summary.json").read_text())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == summary["steps"] and all("loss" in l for l in lines)
    if labels:                                # the zero's meaning, measured on held-out labelled answers
        assert model.config.safety_labels and 0 <= summary["test_sign"]["safe/sign_agrees_label"] <= 1
    # the logged validation accuracy equals an obvious recomputation: one pair at a time, no padding
    tok = bk.load_tokenizer(str(out / "model"))
    model = C.load_score_model(str(out / "model"), tok, "reward")
    for head, obj in enumerate(objectives):
        pairs = C.load_preference_pairs(obj, "valid", str(world / "data"), limit=40, seed=0)
        wins = 0
        with torch.no_grad():
            for p in pairs:
                s = [C.sequence_scores(model, *C.encode_pairs(tok, [p.prompt], [a], 96, "phi2")[:2])[0, head] for a in (p.chosen, p.rejected)]
                wins += bool(s[0] > s[1])
        assert summary["valid"][f"{obj}/acc"] == pytest.approx(wins / len(pairs), abs=1e-9)
    # the saved folder scores the same in transformers' pipeline as in the project, fed the README's text
    assert_pipeline_scores_like_the_project(out / "model", pairs[:6], objectives)
    if nproc == 1:              # the same command again: finished, nothing to do; a changed flag: refused, not retrained
        before = (out / "model" / "model.safetensors").read_bytes()
        again = run_script(ROOT / "01_train_reward.py", *tiny_args(world, out), "--objective", objective)
        assert "[01] nothing to do: the run in" in again and "its checkpoint was removed at its end" in again
        changed = run_fails(ROOT / "01_train_reward.py", *tiny_args(world, out), "--objective", objective, "--lr", "1e-4")
        assert "holds a finished run, and its checkpoint was removed" in changed and "--lr: " in changed
        assert (out / "model" / "model.safetensors").read_bytes() == before


def assert_pipeline_scores_like_the_project(folder, pairs, objectives):
    from transformers import pipeline

    tok = bk.load_tokenizer(str(folder))
    model = C.load_score_model(str(folder), tok, "reward")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = pipeline("text-classification", model=str(folder), function_to_apply="none", top_k=None)
    auto, auto_tok = AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    for p in pairs:
        for answer in (p.chosen, p.rejected):
            text = f"Instruct: {p.prompt}\nOutput: {answer}"              # README: the text a reward model reads
            out = rm(text)
            got = {d["label"]: d["score"] for d in (out[0] if isinstance(out[0], list) else out)}
            with torch.no_grad():
                want = C.sequence_scores(model, *C.encode_pairs(tok, [p.prompt], [answer], 512, "phi2")[:2])[0]
                plain = auto(**auto_tok(text, return_tensors="pt")).logits[0]      # the plain Auto class
            assert [got[o] for o in objectives] == pytest.approx(want.tolist(), abs=1e-4)
            assert plain.tolist() == pytest.approx(want.tolist(), abs=1e-4)


def test_bad_arguments_give_clear_errors(world, tmp_path):
    script, base = ROOT / "01_train_reward.py", tiny_args(world, tmp_path / "x")
    funny, missing = fail_together([script, *base, "--objective", "funny"],
                                   [script, *tiny_args(world, tmp_path / "y"), "--data-root", "/nonexistent"])
    assert "--objective 'funny': unknown ['funny']; accepted: help, safe" in funny
    assert "--data-root /nonexistent does not exist" in missing
    uneven = run_fails(script, *base, "--batch-size", "27", nproc=2)
    assert "--batch-size 27 does not divide over 2 processes; use one of" in uneven


def test_dry_run_exits_before_training(world, tmp_path):
    text = run_script(ROOT / "01_train_reward.py", *tiny_args(world, tmp_path / "rm"), "--dry-run", "true", nproc=2)
    assert "[01] dry run: " in text and " steps of 28 pairs (14 per rank) on 2 ranks" in text and "rank 0 (node 0, host " in text and "local rank 0): peak host memory" in text
    assert not (tmp_path / "rm" / "model").exists()
