"""Stage 4: the paper's evaluation (MOLMA Sec. 4.2, 4.4-4.8): evaluate, then render a report that reads without
running anything.

Evaluate (the models answer, the reward models score; torchrun, prompts split across ranks): every number goes into
<out>/report.json, and every answer into <out>/answers.jsonl. Render (rank 0, plain Python): the figures and
report.md are drawn from report.json alone. In the paper's numbering:
  Table 2    reward-model accuracy on test pairs never seen in training or validation (and reference reward models);
  Figure 2a  the same test prompts answered by the reference model, MOLMA and every baseline run found, scored by
             RMhelp and RMsafe; MOLMA's win rate against each per objective (a tie is half a win), 95% bootstrap CI;
  Figure 2b  a blinded human-evaluation sheet, and its win rates once filled (--human-sheets);
  Figure 3   the reward distributions: a (helpfulness, safety) scatter per model;
  Figure 4   MOLMA against every so_weighted run found, by its helpfulness weight;
  Table 3    training time from the run summaries, and MOLMA's ratio to the single-objective runs.
Beyond the paper: Fast RL's yardstick (worst case, disparity), the training curves, the Lagrangian's multiplier,
what the policies said during training, and on the tiny world the ground truth (Pareto front, hypervolume).
Over seeds (`./run.sh study`, two or three objectives) is stage 5, 05_study.py, from the per-seed report.json
files this stage writes: means and intervals, paired differences, equal KL, how many weightings matched MOLMA.

Tiny world (after stages 0-3):
    torchrun --standalone --nproc_per_node=2 04_evaluate.py --preset tiny
One node of 8 GPUs (the paper):
    torchrun --standalone --nproc_per_node=8 04_evaluate.py --runs-dir runs/paper
The same seed gives the same report on CPU.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import bookkeeping as bk
import common as C
from human_eval import human_sheets_report, write_human_sheet
from report import BASELINES, SIDE_BY_SIDE, render
from stats import bootstrap_ci, hypervolume, pareto_front, win_rate, worst_case_and_disparity

# Runs reported when their folder holds one, never counted missing: MOLMA with 02 --aligner representation
EXTRA_RUNS = ["molma_representation"]
TABLE2 = [("help", "shp", "Stanford SHP"), ("help", "hh_helpful", "Anthropic Helpful"), ("safe", "hh_harmless", "Anthropic Harmless"),
          ("help", "pku_help", "PKU-SafeRLHF (helpfulness)"), ("safe", "pku_safe", "PKU-SafeRLHF (safety)"),
          ("honest", "ultrafeedback_honesty", "UltraFeedback (honesty)")]     # the last: with honest only


@dataclass
class Args(bk.CheckedArgs):
    """Evaluate the reward models, MOLMA and the baselines as the paper does, and write the report."""
    runs_dir: str = bk.arg("runs/paper", "folder holding molma/, so_*/ and fast_rl/ runs (stages 2-3)")
    models: str = bk.arg("", "instead of discovery: comma list of name=policy_folder")
    policy: str = bk.arg("microsoft/phi-2", "the reference model pi_0")
    reward_models: str = bk.arg("runs/paper/rm_help/model,runs/paper/rm_safe/model", "RMhelp and RMsafe (stage 1), and "
                                                                                  "RMhonest with --objectives help,safe,honest")
    objectives: str = bk.arg("help,safe", "what every model is evaluated on: help,safe (the paper's) or help,safe,honest")
    data_root: str = bk.arg("", "local copies of the datasets in their hub schemas; empty: read the hub")
    prompt_template: str = bk.arg("phi2", "prompt format, the same in every stage: phi2, llama2_chat, plain, or "
                                           "chat (the tokenizer's own chat template)")
    out: str = bk.arg("", "report folder (default: <runs-dir>/report)")
    num_prompts: bk.Positive[int] = bk.arg(1000, "test prompts answered by every model (Sec. 4.5.1)")
    rm_eval_size: bk.Positive[int] = bk.arg(1000, "test pairs per Table 2 column (Sec. 4.4)")
    max_prompt_len: bk.Positive[int] = bk.arg(256, "prompt tokens kept")
    max_new_tokens: bk.Positive[int] = bk.arg(256, "answer length limit")
    temperature: bk.Positive[float] = bk.arg(1.0, "sampling temperature (no top-k / top-p)")
    batch_size: bk.Positive[int] = bk.arg(32, "prompts per generate call, per rank")
    precision: str = bk.arg("auto", "auto: bf16 on GPU, fp32 on CPU; or bf16 / fp32 anywhere (the models and reward "
                                   "models every rank holds in full)")
    bootstrap: bk.Positive[int] = bk.arg(1000, "bootstrap resamples for the 95% intervals")
    human_eval_prompts: bk.NonNegative[int] = bk.arg(100, "Figure 2b: random test prompts in the blinded human-evaluation sheet "
                                                        "(Sec. 4.5.2: 100)")
    human_eval_models: str = bk.arg("reference,molma,so_help,so_safe,so_weighted,so_piecewise",
                                   "Figure 2b: the models whose answers evaluators rank (the paper's six)")
    peer_timeout: bk.Positive[float] = bk.arg(600.0, "seconds without a heartbeat from a rank (stopped, stuck, its "
                                                   "host frozen) before the run names it and stops; no collective "
                                                   "waits more than twice this")
    dry_run: bool = bk.arg(False, "find and check every model, load the reward models and the data, print what the "
                                 "evaluation would do and each rank's peak memory, and exit")
    human_sheets: str = bk.arg("", "Figure 2b: comma list of filled sheets (CSV), one per evaluator, read against the "
                                  "key they were made with (<out>/human_eval_keys/<sheet_id>.json); no model is "
                                  "loaded and nothing is sampled again: writes <out>/human_eval/results.md")
    wandb_project: str = bk.arg("", "also log the report's numbers and figures to this Weights & Biases project "
                                   "(needs `pip install wandb`)")
    overwrite: bool = bk.arg(False, "replace the report in --out (its human-evaluation keys are kept); without it an "
                                   "existing report stops the evaluation before anything loads")
    reference_rms: str = bk.arg("", "Table 2's open-source reward models, comma list of name=hub_id_or_folder, e.g. "
                                   "oasst=OpenAssistant/reward-model-deberta-v3-large-v2,steamshp=stanfordnlp/SteamSHP-flan-t5-xl; "
                                   "a sequence classifier reads (question, answer) as a text pair, a T5 the SteamSHP prompt")
    ground_truth: bool = bk.arg(False, "tiny world only: score every answer with tiny_world.ground_truth")
    study: str = bk.arg("", "moved: the report over seeds is stage 5, `python 05_study.py --study <folder>`")
    seed: int = bk.arg(0, "seed")


PRESETS = {"tiny": dict(runs_dir="runs/tiny", policy="runs/tiny/world/base",
                        reward_models="runs/tiny/rm_help/model,runs/tiny/rm_safe/model", data_root="runs/tiny/world/data",
                        num_prompts=300, max_prompt_len=32, max_new_tokens=40, ground_truth=True)}




# ======================================================================================================================
# 2. EVALUATE: the models answer, the reward models score; every number of the report goes into report.json
# ======================================================================================================================
def true_scores(prompt: str, answer: str, objectives=("help", "safe")) -> tuple[float, ...]:
    """Tiny world only (--ground-truth): the answer's true scores, in the order of objectives; the world is imported
    on demand."""
    import tiny_world

    return tiny_world.truths(prompt, answer, tuple(objectives))


def find_models(args) -> tuple[dict[str, str], dict[str, str], dict[str, dict]]:
    """-> ({name: policy folder}, {run name: why it is not evaluated}, {name: run_summary}); pi_0 first.

    A run folder without a trained policy (a dry run, a crash before the end, a run still training) is listed as
    not trained, with its last checkpoint's iteration, and never blocks the report: pi_0 alone is evaluated too."""
    runs_dir, missing = Path(args.runs_dir), {}
    if args.models:
        models = dict(item.split("=", 1) for item in args.models.split(","))
    else:
        models = {}
        names = ["molma", *BASELINES]
        names += sorted(p.name for p in runs_dir.glob("so_weighted?*") if p.is_dir())
        names += [n for n in EXTRA_RUNS if (runs_dir / n).is_dir()]      # when there is one
        for name in names:
            run = runs_dir / name
            if (run / "policy" / "config.json").exists():
                models[name] = str(run / "policy")
            elif not run.exists():
                missing[name] = "no run"
            else:
                it = bk.checkpoint_iteration(run / "checkpoint")
                missing[name] = "not trained" + (f" (stopped at iteration {it}; run its command again to continue)"
                                                 if it else " (no checkpoint: a dry run, or stopped before one)")
    for name, path in models.items():
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"{name}: {path} is not a model (no config.json). A run folder holds its trained policy in "
                             f"policy/ once the run has finished; rerun it, or remove the folder to report it as missing")
        bk.check_model_folder(path, f"{name}'s policy", "causal_lm")
        bk.check_can_build(path, f"{name}'s policy", ("causal_lm",))
    bk.check_model_folder(args.policy, "--policy", "causal_lm")
    bk.check_can_build(args.policy, "--policy", ("causal_lm",))
    for path in args.reward_models.split(","):
        bk.check_model_folder(path, "--reward-models", "sequence_classifier")
        bk.check_can_build(path, "--reward-models", ("backbone",))
    # before any weights load: the reward models and every trained policy share the run's prompt format and tokenizer
    bk.check_formats_match(args.reward_models.split(","), args.policy, args.prompt_template)
    for name, path in models.items():
        bk.check_formats_match([path], args.policy, args.prompt_template, f"{name}'s policy")
    if "molma" not in models:
        C.print0(f"[04] no trained MOLMA run in {runs_dir} ({missing.get('molma', 'not in --models')}): the report "
                 f"holds each model's scores alone, without win rates against MOLMA")
    models = {"reference": args.policy, **models}
    summaries = {n: C.read_json(Path(p).parent / "run_summary.json")
                 for n, p in models.items() if (Path(p).parent / "run_summary.json").exists() and n != "reference"}
    return models, missing, summaries


