"""Loaders of the real datasets, on hand-written fixtures in each real schema (tests/fixtures/data)."""
import gzip
import json

import pytest

import common as C
from conftest import ROOT

FIX = str(ROOT / "tests" / "fixtures" / "data")


def rows(source, split="test"):
    return C.load_rows(source, split, FIX)


def test_pku_pairs_orientation_and_skips():
    help_pairs, help_skip = C.parse_pairs("pku_help", rows("pku_help"))
    safe_pairs, safe_skip = C.parse_pairs("pku_safe", rows("pku_safe"))
    # row 1: the helpful answer is the unsafe one -> the two objectives choose opposite answers
    assert help_pairs[0].chosen.startswith("Slide a shim") and safe_pairs[0].chosen.startswith("If it is yours")
    assert help_pairs[1].chosen.startswith("Stand it in a glass")
    assert [p.prompt for p in help_pairs] == ["How do I get into a locked shed?", "How do I keep basil fresh?",
                                             "How can I read my partner's texts?"]
    assert help_skip == {"identical answers": 1, "missing field better_response_id": 1, "empty prompt or answer": 1}
    assert [p.prompt for p in safe_pairs] == ["How do I get into a locked shed?", "How do I keep basil fresh?",
                                             "How do I sharpen a knife?"]
    assert safe_skip == {"safer answer labelled unsafe": 1, "identical answers": 1, "empty prompt or answer": 1}


def test_hh_split_at_last_assistant_turn():
    pairs, skipped = C.parse_pairs("hh_helpful", rows("hh_helpful"))
    assert len(pairs) == 2
    assert pairs[0].prompt == "How do I keep basil fresh?"
    assert (pairs[0].chosen, pairs[0].rejected) == ("Stand it in a glass of water.", "Freeze it.")
    # multi-turn: the dialogue so far is the prompt, the last answers are the pair
    assert pairs[1].prompt.startswith("Human: Recommend a book.") and pairs[1].prompt.endswith("Human: Science fiction.")
    assert (pairs[1].chosen, pairs[1].rejected) == ("Try The Left Hand of Darkness.", "Books are nice.")
    assert skipped == {"transcripts diverge before the last turn": 1, "malformed row": 1, "identical answers": 1}
    harmless, skipped = C.parse_pairs("hh_harmless", rows("hh_harmless"))
    assert harmless[0].chosen.startswith("I can't help") and "wires" in harmless[0].rejected
    assert skipped == {"transcripts diverge before the last turn": 1}


def test_shp_labels_ratio_filter_and_missing_field():
    pairs, skipped = C.parse_pairs("shp", rows("shp"))
    assert [(p.prompt, p.chosen) for p in pairs] == [("Why is my bread dense?", "Proof it longer in a warm place."),
                                                     ("Why did my cake sink?", "Your oven door was opened too early.")]
    assert skipped == {"filtered: score_ratio < 2": 1, "missing field human_ref_B": 1}


def test_rl_prompts_from_alpaca_and_hh():
    prompts, skipped = C.parse_prompts("alpaca", rows("alpaca", "train"))
    assert prompts == ["Give three tips for staying healthy.", "Translate to French.\nGood morning"]
    assert skipped == {"missing or empty prompt": 1, "filtered: duplicate prompt": 1}
    prompts, skipped = C.parse_prompts("hh_harmless", rows("hh_harmless", "train"))
    assert prompts[:2] == ["How do I hotwire a car?", "Tell me a mean joke about my boss."]
    assert prompts[2].startswith("Human: Hi") and skipped == {"filtered: duplicate prompt": 1}


def test_bad_fraction_is_an_error_and_skips_are_printed_and_recorded(capsys, monkeypatch):
    monkeypatch.setattr(C, "SKIPPED_ROWS", {})
    pairs = C.load_preference_pairs("help", "test", FIX, max_bad_fraction=0.6, sources={"pku_help": 1.0})
    out = capsys.readouterr().out
    assert len(pairs) == 3
    assert "[data] pku_help (test split): 6 rows, skipped 3: " in out and "missing field better_response_id (1)" in out
    assert C.SKIPPED_ROWS == {"pku_help/test": {"identical answers": 1, "missing field better_response_id": 1,
                                           "empty prompt or answer": 1}}
    with pytest.raises(ValueError, match=r"pku_help: 3 of 6 rows are bad .*max_bad_fraction=0.2"):
        C.load_preference_pairs("help", "test", FIX, sources={"pku_help": 1.0})


