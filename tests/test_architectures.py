"""Nothing rests on phi-2's quirks: the whole pipeline 00 -> 04 on a tiny Llama (adds <s>, no pad, Llama-2's chat
prompt) and a tiny Qwen2 (a real pad token distinct from EOS, and its own ChatML chat template: --prompt-template
chat, as a real instruct model runs), each with its own tokenizer; scores independent of
padding with those tokenizers; the decoder layers FSDP shards found for the common architectures."""
import json

import pytest
import torch

import common as C

import bookkeeping as bk
from conftest import ROOT, run_script, run_together

ARCHS = {"llama": "llama2_chat", "qwen2": "chat"}


@pytest.fixture(scope="module")
def other_worlds(tmp_path_factory):
    """A small tiny world of each architecture, built together: {arch: folder}."""
    outs = {arch: tmp_path_factory.mktemp(arch) / "world" for arch in sorted(ARCHS)}
    run_together(*([ROOT / "00_make_tiny_world.py", "--arch", arch, "--out", out, "--pretrain-steps", "60",
                    "--pretrain-texts", "600", "--pku-train", "600", "--hh-harmless-train", "600", "--alpaca", "600",
                    "--samples", "10"] for arch, out in outs.items()))
    return outs


@pytest.fixture(params=sorted(ARCHS))
def other_world(request, other_worlds):
    return request.param, other_worlds[request.param]