class Ranks:
    """Work split across ranks: each takes every world_size-th item; gather puts the results back in order."""

    def __init__(self, info):
        self.info = info

    def mine(self, items: list) -> list:
        return items[self.info.rank :: self.info.world_size]

    def gather(self, n: int, results: list) -> list:
        parts = [None] * self.info.world_size
        dist.all_gather_object(parts, results)
        merged = [None] * n
        for r, part in enumerate(parts):
            merged[r :: self.info.world_size] = part
        return merged


class RewardScorer:
    """RM<objective> on this rank (frozen, not sharded): probabilities sigmoid(score) of (prompt, answer) lists."""

    def __init__(self, args, tokenizer, info, dtype, objectives: list[str]):
        self.args, self.tokenizer, self.device = args, tokenizer, info.device
        self.paths = [p for p in args.reward_models.split(",") if p]
        self.heads = dict(zip(objectives, C.load_reward_heads(self.paths, objectives, tokenizer)))
        for m in {id(m): m for m, _ in self.heads.values()}.values():
            m.to(info.device, dtype)

    @torch.no_grad()
    def __call__(self, prompts: list[str], answers: list[str], objective: str) -> list[float]:
        m, i = self.heads[objective]
        res, bs = [], self.args.batch_size
        for j in range(0, len(prompts), bs):
            ids, mask, _ = C.encode_pairs(self.tokenizer, prompts[j : j + bs], answers[j : j + bs],
                                          self.args.max_prompt_len + self.args.max_new_tokens, self.args.prompt_template)
            res += torch.sigmoid(C.sequence_scores(m, ids.to(self.device), mask.to(self.device))[:, i]).tolist()
        return res


