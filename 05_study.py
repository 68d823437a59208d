"""Stage 5: the report over seeds of a study (beyond the paper): from the per-seed reports 04 writes, each
quantity's mean and 95% interval per model and setting, paired differences (MOLMA minus each model, whitened minus
not), the comparison at equal KL (Gao et al. 2022), how many so_weighted weightings it took to match MOLMA, the
claims RESULTS.md states with the paired interval that tests each, and a figure of the means.

No models are loaded and nothing is sampled: plain Python, after `./run.sh study` has trained and evaluated every
run of <study>/whiten_<false|true>/seed<S>/ (04 writes each seed's report/report.json; the RL runs' metrics.jsonl
give the KL curves):
    python 05_study.py --study runs/study           # two objectives
    python 05_study.py --study runs/study_hhh       # three objectives
Writes <study>/study.md, study.json, fig_study.png and fig_kl_whiten_<false|true>.png. The same reports give the
same numbers. With --results RESULTS.md (as ./run.sh study runs it) the same report also becomes this study's
section of RESULTS.md, stamped with the command, the date and the machine: the results the README points to are
written by the study itself, never copied by hand.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import bookkeeping as bk
import common as C
from report import QUALITY, plt, save_figure       # (report sets matplotlib's Agg backend)
from stats import holm, mean_ci, paired, pareto_front, t_pvalue


@dataclass
class Args(bk.CheckedArgs):
    """The report over seeds of a study folder (./run.sh study), from its per-seed reports."""
    study: str = bk.arg("runs/study", "the study folder: <study>/whiten_<false|true>/seed<S>/report/report.json "
                                     "(04's per-seed reports) and the runs beside them")
    results: str = bk.arg("", "also write the report as this study's section of a generated results file (./run.sh "
                             "study: RESULTS.md): that section is replaced, every other study's section is kept")
    allow_missing_seeds: bool = bk.arg(False, "report over the seeds whose report exists when another seed's is missing "
                                             "(said in the output and the report); by default a missing one stops it")


def seed_values(study: Path, setting: str, allow_missing: bool = False) -> tuple[list[str], dict, list[str]]:
    """One setting's per-seed numbers -> (seeds, {model: {quantity: [value per seed]}}, objectives); a seed folder
    without its report, or a model missing from any seed's report, is an error, so that every mean is over the same
    seeds (allow_missing: the seeds with a report, said aloud)."""
    folders = sorted((p for p in (study / setting).glob("seed*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    missing = [p / "report" / "report.json" for p in folders if not (p / "report" / "report.json").exists()]
    if missing and not allow_missing:
        raise SystemExit(f"{study / setting}: {len(missing)} of {len(folders)} seeds have no report: "
                         f"{', '.join(map(str, missing))}. A mean over the others would be over fewer seeds than the "
                         f"study ran. Finish them (./run.sh study resumes), or --allow-missing-seeds true to report "
                         f"over the seeds there are")
    if missing:
        print(f"[05] {study / setting}: seeds {', '.join(p.parts[-3][4:] for p in missing)} have no report; reporting "
              f"over the others (--allow-missing-seeds)")
    reports = [p / "report" / "report.json" for p in folders if (p / "report" / "report.json").exists()]
    seeds, per, objectives = [p.parts[-3][4:] for p in reports], {}, None
    for path in reports:
        rep = C.read_json(path)
        objs = rep.get("objectives", ["help", "safe"])             # a report from before K = 3 was (help, safe)
        if objectives not in (None, objs):
            raise SystemExit(f"{path} is on the objectives {objs}, the setting's other seeds on {objectives}: one study, "
                             f"one set of objectives (give each its own STUDY folder)")
        objectives = objs
        runs_dir = path.parent.parent
        front = set(rep["pareto_front"])
        for n, t in rep["truth"].items():
            metrics = runs_dir / n / "metrics.jsonl"
            kl = 0.0                                                  # pi_0 is its own reference
            if n != "reference":
                lines = [json.loads(l) for l in metrics.read_text().splitlines() if l][-10:]
                kl = sum(l["objective/kl"] for l in lines) / len(lines)
            v = {**{f"true_{o}": t[f"true_{o}"] for o in objs}, "mean_product": t["mean_answer_area"],
                 **{f"rm_{o}": rep["mean_scores"][n][k] for k, o in enumerate(objs)}, "kl": kl,
                 "on_front": float(n in front)}
            if n != "molma":
                v.update({f"molma_win_{o}": rep["win_rates"][n][o]["win_rate"] for o in objs})
            for k, x in v.items():
                per.setdefault(n, {}).setdefault(k, []).append(x)
    for n, v in per.items():
        if len(v["kl"]) != len(seeds):
            raise SystemExit(f"{study / setting}: {n} is in {len(v['kl'])} of the {len(seeds)} seeds' reports; "
                             f"finish its runs (./run.sh study resumes) or remove it")
    return seeds, per, objectives


def smoothed_curve(metrics_path: Path, objectives=("help", "safe"), window: int = 10) -> list[tuple[float, ...]]:
    """One run's path through (KL to pi_0, the truth of each objective), per iteration: trailing means over up to
    `window` iterations of metrics.jsonl's objective/kl and truth/<objective> (the tiny world's truth of that
    iteration's training rollouts). The window expands from the first iteration (its mean is over the iterations
    so far), so the curve starts where the run starts, near KL 0: no run looks as if it started above a KL because
    the window put its first point late. -> [(kl, true score per objective)], one per iteration."""
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l]
    xs = [(r["objective/kl"], *(r[f"truth/{o}"] for o in objectives)) for r in rows]
    return [tuple(sum(x[j] for x in xs[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                  for j in range(len(xs[0]))) for i in range(len(xs))]


def at_kl(curve: list[tuple[float, ...]], kl: float) -> tuple[str, tuple[float, ...] | None]:
    """Where a run's smoothed KL first reaches kl -> ("reached", its true scores there, linearly between the two
    iterations around it); ("starts above", None) when its first smoothed point already lies above kl, so the run
    never passed through that KL and no comparison at it exists; ("never", None) when it stays below."""
    for i, (k, *t) in enumerate(curve):
        if k >= kl:
            if k == kl:
                return "reached", tuple(t)
            if i == 0:
                return "starts above", None
            k0, *t0 = curve[i - 1]
            f = (kl - k0) / (k - k0)
            return "reached", tuple(a0 + f * (a - a0) for a0, a in zip(t0, t))
    return "never", None


def equal_kl(study: Path, setting: str, seeds: list[str], names: list[str], objectives=("help", "safe")) -> dict:
    """Gao et al. (2022): RLHF trades reward for distance from pi_0, so methods are compared at equal KL too.
    Per seed, one rule for both runs: the KL compared is the highest both runs' smoothed curves reach (the lower of
    their two maxima), and each run's true scores are read where its own curve first reaches it (at_kl). Swapping
    the two runs swaps the sign and nothing else, so two runs of one process differ by 0 on average
    (tests/test_evaluate.py's simulated twins); reading one run at its end and the other at its first crossing
    favours the one read at its end whenever the truth still rises at a level KL. A seed where either curve's first
    point already lies above that KL is counted apart ("starts_above") and left out of the differences.
    -> {"models": {model: {"molma_minus_<objective>": [..], "seeds": [..], "kl": [KL compared, per seed],
    "starts_above": [..], "never": [..]}}, "curves": {model: [curve per seed]}, "seeds": seeds}."""
    curves = {n: [smoothed_curve(study / setting / f"seed{x}" / n / "metrics.jsonl", objectives) for x in seeds]
              for n in names if n != "reference"}
    result = {"curves": curves, "models": {}, "seeds": seeds}
    for n in curves:
        if n == "molma":
            continue
        d = {**{f"molma_minus_{o}": [] for o in objectives}, "seeds": [], "kl": [], "starts_above": [], "never": []}
        for x, mc, c in zip(seeds, curves["molma"], curves[n]):
            kl = min(max(p[0] for p in mc), max(p[0] for p in c))       # the highest KL both runs reach
            (s_mine, mine), (s_there, there) = at_kl(mc, kl), at_kl(c, kl)
            if s_mine == s_there == "reached":
                for o, a, b in zip(objectives, mine, there):
                    d[f"molma_minus_{o}"].append(a - b)
                d["seeds"].append(x)
                d["kl"].append(kl)
            else:
                d["starts_above" if "starts above" in (s_mine, s_there) else "never"].append(x)
        result["models"][n] = d
    return result


def verdict(values: list[float]) -> str:
    """A paired difference's verdict from its 95% interval: the sign holds only if the interval excludes 0."""
    if len(values) < 2:
        return "too few seeds"
    m, lo, hi = mean_ci(values)
    return "> 0 holds" if lo > 0 else "< 0 holds" if hi < 0 else "not distinguishable from 0"


def family(claims: list[tuple[str, str, list[float]]]) -> list[dict]:
    """A family of claims [(claim, quantity, paired values per seed)] -> each with its 95% interval, its verdict
    uncorrected (the interval), its p-value, Holm's adjusted p over the family, and its verdict for the family:
    the sign holds only if the adjusted p < 0.05."""
    ps = [t_pvalue(v) for _, _, v in claims]
    rows = []
    for (c, q, v), p, adj in zip(claims, ps, holm(ps)):
        sign = "> 0" if v and sum(v) > 0 else "< 0"
        rows.append({"claim": c, "quantity": q, "interval": mean_ci(v) if len(v) > 1 else None, "values": v,
                     "verdict": verdict(v), "p": p, "p_holm": adj,
                     "verdict_holm": ("too few seeds" if len(v) < 2 else f"{sign} holds" if adj < 0.05
                                      else "not distinguishable from 0")})
    return rows


def family_markdown(rows: list[dict], what: str) -> list[str]:
    """A family's table and the sentence that says how many claims it tested and how many hold, before and after."""
    fmt = lambda r: "{:.3f} [{:.3f}, {:.3f}]".format(*r["interval"]) if r["interval"] else "-"
    pf = lambda p: "-" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"
    raw = sum("holds" in r["verdict"] for r in rows)
    held = sum("holds" in r["verdict_holm"] for r in rows)
    return [f"Claims and their tests, {what}: a family of **{len(rows)} claims**. Each is a paired t-test over seeds; "
            f"a claim holds when Holm's adjusted p (family-wise error 5% over these {len(rows)}) is below 0.05. "
            f"{held} hold after the correction; {raw} would by their own 95% interval alone (uncorrected, shown "
            f"beside: with no real difference anywhere about {0.05 * len(rows):.1f} of {len(rows)} would).\n",
            "| claim | quantity | mean [95% interval] | p | Holm p | verdict (Holm) | uncorrected |", "|---" * 7 + "|",
            *(f"| {r['claim']} | {r['quantity']} | {fmt(r)} | {pf(r['p'])} | {pf(r['p_holm'])} | {r['verdict_holm']} "
              f"| {r['verdict']} |" for r in rows)]


def weightings_needed(per: dict, eq: dict, objectives: list[str], weights: dict) -> dict:
    """MOLMA needs no weights; so_weighted needs one per objective, and with K of them a user searches the simplex.
    For every so_weighted run of the study (one weighting each, equal weights first: the one a user tries first)
    and Fast RL (weight-free too), paired by seed: the run minus MOLMA per objective, at the end and at MOLMA's KL.
    A weighting matched or beat MOLMA when on EVERY objective
      by the means:  the mean over seeds of (run - MOLMA) >= 0;
      per seed:      (run - MOLMA) >= 0 in that seed (at equal KL: a seed where a curve starts above the KL
                     compared does not count);
    and, with the intervals (uncorrected: a description of the grid, not a family of claims): "beats" when every
    objective's 95% interval of (run - MOLMA) lies above 0, "MOLMA better" when on at least one objective the
    interval of (MOLMA - run) lies above 0.
    Of N weightings with m that matched, a user trying them in a random order needs (N + 1) / (m + 1) on average."""
    runs = sorted((n for n in per if n.startswith("so_weighted")), key=lambda n: (n != "so_weighted", n))
    out = {"weightings": runs, "rows": {}, "summary": {}}
    n_seeds = len(eq["seeds"])
    for where in ("end", "equal_kl"):
        per_seed_count = [0] * n_seeds
        for n in [*runs, *(["fast_rl"] if "fast_rl" in per else [])]:
            if where == "end":
                diff = {o: paired(per[n], per["molma"], (f"true_{o}",))[f"true_{o}"] for o in objectives}
                seeds_in = list(range(n_seeds))
            else:
                d = eq["models"][n]
                diff = {o: [-x for x in d[f"molma_minus_{o}"]] for o in objectives}
                seeds_in = [i for i, s in enumerate(eq["seeds"]) if s in d["seeds"]]
            ok = [all(diff[o][j] >= 0 for o in objectives) for j in range(len(seeds_in))]
            if n in runs:
                for j, i in enumerate(seeds_in):
                    per_seed_count[i] += ok[j]
            row = {"weights": weights.get(n), "seeds": len(seeds_in),
                   "minus_molma": {o: mean_ci(v) if len(v) > 1 else None for o, v in diff.items()},
                   "values": diff, "by_means": bool(seeds_in) and all(sum(v) / len(v) >= 0 for v in diff.values()),
                   "seeds_matched": sum(ok),
                   "beats": all(verdict(v) == "> 0 holds" for v in diff.values()),
                   "molma_better_on": [o for o, v in diff.items() if verdict(v) == "< 0 holds"]}
            out["rows"].setdefault(where, {})[n] = row
        rows = [out["rows"][where][n] for n in runs]
        m = sum(r["by_means"] for r in rows)
        out["summary"][where] = {
            "weightings": len(runs), "matched_by_means": m,
            "expected_tries_random_order": (len(runs) + 1) / (m + 1) if m else None,
            "equal_weights_matched": bool(rows and rows[0]["by_means"]),
            "beats_with_intervals": sum(r["beats"] for r in rows),
            "molma_better_with_intervals": sum(bool(r["molma_better_on"]) for r in rows),
            "matched_per_seed": per_seed_count,
            "matched_per_seed_ci": mean_ci([float(c) for c in per_seed_count])}
    return out


def weightings_markdown(w: dict, objectives: list[str], n_seeds: int) -> list[str]:
    fmt = lambda c: "-" if c is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*c)
    wfmt = lambda ws, n: "(" + ", ".join(f"{x:.2f}" for x in ws) + ")" if ws else n
    L = [f"### How many weightings does so_weighted need to match MOLMA on all {len(objectives)} objectives at once?\n",
         f"Each so_weighted run of the study is one weighting of ({', '.join(objectives)}); MOLMA and Fast RL need none. "
         f"Each cell: the run minus MOLMA, mean over seeds [95% interval], paired by seed; 'matched' means >= MOLMA on "
         f"every objective (by the means over seeds; per seed, in how many seeds); the intervals are uncorrected "
         f"(this table describes the grid; the claims below are the tests).\n"]
    for where, title in (("end", "At the end (test answers' truth)"),
                         ("equal_kl", "At equal KL (training answers' truth, each run where its curve first reaches "
                                      "the highest KL both reach)")):
        s = w["summary"][where]
        L += [f"{title}:\n", "| run | weights | " + " | ".join(f"true {o}" for o in objectives)
              + " | matched (means) | seeds matched | MOLMA better (interval excludes 0) |", "|---" * (len(objectives) + 5) + "|"]
        for n, r in w["rows"][where].items():
            L.append(f"| {n} | {wfmt(r['weights'], '-' if n == 'fast_rl' else '?')} | "
                     + " | ".join(fmt(r["minus_molma"][o]) for o in objectives)
                     + f" | {'yes' if r['by_means'] else 'no'} | {r['seeds_matched']} of {r['seeds']}"
                     + (f" (of {n_seeds} reached)" if where == "equal_kl" and r["seeds"] < n_seeds else "")
                     + f" | {', '.join(r['molma_better_on']) or '-'} |")
        m, lo, hi = s["matched_per_seed_ci"]
        tries = (f"a user trying them in a random order needs {s['expected_tries_random_order']:.1f} of them on average"
                 if s["matched_by_means"] else "no number of tries finds one in this grid")
        L += ["", f"{s['matched_by_means']} of {s['weightings']} weightings matched or beat MOLMA on every objective by "
              f"the means ({tries}; equal weights, tried first, {'did' if s['equal_weights_matched'] else 'did not'}); "
              f"{s['beats_with_intervals']} beat it on every objective with every interval above 0; on "
              f"{s['molma_better_with_intervals']} MOLMA was better on at least one objective with the interval "
              f"excluding 0. Per seed, weightings that matched MOLMA's on every objective: "
              f"{', '.join(map(str, s['matched_per_seed']))} of {s['weightings']}"
              + (f" (mean {m:.1f} [{lo:.1f}, {hi:.1f}])." if not math.isnan(lo) else "."), ""]
    return L


