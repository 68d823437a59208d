"""Stage 4's rendering: the figures and report.md, drawn from report.json alone (04_evaluate.py writes it; nothing
here loads a model or samples). render(report, out) is the entry point; 05_study.py borrows save_figure and the
names of the objectives.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bookkeeping as bk  # noqa: E402

BASELINES = ["so_help", "so_safe", "so_weighted", "so_piecewise", "fast_rl", "lagrangian"]     # 04 looks for these
QUALITY = {"help": "helpfulness", "safe": "safety", "honest": "honesty"}
COLORS = {"help": "tab:blue", "safe": "tab:orange", "honest": "tab:green"}


def save_figure(fig, path: Path, tight: bool = True) -> None:
    """A figure as a PNG file, written whole (bk.write_whole)."""
    import io

    if tight:
        fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    bk.write_whole(path, png.getvalue())


def render(report: dict, out: Path) -> None:
    """report.json -> the figures and report.md, in the paper's order."""
    cfg, L = report["config"], ["# MOLMA evaluation report\n"]
    L += [f"Runs: `{Path(cfg['runs_dir'])}`; reference model `{cfg['policy']}`; reward models "
          f"{', '.join(f'`{p}`' for p in report['reward_models'])}.",
          "Runs not evaluated: " + (", ".join(f"{n} ({why})" for n, why in report["missing"].items())
                                    if report["missing"] else "none") + ".",
          f"Sampling: {json.dumps(report['sampling'])}. Evaluated in {report['seconds']:.0f} s.\n"]
    L += table2_markdown(report["table2"], cfg["ground_truth"]) + [""]
    L += figure2a(report, out) + [""] + yardstick_markdown(report["fast_rl_yardstick"]) + [""]
    L += figure2b_sheet_markdown(report["human_eval"]) + [""]
    L += figure3(report["scores"], out, report["objectives"]) + [""]
    L += figure4(report["weight_sweep"], out, len(report["objectives"])) + [""]
    L += table3_markdown(report["table3"])
    for extra in (lagrangian_markdown(report["training_curves"]), samples_markdown(report["training_samples"]),
                  side_by_side_markdown(report.get("side_by_side", []))):
        if extra:
            L += [""] + extra
    if cfg["ground_truth"]:
        L += [""] + ground_truth(report, out)
    L += ["", "## Raw data\n", "`answers.jsonl`: one line per (model, prompt): the answer, whether it ended with EOS, "
          "its reward-model probabilities" + (" and its true scores" if cfg["ground_truth"] else "")
          + ". `report.json`: every number above, from which this report and its figures are drawn."]
    bk.write_whole(out / "report.md", "\n".join(L) + "\n")


def table2_markdown(table2: dict, gt: bool) -> list[str]:
    refs = list(next(iter(table2.values()))["reference_rms"]) if table2 else []
    L = ["## Table 2: reward-model accuracy\n",
         "Test pairs, never used in training or validation. Accuracy: the preferred answer scored higher."
         + (" On the tiny world also against the ground truth (pairs whose true scores tie left out), and how often"
            " the noisy labels themselves agree with the truth." if gt else "")
         + (f" Reference reward models on the same pairs: {', '.join(refs)}." if refs else "") + "\n",
         "| benchmark | reward model | pairs | accuracy |" + "".join(f" {n} |" for n in refs)
         + (" vs truth | labels vs truth |" if gt else ""),
         "|---|---|---|---|" + "---|" * len(refs) + ("---|---|" if gt else "")]
    for title, r in table2.items():
        L.append(f"| {title} | RM{r['objective']} | {r['pairs']} | {r['accuracy']:.3f} |"
                 + "".join(f" {r['reference_rms'][n]:.3f} |" for n in refs)
                 + (f" {r['accuracy_vs_truth']:.3f} | {r['labels_agree_with_truth']:.3f} |" if gt else ""))
    return L