def test_mix_follows_proportions_and_is_seeded():
    mix = {"hh_helpful": 0.5, "shp": 0.5}
    a = C.load_preference_pairs("help", "test", FIX, sources=mix, max_bad_fraction=0.9, seed=1)
    b = C.load_preference_pairs("help", "test", FIX, sources=mix, max_bad_fraction=0.9, seed=1)
    assert a == b and sorted(p.source for p in a) == ["hh_helpful", "hh_helpful", "shp", "shp"]
    assert len(C.load_preference_pairs("help", "test", FIX, sources=mix, max_bad_fraction=0.9, limit=2)) == 2


def test_train_and_valid_splits_partition_the_train_split(tmp_path):
    # build a train split from the fixture's test rows, many copies with distinct prompts
    src = rows("pku_help")[0]
    folder = tmp_path / "PKU-Alignment" / "PKU-SafeRLHF"
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({**src, "prompt": f"question {i}"}) + "\n")
    tr = C.load_preference_pairs("help", "train", str(tmp_path), sources={"pku_help": 1.0})
    va = C.load_preference_pairs("help", "valid", str(tmp_path), sources={"pku_help": 1.0})
    assert len(tr) + len(va) == 400 and not {p.prompt for p in tr} & {p.prompt for p in va}
    assert 5 <= len(va) <= 40                        # about RM_VALID_FRACTION = 5%


def test_clear_errors_for_unknown_source_objective_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'reddit'; accepted: pku_help"):
        C.load_rows("reddit", "train", FIX)
    with pytest.raises(ValueError, match="unknown objective 'funny'; accepted: help, safe"):
        C.load_preference_pairs("funny", "test", FIX)
    with pytest.raises(FileNotFoundError, match=r"no local copy of stanfordnlp/SHP split 'train': expected .*train.jsonl"):
        C.load_rows("shp", "train", str(tmp_path))
    with pytest.raises(ValueError, match="gives no RL prompts"):
        C.parse_prompts("shp", rows("shp"))


def test_hub_path_asks_datasets_for_the_real_ids(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, data_dir=None, split=None):
        calls.append((path, data_dir, split))
        return rows({"PKU-Alignment/PKU-SafeRLHF": "pku_help", "Anthropic/hh-rlhf": "hh_helpful",
                     "stanfordnlp/SHP": "shp"}[path])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs = C.load_preference_pairs("help", "test", data_root=None, max_bad_fraction=0.6)
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", None, "test"), ("Anthropic/hh-rlhf", "helpful-base", "test"),
                     ("stanfordnlp/SHP", None, "test")]
    assert {p.source for p in pairs} <= {"pku_help", "hh_helpful", "shp"}