def kl_figure(study: Path, setting: str, curves: dict, objectives=("help", "safe")) -> str:
    """Each objective's truth of the training rollouts against KL to pi_0, as training goes, mean over seeds."""
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.5 * len(objectives), 4.2), sharex=True, squeeze=False)
    names = sorted(curves, key=lambda n: (n != "molma", n))
    for i, n in enumerate(names):
        n_it = min(len(c) for c in curves[n])
        mean = [[sum(c[t][j] for c in curves[n]) / len(curves[n]) for j in range(len(objectives) + 1)] for t in range(n_it)]
        for ax, j in zip(axes.flat, range(1, len(objectives) + 1)):
            ax.plot([m[0] for m in mean], [m[j] for m in mean], lw=2.2 if n == "molma" else 1.0,
                    color="black" if n == "molma" else plt.get_cmap("tab20")(i % 20), label=n,
                    ls="-" if n == "molma" or not n.startswith("so_weighted_w") else ":")
    for ax, o in zip(axes.flat, objectives):
        ax.set_xlabel("KL to pi_0 (training, trailing mean of up to 10 iterations)")
        ax.set_ylabel(f"true {QUALITY.get(o, o)} of the training answers")
    axes.flat[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{setting.replace('_', ' = ')}: the truth against the distance from pi_0, as training goes "
                 f"(mean over seeds)", fontsize=10)
    name = f"fig_kl_{setting}.png"
    save_figure(fig, study / name)
    return name


