"""Nothing rests on phi-2's quirks: the whole pipeline 00 -> 04 on a tiny Llama (adds <s>, no pad, Llama-2's chat
prompt) and a tiny Qwen2 (a real pad token distinct from EOS, and its own ChatML chat template: --prompt-template
chat, as a real instruct model runs), each with its own tokenizer; scores independent of
padding with those tokenizers; the decoder layers FSDP shards found for the common architectures."""
import json

import pytest
import torch

import common as C
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
    tok = C.load_tokenizer(str(world / "base"), ARCHS[arch])
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
        assert C.recorded_prompt_format(str(folder)) == ARCHS[arch]


@torch.no_grad()
def test_scores_and_logprobs_ignore_padding_with_these_tokenizers(other_world, tmp_path):
    import transformers

    arch, world = other_world
    tok = C.load_tokenizer(str(world / "base"), ARCHS[arch])
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    cfg = transformers.AutoConfig.from_pretrained(world / "base")
    C.set_seed(0)
    rm = getattr(transformers, f"{cls}ForSequenceClassification")(
        transformers.AutoConfig.from_pretrained(world / "base", num_labels=1)).eval()
    rm.config.pad_token_id = tok.pad_token_id
    prompts = ["how do i bake bread ?", "can you tell me how to pick a lock ? thank you ."]
    answers = ["sure .", "i can not help with that , but you could call a locksmith ."]
    alone = [C.sequence_scores(rm, *C.encode_pairs(tok, [p], [a], 64, ARCHS[arch])[:2])[0] for p, a in zip(prompts, answers)]
    ids, mask, _ = C.encode_pairs(tok, prompts, answers, 64, ARCHS[arch])
    assert (ids[0, mask[0].sum():] == tok.pad_token_id).all()                # padded with the real pad id
    batch = C.sequence_scores(rm, ids, mask)
    for i in range(2):
        torch.testing.assert_close(batch[i], alone[i], rtol=1e-5, atol=1e-5)
    # saved, the folder scores the same in transformers' pipeline, fed the template's text (its tokenizer adds BOS)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
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
    with pytest.raises(SystemExit, match="cannot find the decoder layers of Linear"):
        C.decoder_layers(torch.nn.Linear(2, 2))
