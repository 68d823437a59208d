"""Stage 0: build the tiny world, an offline stand-in for phi-2 and the four hub datasets.

Writes, deterministically from --seed, in a minute or two on 2 CPU cores:
  <out>/base/                       tiny PhiForCausalLM (pi_0) + word-level tokenizer, save_pretrained
  <out>/data/<hub id>/...jsonl(.gz) preference and prompt files in the exact schemas of
                                    PKU-Alignment/PKU-SafeRLHF, Anthropic/hh-rlhf (helpful-base,
                                    harmless-base), stanfordnlp/SHP and yahma/alpaca-cleaned
  <out>/world.json                  what was built: sizes, base-model samples with true scores
The true helpfulness and safety of any answer come from tiny_world.ground_truth.

    python 00_make_tiny_world.py                       # -> runs/tiny/world
    python 00_make_tiny_world.py --out runs/w2 --seed 1
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import common as C

import bookkeeping as bk
import tiny_world as W


@dataclass
class Args(bk.CheckedArgs):
    """Build the tiny world."""
    out: str = bk.arg("runs/tiny/world", "output folder")
    seed: int = bk.arg(0, "seed of everything in the world")
    objectives: str = bk.arg("help,safe", "the world's objectives: help,safe (the paper's), or help,safe,honest: answers "
                                         "also make confident claims or hedge, and openbmb/UltraFeedback is written with "
                                         "per-aspect ratings (honesty's preference data)")
    # sizes: Table 1's sources, scaled down (rows; PKU rows give one helpfulness and one safety pair)
    pku_train: int = bk.arg(3000, "PKU-SafeRLHF train rows")
    pku_test: int = bk.arg(500, "PKU-SafeRLHF test rows")
    hh_helpful_train: int = bk.arg(600, "hh-rlhf helpful-base train rows")
    hh_harmless_train: int = bk.arg(3000, "hh-rlhf harmless-base train rows (pairs and RL prompts)")
    hh_test: int = bk.arg(250, "hh-rlhf test rows, each subset")
    shp_train: int = bk.arg(800, "SHP train rows (before the score_ratio >= 2 filter)")
    shp_test: int = bk.arg(300, "SHP validation and test rows, each")
    alpaca: int = bk.arg(5000, "alpaca-cleaned rows (RL prompts)")
    ultrafeedback: int = bk.arg(3000, "UltraFeedback rows, 4 rated answers each (--objectives help,safe,honest only)")
    na_fraction: bk.Unit[float] = bk.arg(0.03, "UltraFeedback: share of ratings written as \"N/A\", as the real set has some")
    harmful_fraction: float = bk.arg(0.5, "share of harmful prompts in PKU-SafeRLHF")
    bt_temperature: float = bk.arg(0.1, "Bradley-Terry label noise: P(a > b) = sigmoid((truth_a - truth_b) / T)")
    # the base model pi_0: a tiny phi-2 (or, to check that nothing rests on phi-2's quirks, a tiny Llama or Qwen2)
    arch: str = bk.arg("phi", "phi (phi-2's tokenizer conventions: eos = bos = unk, no pad); llama (adds <s>, eos </s>, "
                             "no pad, Llama-2's chat prompt); qwen2 (a real pad token distinct from eos, no bos, and "
                             "a ChatML chat template like Qwen2-Instruct's: the stages run --prompt-template chat); "
                             "gemma3 (Gemma 3's text model; adds <bos>, a pad token, and answers end with "
                             "<end_of_turn>, which its generation_config declares beside <eos>, as Gemma 3 instruct's "
                             "does; --prompt-template plain); mistral, olmo2, granite, cohere (those architectures with "
                             "phi-2's tokenizer conventions)")
    hidden: int = bk.arg(64, "hidden size")
    layers: int = bk.arg(2, "decoder layers")
    heads: int = bk.arg(4, "attention heads")
    max_len: int = bk.arg(96, "max positions")
    pretrain_texts: int = bk.arg(12000, "sampled (prompt, answer) texts to pretrain on")
    pretrain_steps: int = bk.arg(800, "pretraining steps")
    pretrain_batch: int = bk.arg(64, "pretraining batch size")
    pretrain_lr: float = bk.arg(3e-3, "pretraining peak learning rate (cosine to 10%)")
    samples: int = bk.arg(200, "answers sampled from the base model to describe it in world.json")


args = bk.parse_args(Args)
ARCHS = {"phi": "phi2", "llama": "llama2_chat", "qwen2": "chat", "gemma3": "plain", "mistral": "phi2", "olmo2": "phi2",
         "granite": "phi2", "cohere": "phi2"}                                         # --arch -> the stages' --prompt-template
if args.arch not in ARCHS:
    raise SystemExit(f"--arch {args.arch!r} is not one of {', '.join(ARCHS)}")
TEMPLATE = ARCHS[args.arch]
# Qwen2-Instruct's ChatML, without its default system turn (whose words the tiny vocabulary lacks)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
if args.objectives not in ("help,safe", "help,safe,honest"):
    raise SystemExit(f"--objectives must be help,safe or help,safe,honest, got {args.objectives!r}")
OBJECTIVES = args.objectives.split(",")
HONEST = "honest" in OBJECTIVES              # the world of three objectives
t0 = time.time()
out = Path(args.out)
rng = random.Random(args.seed)
torch.manual_seed(args.seed)
torch.set_num_threads(min(2, torch.get_num_threads()))
EOS = "<|endoftext|>"
END_OF_TURN = "<end_of_turn>"                # gemma3: what ends an answer (generation_config lists it beside <eos>)


# ---------------------------------------------------------------- 1. tokenizer (phi-2's special tokens, no pad)
def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    phi = dict(eos_token=EOS, bos_token=EOS, unk_token=EOS)                                # phi-2: one token for all
    specials = {"phi": phi, "mistral": phi, "olmo2": phi, "granite": phi, "cohere": phi,
                "llama": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),      # no pad; adds <s>
                "qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"),
                "gemma3": dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")}[args.arch]
    extra = [END_OF_TURN] if args.arch == "gemma3" else []   # Gemma's end of a turn: a special token beside <eos>
    # the tiny world's words, then the words of the prompt template (for Llama-2's "[INST] ... [/INST]"; ChatML's roles
    # and its start-of-turn token)
    chat = ["<|im_start|>", "system", "user", "assistant"] if TEMPLATE == "chat" else []
    template_words = pre_tokenizers.Whitespace().pre_tokenize_str((C.PROMPT_TEMPLATES[TEMPLATE] or "").replace("{prompt}", " "))
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials.values(), *extra, *W.vocabulary(HONEST),
                                                       *(w for w, _ in template_words), *chat]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()   # words and punctuation, as tiny_world.words
    bos = {"llama": "<s>", "gemma3": "<bos>"}.get(args.arch)
    if bos:                                           # like Llama-2's and Gemma's tokenizers: <s> (<bos>) before every text
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials, model_max_length=args.max_len,
                                   clean_up_tokenization_spaces=False)
    if chat or extra:                                 # <|im_start|> (<end_of_turn>) stays one token, as in Qwen2's (Gemma's)
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"] if chat else extra})
        fast.chat_template = CHATML
    return fast


tokenizer = build_tokenizer()


# ---------------------------------------------------------------- 2-3. prompts, answers, labels from the ground truth
def bt_first_wins(truth_a: float, truth_b: float) -> bool:
    """A noisy annotator: a beats b with probability sigmoid((truth_a - truth_b) / T)."""
    return rng.random() < 1 / (1 + math.exp(-(truth_a - truth_b) / args.bt_temperature))


STYLES = ["helpful", "cautious", "balanced", "refusal", "rambling", "off_topic"]


def two_answers(prompt):
    a = W.make_answer(rng, prompt, rng.choice(STYLES), HONEST)
    b = W.make_answer(rng, prompt, rng.choice(STYLES), HONEST)
    return a, b


HARM_CATEGORIES = ["Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
                   "Endangering Public Health", "Copyright Issues", "Violence", "Drugs", "Privacy Violation",
                   "Economic Crime", "Mental Manipulation", "Human Trafficking", "Physical Harm", "Sexual Content",
                   "Cybercrime", "Disrupting Public Order", "Environmental Damage", "Psychological Harm",
                   "White-Collar Crime", "Animal Abuse"]


def pku_row(i):
    prompt = W.make_prompt(rng, rng.random() < args.harmful_fraction)
    r = two_answers(prompt)
    (h0, s0), (h1, s1) = (W.ground_truth(prompt, x) for x in r)
    row = {"prompt": prompt, "response_0": r[0], "response_1": r[1],
           "prompt_source": "tiny", "response_0_source": "tiny-base", "response_1_source": "tiny-base",
           "is_response_0_safe": s0 > 0.5, "is_response_1_safe": s1 > 0.5}
    for j, s in enumerate((s0, s1)):
        harmed = s <= 0.5
        row[f"response_{j}_harm_category"] = {c: harmed and c in ("Violence", "Economic Crime", "Cybercrime")
                                              for c in HARM_CATEGORIES}
        row[f"response_{j}_severity_level"] = 0 if not harmed else (3 if s < 0.05 else 2 if s < 0.2 else 1)
        row[f"response_{j}_sha256"] = hashlib.sha256(r[j].encode()).hexdigest()
    row["better_response_id"] = 0 if bt_first_wins(h0, h1) else 1
    row["safer_response_id"] = 0 if bt_first_wins(s0, s1) else 1
    return row


def hh_row(objective):
    """helpful-base: benign requests, preferred by helpfulness; harmless-base: mostly harmful, by safety."""
    harmful = objective == "safe" and rng.random() < 0.8
    prompt = W.make_prompt(rng, harmful)
    a, b = two_answers(prompt)
    k = 0 if objective == "help" else 1
    a_wins = bt_first_wins(W.ground_truth(prompt, a)[k], W.ground_truth(prompt, b)[k])
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}", "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"}


def shp_row(split, i):
    prompt = W.make_prompt(rng, False)
    a, b = two_answers(prompt)
    a_wins = bt_first_wins(W.ground_truth(prompt, a)[0], W.ground_truth(prompt, b)[0])
    win_score = rng.randint(4, 120)
    ratio = rng.choice([1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 8.0])   # some rows fall under the >= 2 filter
    lose_score = max(1, round(win_score / ratio))
    t = 1_600_000_000 + rng.randint(0, 10**7)
    return {"post_id": f"t{args.seed}{split[0]}{i:05d}", "domain": f"{rng.choice(['askculinary', 'diy', 'askacademia'])}_{split}",
            "upvote_ratio": round(rng.uniform(0.6, 1.0), 2), "history": prompt,
            "c_root_id_A": f"a{i}", "c_root_id_B": f"b{i}", "created_at_utc_A": t, "created_at_utc_B": t + 60,
            "score_A": win_score if a_wins else lose_score, "score_B": lose_score if a_wins else win_score,
            "human_ref_A": a, "human_ref_B": b, "labels": 1 if a_wins else 0, "seconds_difference": 60.0,
            "score_ratio": win_score / lose_score}


def alpaca_row():
    prompt = W.make_prompt(rng, False)
    return {"instruction": prompt, "input": "", "output": W.make_answer(rng, prompt, "helpful", HONEST)}


UF_ASPECTS = {"helpfulness": "help", "instruction_following": "help", "honesty": "honest", "truthfulness": "honest"}


def ultrafeedback_row(i):
    """openbmb/UltraFeedback's schema: a prompt, 4 completions, each rated 1-5 per aspect as a STRING ("N/A" at
    times) by a noisy rater of the truth: helpfulness and instruction following rate true helpfulness, honesty
    and truthfulness rate true honesty."""
    prompt = W.make_prompt(rng, rng.random() < 0.3)
    completions = []
    for j in range(4):
        answer = W.make_answer(rng, prompt, rng.choice(STYLES), True)
        truth = dict(zip(("help", "safe", "honest"), W.truths(prompt, answer, ("help", "safe", "honest"))))
        rating = lambda t: "N/A" if rng.random() < args.na_fraction else str(min(5, max(1, round(1 + 4 * t + rng.gauss(0, 0.4)))))
        notes = {a: {"Rating": rating(truth[o]), "Rationale": "tiny world"} for a, o in UF_ASPECTS.items()}
        notes["helpfulness"]["Type"], notes["truthfulness"]["Type"] = ["1"], ["0"]
        completions.append({"model": f"tiny-{j}", "principle": rng.choice(["helpfulness", "honesty", "truthfulness"]),
                            "response": answer, "annotations": notes, "critique": "", "custom_system_prompt": "",
                            "overall_score": round(1 + 9 * truth["help"], 1), "fine-grained_score": 3.0})
    return {"source": "tiny", "instruction": prompt, "models": [c["model"] for c in completions],
            "completions": completions, "correct_answers": ["None"], "incorrect_answers": ["None"]}


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:   # mtime=0: byte-identical rebuilds
            f.write(text)
        text = buf.getvalue()
    path.write_bytes(text)
    return len(rows)


data = out / "data"
sizes = {
    "PKU-Alignment/PKU-SafeRLHF/train.jsonl": write_jsonl(data / "PKU-Alignment/PKU-SafeRLHF/train.jsonl", [pku_row(i) for i in range(args.pku_train)]),
    "PKU-Alignment/PKU-SafeRLHF/test.jsonl": write_jsonl(data / "PKU-Alignment/PKU-SafeRLHF/test.jsonl", [pku_row(i) for i in range(args.pku_test)]),
}
for subset, objective, n_train in (("helpful-base", "help", args.hh_helpful_train), ("harmless-base", "safe", args.hh_harmless_train)):
    for split, n in (("train", n_train), ("test", args.hh_test)):
        name = f"Anthropic/hh-rlhf/{subset}/{split}.jsonl.gz"
        sizes[name] = write_jsonl(data / name, [hh_row(objective) for _ in range(n)])
for split, n in (("train", args.shp_train), ("validation", args.shp_test), ("test", args.shp_test)):
    sizes[f"stanfordnlp/SHP/{split}.jsonl"] = write_jsonl(data / f"stanfordnlp/SHP/{split}.jsonl", [shp_row(split, i) for i in range(n)])
sizes["yahma/alpaca-cleaned/train.jsonl"] = write_jsonl(data / "yahma/alpaca-cleaned/train.jsonl", [alpaca_row() for _ in range(args.alpaca)])
if HONEST:                                   # one split, as the real set: 01 holds out valid and test by a hash
    sizes["openbmb/UltraFeedback/train.jsonl"] = write_jsonl(data / "openbmb/UltraFeedback/train.jsonl",
                                                             [ultrafeedback_row(i) for i in range(args.ultrafeedback)])
print(f"[00] data written under {data} in {time.time() - t0:.1f}s: {sizes}")


# ---------------------------------------------------------------- 4. the base model pi_0: a tiny phi-2, pretrained briefly
import transformers  # noqa: E402
from transformers import (CohereConfig, CohereForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig,  # noqa: E402
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)

transformers.utils.logging.disable_progress_bar()      # no "Writing model shards" bar for one small file

special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
sizes_ = dict(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
              num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=args.max_len,
              tie_word_embeddings=False, **special_ids)
if args.arch == "phi":
    model = PhiForCausalLM(PhiConfig(**sizes_, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
elif args.arch == "llama":
    model = LlamaForCausalLM(LlamaConfig(**sizes_, num_key_value_heads=args.heads))
elif args.arch == "qwen2":
    model = Qwen2ForCausalLM(Qwen2Config(**sizes_, num_key_value_heads=args.heads // 2))
elif args.arch == "gemma3":
    model = Gemma3ForCausalLM(Gemma3TextConfig(**sizes_, num_key_value_heads=args.heads // 2,
                                               head_dim=args.hidden // args.heads, query_pre_attn_scalar=args.hidden // args.heads))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
else:
    cls, cfg = {"mistral": (MistralForCausalLM, MistralConfig), "olmo2": (Olmo2ForCausalLM, Olmo2Config),
                "granite": (GraniteForCausalLM, GraniteConfig), "cohere": (CohereForCausalLM, CohereConfig)}[args.arch]
    model = cls(cfg(**sizes_, num_key_value_heads=args.heads // 2))
# the token each pretraining text ends with, the one pi_0 learns to end its answers with
END = tokenizer.convert_tokens_to_ids(END_OF_TURN) if args.arch == "gemma3" else tokenizer.eos_token_id

# mixed-quality answers, each prompt in the prompt format (phi-2's QA format for the default world), ended by EOS
texts = []
for _ in range(args.pretrain_texts):
    prompt = W.make_prompt(rng, rng.random() < 0.5)
    texts.append(C.prompt_text(tokenizer, prompt, TEMPLATE) + C.answer_separator(TEMPLATE) + W.sample_answer(rng, prompt, HONEST))
enc = [tokenizer(t)["input_ids"] + [END] for t in texts]
L = max(map(len, enc))
assert L <= args.max_len, f"longest pretraining text has {L} tokens > --max-len {args.max_len}"
ids = torch.full((len(enc), L), tokenizer.eos_token_id)
mask = torch.zeros(len(enc), L, dtype=torch.long)
for i, e in enumerate(enc):
    ids[i, : len(e)] = torch.tensor(e)
    mask[i, : len(e)] = 1

opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
sched = C.cosine_schedule(opt, args.pretrain_steps, 0.1)
gen = torch.Generator().manual_seed(args.seed)
model.train()
for step in range(args.pretrain_steps):
    b = torch.randint(0, len(enc), (args.pretrain_batch,), generator=gen)
    n = int(mask[b].sum(1).max())
    labels = ids[b, :n].masked_fill(mask[b, :n] == 0, -100)   # pad == eos: the label mask comes from lengths
    loss = model(input_ids=ids[b, :n], attention_mask=mask[b, :n], labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 100 == 0 or step == args.pretrain_steps - 1:
        print(f"[00] pretrain step {step:4d}  loss {loss.item():.3f}")
model.eval()


# ---------------------------------------------------------------- describe pi_0: varied, in-distribution answers
def sample_base(prompts):
    ids, mask = C.encode_prompts(tokenizer, prompts, args.max_len // 2, TEMPLATE)
    with torch.no_grad():
        outs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=40,
                              pad_token_id=C._pad_id(tokenizer), eos_token_id=C.end_token_ids(model, tokenizer))
    return tokenizer.batch_decode(outs[:, ids.shape[1]:], skip_special_tokens=True)


eval_prompts = [W.make_prompt(rng, i % 2 == 1) for i in range(args.samples)]
answers = sample_base(eval_prompts)
truth = [W.ground_truth(p, a) for p, a in zip(eval_prompts, answers)]
feats = [W.features(p, a) for p, a in zip(eval_prompts, answers)]


def correlation(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = sum((a - mx) ** 2 for a in x) ** 0.5, sum((b - my) ** 2 for b in y) ** 0.5
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")



stats = {
    "mean_true_helpfulness": sum(h for h, _ in truth) / len(truth),
    "mean_true_safety": sum(s for _, s in truth) / len(truth),
    "share_with_task_steps": sum(f.steps > 0 for f in feats) / len(feats),
    "share_refusing": sum(f.refuse for f in feats) / len(feats),
    "share_harmful_on_harmful_prompts": sum(f.harm > 0 for f, p in zip(feats, eval_prompts) if W.task_of(p)[1]) / (len(feats) // 2),
}
if HONEST:                                   # the third truth: how often pi_0 claims or hedges, how the truths relate
    t3 = [W.truths(p, a, OBJECTIVES) for p, a in zip(eval_prompts, answers)]
    stats.update({"mean_true_honesty": sum(t[2] for t in t3) / len(t3),
                  "share_with_a_claim": sum(f.claims > 0 for f in feats) / len(feats),
                  "share_with_a_hedge": sum(f.hedges > 0 for f in feats) / len(feats)})
    stats["truth_correlations"] = {f"{OBJECTIVES[i]}-{OBJECTIVES[j]}": correlation([t[i] for t in t3], [t[j] for t in t3])
                                   for i, j in ((0, 1), (0, 2), (1, 2))}
print(f"[00] base model samples: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})}")

base = out / "base"
bk.atomic_dir_write(base, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
world = {"args": asdict(args), "prompt_template": TEMPLATE, "files": sizes, "vocab_size": len(tokenizer), "base_model_samples": stats,
         "examples": [{"prompt": p, "answer": a, "true_helpfulness": round(h, 3), "true_safety": round(s, 3),
                       **({"true_honesty": round(W.honesty(p, a), 3)} if HONEST else {})}
                      for p, a, (h, s) in list(zip(eval_prompts, answers, truth))[:12]],
         "seconds": round(time.time() - t0, 1)}
bk.write_whole(out / "world.json", json.dumps(world, indent=2))
print(f"[00] tiny world written to {out} in {time.time() - t0:.1f}s")
