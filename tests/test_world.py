"""The tiny world: its ground truth's conflict, a deterministic build, and files that load as 01-04 expect."""
import hashlib
import json

import pytest

import tiny_world as W
from conftest import ROOT, run_together


@pytest.mark.parametrize("task", sorted(W.HARMFUL))
def test_harmful_prompts_trade_helpfulness_against_safety(task):
    prompt = f"how do i {task} ?"
    steps, alts = W.HARMFUL[task]
    comply = f"sure . to {task} , first {steps[0]} , then {steps[1]} , then {steps[2]} , and finally {steps[3]} ."
    refuse = "sorry , i can not help with that ."
    balanced = f"i can not help you {task} , but you could {alts[0]} or {alts[1]} ."
    (hc, sc), (hr, sr), (hb, sb) = (W.ground_truth(prompt, a) for a in (comply, refuse, balanced))
    assert hc > hb > hr and sc < 0.05 < 0.9 < sr          # the most helpful answer is unsafe; refusing is safe, unhelpful
    assert hb > 0.4 and sb > 0.9                          # a balanced answer is reasonably helpful and safe
    assert sb >= sr - 1e-9


@pytest.mark.parametrize("task", sorted(W.BENIGN))
def test_benign_prompts_reward_steps_and_a_cautious_rater_prefers_refusal_slightly(task):
    prompt = f"what is the best way to {task} ?"
    steps = W.BENIGN[task]
    full = f"sure . to {task} , first {steps[0]} , then {steps[1]} , then {steps[2]} , and finally {steps[3]} ."
    one = f"sure . to {task} , first {steps[0]} ."
    (hf, sf), (h1, _), (hr, sr) = (W.ground_truth(prompt, a) for a in (full, one, "sorry , i can not help with that ."))
    assert hf > h1 > hr and hf > 0.9 and hr < 0.1
    assert sf > 0.85 and sr > sf                          # so safety alone drifts towards over-refusal


def test_ground_truth_accepts_any_text():
    for prompt, answer in [("", ""), ("what ?", "x y z"), ("how do i pick a lock ?", "<|endoftext|>" * 3)]:
        h, s = W.ground_truth(prompt, answer)
        assert 0 < h < 1 and 0 < s < 1


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "world.json":
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_world_build_is_deterministic(tmp_path):
    small = ["--pretrain-steps", "10", "--pretrain-texts", "100", "--pku-train", "200", "--alpaca", "100", "--samples", "4",
             "--hh-harmless-train", "300", "--hh-helpful-train", "100", "--shp-train", "100"]
    run_together(*([ROOT / "00_make_tiny_world.py", "--out", tmp_path / name, *seed, *small]
                   for name, seed in [("a", []), ("b", []), ("c", ["--seed", "1"])]))   # two builds at once: no shared state
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_the_suites_world_loads_as_stages_1_to_4_expect(world):
    from transformers import AutoModelForCausalLM

    import common as C

    import bookkeeping as bk
    tok = bk.load_tokenizer(str(world / "base"))
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id                       # pad == eos, as with phi-2
    assert AutoModelForCausalLM.from_pretrained(world / "base").config.model_type == "phi"
    info = json.loads((world / "world.json").read_text())["base_model_samples"]
    # varied answers: neither all helpful nor all safe
    assert 0.15 < info["share_with_task_steps"] < 0.8 and 0.05 < info["share_refusing"] < 0.6
    assert 0.1 < info["share_harmful_on_harmful_prompts"] < 0.8
    for objective in ("help", "safe", "honest"):       # (SMALL_WORLD's rows: the default world has 3x to 6x more)
        assert len(C.load_preference_pairs(objective, "train", str(world / "data"))) > 400
    assert len(C.load_rl_prompts("test", str(world / "data"))) > 50


@pytest.mark.parametrize("task", sorted(W.BENIGN)[:4])
def test_honesty_is_its_own_quality_against_helpfulness_and_apart_from_safety(task):
    """A confident claim reads as more helpful and is dishonest; a hedge is honest and costs a little helpfulness;
    neither moves safety (the world of three objectives)."""
    prompt = f"how do i {task} ?"
    steps = W.BENIGN[task]
    plain = f"sure . to {task} , first {steps[0]} , then {steps[1]} ."
    claim, hedge = plain + " " + W.CLAIMS[0], plain + " " + W.HEDGES[0]
    (hp, sp, op), (hc, sc, oc), (hh, sh, oh) = (W.truths(prompt, a, ("help", "safe", "honest")) for a in (plain, claim, hedge))
    assert hc > hp > hh                                   # the rater likes confidence, dislikes hedging
    assert oc < 0.5 < op < oh                             # ... which is the dishonest one
    assert sc == sp == sh                                 # safety does not see it
    assert W.truths(prompt, plain) == W.ground_truth(prompt, plain)          # two objectives: the paper's truth


def test_the_default_world_never_claims_or_hedges():
    vocab = set(W.vocabulary())
    assert not vocab >= set(W.words(W.CLAIMS[0])) and not vocab >= set(W.words(W.HEDGES[0]))
    assert set(W.vocabulary(honest_world=True)) >= set(W.words(" ".join(W.CLAIMS + W.HEDGES)))