def test_a_malformed_line_names_its_file_and_line(tmp_path):
    folder = tmp_path / "yahma" / "alpaca-cleaned"
    folder.mkdir(parents=True)
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})
    (folder / "train.jsonl").write_text(good + "\n" + good + "\n" + good[: len(good) // 2])   # a truncated last line
    with pytest.raises(SystemExit, match=r"alpaca-cleaned/train.jsonl, line 3: not JSON .*each line must be one JSON object"):
        C.load_rows("alpaca", "train", str(tmp_path))
    (folder / "train.jsonl").write_text(good + "\n" + '["a list", "is valid JSON"]\n')        # JSON, not an object
    with pytest.raises(SystemExit, match=r"alpaca-cleaned/train.jsonl, line 2: a JSON list, not an object"):
        C.load_rows("alpaca", "train", str(tmp_path))
    (folder / "train.jsonl").write_text("")                                                  # an empty file
    with pytest.raises(SystemExit, match=r"alpaca-cleaned/train.jsonl holds no rows: an empty file"):
        C.load_rows("alpaca", "train", str(tmp_path))
    hh = tmp_path / "Anthropic" / "hh-rlhf" / "harmless-base"
    hh.mkdir(parents=True)
    with gzip.open(hh / "train.jsonl.gz", "wt") as f:
        f.write('{"chosen": "x"}\n{"chosen": \n')
    with pytest.raises(SystemExit, match=r"harmless-base/train.jsonl.gz, line 2"):
        C.load_rows("hh_harmless", "train", str(tmp_path))
    whole = gzip.compress(("".join(json.dumps({"chosen": f"x{i}"}) + "\n" for i in range(200))).encode())
    (hh / "train.jsonl.gz").write_bytes(whole[: len(whole) // 2])                            # a download cut short
    with pytest.raises(SystemExit, match=r"harmless-base/train.jsonl.gz: cannot be read to its end .*copy or download"):
        C.load_rows("hh_harmless", "train", str(tmp_path))


def test_pku_rows_with_a_non_binary_label_are_skipped_by_name(capsys, monkeypatch):
    monkeypatch.setattr(C, "SKIPPED_ROWS", {})
    good = rows("pku_safe")[0]
    data = [dict(good, prompt=f"q{i}") for i in range(99)] + [dict(good, prompt="q99", safer_response_id="x")]
    pairs, skipped = C.parse_pairs("pku_safe", data)
    assert skipped == {"safer_response_id not 0/1": 1} and len(pairs) == 99


def test_ultrafeedback_honesty_pairs_from_the_per_aspect_ratings_skip_na_and_ties():
    """openbmb/UltraFeedback (one split, ratings as strings, "N/A" at times): per prompt, the binarized versions'
    rule, the highest-rated answer on honesty against a random one rated strictly lower, drawn with a seed from the
    prompt (the same pair in every stage and run); N/A ratings left out; ties and prompts with fewer than two rated
    answers skipped and counted by reason."""
    data = rows("ultrafeedback_honesty", "train")
    pairs, skipped = C.parse_pairs("ultrafeedback_honesty", data)
    assert [(p.prompt, p.chosen) for p in pairs] == [
        ("How do I keep basil fresh?", "Stand it in water; I am not sure it lasts a week."),
        ("Will this diet make me lose 10 kg in a week?", "Unlikely; safe loss is about 0.5-1 kg a week, and it varies.")]
    # basil: honesty 5 (chosen), 4 and 2 below it, N/A left out; the diet row has one answer below
    assert pairs[0].rejected in ("Wrap it in a damp towel.", "Refrigerate it. This works 100% of the time, guaranteed.")
    assert pairs[1].rejected == "Yes, guaranteed: everyone loses 10 kg."
    assert skipped == {"every answer rated the same on honesty (a tie)": 1,
                       "fewer than two answers rated on honesty (N/A)": 1}
    assert C.parse_pairs("ultrafeedback_honesty", data)[0] == pairs                 # seeded: the same pairs again
    copies = [dict(data[0], instruction=f"{data[0]['instruction']} ({i})") for i in range(40)]
    drawn = [p.rejected for p in C.parse_pairs("ultrafeedback_honesty", copies)[0]]
    assert 10 < drawn.count("Wrap it in a damp towel.") < 30                        # any lower one, not the worst only
    assert C.PAIR_MIXES["honest"] == {"ultrafeedback_honesty": 1.0}


def test_ultrafeedback_has_one_split_and_valid_and_test_are_held_out_by_a_hash(tmp_path):
    src = json.loads(open(f"{FIX}/openbmb/UltraFeedback/train.jsonl").readline())
    folder = tmp_path / "openbmb" / "UltraFeedback"
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w") as f:           # many prompts, each a usable row
        for i in range(400):
            f.write(json.dumps({**src, "instruction": f"{src['instruction']} ({i})"}) + "\n")
    split = {s: {p.prompt for p in C.load_preference_pairs("honest", s, str(tmp_path))} for s in ("train", "valid", "test")}
    assert not (split["train"] & split["valid"]) and not (split["train"] & split["test"]) and not (split["valid"] & split["test"])
    assert len(split["train"]) + len(split["valid"]) + len(split["test"]) == 400
    assert 5 <= len(split["valid"]) <= 40 and 5 <= len(split["test"]) <= 40           # about 5% each


def test_a_run_starts_with_no_state_of_another_run_in_the_same_process(tmp_path):
    """A caller running two stages' main() in one process: the second run's summary holds only its own skipped rows
    and segments (lock_run_folder starts a run), and teardown releases each lock once."""
    import bookkeeping as bk

    C.SKIPPED_ROWS["pku_help/train"] = {"identical answers": 3}
    bk.RUN_SEGMENTS.append({"from_iteration": 0, "world_size": 8})
    bk.lock_run_folder(tmp_path / "run", "test")
    assert C.SKIPPED_ROWS == {} and bk.run_segments() == [{"from_iteration": 0, "world_size": 1}]
    assert (tmp_path / "run" / ".lock").exists() and len(C._AT_TEARDOWN) == 1
    C._AT_TEARDOWN.pop()()                            # what teardown does with it
    assert not (tmp_path / "run" / ".lock").exists()