def study_report(study: Path, allow_missing: bool = False) -> None:
    """The report over seeds: each quantity's mean and 95% interval per model and setting, paired differences
    (MOLMA minus each model, whitened minus not), at equal KL, how many so_weighted weightings it took to match
    MOLMA, and a figure of the means."""
    settings = [s for s in ("whiten_false", "whiten_true") if list((study / s).glob("seed*/report/report.json"))]
    if not settings:
        raise SystemExit(f"{study}: no per-seed reports (whiten_<false|true>/seed<S>/report/report.json); run ./run.sh study")
    data = {s: seed_values(study, s, allow_missing) for s in settings}
    objectives = data[settings[0]][2]
    if any(d[2] != objectives for d in data.values()):
        raise SystemExit(f"{study}: the settings were evaluated on different objectives; one study, one set of objectives")
    data = {s: (seeds, per) for s, (seeds, per, _) in data.items()}
    fmt = lambda v: "{:.3f} [{:.3f}, {:.3f}]".format(*mean_ci(v)) if len(v) > 1 else f"{v[0]:.3f} (one seed)"
    truths = [f"true_{o}" for o in objectives]
    product = "mean " + " x ".join(o[0] if len(objectives) == 2 else o for o in objectives)     # mean h x s
    cols = ([(t, t.replace("_", " ")) for t in truths] + [("mean_product", product)]
            + [(f"rm_{o}", f"RM{o}") for o in objectives] + [("kl", "KL")]
            + [(f"molma_win_{o}", f"MOLMA wins ({o})") for o in objectives])
    out = {"objectives": objectives, "settings": {}}
    L = [f"# MOLMA over seeds: `{study}`\n",
         f"Objectives: {', '.join(objectives)}. One tiny world and one set of reward models (seed 0). What varies per "
         "seed: each RL run's `--seed` (the policy's sampling, the critic's new head, the prompt order) and its "
         "evaluation's `--seed` (which test prompts and the sampling of every model's answers, pi_0's included), so "
         "sampling noise is inside every interval. Each cell: the mean over seeds "
         "[95% interval of the mean, Student's t]. True scores: the tiny world's ground truth of the test answers; "
         "RM: reward-model probabilities of the same answers; KL: the training KL to pi_0, mean of the last 10 "
         "iterations; MOLMA wins: MOLMA's win rate against the model on the test prompts (RM scores, ties = 1/2).\n"]
    for setting, (seeds, per) in data.items():
        out["settings"][setting] = {"seeds": seeds, "models": {n: {k: dict(zip(("mean", "low", "high"), mean_ci(v)), values=v)
                                                                   for k, v in q.items()} for n, q in per.items()}}
        absent = sorted({p.name[4:] for p in (study / setting).glob("seed*") if p.is_dir()} - set(seeds), key=int)
        L += [f"## {setting.replace('_', ' = ')}: seeds {', '.join(seeds)}"
              + (f" (seeds {', '.join(absent)}: no report, left out by --allow-missing-seeds)" if absent else "") + "\n",
              "| model | " + " | ".join(c for _, c in cols) + " | on the Pareto front |", "|---" * (len(cols) + 2) + "|"]
        for n, q in per.items():
            L.append(f"| {n} | " + " | ".join(fmt(q[k]) if k in q else "-" for k, _ in cols)
                     + f" | {int(sum(q['on_front']))} of {len(seeds)} seeds |")
        L += ["", "MOLMA minus each model, paired by seed (an interval that excludes 0 holds across these seeds):\n",
              "| model | " + " | ".join(t.replace("_", " ") for t in truths) + f" | {product} |", "|---" * (len(truths) + 2) + "|"]
        diffs = {n: paired(per["molma"], q, (*truths, "mean_product")) for n, q in per.items() if n != "molma"}
        L += [f"| {n} | " + " | ".join(fmt(v) for v in d.values()) + " |" for n, d in diffs.items()]
        out["settings"][setting]["molma_minus"] = {n: {k: mean_ci(v) for k, v in d.items()} for n, d in diffs.items()}
        kl_diff = {n: paired(per["molma"], q, ("kl",))["kl"] for n, q in per.items() if n not in ("molma", "reference")}
        eq = equal_kl(study, setting, seeds, list(per), objectives)
        fig = kl_figure(study, setting, eq["curves"], objectives)
        L += ["", f"At equal KL: per seed, the highest KL both MOLMA's and the model's training curves reach, each "
              f"read where its own curve first reaches it (the same rule on both sides); MOLMA's true scores there "
              f"minus the model's (training answers' truth, trailing means of up to 10 iterations, paired by seed; "
              f"`{fig}`):\n",
              "| model | seeds compared | a curve starts above (left out) | KL compared (mean) | "
              + " | ".join(t.replace("_", " ") for t in truths)
              + " | MOLMA's KL minus the model's (final) |", "|---" * (len(truths) + 5) + "|"]
        for n, d in eq["models"].items():
            L.append(f"| {n} | {len(d['seeds'])} of {len(seeds)} | {len(d['starts_above'])} | "
                     + (f"{sum(d['kl']) / len(d['kl']):.3f}" if d["kl"] else "-") + " | " + " | ".join(
                fmt(d[f"molma_minus_{o}"]) if d[f"molma_minus_{o}"] else "-" for o in objectives) + f" | {fmt(kl_diff[n])} |")
        L += ["", f"![KL curves]({fig})", ""]
        out["settings"][setting]["equal_kl"] = {n: {**{f"molma_minus_{o}": mean_ci(d[f"molma_minus_{o}"])
                                                       if len(d[f"molma_minus_{o}"]) > 1 else None for o in objectives},
                                                   "seeds": d["seeds"], "kl": d["kl"], "starts_above": d["starts_above"],
                                                   "never": d["never"]} for n, d in eq["models"].items()}
        if sum(n.startswith("so_weighted") for n in per) > 1:
            weights = {}
            for n in per:
                summary = study / setting / f"seed{seeds[0]}" / n / "run_summary.json"
                if n.startswith("so_weighted") and summary.exists():
                    weights[n] = C.read_json(summary).get("state", {}).get("weights")
            w = weightings_needed(per, eq, objectives, weights)
            out["settings"][setting]["weightings_needed"] = w
            L += weightings_markdown(w, objectives, len(seeds))
        claims = []          # (claim, quantity, values): what may be said, each with its test
        ref = per.get("reference")
        if ref:
            for k in truths:
                claims.append((f"MOLMA improves on pi_0 in {k.replace('_', ' ')}", f"MOLMA - pi_0, {k}",
                               paired(per["molma"], ref, (k,))[k]))
        if "molma_representation" in per:    # an approximation keeps MOLMA's results if no difference holds
            d = eq["models"]["molma_representation"]
            claims += [(f"The representation aligner changes MOLMA's {k.replace('_', ' ')} (final answers)",
                        f"MOLMA - molma_representation, {k}", diffs["molma_representation"][k]) for k in truths]
            claims += [(f"The representation aligner changes MOLMA's true {o} at equal KL", f"MOLMA - "
                        f"molma_representation at equal KL, true {o} ({len(d['seeds'])} seeds)", d[f"molma_minus_{o}"])
                       for o in objectives]
            claims.append(("The representation aligner changes MOLMA's KL to pi_0", "KL(MOLMA) - "
                           "KL(molma_representation)", kl_diff["molma_representation"]))
        for n in ("so_weighted", "fast_rl", "lagrangian", "so_help", "so_safe", "so_piecewise"):
            if n not in per:
                continue
            for k in truths:
                claims.append((f"MOLMA beats {n} in {k.replace('_', ' ')} (final answers)", f"MOLMA - {n}, {k}",
                               diffs[n][k]))
            d = eq["models"][n]
            for o in objectives:
                claims.append((f"MOLMA beats {n} in true {o} at equal KL", f"MOLMA - {n} at equal KL, true {o} "
                               f"({len(d['seeds'])} seeds)", d[f"molma_minus_{o}"]))
            claims.append((f"MOLMA ends closer to pi_0 than {n}", f"KL(MOLMA) - KL({n})", kl_diff[n]))
        rows = family(claims)
        L += family_markdown(rows, setting.replace("_", " = "))
        out["settings"][setting]["claims"] = rows
        L.append("")
    if len(data) == 2:
        (sf, pf), (st, pt) = data["whiten_false"], data["whiten_true"]
        common_seeds = [x for x in sf if x in st]
        pick = lambda seeds, q: {k: [v[seeds.index(x)] for x in common_seeds] for k, v in q.items()}
        L += [f"## Advantage whitening: whitened minus not, paired by seed ({', '.join(common_seeds)})\n",
              "| model | " + " | ".join(t.replace("_", " ") for t in truths) + f" | {product} | KL |",
              "|---" * (len(truths) + 3) + "|"]
        out["whiten_true_minus_false"], whiten_claims = {}, []
        for n in [n for n in pt if n in pf and n != "reference"]:
            d = paired(pick(st, pt[n]), pick(sf, pf[n]), (*truths, "mean_product", "kl"))
            out["whiten_true_minus_false"][n] = {k: mean_ci(v) for k, v in d.items()}
            L.append(f"| {n} | " + " | ".join(fmt(v) for v in d.values()) + " |")
            whiten_claims += [(f"Whitening raises {n}'s {k.replace('_', ' ')}", f"{n} whitened - not, {k}", d[k])
                              for k in (*truths, "kl")]
        rows = family(whiten_claims)
        L += ["", *family_markdown(rows, "whitening (paired by seed)")]
        out["whiten_claims"] = rows
        L.append("")
    L += study_figure(study, data, objectives)
    timing = study / "stage_seconds.txt"
    if timing.exists():
        secs = [float(l.split()[-1]) for l in timing.read_text().splitlines() if l.strip()]
        L += ["", f"Training time: {len(secs)} RL runs took {sum(secs):.0f} s in all ({sum(secs) / len(secs):.0f} s "
              f"per run, process start included), listed in `stage_seconds.txt`."]
        out["rl_seconds"] = sum(secs)
    bk.write_whole(study / "study.md", "\n".join(L) + "\n")
    bk.write_whole(study / "study.json", json.dumps(out, indent=2))
    print(f"[05] the report over seeds: {study / 'study.md'}")


