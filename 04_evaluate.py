"""Stage 4: the paper's evaluation (MOLMA Sec. 4.2, 4.4-4.8) and a report that reads without running anything.

Into <out> (default <runs-dir>/report):
  1. reward-model accuracy, Table 2's layout, on test pairs never seen in training or validation;
  2. model-based evaluation (Figure 2a): the same test prompts answered by the reference model, MOLMA and
     every baseline run found, scored by RMhelp and RMsafe; MOLMA's win rate against each model per
     objective (a tie counts as half a win) with 95% bootstrap confidence intervals;
  3. reward distributions (Figure 3): a (helpfulness, safety) scatter per model;
  4. the weight sweep (Figure 4): MOLMA against every so_weighted run found, by its helpfulness weight;
  5. training time (Table 3) from the run summaries, and MOLMA's ratio to the single-objective runs;
  6. tiny world only: every answer's true helpfulness and safety, each model's mean on one plot with the
     Pareto front, and the hypervolume of each model's answers against the reference point (0, 0);
  7. report.md with all of it and the figures inline; answers.jsonl with every answer and its scores.

Tiny world (after stages 0-3):
    torchrun --standalone --nproc_per_node=2 04_evaluate.py --preset tiny
One node of 8 GPUs (the paper):
    torchrun --standalone --nproc_per_node=8 04_evaluate.py --runs-dir runs/paper
Prompts are split across ranks and the answers gathered; the same seed gives the same report on CPU.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import common as C

BASELINES = ["so_help", "so_safe", "so_weighted", "so_piecewise", "fast_rl"]
TABLE2 = [("help", "shp", "Stanford SHP"), ("help", "hh_helpful", "Anthropic Helpful"), ("safe", "hh_harmless", "Anthropic Harmless"),
          ("help", "pku_help", "PKU-SafeRLHF (helpfulness)"), ("safe", "pku_safe", "PKU-SafeRLHF (safety)")]


@dataclass
class Args:
    """Evaluate the reward models, MOLMA and the baselines as the paper does, and write the report."""
    runs_dir: str = C.arg("runs/paper", "folder holding molma/, so_*/ and fast_rl/ runs (stages 2-3)")
    models: str = C.arg("", "instead of discovery: comma list of name=policy_folder")
    policy: str = C.arg("microsoft/phi-2", "the reference model pi_0")
    reward_models: str = C.arg("runs/paper/rm_help/model,runs/paper/rm_safe/model", "RMhelp and RMsafe (stage 1)")
    data_root: str = C.arg("", "local copies of the datasets in their hub schemas; empty: read the hub")
    out: str = C.arg("", "report folder (default: <runs-dir>/report)")
    num_prompts: int = C.arg(1000, "test prompts answered by every model (Sec. 4.5.1)")
    rm_eval_size: int = C.arg(1000, "test pairs per Table 2 column (Sec. 4.4)")
    max_prompt_len: int = C.arg(256, "prompt tokens kept")
    max_new_tokens: int = C.arg(256, "answer length limit")
    temperature: float = C.arg(1.0, "sampling temperature (no top-k / top-p)")
    batch_size: int = C.arg(32, "prompts per generate call, per rank")
    bootstrap: int = C.arg(1000, "bootstrap resamples for the 95% intervals")
    ground_truth: bool = C.arg(False, "tiny world only: score every answer with tiny_world.ground_truth")
    seed: int = C.arg(0, "seed")


PRESETS = {"tiny": dict(runs_dir="runs/tiny", policy="runs/tiny/world/base",
                        reward_models="runs/tiny/rm_help/model,runs/tiny/rm_safe/model", data_root="runs/tiny/world/data",
                        num_prompts=300, max_prompt_len=32, max_new_tokens=40, ground_truth=True)}


# ---------------------------------------------------------------- statistics (plain functions, tested)
def win_rate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] scores of model A and model B on the same prompts -> A's win rate; a tie counts as half."""
    return ((a > b).double() + 0.5 * (a == b).double()).mean()