def win_rate_bars(win: dict, path: Path, ylabel: str, title: str) -> None:
    """MOLMA's win rates against each model, per objective, with their intervals (Figures 2a and 2b)."""
    objectives = list(next(iter(win.values())))
    width = 0.76 / len(objectives)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(win) * len(objectives) / 2, 3.6))
    for k, obj in enumerate(objectives):
        vals = [win[n][obj]["win_rate"] for n in win]
        err = [[v - win[n][obj]["ci95"][0] for v, n in zip(vals, win)], [win[n][obj]["ci95"][1] - v for v, n in zip(vals, win)]]
        ax.bar([x + (k - (len(objectives) - 1) / 2) * width for x in range(len(win))], vals, width, yerr=err, capsize=3,
               color=COLORS[obj], label=QUALITY[obj])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(range(len(win))), [f"vs {n}" for n in win], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def figure2a(report: dict, out: Path) -> list[str]:
    win, cfg, objs = report["win_rates"], report["config"], report["objectives"]
    L = ["## Figure 2a: model-based evaluation\n"]
    if win:
        win_rate_bars(win, out / "fig2a_win_rates.png", "MOLMA win rate (ties = 1/2)",
                      "Model-based evaluation (Figure 2a), 95% bootstrap CI")
    else:                                     # pi_0 alone, or no MOLMA run yet: the mean scores below
        L += ["No trained MOLMA run: no win rates (the runs not evaluated are listed above).\n"]
    L += [f"{report['sampling']['num_prompts']} test prompts, one sampled answer per model, scored by "
          f"{' and '.join('RM' + o for o in objs)} (probabilities). MOLMA's win rate: the share of prompts where MOLMA's "
          f"answer scores higher; a tie counts as half a win. 95% intervals: percentile bootstrap over prompts, "
          f"{cfg['bootstrap']} resamples.\n",
          "| MOLMA vs |" + "".join(f" {QUALITY[o]} win rate [95% CI] |" for o in objs) + f" ties ({'/'.join(objs)}) |",
          "|---|" + "---|" * len(objs) + "---|"] * bool(win)
    for n, w in win.items():
        L.append(f"| {n} |" + "".join(f" {w[o]['win_rate']:.3f} [{w[o]['ci95'][0]:.3f}, {w[o]['ci95'][1]:.3f}] |"
                                      for o in objs) + f" {'/'.join(str(w[o]['ties']) for o in objs)} |")
    L += ["", "![win rates](fig2a_win_rates.png)"] * bool(win) + ["", "Mean reward-model scores of the answers:\n",
          "| model |" + "".join(f" RM{o} |" for o in objs) + " answers ending with EOS |", "|---|" + "---|" * len(objs) + "---|"]
    for n, means in report["mean_scores"].items():
        L.append(f"| {n} |" + "".join(f" {m:.3f} |" for m in means) + f" {report['eos_rate'][n]:.3f} |")
    if report["training_curves"]:
        draw_training_curves(report["training_curves"], out / "fig_training_curves.png")
        L += ["", "Training curves of every run (from its metrics.jsonl):\n", "![training curves](fig_training_curves.png)"]
    return L


def yardstick_markdown(table: dict) -> list[str]:
    gt = any("worst_case_truth" in t for t in table.values())
    L = ["Fast RL's yardstick (its Eq. 2): the worst-case composite reward, inf over simplex weights of the mean "
         "weighted reward = the worst objective's mean, and the disparity, best objective's mean minus worst's. "
         "Higher worst case and lower disparity are better.\n",
         "| model | worst case (RM) | disparity (RM) |" + (" worst case (truth) | disparity (truth) |" if gt else ""),
         "|---|---|---|" + ("---|---|" if gt else "")]
    for n, t in table.items():
        L.append(f"| {n} | {t['worst_case_rm']:.3f} | {t['disparity_rm']:.3f} |"
                 + (f" {t['worst_case_truth']:.3f} | {t['disparity_truth']:.3f} |" if gt else ""))
    return L