class ReferenceRM:
    """An open-source reward model of Table 2 with its own tokenizer and input format, read from its model card:

    - a sequence classifier (OpenAssistant's DeBERTa-v3 reward model): tokenizer(question, answer) as a text pair,
      the score is logits[0]; the chosen answer wins when it scores higher;
    - a seq2seq model (SteamSHP, FLAN-T5): "POST: {question}\\n\\n RESPONSE A: {a}\\n\\n RESPONSE B: {b}\\n\\n Which
      response is better? RESPONSE", then the probability of the first generated token being "A" or "B"; both
      orders are asked and averaged, so the position of an answer does not decide.
    """

    def __init__(self, name: str, path: str, device, dtype, max_len: int):
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.device, self.max_len = name, device, max_len
        bk.check_model_folder(path, f"--reference-rms {name}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.seq2seq = AutoConfig.from_pretrained(path).is_encoder_decoder
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForSequenceClassification
        self.model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
        if self.seq2seq:
            self.ab = [self.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("A", "B")]
        C.print0(f"[04] reference reward model {name}: {path} ({type(self.model).__name__}, "
                 f"{'SteamSHP A/B prompt' if self.seq2seq else 'text pair'})")

    @torch.no_grad()
    def prefers_chosen(self, pairs: list, batch_size: int) -> list[bool]:
        out = []
        for j in range(0, len(pairs), batch_size):
            batch = pairs[j : j + batch_size]
            if self.seq2seq:
                ab = self._p_a([(p.prompt, p.chosen, p.rejected) for p in batch])     # P(A): chosen shown first
                ba = self._p_a([(p.prompt, p.rejected, p.chosen) for p in batch])     # P(A): chosen shown second
                out += [(x + (1 - y)) / 2 > 0.5 for x, y in zip(ab, ba)]
            else:
                c, r = self._score(batch, "chosen"), self._score(batch, "rejected")
                out += [x > y for x, y in zip(c, r)]
        return out

    def _score(self, batch, which):
        enc = self.tokenizer([p.prompt for p in batch], [getattr(p, which) for p in batch], return_tensors="pt",
                             padding=True, truncation=True, max_length=self.max_len).to(self.device)
        return self.model(**enc).logits[:, 0].float().tolist()

    def _p_a(self, triples):
        """P("A") / (P("A") + P("B")) of the first decoded token, one per (post, response A, response B)."""
        texts = [f"POST: {q}\n\n RESPONSE A: {a}\n\n RESPONSE B: {b}\n\n Which response is better? RESPONSE"
                 for q, a, b in triples]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_len).to(self.device)
        start = torch.full((len(texts), 1), self.model.config.decoder_start_token_id, device=self.device)
        logits = self.model(**enc, decoder_input_ids=start).logits[:, 0].float()
        p = logits.softmax(-1)[:, self.ab]
        return (p[:, 0] / p.sum(-1).clamp(min=1e-30)).tolist()