def study_figure(study: Path, data: dict, objectives=("help", "safe")) -> list[str]:
    """Each model's mean true scores with 95% intervals on both axes: a panel per setting with two objectives (the
    so_weighted sweep joined by weight, the Pareto front of the means drawn), a row of pairwise panels per setting
    with three (the models on the K-dimensional front of the means drawn with a black edge)."""
    pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
    rows, cols = (1, len(data)) if len(pairs) == 1 else (len(data), len(pairs))
    share = True if len(pairs) == 1 else "col"              # the settings side by side on the same axes
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols + 1.8, 4.8 * rows), sharex=share, sharey=share, squeeze=False)
    names = sorted({n for _, per in data.values() for n in per}, key=lambda n: (n != "molma", n))
    color = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    panels = [(s, pair) for s in data for pair in pairs]
    for ax, (setting, (i, j)) in zip(axes.flat, panels):
        seeds, per = data[setting]
        means = {n: tuple(mean_ci(q[f"true_{o}"])[0] for o in objectives) for n, q in per.items()}
        front = set(pareto_front(means))
        for n, q in per.items():
            (x, xl, xh), (y, yl, yh) = mean_ci(q[f"true_{objectives[i]}"]), mean_ci(q[f"true_{objectives[j]}"])
            err = lambda m, lo, hi: None if math.isnan(lo) else [[m - lo], [hi - m]]
            ax.errorbar([x], [y], xerr=err(x, xl, xh), yerr=err(y, yl, yh), fmt="*" if n == "molma" else "o",
                        ms=11 if n == "molma" else 5, color=color[n], capsize=2, lw=0.8, zorder=3,
                        mec="black" if len(pairs) > 1 and n in front else color[n],
                        label=n.replace("so_weighted_w", "so_weighted w="))
        if len(pairs) == 1:
            sweep = sorted((n for n in means if n.startswith("so_weighted")), key=lambda n: means[n][0])
            if len(sweep) > 1:
                ax.plot([means[n][0] for n in sweep], [means[n][1] for n in sweep], color="grey", lw=0.8, ls=":",
                        label="so_weighted at each weight")
            line = sorted(means[n] for n in front)
            ax.plot([p[0] for p in line], [p[1] for p in line], "k--", lw=1, label="Pareto front of the means")
        ax.set_title(f"{setting.replace('_', ' = ')}: {len(seeds)} seeds", fontsize=10)
        ax.set_xlabel(f"mean true {QUALITY.get(objectives[i], objectives[i])}")
        ax.set_ylabel(f"mean true {QUALITY.get(objectives[j], objectives[j])}")
    axes.flat[cols - 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle("Tiny world over seeds: mean true scores of the test answers, 95% intervals"
                 + ("; black edge: on the Pareto front of the means" if len(pairs) > 1 else ""), fontsize=10)
    save_figure(fig, study / "fig_study.png")
    return ["![over seeds](fig_study.png)"]


RESULTS_HEAD = ("# Results over seeds\n\nGenerated: each section between a study's two marker lines is written by "
                "`05_study.py --results RESULTS.md` (the last step of `./run.sh study`) from that study's per-seed "
                "reports, and replaced when the study runs again; do not edit those by hand. The README says how "
                "each number is made and what it does not show; a verdict \"holds\" only after Holm's correction for "
                "the family of claims its section tests.\n")


def machine() -> str:
    """The machine a study ran on, as its section names it: the CPU's model and the cores this process may use."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def write_results(results: Path, study: Path) -> None:
    """Put <study>/study.md into results as the section of this study (between its two marker lines), replacing the
    section an earlier run of the same study wrote and keeping every other section in its place. Headings go one
    level down and the figures are linked from the results file's folder."""
    begin, end = f"<!-- 05_study.py --study {study.as_posix()} -->", f"<!-- end of {study.as_posix()} -->"
    text = (study / "study.md").read_text()
    rel = Path(os.path.relpath(study.resolve(), results.resolve().parent)).as_posix()
    body = []
    for line in text.splitlines():
        if line.startswith("#"):
            line = "#" + line
        body.append(line.replace("](fig_", f"]({rel}/fig_"))
    stamp = (f"Written by `python 05_study.py --study {study.as_posix()} --results {results.name}` on "
             f"{time.strftime('%Y-%m-%d')}, {machine()}. The figures lie in `{rel}/` (run folders are not committed).")
    section = "\n".join([begin, body[0], "", stamp, *body[1:], end])
    old = results.read_text() if results.exists() else RESULTS_HEAD
    if begin in old and end in old:
        new = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    elif (begin in old) != (end in old):
        raise SystemExit(f"{results} holds only one of this study's two markers ({begin!r}, {end!r}): edited by "
                         f"hand? Put the marker back or delete the partial section, then run again")
    else:                         # a new section: after the generated ones (before anything written by hand)
        at = old.rfind("<!-- end of ")
        at = old.index("-->", at) + 3 if at >= 0 else (len(RESULTS_HEAD) if old.startswith(RESULTS_HEAD) else len(old))
        new = old[:at].rstrip("\n") + "\n\n" + section + "\n" + ("\n" + old[at:].lstrip("\n") if old[at:].strip() else "")
    bk.write_whole(results, new)
    print(f"[05] {results}: the section of {study.as_posix()} written")


def main():
    args = bk.parse_args(Args)
    study_report(Path(args.study), args.allow_missing_seeds)
    if args.results:
        write_results(Path(args.results), Path(args.study))


if __name__ == "__main__":
    main()