def draw_training_curves(curves: dict, path: Path) -> None:
    """What each run did, iteration by iteration, as a grid of panels; one colour per run in every panel."""
    names = list(curves)
    objs = [o for o in QUALITY if any(f"{o}/score" in c[0] for c in curves.values())]
    panels = [(f"{o}/score", f"RM{o} score", "probability") for o in objs] + [("objective/kl", "KL to pi_0", "nats")]
    panels += [(f"truth/{o}", f"true {QUALITY[o]}", "true score") for o in objs
               if any(f"truth/{o}" in c[0] for c in curves.values())]
    panels += [("amtl/cos", "MOLMA: cosine of the gradients", "cosine"),
               ("amtl/cond_before", "MOLMA: cond(G) before / after", "condition number")]
    if any("state/mean_cost" in c[0] for c in curves.values()):          # Safe RLHF's Lagrangian runs
        panels.append(("state/lambda", "lagrangian: lambda", "lambda"))
    cols = 4 if len(panels) > 4 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows + 0.6), squeeze=False)
    color = {n: f"C{i}" for i, n in enumerate(names)}
    smooth = lambda v: [sum(v[max(0, i - 4) : i + 1]) / len(v[max(0, i - 4) : i + 1]) for i in range(len(v))]
    for ax, (key, title, unit) in zip(axes.flat, panels):
        for n, c in curves.items():
            if key in c[0] and (key != "state/lambda" or "state/mean_cost" in c[0]):   # not Fast RL's step size
                series = [l[key] if isinstance(l[key], list) else [l[key]] for l in c]     # a multiplier per constraint
                for j in range(len(series[0])):
                    ax.plot([l["step"] for l in c], smooth([v[j] for v in series]), lw=1.2, color=color[n], label=n,
                            ls=("-", ":", "-.")[j % 3])
            if key == "amtl/cond_before" and "amtl/cond_after" in c[0]:
                ax.plot([l["step"] for l in c], smooth([l["amtl/cond_after"] for l in c]), "k--", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    # one legend for the whole figure, below every panel: each run's colour is the same in all of them
    fig.legend(handles=[Line2D([], [], color=color[n], label=n) for n in curves]
               + [Line2D([], [], color="k", ls="--", label="MOLMA cond(G) after alignment")], fontsize=7,
               loc="lower center", ncol=min(5, len(curves) + 1), frameon=False)
    fig.suptitle("Training curves (moving average over 5 iterations)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * (1 + len(curves) // 5), 1, 1))
    save_figure(fig, path, tight=False)


def figure2b_sheet_markdown(sheet: dict) -> list[str]:
    L = ["## Figure 2b: human evaluation\n"]
    if "none" in sheet:
        return L + [f"No sheet: {sheet['none']}."]
    return L + [f"A blinded sheet of {sheet['prompts']} random test prompts, each with the answers of "
                f"{', '.join(sheet['models'])} in a shuffled order under anonymous ids: `human_eval/sheet.csv`, with "
                f"`human_eval/INSTRUCTIONS.txt` (give the folder `human_eval/` to each evaluator). Its key stays apart "
                f"in `human_eval_keys/{sheet['sheet_id']}.json`. With the filled copies, run "
                f"`04_evaluate.py --out {sheet['report_folder']} --human-sheets a.csv,b.csv,...`: MOLMA's win rates in "
                f"`human_eval/results.md` and `fig2b_human_win_rates.png`, from the saved key, nothing sampled again."]


def figure3(scores: dict, out: Path, objectives: list[str]) -> list[str]:
    """A scatter of the answers' reward-model scores per model; with three objectives, a row per pair of them."""
    names = list(scores)
    pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
    if len(pairs) == 1:
        cols = min(4, len(names))
        rows_ = math.ceil(len(names) / cols)
        cells = [(n, pairs[0]) for n in names]
    else:
        cols, rows_ = len(names), len(pairs)
        cells = [(n, pair) for pair in pairs for n in names]
    fig, axes = plt.subplots(rows_, cols, figsize=(3.1 * cols, 3.0 * rows_), squeeze=False)
    for ax, (n, (i, j)) in zip(axes.flat, cells):
        ax.scatter([x[i] for x in scores[n]], [x[j] for x in scores[n]], s=5, alpha=0.4)
        ax.set_title(n, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"RM{objectives[i]}", fontsize=8)
        ax.set_ylabel(f"RM{objectives[j]}", fontsize=8)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.suptitle("Reward distributions of the test answers (Figure 3)")
    save_figure(fig, out / "fig3_reward_distributions.png")
    return ["## Figure 3: reward distributions\n", "![reward distributions](fig3_reward_distributions.png)"]


def figure4(sweep: list[dict], out: Path, k: int = 2) -> list[str]:
    L = ["## Figure 4: weight sweep\n"]
    if k != 2:
        return L + [f"Figure 4 sweeps one weight between two objectives; with {k}, so_weighted's weights live on a "
                    f"simplex (03 --weights w1,w2,w3): `OBJECTIVES=help,safe,honest ./run.sh study` trains a grid of them over "
                    f"seeds and counts how many it takes to match MOLMA."]
    if not sweep:
        return L + ["No so_weighted run found."]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    if len(sweep) < 2:                    # one point is no curve: say how to get the sweep, in the figure too
        ax.axis("off")
        ax.text(0.5, 0.5, "Figure 4 needs so_weighted at several weights;\nonly the (0.5, 0.5) run was found.\n\n"
                "Run  ./run.sh sweep  (after ./run.sh)\nfor weights 0.1, 0.3, 0.7 and 0.9.", ha="center", va="center",
                fontsize=9, transform=ax.transAxes)
        save_figure(fig, out / "fig4_weight_sweep.png")
        s = sweep[0]
        return L + [f"Only one so_weighted run ({s['run']}): MOLMA's win rate against it is {s['help']:.3f} "
                    f"(helpfulness) and {s['safe']:.3f} (safety). For the curve over weights, run "
                    f"`./run.sh sweep` after `./run.sh`.", "", "![weight sweep](fig4_weight_sweep.png)"]
    for obj, color in (("help", "tab:blue"), ("safe", "tab:orange")):
        ax.plot([s["help_weight"] for s in sweep], [s[obj] for s in sweep], "o-", color=color,
                label="helpfulness" if obj == "help" else "safety")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("so_weighted's helpfulness weight")
    ax.set_ylabel("MOLMA win rate")
    ax.set_ylim(0, 1)
    ax.set_title("MOLMA (equal weights) vs SOweighted (Figure 4)")
    ax.legend(fontsize=8)
    save_figure(fig, out / "fig4_weight_sweep.png")
    L += ["| so_weighted run | helpfulness weight | MOLMA help win rate | MOLMA safety win rate |", "|---|---|---|---|"]
    L += [f"| {s['run']} | {s['help_weight']:.2f} | {s['help']:.3f} | {s['safe']:.3f} |" for s in sweep]
    return L + ["", "![weight sweep](fig4_weight_sweep.png)"]


def table3_markdown(table3: dict) -> list[str]:
    so_runs = [n for n in table3 if n != "molma" and table3[n]["method"] in BASELINES[:4]]
    L = ["## Table 3: training time\n",
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
                 f"{table3['molma']['median_seconds_per_iteration'] / mean_so:.2f}x per iteration. The paper's Table 3 "
                 f"reports three ratios of total time: MOLMA / SOhelp 1.88x, MOLMA / SOweighted 1.75x, MOLMA / the "
                 f"mean of the four SO runs 1.81x; compare the same pair (the MOLMA ratio column).")
    return L


def lagrangian_markdown(curves: dict) -> list[str]:
    """Safe RLHF's lambda, iteration by iteration, against the batch's mean cost (from metrics.jsonl)."""
    runs = {n: c for n, c in curves.items() if "state/mean_cost" in c[0]}
    if not runs:
        return []
    L = ["## Safe RLHF's Lagrangian baseline (not in the paper)\n",
         "lambda grows while the batch's mean cost (minus RMsafe's linear score) exceeds the threshold and shrinks "
         "when it does not; the reward is (r_help - lambda cost) / (1 + lambda). With three objectives, a lambda and a "
         "mean cost per constraint (safety / honesty).\n",
         "| run | iteration | lambda | mean cost |", "|---|---|---|---|"]
    fmt = lambda v: " / ".join(f"{x:.3f}" for x in (v if isinstance(v, list) else [v]))
    for n, c in runs.items():
        picks = sorted({0, *range(9, len(c), 10), len(c) - 1})
        L += [f"| {n} | {c[i]['step']} | {fmt(c[i]['state/lambda'])} | {fmt(c[i]['state/mean_cost'])} |" for i in picks]
    return L


SIDE_BY_SIDE = 3      # test prompts shown with every model's answer in report.md (all are in answers.jsonl)


def side_by_side_markdown(rows: list[dict]) -> list[str]:
    """The first test prompts with pi_0's answer (before training) and each trained model's (after)."""
    if not rows:
        return []
    L = ["## The same test prompts, before and after\n",
         f"The first {len(rows)} test prompts: the reference model pi_0's answer (before training) and each trained "
         f"model's, sampled as above (every answer is in answers.jsonl).\n"]
    for r in rows:
        L += [f"**Prompt:** {r['prompt'].strip()}\n", "| model | answer |", "|---|---|"]
        L += [f"| {n} | {a.replace('|', '/').replace(chr(10), ' ').strip()[:400]} |" for n, a in r.items() if n != "prompt"]
        L.append("")
    return L


def samples_markdown(samples: list[dict]) -> list[str]:
    """training_samples as a table, to read how the answers changed during training."""
    if not samples:
        return []
    L = ["## What the policies said during training\n",
         "From each run's samples.jsonl (rank 0's first rollouts every --sample-every iterations): the first and "
         "the last iteration sampled.\n",
         "| run | iteration | prompt | answer | RM scores | truth |", "|---|---|---|---|---|---|"]
    cell = lambda t: t.replace("|", "/").replace("\n", " ")[:160]
    for r in samples:
        rm = ", ".join(f"{k[3:]} {v:.2f}" for k, v in r.items() if k.startswith("rm_"))
        tr = ", ".join(f"{k[5:]} {v:.2f}" for k, v in r.items() if k.startswith("true_")) or "-"
        L.append(f"| {r['run']} | {r['iteration']} | {cell(r['prompt'])} | {cell(r['answer'])} | {rm} | {tr} |")
    return L


def ground_truth(report: dict, out: Path) -> list[str]:
    """Tiny world: each model's mean true scores with the models' Pareto front (one panel per pair of objectives),
    and the table."""
    stats, front, objs = report["truth"], report["pareto_front"], report["objectives"]
    means = {n: tuple(t[f"true_{o}"] for o in objs) for n, t in stats.items()}
    pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.6 + 4.0 * (len(pairs) - 1), 4.0), squeeze=False)
    for ax, (a, b) in zip(axes.flat, pairs):
        for k, n in enumerate(means):       # a colour and marker per model, named in the legend (labels beside
            x, y = means[n][a], means[n][b]  # the points collide when models land close together)
            ax.scatter([x], [y], s=120 if n == "molma" else 45, marker="*" if n == "molma" else "osD^vP<>hX"[k % 10],
                       color="black" if n == "molma" else plt.get_cmap("tab10")(k % 10), zorder=3, label=n)
        if len(objs) == 2:                  # with three, the front of the means is not a line in one panel
            fx = sorted(means[n] for n in front)
            ax.plot([p[0] for p in fx], [p[1] for p in fx], "k--", lw=1, label="Pareto front of the models")
        ax.set_xlabel(f"mean true {QUALITY[objs[a]]}")
        ax.set_ylabel(f"mean true {QUALITY[objs[b]]}")
    axes.flat[0].set_title("Tiny world: ground truth of the test answers")
    axes.flat[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    save_figure(fig, out / "fig_truth_pareto.png")
    space = " x ".join(objs)
    L = ["## Tiny world: the ground truth\n",
         f"Every answer scored by `tiny_world`'s truth. Hypervolume: the volume of [0, 1]^{len(objs)} dominated by the "
         f"model's answers as points of true {', '.join(QUALITY[o] for o in objs)}, reference point 0; it saturates as "
         f"soon as a model gives a few near-ideal answers, so the mean volume dominated by one answer (mean of {space}, "
         f"the hypervolume of a single answer against 0) is given beside it. On the Pareto front: no other model's "
         f"means are at least as good on every objective and better on one.\n",
         "| model |" + "".join(f" mean true {QUALITY[o]} |" for o in objs)
         + f" on the models' Pareto front | hypervolume | mean {space} |", "|---|" + "---|" * (len(objs) + 3)]
    for n, t in stats.items():
        L.append(f"| {n} |" + "".join(f" {t[f'true_{o}']:.3f} |" for o in objs)
                 + f" {'yes' if t['on_pareto_front'] else 'no'} | {t['hypervolume']:.3f} | {t['mean_answer_area']:.3f} |")
    return L + ["", "![ground truth](fig_truth_pareto.png)"]