# ---------------------------------------------------------------- Table 2: reward-model accuracy on test pairs
def table2_reward_model_accuracy(args, score: RewardScorer, ranks: Ranks, references: list[ReferenceRM]) -> dict:
    """RM<objective> on each test set of its objectives, and every reference reward model on exactly the same pairs."""
    table2 = {}
    for objective, source, title in [row for row in TABLE2 if row[0] in score.heads]:
        pairs = C.load_preference_pairs(objective, "test", args.data_root or None, limit=args.rm_eval_size,
                                        seed=args.seed, sources={source: 1.0})
        mine = ranks.mine(pairs)
        c = score([p.prompt for p in mine], [p.chosen for p in mine], objective)
        r = score([p.prompt for p in mine], [p.rejected for p in mine], objective)
        wins = ranks.gather(len(pairs), [x > y for x, y in zip(c, r)])
        row = {"objective": objective, "source": source, "title": title, "pairs": len(pairs),
               "accuracy": sum(wins) / len(wins), "reference_rms": {}}
        for ref in references:
            ref_wins = ranks.gather(len(pairs), ref.prefers_chosen(mine, args.batch_size))
            row["reference_rms"][ref.name] = sum(ref_wins) / len(ref_wins)
        if args.ground_truth:
            truth = [(true_scores(p.prompt, p.chosen, [objective])[0], true_scores(p.prompt, p.rejected, [objective])[0])
                     for p in pairs]
            kept = [(w, tc > tr) for w, (tc, tr) in zip(wins, truth) if tc != tr]
            row["accuracy_vs_truth"] = sum(w == t for w, t in kept) / max(1, len(kept))
            row["labels_agree_with_truth"] = sum(t for _, t in kept) / max(1, len(kept))
        table2[title] = row
        C.print0(f"[04] Table 2 {title}: RM{objective} accuracy {row['accuracy']:.3f} on {len(pairs)} pairs")
    return table2


# ---------------------------------------------------------------- the answers (Figures 2a, 2b and 3): the same test prompts
def sample_answers(args, models: dict, tokenizer, info, dtype, score: RewardScorer, ranks: Ranks):
    """-> (prompts, {model: [(answer, ended with EOS, RM score per objective...)] in prompt order})."""
    prompts = [p for p, _ in C.load_rl_prompts("test", args.data_root or None, limit=args.num_prompts, seed=args.seed)]
    bk.count_cut_prompts(tokenizer, prompts, args.max_prompt_len, "test prompts", args.prompt_template)
    mine = ranks.mine(prompts)
    answers = {}
    for mi, (name, path) in enumerate(models.items()):
        model = C.load_causal_lm(path, tokenizer).to(info.device, dtype)
        C.set_seed(args.seed * 1000 + mi * 10 + info.rank)          # reproducible, different per model and rank
        texts, ended = [], []
        for j in range(0, len(mine), args.batch_size):      # the RL stages' sampling (args has its settings)
            r = C.generate_rollouts(model, tokenizer, mine[j : j + args.batch_size], args, info.device)
            ended += r.ended.tolist()
            texts += r.answers(tokenizer)
        del model
        per_objective = [score(mine, texts, o) for o in score.heads]
        answers[name] = ranks.gather(len(prompts), list(zip(texts, ended, *per_objective)))
        C.print0(f"[04] {name}: {len(answers[name])} answers")
    return prompts, answers