@pytest.mark.both_cores
def test_the_whole_pipeline_runs_on_a_non_phi_model(other_world, tmp_path):
    arch, world = other_world
    template = ["--prompt-template", ARCHS[arch]]
    tok = bk.load_tokenizer(str(world / "base"), ARCHS[arch])
    if arch == "llama":
        assert C.special_prefix(tok, ARCHS[arch]) == [tok.bos_token_id] and tok.pad_token_id == tok.eos_token_id
    else:
        assert C.special_prefix(tok, ARCHS[arch]) == [] and tok.pad_token_id != tok.eos_token_id
    # one multi-headed reward model (help and safe outputs) stands for RMhelp and RMsafe, to keep the suite short
    run_script(ROOT / "01_train_reward.py", "--preset", "tiny", "--objective", "help,safe", "--base-model", world / "base",
               "--data-root", world / "data", "--out", tmp_path / "rm", "--max-pairs", "56", "--eval-every", "1000",
               "--max-valid-pairs", "28", *template, nproc=2)
    rm = tmp_path / "rm" / "model"
    rl = ["--preset", "tiny", "--policy", world / "base", "--data-root", world / "data", "--reward-models", rm,
          "--iterations", "2", "--rollouts", "8", "--minibatch", "8", "--max-new-tokens", "16", *template]
    run_script(ROOT / "02_train_molma.py", *rl, "--out", tmp_path / "runs" / "molma", nproc=2)
    rl[rl.index("--iterations") + 1] = "1"
    run_script(ROOT / "03_train_baselines.py", *rl, "--method", "so_weighted", "--out", tmp_path / "runs" / "so_weighted", nproc=2)
    last = json.loads((tmp_path / "runs" / "molma" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["amtl/cond_after"] == pytest.approx(1.0, abs=1e-4) and last["response/length"] > 0
    run_script(ROOT / "04_evaluate.py", "--preset", "tiny", "--runs-dir", tmp_path / "runs", "--policy", world / "base",
               "--data-root", world / "data", "--reward-models", rm, "--num-prompts", "16",
               "--rm-eval-size", "20", "--bootstrap", "50", *template, nproc=2)
    report = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    assert set(report["win_rates"]) == {"reference", "so_weighted"}
    answers = [json.loads(l) for l in (tmp_path / "runs" / "report" / "answers.jsonl").read_text().splitlines()]
    assert not any(special in a["answer"] for a in answers for special in tok.all_special_tokens)
    # the format travels with every folder the stages wrote
    for folder in (rm, tmp_path / "runs" / "molma" / "policy", tmp_path / "runs" / "so_weighted" / "policy"):
        assert bk.recorded_prompt_format(str(folder)) == ARCHS[arch]


@torch.no_grad()
def test_scores_and_logprobs_ignore_padding_with_these_tokenizers(other_world, tmp_path):
    import transformers

    arch, world = other_world
    tok = bk.load_tokenizer(str(world / "base"), ARCHS[arch])
    cfg = transformers.AutoConfig.from_pretrained(world / "base")
    C.set_seed(0)
    rm = C.load_score_model(str(world / "base"), tok, "reward", ["help"])       # pi_0's backbone, a new head
    prompts = ["how do i bake bread ?", "can you tell me how to pick a lock ? thank you ."]
    answers = ["sure .", "i can not help with that , but you could call a locksmith ."]
    alone = [C.sequence_scores(rm, *C.encode_pairs(tok, [p], [a], 64, ARCHS[arch])[:2])[0] for p, a in zip(prompts, answers)]
    ids, mask, _ = C.encode_pairs(tok, prompts, answers, 64, ARCHS[arch])
    assert (ids[0, mask[0].sum():] == tok.pad_token_id).all()                # padded with the real pad id
    batch = C.sequence_scores(rm, ids, mask)
    for i in range(2):
        torch.testing.assert_close(batch[i], alone[i], rtol=1e-5, atol=1e-5)
    # saved, the folder scores the same in transformers' pipeline, fed the template's text (its tokenizer adds BOS)
    bk.write_pretrained(tmp_path / "rm", rm, rm.state_dict(), tok)
    # (the tiny Qwen2 world's word-level tokenizer is saved as the generic fast class, which AutoTokenizer rebuilds
    # as Qwen2's BPE class from the config: it is handed over as loaded. A real Qwen2 tokenizer round-trips.)
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none",
                                 **({"tokenizer": C.auto_tokenizer(str(tmp_path / "rm"))} if arch == "qwen2" else {}))
    for p, a, want in zip(prompts, answers, alone):
        text = C.prompt_text(tok, p, ARCHS[arch]) + C.answer_separator(ARCHS[arch]) + a
        assert pipe(text)[0]["score"] == pytest.approx(want[0].item(), abs=1e-4)
    lm = transformers.AutoModelForCausalLM.from_pretrained(world / "base").eval()
    p_ids, p_mask = C.encode_prompts(tok, prompts, 64, ARCHS[arch])
    resp = torch.tensor([[5, 6, tok.eos_token_id], [7, tok.eos_token_id, tok.eos_token_id]])
    r_mask = C.response_mask(resp, tok.eos_token_id)
    batched = C.response_logprobs(lm, torch.cat([p_ids, resp], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1])
    for i in range(2):
        n_p = int(p_mask[i].sum())
        s = torch.cat([p_ids[i, -n_p:], resp[i]])[None]
        alone_lp = C.response_logprobs(lm, s, torch.ones_like(s), n_p)
        n = int(r_mask[i].sum())
        torch.testing.assert_close(batched[i, :n], alone_lp[0, :n], rtol=1e-5, atol=1e-5)
    assert cfg.model_type == arch


@pytest.mark.parametrize("name", ["Phi", "Llama", "Mistral", "Qwen2", "Gemma"])
def test_decoder_layers_are_found_for_the_common_architectures(name):
    import transformers

    cfg = getattr(transformers, f"{name}Config")(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                   num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    for head in ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification"):
        model = getattr(transformers, f"{name}{head}")(cfg)
        layers = C.decoder_layers(model)
        assert len(layers) == 3 and layers is model.model.layers


def test_a_model_without_known_layers_is_a_clear_error():
    with pytest.raises(SystemExit, match="Linear: cannot find its decoder layers"):
        C.decoder_layers(torch.nn.Linear(2, 2))


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# transformers 5 has no *ForTokenClassification for Gemma 3 or OLMo 2, and no *ForSequenceClassification for Granite or
# Cohere: the project's ScoreModel is every architecture's reward model and critic
SCORE_ARCHS = ["Phi", "Llama", "Mistral", "Qwen2", "Gemma3Text", "Olmo2", "Granite", "Cohere"]


@pytest.mark.parametrize("name", SCORE_ARCHS)
@torch.no_grad()
def test_reward_model_and_critic_on_any_decoder_save_load_and_read_in_transformers(name, tmp_path):
    from types import SimpleNamespace

    import transformers

    C.set_seed(0)
    base = tmp_path / "base"
    lm = transformers.AutoModelForCausalLM.from_config(getattr(transformers, f"{name}Config")(**TINY))
    lm.save_pretrained(base)
    bk.check_can_build(str(base), "--policy")                 # from config.json alone: builds, and FSDP finds its layers
    tok = SimpleNamespace(pad_token_id=0)
    ids = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for head, labels in (("reward", ["help", "safe"]), ("critic", ["help", "safe", "honest"])):
        model = C.load_score_model(str(base), tok, head, labels)
        backbone = lm.base_model.state_dict()
        assert all(torch.equal(v, backbone[k]) for k, v in model.base_model.state_dict().items())   # pi_0's backbone
        out = model(input_ids=ids, attention_mask=mask, position_ids=C.position_ids_from_mask(mask))
        assert out.shape == (2, 5, len(labels))
        folder = tmp_path / head
        bk.write_pretrained(folder, model, model.state_dict())
        kind = {"reward": "sequence_classifier", "critic": "token_classifier"}[head]
        bk.check_model_folder(str(folder), head, kind)
        back = C.load_score_model(str(folder), tok, head)
        assert back.config.id2label == dict(enumerate(labels))
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, position_ids=C.position_ids_from_mask(mask)),
                                   out)
        cls = C.transformers_head_class(model.config, head)
        if cls is None:                                     # the folder names the backbone; it loads as AutoModel
            assert name in ("Granite", "Cohere", "Gemma3Text", "Olmo2") and model.config.architectures == [f"{name}Model"]
            continue
        assert model.config.architectures == [cls]
        auto = (transformers.AutoModelForSequenceClassification if head == "reward"
                else transformers.AutoModelForTokenClassification).from_pretrained(folder).eval()
        if head == "reward":                               # transformers' own pooling: the last token that is not pad
            torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask).logits,
                                       C.sequence_scores(model, ids, mask), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(auto(input_ids=ids[:1]).logits, out[:1], rtol=1e-5, atol=1e-5)
    expected = {"Phi": (1, 1), "Llama": (1, 1), "Mistral": (1, 1), "Qwen2": (1, 1), "Gemma3Text": (1, 0),
                "Olmo2": (1, 0), "Granite": (0, 0), "Cohere": (0, 0)}[name]
    assert tuple(int(C.transformers_head_class(lm.config, h) is not None) for h in ("reward", "critic")) == expected