def bootstrap_ci(a: torch.Tensor, b: torch.Tensor, n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of win_rate(a, b), resampling prompts with replacement."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (n, len(a)), generator=g)
    wins = (a[idx] > b[idx]).double() + 0.5 * (a[idx] == b[idx]).double()
    rates = wins.mean(1).sort().values
    return rates[int(0.025 * (n - 1))].item(), rates[int(math.ceil(0.975 * (n - 1)))].item()


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by a set of (x, y) points (both maximised) and bounded below by ref."""
    pts = sorted((p for p in points if p[0] > ref[0] and p[1] > ref[1]), reverse=True)
    area, best_y = 0.0, ref[1]
    for i, (x, y) in enumerate(pts):
        best_y = max(best_y, y)
        next_x = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (x - next_x) * (best_y - ref[1])
    return area


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose point no other point weakly dominates with one strict improvement."""
    return [n for n, (x, y) in points.items()
            if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for m, (x2, y2) in points.items() if m != n)]


def main():
    args = C.parse_args(Args, presets=PRESETS)
    info = C.setup_distributed()
    out = Path(args.out or Path(args.runs_dir) / "report")
    t0 = time.time()
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    tokenizer = C.load_tokenizer(args.policy)

    # ---------------------------------------------------------------- which models
    runs_dir = Path(args.runs_dir)
    missing = []
    if args.models:
        models = dict(item.split("=", 1) for item in args.models.split(","))
    else:
        models = {}
        names = ["molma", *BASELINES]
        names += sorted(p.name for p in runs_dir.glob("so_weighted?*") if (p / "run_summary.json").exists())
        for name in names:
            if not (runs_dir / name).exists():
                missing.append(name)
            else:
                models[name] = str(runs_dir / name / "policy")
    for name, path in models.items():
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"{name}: {path} is not a model (no config.json). A run folder holds its trained policy in "
                             f"policy/ once the run has finished; rerun it, or remove the folder to report it as missing")
    if "molma" not in models:
        raise SystemExit(f"no MOLMA run: {runs_dir / 'molma' / 'policy'} not found (train it with 02_train_molma.py)")
    models = {"reference": args.policy, **models}
    summaries = {n: json.loads((Path(p).parent / "run_summary.json").read_text())
                 for n, p in models.items() if (Path(p).parent / "run_summary.json").exists() and n != "reference"}
    C.print0(f"[04] models: {list(models)}; missing: {missing or 'none'}")

    # ---------------------------------------------------------------- reward models on this rank (frozen, not sharded)
    rm_paths = [p for p in args.reward_models.split(",") if p]
    heads = dict(zip(("help", "safe"), C.load_reward_heads(rm_paths, ["help", "safe"], tokenizer)))
    for m in {id(m): m for m, _ in heads.values()}.values():
        m.to(info.device, dtype)

    def share(items):
        """This rank's items (strided), and a function gathering per-item results back in order."""
        mine = items[info.rank :: info.world_size]

        def gather(results):
            parts = [None] * info.world_size
            C.dist.all_gather_object(parts, results)
            merged = [None] * len(items)
            for r, part in enumerate(parts):
                merged[r :: info.world_size] = part
            return merged
        return mine, gather

    @torch.no_grad()
    def rm_scores(prompts, answers, objective):
        """Probabilities sigmoid(score) of one objective for (prompt, answer) lists of this rank."""
        m, i = heads[objective]
        res = []
        for j in range(0, len(prompts), args.batch_size):
            ids, mask, _ = C.encode_pairs(tokenizer, prompts[j : j + args.batch_size], answers[j : j + args.batch_size],
                                          args.max_prompt_len + args.max_new_tokens)
            res += torch.sigmoid(C.sequence_scores(m, ids.to(info.device), mask.to(info.device))[:, i]).tolist()
        return res

    if args.ground_truth:
        import tiny_world as W

    # ---------------------------------------------------------------- 1. Table 2: reward-model accuracy on test pairs
    table2 = {}
    for objective, source, title in TABLE2:
        pairs = C.load_preference_pairs(objective, "test", args.data_root or None, limit=args.rm_eval_size,
                                        seed=args.seed, sources={source: 1.0})
        mine, gather = share(pairs)
        c = rm_scores([p.prompt for p in mine], [p.chosen for p in mine], objective)
        r = rm_scores([p.prompt for p in mine], [p.rejected for p in mine], objective)
        wins = gather([x > y for x, y in zip(c, r)])
        row = {"objective": objective, "source": source, "title": title, "pairs": len(pairs),
               "accuracy": sum(wins) / len(wins)}
        if args.ground_truth:
            k = 0 if objective == "help" else 1
            truth = [(W.ground_truth(p.prompt, p.chosen)[k], W.ground_truth(p.prompt, p.rejected)[k]) for p in pairs]
            kept = [(w, tc > tr) for w, (tc, tr) in zip(wins, truth) if tc != tr]
            row["accuracy_vs_truth"] = sum(w == t for w, t in kept) / max(1, len(kept))
            row["labels_agree_with_truth"] = sum(t for _, t in kept) / max(1, len(kept))
        table2[title] = row
        C.print0(f"[04] Table 2 {title}: RM{objective} accuracy {row['accuracy']:.3f} on {len(pairs)} pairs")

    # ---------------------------------------------------------------- 2-3. answers of every model to the same test prompts
    prompts = [p for p, _ in C.load_rl_prompts("test", args.data_root or None, limit=args.num_prompts, seed=args.seed)]
    mine, gather = share(prompts)
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
        h, s = rm_scores(mine, texts, "help"), rm_scores(mine, texts, "safe")
        answers[name] = gather(list(zip(texts, ended, h, s)))
        C.print0(f"[04] {name}: {len(answers[name])} answers")

    if not info.is_main:
        C.dist.barrier()
        C.dist.destroy_process_group()
        return

    # ---------------------------------------------------------------- rank 0: statistics, figures, report
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)

    def save_figure(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    names = list(models)
    scores = {n: torch.tensor([[a[2], a[3]] for a in answers[n]], dtype=torch.float64) for n in names}
    truth = {}
    with (out / "answers.jsonl").open("w") as f:
        for n in names:
            for p, (text, ended, h, s) in zip(prompts, answers[n]):
                row = {"model": n, "prompt": p, "answer": text, "ended_with_eos": ended, "rm_help": h, "rm_safe": s}
                if args.ground_truth:
                    row["true_help"], row["true_safe"] = W.ground_truth(p, text)
                    truth.setdefault(n, []).append((row["true_help"], row["true_safe"]))
                f.write(json.dumps(row) + "\n")

    # Figure 2a: MOLMA's win rates
    win = {}
    for j, n in enumerate(x for x in names if x != "molma"):
        win[n] = {}
        for k, obj in enumerate(("help", "safe")):
            a, b = scores["molma"][:, k], scores[n][:, k]
            lo, hi = bootstrap_ci(a, b, args.bootstrap, args.seed + 17 * j + k)
            win[n][obj] = {"win_rate": win_rate(a, b).item(), "ci95": [lo, hi], "ties": int((a == b).sum())}
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(win), 3.6))
    xs = range(len(win))
    for k, (obj, color) in enumerate((("help", "tab:blue"), ("safe", "tab:orange"))):
        vals = [win[n][obj]["win_rate"] for n in win]
        err = [[v - win[n][obj]["ci95"][0] for v, n in zip(vals, win)], [win[n][obj]["ci95"][1] - v for v, n in zip(vals, win)]]
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], vals, 0.38, yerr=err, capsize=3, color=color, label=f"{obj}fulness" if obj == "help" else "safety")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [f"vs {n}" for n in win], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("MOLMA win rate (ties = 1/2)")
    ax.set_title("Model-based evaluation (Figure 2a), 95% bootstrap CI")
    ax.legend(fontsize=8)
    save_figure(fig, "fig2a_win_rates.png")

    # Figure 3: reward distributions
    cols = min(4, len(names))
    rows_ = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.1 * cols, 3.0 * rows_), squeeze=False)
    for ax, n in zip(axes.flat, names):
        ax.scatter(scores[n][:, 0], scores[n][:, 1], s=5, alpha=0.4)
        ax.set_title(n, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("RMhelp", fontsize=8)
        ax.set_ylabel("RMsafe", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Reward distributions of the test answers (Figure 3)")
    save_figure(fig, "fig3_reward_distributions.png")

    # Figure 4: MOLMA against so_weighted at several weights
    sweep = sorted((summaries[n]["state"]["weights"][0], n) for n in names
                   if n in summaries and summaries[n]["method"] == "so_weighted")
    if sweep:
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
        for obj, color in (("help", "tab:blue"), ("safe", "tab:orange")):
            ax.plot([w for w, _ in sweep], [win[n][obj]["win_rate"] for _, n in sweep], "o-", color=color,
                    label="helpfulness" if obj == "help" else "safety")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("so_weighted's helpfulness weight")
        ax.set_ylabel("MOLMA win rate")
        ax.set_ylim(0, 1)
        ax.set_title("MOLMA (equal weights) vs SOweighted (Figure 4)")
        ax.legend(fontsize=8)
        save_figure(fig, "fig4_weight_sweep.png")

    # Training curves: what each run did, iteration by iteration (metrics.jsonl)
    curves = {n: [json.loads(l) for l in (Path(models[n]).parent / "metrics.jsonl").read_text().splitlines() if l]
              for n in names if n in summaries and (Path(models[n]).parent / "metrics.jsonl").exists()}
    if curves:
        panels = [("help/score", "RMhelp score"), ("safe/score", "RMsafe score"), ("objective/kl", "KL to pi_0 (nats)")]
        if any("truth/help" in c[0] for c in curves.values()):
            panels += [("truth/help", "true helpfulness"), ("truth/safe", "true safety")]
        panels += [("amtl/cos", "MOLMA: cosine of the gradients"), ("amtl/cond_before", "MOLMA: cond(G) before / after")]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.9), squeeze=False)
        color = {n: f"C{i}" for i, n in enumerate(names)}          # one colour per run in every panel
        smooth = lambda v: [sum(v[max(0, i - 4) : i + 1]) / len(v[max(0, i - 4) : i + 1]) for i in range(len(v))]
        for ax, (key, title) in zip(axes[0], panels):
            for n, c in curves.items():
                if key in c[0]:
                    ax.plot([l["step"] for l in c], smooth([l[key] for l in c]), lw=1.2, color=color[n], label=n)
                if key == "amtl/cond_before" and "amtl/cond_after" in c[0]:
                    ax.plot([l["step"] for l in c], smooth([l["amtl/cond_after"] for l in c]), "k--", lw=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
        from matplotlib.lines import Line2D
        axes[0][-1].legend(handles=[Line2D([], [], color=color[n], label=n) for n in curves]
                           + [Line2D([], [], color="k", ls="--", label="after alignment")], fontsize=6)
        fig.suptitle("Training curves (moving average over 5 iterations)", fontsize=10)
        save_figure(fig, "fig_training_curves.png")

    # Table 3: training time
    table3 = {n: {"method": summaries[n]["method"], "train_seconds": summaries[n]["train_seconds"],
                  "iterations": summaries[n]["iterations"], "median_seconds_per_iteration": summaries[n]["median_seconds_per_iteration"],
                  "phase_seconds_median": summaries[n]["phase_seconds_median"]} for n in names if n in summaries}
    so_runs = [n for n in table3 if n != "molma" and table3[n]["method"] in BASELINES[:4]]
    for n in table3:
        base = table3.get("molma", {}).get("median_seconds_per_iteration")
        table3[n]["molma_ratio"] = base / table3[n]["median_seconds_per_iteration"] if base and n != "molma" else None

    # Tiny world: the truth, the Pareto front, hypervolumes
    truth_stats, front = {}, []
    if args.ground_truth:
        means = {n: (sum(h for h, _ in truth[n]) / len(truth[n]), sum(s for _, s in truth[n]) / len(truth[n])) for n in names}
        front = pareto_front(means)
        truth_stats = {n: {"true_help": means[n][0], "true_safe": means[n][1], "on_pareto_front": n in front,
                           "hypervolume": hypervolume(truth[n]),
                           "mean_answer_area": sum(h * s for h, s in truth[n]) / len(truth[n])} for n in names}
        fig, ax = plt.subplots(figsize=(5.0, 4.0))
        for n in names:
            x, y = means[n]
            ax.scatter([x], [y], s=40, marker="*" if n == "molma" else "o", zorder=3)
            ax.annotate(n, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        fx = sorted(means[n] for n in front)
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "k--", lw=1, label="Pareto front of the models")
        ax.set_xlabel("mean true helpfulness")
        ax.set_ylabel("mean true safety")
        ax.set_title("Tiny world: ground truth of the test answers")
        ax.legend(fontsize=8)
        save_figure(fig, "fig_truth_pareto.png")

    # ---------------------------------------------------------------- report.md
    sampling = {"num_prompts": len(prompts), "temperature": args.temperature, "top_k": 0, "top_p": 1.0,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "world_size": info.world_size}
    mean_scores = {n: scores[n].mean(0).tolist() for n in names}
    L = [f"# MOLMA evaluation report\n",
         f"Runs: `{runs_dir}`; reference model `{args.policy}`; reward models {', '.join(f'`{p}`' for p in rm_paths)}.",
         f"Missing runs (not found, left out): {', '.join(missing) if missing else 'none'}.",
         f"Sampling: {json.dumps(sampling)}. Built in {time.time() - t0:.0f} s.\n",
         "## 1. Reward-model accuracy (Table 2)\n",
         "Test pairs, never used in training or validation. Accuracy: the preferred answer scored higher."
         + (" On the tiny world also against the ground truth (pairs whose true scores tie left out), and how often"
            " the noisy labels themselves agree with the truth." if args.ground_truth else "") + "\n",
         "| benchmark | reward model | pairs | accuracy |" + (" vs truth | labels vs truth |" if args.ground_truth else ""),
         "|---|---|---|---|" + ("---|---|" if args.ground_truth else "")]
    for title, r in table2.items():
        L.append(f"| {title} | RM{r['objective']} | {r['pairs']} | {r['accuracy']:.3f} |"
                 + (f" {r['accuracy_vs_truth']:.3f} | {r['labels_agree_with_truth']:.3f} |" if args.ground_truth else ""))
    L += ["", "## 2. Model-based evaluation (Figure 2a)\n",
          f"{len(prompts)} test prompts, one sampled answer per model, scored by RMhelp and RMsafe (probabilities). "
          "MOLMA's win rate: the share of prompts where MOLMA's answer scores higher; a tie counts as half a win. "
          f"95% intervals: percentile bootstrap over prompts, {args.bootstrap} resamples.\n",
          "| MOLMA vs | helpfulness win rate [95% CI] | safety win rate [95% CI] | ties (help/safe) |", "|---|---|---|---|"]
    for n, w in win.items():
        L.append(f"| {n} | {w['help']['win_rate']:.3f} [{w['help']['ci95'][0]:.3f}, {w['help']['ci95'][1]:.3f}] | "
                 f"{w['safe']['win_rate']:.3f} [{w['safe']['ci95'][0]:.3f}, {w['safe']['ci95'][1]:.3f}] | "
                 f"{w['help']['ties']}/{w['safe']['ties']} |")
    L += ["", "![win rates](fig2a_win_rates.png)", "", "Mean reward-model scores of the answers:\n",
          "| model | RMhelp | RMsafe | answers ending with EOS |", "|---|---|---|---|"]
    for n in names:
        L.append(f"| {n} | {mean_scores[n][0]:.3f} | {mean_scores[n][1]:.3f} | {sum(a[1] for a in answers[n]) / len(answers[n]):.3f} |")
    if curves:
        L += ["", "Training curves of every run (from its metrics.jsonl):\n", "![training curves](fig_training_curves.png)"]
    L += ["", "## 3. Reward distributions (Figure 3)\n", "![reward distributions](fig3_reward_distributions.png)", "",
          "## 4. Weight sweep (Figure 4)\n"]
    if sweep:
        L += ["| so_weighted run | helpfulness weight | MOLMA help win rate | MOLMA safety win rate |", "|---|---|---|---|"]
        L += [f"| {n} | {w:.2f} | {win[n]['help']['win_rate']:.3f} | {win[n]['safe']['win_rate']:.3f} |" for w, n in sweep]
        L += ["", "![weight sweep](fig4_weight_sweep.png)"]
    else:
        L.append("No so_weighted run found.")
    L += ["", "## 5. Training time (Table 3)\n",
          "From the run summaries: the sum of the iterations' wall times, the median iteration and its phases, "
          "and MOLMA's median iteration divided by each run's.\n",
          "| run | iterations | train seconds | median s/iteration | generation / scoring / update | MOLMA ratio |", "|---|---|---|---|---|---|"]
    for n, t in table3.items():
        ph = t["phase_seconds_median"]
        L.append(f"| {n} | {t['iterations']} | {t['train_seconds']:.1f} | {t['median_seconds_per_iteration']:.3f} | "
                 f"{ph['generation']:.3f} / {ph['scoring']:.3f} / {ph['update']:.3f} | "
                 + (f"{t['molma_ratio']:.2f}x |" if t["molma_ratio"] else "- |"))
    if so_runs and "molma" in table3:
        mean_so = sum(table3[n]["median_seconds_per_iteration"] for n in so_runs) / len(so_runs)
        L.append(f"\nMOLMA / mean of the single-objective runs ({', '.join(so_runs)}): "
                 f"{table3['molma']['median_seconds_per_iteration'] / mean_so:.2f}x per iteration (the paper's Table 3: 1.88x).")
    if args.ground_truth:
        L += ["", "## 6. Tiny world: the ground truth\n",
              "Every answer scored by `tiny_world.ground_truth`. Hypervolume: the area of [0, 1]^2 dominated by the "
              "model's answers as (true helpfulness, true safety) points, reference point (0, 0); it saturates as soon as "
              "a model gives a few near-ideal answers, so the mean area dominated by one answer (mean of h x s, the "
              "hypervolume of a single answer against (0, 0)) is given beside it.\n",
              "| model | mean true helpfulness | mean true safety | on the models' Pareto front | hypervolume | mean h x s |",
              "|---|---|---|---|---|---|"]
        for n, t in truth_stats.items():
            L.append(f"| {n} | {t['true_help']:.3f} | {t['true_safe']:.3f} | {'yes' if t['on_pareto_front'] else 'no'} | "
                     f"{t['hypervolume']:.3f} | {t['mean_answer_area']:.3f} |")
        L += ["", "![ground truth](fig_truth_pareto.png)"]
    L += ["", "## 7. Raw data\n", "`answers.jsonl`: one line per (model, prompt): the answer, whether it ended with EOS, "
          "its reward-model probabilities" + (" and its true scores" if args.ground_truth else "") + ". `report.json`: every number above."]
    (out / "report.md").write_text("\n".join(L) + "\n")
    (out / "report.json").write_text(json.dumps({"config": asdict(args), "missing": missing, "sampling": sampling,
                                                 "table2": table2, "win_rates": win, "mean_scores": mean_scores,
                                                 "table3": table3, "truth": truth_stats, "pareto_front": front}, indent=2))
    print(f"[04] report written to {out / 'report.md'} in {time.time() - t0:.0f}s")
    C.dist.barrier()
    C.dist.destroy_process_group()


if __name__ == "__main__":
    main()