def write_answers(out: Path, args, prompts, answers, objectives: list[str]) -> dict[str, list[tuple[float, ...]]]:
    """answers.jsonl, one line per (model, prompt); -> the tiny world's true scores per model, answer and objective."""
    truth, lines = {}, []
    for n in answers:
        for p, (text, ended, *rm) in zip(prompts, answers[n]):
            row = {"model": n, "prompt": p, "answer": text, "ended_with_eos": ended,
                   **{f"rm_{o}": v for o, v in zip(objectives, rm)}}
            if args.ground_truth:
                t = true_scores(p, text, objectives)
                row.update({f"true_{o}": v for o, v in zip(objectives, t)})
                truth.setdefault(n, []).append(t)
            lines.append(json.dumps(row) + "\n")
    bk.write_whole(out / "answers.jsonl", "".join(lines))
    return truth


# ---------------------------------------------------------------- Figure 2a: MOLMA's win rates
def win_rates(args, scores: dict, objectives: list[str]) -> dict:
    """{model: {objective: win rate, 95% CI, ties}} of MOLMA's answers against each other model's, prompt by prompt."""
    win = {}
    if "molma" not in scores:                 # pi_0 (and baselines) alone: each model's scores, no comparison
        return win
    for j, n in enumerate(x for x in scores if x != "molma"):
        win[n] = {}
        for k, obj in enumerate(objectives):
            a, b = scores["molma"][:, k], scores[n][:, k]
            lo, hi = bootstrap_ci(a, b, args.bootstrap, args.seed + 17 * j + k)
            win[n][obj] = {"win_rate": win_rate(a, b).item(), "ci95": [lo, hi], "ties": int((a == b).sum())}
    return win


# ---------------------------------------------------------------- Figure 2b: the blinded sheet (results: part 4)
def human_eval_kit(args, out: Path, prompts, answers) -> dict:
    """Write the blank sheet and its key (the models in Figure 2a's order) -> what the report says of it."""
    names = list(dict.fromkeys(n for n in ["molma", *answers] if n in answers and n in args.human_eval_models.split(",")))
    if args.human_eval_prompts == 0:
        return {"none": "--human-eval-prompts 0"}
    if "molma" not in names or len(names) < 2:
        return {"none": "it needs MOLMA and at least one other model (--human-eval-models)"}
    key = write_human_sheet(out, prompts, answers, names, args.human_eval_prompts, args.seed)
    return {"sheet_id": key["sheet_id"], "models": names, "report_folder": str(out),
            "prompts": len({v["prompt_index"] for v in key["answers"].values()})}


# ---------------------------------------------------------------- Figure 4: MOLMA against so_weighted at several weights
def weight_sweep(summaries: dict, win: dict) -> list[dict]:
    """Every so_weighted run with its helpfulness weight and MOLMA's win rates against it, by weight (two objectives;
    with three, the weights live on a simplex: OBJECTIVES=help,safe,honest ./run.sh study runs a grid of them)."""
    if any(len(w) != 2 for w in win.values()):
        return []
    return [{"run": n, "help_weight": w, "help": win[n]["help"]["win_rate"], "safe": win[n]["safe"]["win_rate"]}
            for w, n in sorted((summaries[n]["state"]["weights"][0], n) for n in win
                               if n in summaries and summaries[n]["method"] == "so_weighted")]


# ---------------------------------------------------------------- Table 3: training time
def table3_training_time(summaries: dict) -> dict:
    """Per run: iterations, seconds, median iteration and phases, and MOLMA's median iteration over the run's."""
    table3 = {n: {"method": s["method"], "train_seconds": s["train_seconds"], "iterations": s["iterations"],
                  "median_seconds_per_iteration": s["median_seconds_per_iteration"],
                  "phase_seconds_median": s["phase_seconds_median"]} for n, s in summaries.items()}
    base = table3.get("molma", {}).get("median_seconds_per_iteration")
    for n in table3:
        table3[n]["molma_ratio"] = base / table3[n]["median_seconds_per_iteration"] if base and n != "molma" else None
    return table3