def test_a_model_that_is_no_decoder_is_refused_from_its_config_alone(tmp_path):
    import transformers

    transformers.T5Config(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(SystemExit, match=r"--policy .*t5: this project cannot train a .*'t5'.*no AutoModelForCausalLM"):
        bk.check_can_build(str(tmp_path / "t5"), "--policy")
    # a decoder whose blocks are not where FSDP looks: refused naming it, before any weight is read
    transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, is_decoder=True).save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit, match=r"--reward-models .*bert: a .*'bert'.*: cannot find its decoder layers"):
        bk.check_can_build(str(tmp_path / "bert"), "--reward-models", ("backbone",))


# every stage on more decoders, one process each (their two-rank FSDP path is the one Llama and Qwen2 take above):
# architecture -> the stages' --prompt-template (00 --arch gives each its tokenizer's conventions)
MORE_ARCHS = {"gemma3": "plain", "mistral": "phi2", "olmo2": "phi2", "granite": "phi2", "cohere": "phi2"}


@pytest.fixture(scope="module")
def more_pipelines(tmp_path_factory):
    """00 -> 04 for each of MORE_ARCHS, stage by stage, the architectures' runs side by side (run_together);
    -> {arch: (its folder, {stage: what it printed})}."""
    root = tmp_path_factory.mktemp("more_archs")
    dirs = {arch: root / arch for arch in MORE_ARCHS}
    printed = {arch: {} for arch in MORE_ARCHS}

    def stage(name, command):
        outs = run_together(*(command(arch, d, ["--prompt-template", MORE_ARCHS[arch]]) for arch, d in dirs.items()))
        for arch, o in zip(dirs, outs):
            printed[arch][name] = o.stdout + o.stderr

    stage("00", lambda a, d, t: [ROOT / "00_make_tiny_world.py", "--arch", a, "--out", d / "world", "--pretrain-steps",
                                 "60", "--pretrain-texts", "600", "--pku-train", "600", "--hh-harmless-train", "600",
                                 "--alpaca", "600", "--samples", "10"])
    stage("01", lambda a, d, t: [ROOT / "01_train_reward.py", "--preset", "tiny", "--objective", "help,safe",
                                 "--base-model", d / "world" / "base", "--data-root", d / "world" / "data", "--out",
                                 d / "rm", "--max-pairs", "56", "--eval-every", "1000", "--max-valid-pairs", "28", *t])
    rl = lambda d, t: ["--preset", "tiny", "--policy", d / "world" / "base", "--data-root", d / "world" / "data",
                       "--reward-models", d / "rm" / "model", "--iterations", "1", "--rollouts", "8", "--minibatch", "8",
                       "--max-new-tokens", "16", *t]
    stage("02", lambda a, d, t: [ROOT / "02_train_molma.py", *rl(d, t), "--out", d / "runs" / "molma"])
    stage("03", lambda a, d, t: [ROOT / "03_train_baselines.py", *rl(d, t), "--method", "so_weighted", "--out",
                                 d / "runs" / "so_weighted"])
    stage("04", lambda a, d, t: [ROOT / "04_evaluate.py", "--preset", "tiny", "--runs-dir", d / "runs", "--policy",
                                 d / "world" / "base", "--data-root", d / "world" / "data", "--reward-models",
                                 d / "rm" / "model", "--num-prompts", "16", "--rm-eval-size", "20", "--bootstrap", "50", *t])
    return {arch: (dirs[arch], printed[arch]) for arch in MORE_ARCHS}