# ---------------------------------------------------------------- beyond the paper
def fast_rl_yardstick(scores: dict, truth: dict) -> dict:
    """Fast RL's Eq. 2 per model, from the test answers' reward-model probabilities (and the tiny world's truth)."""
    table = {}
    for n, s in scores.items():
        table[n] = dict(zip(("worst_case_rm", "disparity_rm"), worst_case_and_disparity(s.mean(0).tolist())))
        if n in truth:
            means = [sum(t[k] for t in truth[n]) / len(truth[n]) for k in range(len(truth[n][0]))]
            table[n].update(zip(("worst_case_truth", "disparity_truth"), worst_case_and_disparity(means)))
    return table


CURVE_KEYS = ("step", "help/score", "safe/score", "honest/score", "objective/kl", "truth/help", "truth/safe",
              "truth/honest", "amtl/cos", "amtl/cond_before", "amtl/cond_after", "state/lambda", "state/mean_cost")


def training_curves(models: dict, summaries: dict) -> dict:
    """What each run did, iteration by iteration: the lines of its metrics.jsonl that the report draws."""
    return {n: [{k: l[k] for k in CURVE_KEYS if k in l}
                for l in map(json.loads, (Path(models[n]).parent / "metrics.jsonl").read_text().splitlines()) if l]
            for n in models if n in summaries and (Path(models[n]).parent / "metrics.jsonl").exists()}


def training_samples(models: dict, per_iteration: int = 2) -> list[dict]:
    """A few answers of each run from its first and last sampled iteration (samples.jsonl)."""
    picked = []
    for n, path in models.items():
        f = Path(path).parent / "samples.jsonl"
        rows = [json.loads(l) for l in f.read_text().splitlines() if l] if n != "reference" and f.exists() else []
        for it in sorted({rows[0]["iteration"], rows[-1]["iteration"]} if rows else ()):
            picked += [{"run": n, **r} for r in rows if r["iteration"] == it][:per_iteration]
    return picked


def ground_truth_stats(truth: dict, objectives: list[str]) -> tuple[dict, list[str]]:
    """Tiny world: per model its mean true scores, the Pareto front of the means, the hypervolume of its answers,
    and the mean volume one answer dominates (h x s, or h x s x o with three objectives)."""
    means = {n: tuple(sum(x[k] for x in t) / len(t) for k in range(len(objectives))) for n, t in truth.items()}
    front = pareto_front(means)
    return {n: {**{f"true_{o}": means[n][k] for k, o in enumerate(objectives)}, "on_pareto_front": n in front,
                "hypervolume": hypervolume(truth[n]),
                "mean_answer_area": sum(math.prod(x) for x in truth[n]) / len(truth[n])} for n in truth}, front


def evaluate(args, out: Path, info) -> dict | None:
    """Every rank: the models, Table 2 and the answers (split across ranks). Rank 0 then writes answers.jsonl and
    the human-evaluation sheet, and returns every number of the report; the other ranks return None."""
    t0 = time.time()
    dtype = C.compute_dtype(args.precision, info)
    ranks = Ranks(info)
    models, missing, summaries = find_models(args)    # pi_0, MOLMA, every baseline run found
    C.print0(f"[04] models: {list(models)}; not evaluated: "
             + (", ".join(f"{n} ({why})" for n, why in missing.items()) or "none"))
    tokenizer = bk.load_tokenizer(args.policy, args.prompt_template)
    objectives = [o for o in args.objectives.split(",") if o]
    score = RewardScorer(args, tokenizer, info, dtype, objectives)
    if args.dry_run:
        n = len(C.load_rl_prompts("test", args.data_root or None, limit=args.num_prompts, seed=args.seed))
        C.print0(f"[04] dry run: {len(models)} models answer {n} test prompts on {info.world_size} ranks; Table 2 on up "
                 f"to {args.rm_eval_size} pairs per test set")
        bk.dry_run_exit("04", {f"RM{o}": m for o, (m, _) in score.heads.items()}, info, "loading the reward models")
    items = [item for item in args.reference_rms.split(",") if item]
    if any("=" not in item for item in items):
        raise SystemExit(f"--reference-rms takes name=hub_id_or_folder items, got {args.reference_rms!r}")
    references = [ReferenceRM(*item.split("=", 1), info.device, dtype, args.max_prompt_len + args.max_new_tokens)
                  for item in items]
    table2 = table2_reward_model_accuracy(args, score, ranks, references)                 # Table 2
    del references
    prompts, answers = sample_answers(args, models, tokenizer, info, dtype, score, ranks)  # Figures 2a, 3
    if not info.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    truth = write_answers(out, args, prompts, answers, objectives)
    scores = {n: torch.tensor([list(a[2:]) for a in answers[n]], dtype=torch.float64) for n in models}
    win = win_rates(args, scores, objectives)                                              # Figure 2a
    truth_stats, front = ground_truth_stats(truth, objectives) if args.ground_truth else ({}, [])
    return {"config": asdict(args), "objectives": objectives, "missing": missing,
            "sampling": {"num_prompts": len(prompts), "temperature": args.temperature, "top_k": 0, "top_p": 1.0,
                         "max_new_tokens": args.max_new_tokens, "seed": args.seed, "world_size": info.world_size},
            "reward_models": score.paths, "table2": table2, "win_rates": win,
            "mean_scores": {n: scores[n].mean(0).tolist() for n in models},
            "eos_rate": {n: sum(a[1] for a in answers[n]) / len(answers[n]) for n in models},
            "human_eval": human_eval_kit(args, out, prompts, answers),                     # Figure 2b
            "scores": {n: scores[n].tolist() for n in models},                             # Figure 3
            "weight_sweep": weight_sweep(summaries, win),                                  # Figure 4
            "table3": table3_training_time({n: summaries[n] for n in models if n in summaries}),   # Table 3
            "fast_rl_yardstick": fast_rl_yardstick(scores, truth), "training_curves": training_curves(models, summaries),
            "training_samples": training_samples(models), "truth": truth_stats, "pareto_front": front,
            "side_by_side": [{"prompt": prompts[i], **{n: answers[n][i][0] for n in models}}
                             for i in range(min(SIDE_BY_SIDE, len(prompts)))],
            "human_win_rates": {}, "seconds": round(time.time() - t0, 1)}




# ======================================================================================================================
def main():
    args = bk.parse_args(Args, presets=PRESETS)
    if args.study:                            # stage 5 now
        raise SystemExit(f"the report over seeds is its own stage now: python 05_study.py --study {args.study}")
    out = Path(args.out or Path(args.runs_dir) / "report")
    if args.human_sheets:                     # part 4: Figure 2b from the filled sheets
        return human_sheets_report(args, out)
    bk.check_tracking(args.wandb_project)
    C.check_precision(args.precision)
    bk.check_output_folder(out)
    if (out / "report.json").exists() and not args.overwrite and not args.dry_run:
        raise SystemExit(f"{out} holds a report already (report.json); give another --out, or --overwrite true to "
                         f"replace it (its human-evaluation keys in human_eval_keys/ are kept)")
    info = C.setup_distributed(args.peer_timeout)
    bk.lock_run_folder(out, "04")                     # one writer per report folder
    t0 = time.time()
    report = evaluate(args, out, info)               # part 2: every rank; the numbers on rank 0
    if info.is_main:
        bk.write_whole(out / "report.json", json.dumps(report, indent=2))
        render(C.read_json(out / "report.json"), out)    # part 3: from what report.json holds
        if args.wandb_project:                # the numbers of report.json as one W&B run's summary, and the figures
            import wandb

            run = wandb.init(project=args.wandb_project, name="/".join(out.resolve().parts[-3:]), job_type="evaluation",
                             group=os.environ.get("WANDB_RUN_GROUP", "/".join(out.resolve().parts[-3:-1])),
                             config=asdict(args))
            run.summary.update({f"win_rate/{n}/{o}": w[o]["win_rate"] for n, w in report["win_rates"].items() for o in w}
                               | {f"truth/{n}/{k}": v for n, t in report["truth"].items() for k, v in t.items()
                                  if isinstance(v, float)})
            run.log({p.stem: wandb.Image(str(p)) for p in sorted(out.glob("fig*.png"))})
            run.finish()
        print(f"[04] report written to {out / 'report.md'} in {time.time() - t0:.0f}s")
    C.teardown()                              # the other ranks wait here for rank 0's report


if __name__ == "__main__":
    main()