@pytest.mark.parametrize("arch", sorted(MORE_ARCHS))
def test_every_stage_runs_on_more_decoders(more_pipelines, arch):
    import transformers

    folder, printed = more_pipelines[arch]
    cfg = transformers.AutoConfig.from_pretrained(folder / "world" / "base")
    assert cfg.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    for name in ("molma", "so_weighted"):          # trained, saved, read back by transformers, checkpoint removed
        run = folder / "runs" / name
        assert transformers.AutoModelForCausalLM.from_pretrained(run / "policy").config.model_type == cfg.model_type
        assert not (run / "checkpoint").exists() and f"removed the resume checkpoint {run / 'checkpoint'}" in printed[
            "02" if name == "molma" else "03"]
    rm = json.loads((folder / "rm" / "model" / "config.json").read_text())
    assert rm["molma_score_head"] == "reward" and rm["id2label"] == {"0": "help", "1": "safe"}
    report = json.loads((folder / "runs" / "report" / "report.json").read_text())
    assert set(report["win_rates"]) == {"reference", "so_weighted"} and set(report["eos_rate"]) == {
        "reference", "molma", "so_weighted"}
    answers = [json.loads(l) for l in (folder / "runs" / "report" / "answers.jsonl").read_text().splitlines()]
    tok = bk.load_tokenizer(str(folder / "world" / "base"), MORE_ARCHS[arch])
    assert not any(special in a["answer"] for a in answers for special in tok.all_special_tokens)
    if arch == "gemma3":       # pi_0 ends its answers with <end_of_turn>, the second end token its generation_config names
        model = transformers.AutoModelForCausalLM.from_pretrained(folder / "world" / "base")
        assert C.end_token_ids(model, tok) == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
        assert report["eos_rate"]["reference"] > 0.3


@torch.no_grad()
def test_a_reward_model_saved_again_in_shards_loads_and_a_mismatched_config_is_named(tmp_path, capsys):
    """A reward-model folder re-saved by transformers in shards (model.safetensors.index.json) is complete: it loads
    and scores the same (its recorded checksum is said not to apply). A config.json whose labels do not match the
    weights' head is refused by name before anything loads."""
    from types import SimpleNamespace

    import transformers

    C.set_seed(0)
    tok = SimpleNamespace(pad_token_id=0)
    rm = C.ScoreModel(transformers.AutoModel.from_config(transformers.LlamaConfig(**TINY)), ["help"], "reward").eval()
    bk.write_pretrained(tmp_path / "rm", rm, rm.state_dict())
    sharded = tmp_path / "sharded"
    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").save_pretrained(
        sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    bk.check_model_folder(str(sharded), "--reward-models", "sequence_classifier")
    assert "was saved again in shards" in capsys.readouterr().out
    ids = torch.tensor([[2, 5, 6, 7]])
    torch.testing.assert_close(C.load_score_model(str(sharded), tok, "reward")(input_ids=ids), rm(input_ids=ids))
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "help", "1": "safe"}, {"help": 0, "safe": 1}
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"names 2 objectives \(help, safe\) but its score head has 1 output"):
        bk.check_model_folder(str(tmp_path / "rm"), "--reward-models", "sequence_classifier")
