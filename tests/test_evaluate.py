"""Stage 4: the statistics against obvious computations, and the report of a tiny smoke pipeline."""
import importlib
import itertools
import json
import math
import random
import shutil
import statistics

import pytest
import torch

from conftest import ROOT, run_fails, run_script

E = importlib.import_module("04_evaluate")
import human_eval
import report as R
import stats
S = importlib.import_module("05_study")


def test_win_rate_counts_ties_as_half():
    a = torch.tensor([0.9, 0.5, 0.2, 0.7])
    b = torch.tensor([0.1, 0.5, 0.3, 0.7])
    assert stats.win_rate(a, b).item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_bootstrap_interval_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g), torch.rand(50, generator=g)
    lo, hi = stats.bootstrap_ci(a, b, 400, seed=3)
    # the same resamples, drawn and scored one by one
    idx = torch.randint(0, 50, (400, 50), generator=torch.Generator().manual_seed(3))
    rates = sorted(sum(1.0 if a[i] > b[i] else 0.5 if a[i] == b[i] else 0.0 for i in row.tolist()) / 50 for row in idx)
    assert (lo, hi) == pytest.approx((rates[int(0.025 * 399)], rates[399 - int(0.025 * 399)]))
    assert lo <= stats.win_rate(a, b).item() <= hi


def test_hypervolume_against_a_grid_count():
    rng = random.Random(1)
    pts = [(rng.random(), rng.random()) for _ in range(12)]
    n = 400
    grid = sum(any(x < px and y < py for px, py in pts)
               for x, y in itertools.product([(i + 0.5) / n for i in range(n)], repeat=2)) / n**2
    assert stats.hypervolume(pts) == pytest.approx(grid, abs=5e-3)
    assert stats.hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    assert stats.hypervolume([(0.5, 0.5), (0.4, 0.4)]) == pytest.approx(0.25)        # a dominated point adds nothing


def test_pareto_front():
    pts = {"a": (0.2, 0.9), "b": (0.5, 0.5), "c": (0.4, 0.4), "d": (0.9, 0.1), "e": (0.5, 0.5)}
    assert stats.pareto_front(pts) == ["a", "b", "d", "e"]


def test_report_from_a_smoke_pipeline(world, reward_models, reference_rms, uninterrupted_run, baseline_runs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(uninterrupted_run, runs / "molma")         # the fault tests' MOLMA run (6 iterations), and two more
    for name in ("so_weighted", "so_weighted_w0.8"):          # one iteration each
        shutil.copytree(baseline_runs[name][0], runs / name)
    (runs / "so_help").mkdir()                                 # a folder that holds no model
    args = ["--preset", "tiny", "--runs-dir", runs, "--policy", world / "base", "--data-root", world / "data",
            "--reward-models", f"{reward_models['help']},{reward_models['safe']}", "--num-prompts", "24",
            "--rm-eval-size", "40", "--bootstrap", "200",
            "--reference-rms", f"oasst={reference_rms['deberta']},steamshp={reference_rms['t5']}"]
    run_script(ROOT / "04_evaluate.py", *args, nproc=2)       # so_help is listed as not trained, never in the way
    report = runs / "report"
    text = (report / "report.md").read_text()
    for section in ("Table 2", "Figure 2a", "Figure 3", "Figure 4", "Table 3", "ground truth"):
        assert section in text
    assert ("Runs not evaluated: so_help (not trained (no checkpoint: a dry run, or stopped before one)), so_safe (no "
            "run), so_piecewise (no run), fast_rl (no run), lagrangian (no run).") in text
    data = json.loads((report / "report.json").read_text())
    # Table 2: a row per test set, with the reference reward models scored on exactly the same pairs
    assert "| benchmark | reward model | pairs | accuracy | oasst | steamshp |" in text
    for row in data["table2"].values():
        assert set(row["reference_rms"]) == {"oasst", "steamshp"} and all(0 <= a <= 1 for a in row["reference_rms"].values())
    assert set(data["win_rates"]) == {"reference", "so_weighted", "so_weighted_w0.8"}
    lines = [json.loads(l) for l in (report / "answers.jsonl").read_text().splitlines()]
    n = data["sampling"]["num_prompts"]                       # 24 capped, then split 60/40 by Table 1, each floored
    assert 22 <= n <= 24 and len(lines) == 4 * n and {"prompt", "model", "answer", "rm_help", "rm_safe", "true_help", "true_safe"} <= set(lines[0])
    # the win rate in the report is the one recomputed from the raw answers
    by = lambda m: [l["rm_help"] for l in lines if l["model"] == m]
    recomputed = stats.win_rate(torch.tensor(by("molma"), dtype=torch.float64), torch.tensor(by("reference"), dtype=torch.float64)).item()
    assert data["win_rates"]["reference"]["help"]["win_rate"] == pytest.approx(recomputed)
    from PIL import Image
    for png in ("fig2a_win_rates.png", "fig3_reward_distributions.png", "fig4_weight_sweep.png", "fig_truth_pareto.png",
                "fig_training_curves.png"):
        with Image.open(report / png) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert "Fast RL's yardstick" in text and "## Figure 2b: human evaluation" in text
    # render reads report.json alone: from a folder holding only it, the same report.md and the same figures
    alone = tmp_path / "rendered"
    alone.mkdir()
    R.render(json.loads((report / "report.json").read_text()), alone)
    assert (alone / "report.md").read_text() == text
    assert sorted(p.name for p in alone.glob("*.png")) == sorted(p.name for p in report.glob("*.png"))
    sheet = report / "human_eval" / "sheet.csv"
    keys = list((report / "human_eval_keys").glob("sheet-*.json"))
    assert sheet.exists() and (report / "human_eval" / "INSTRUCTIONS.txt").exists() and len(keys) == 1
    assert not list((report / "human_eval").glob("*key*"))                  # the raters' folder holds no key
    # two simulated evaluators fill the sheet (by the tiny world's truth), saved as a European spreadsheet would
    key = json.loads(keys[0].read_text())
    truth = {(l["model"], l["prompt"]): (l["true_help"], l["true_safe"]) for l in lines}
    first = (report / "answers.jsonl").read_text()
    import csv
    for i in range(2):
        with open(sheet, newline="") as f:
            rows = list(csv.reader(f))
        for r in rows[1:]:
            h, s = truth[(key["answers"][r[3]]["model"], r[2])]
            r[5], r[6] = str(1 + int((1 - h) * 2.99)), str(1 + int((1 - s) * 2.99))
        with open(tmp_path / f"filled{i}.csv", "w", newline="", encoding="utf-8-sig") as f:
            csv.writer(f, delimiter=";", lineterminator="\r\n").writerows(rows)
    # a second evaluation into the same folder is refused before anything loads (the report and key stay)
    assert "holds a report already (report.json)" in run_fails(ROOT / "04_evaluate.py", *args)
    # the filled sheets are read with their key and the saved answers: no model, no sampling, no torchrun
    run_script(ROOT / "04_evaluate.py", *args, "--human-sheets", f"{tmp_path / 'filled0.csv'},{tmp_path / 'filled1.csv'}")
    assert (report / "answers.jsonl").read_text() == first
    results = json.loads((report / "human_eval" / "results.json").read_text())
    assert results["sheet_id"] == key["sheet_id"] and set(results["win_rates"]) == {"reference", "so_weighted"}
    assert (report / "fig2b_human_win_rates.png").exists() and (report / "human_eval" / "results.md").exists()


def test_fast_rl_yardstick_is_the_infimum_over_simplex_weights():
    means = [0.62, 0.41]
    grid = min(w * means[0] + (1 - w) * means[1] for w in [i / 1000 for i in range(1001)])
    worst, disparity = stats.worst_case_and_disparity(means)
    assert worst == pytest.approx(grid) and disparity == pytest.approx(0.21)


def fill_sheet(src, dst, key, quality, noise, seed, edit=None):
    """A simulated evaluator: ranks each prompt's answers by the models' true quality plus noise (ties allowed)."""
    import csv
    rng = random.Random(seed)
    with open(src, newline="") as f:
        lines = list(csv.reader(f))
    head, rows = lines[0], lines[1:]
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r[1], []).append(r)
    for group in by_prompt.values():
        for col, obj in ((5, 0), (6, 1)):
            q = {r[3]: round(quality[key["answers"][r[3]]["model"]][obj] + rng.gauss(0, noise), 1) for r in group}
            order = sorted(set(q.values()), reverse=True)
            for r in group:
                r[col] = str(1 + order.index(q[r[3]]))                  # equal quality: the same rank
    if edit:
        edit(rows)
    with open(dst, "w", newline="") as f:
        csv.writer(f).writerows([head] + rows)


def test_human_evaluation_kit_round_trip_and_clear_errors(tmp_path):
    from types import SimpleNamespace
    names = ["reference", "molma", "so_help", "so_safe"]
    prompts = [f"prompt {i}" for i in range(40)]
    answers = {n: [(f"answer {j} to {p}", True, 0.5, 0.5) for p in prompts] for j, n in enumerate(names)}
    key = human_eval.write_human_sheet(tmp_path, prompts, answers, names, 30, seed=0)
    sheet = tmp_path / "human_eval" / "sheet.csv"
    text = sheet.read_text()
    assert not any(n in text for n in names)                                   # blinded
    import csv
    with open(sheet, newline="") as f:                                         # the header is the first row
        assert csv.DictReader(f).fieldnames == human_eval.SHEET_COLUMNS
    assert "rank its answers from 1 (best) to 4" in (tmp_path / "human_eval" / "INSTRUCTIONS.txt").read_text()
    assert len(key["answers"]) == 30 * 4
    # true quality (help, safe): MOLMA between the two single-objective models, as Figure 2a would show
    quality = {"reference": (0.3, 0.6), "molma": (0.6, 0.75), "so_help": (0.9, 0.3), "so_safe": (0.2, 0.95)}
    filled = [tmp_path / f"eval{i}.csv" for i in range(3)]
    for i, p in enumerate(filled):
        fill_sheet(sheet, p, key, quality, noise=0.15, seed=i)
    ranks = human_eval.read_human_sheets([str(p) for p in filled], key)
    # the same sheet as spreadsheets save it: a byte-order mark, CRLF, ';' between cells (European locales)
    with open(filled[0], newline="") as f:
        rows = list(csv.reader(f))
    excel = tmp_path / "excel.csv"
    with open(excel, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, delimiter=";", lineterminator="\r\n").writerows(rows)
    assert excel.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in excel.read_bytes()
    assert human_eval.read_human_sheets([str(excel), *map(str, filled[1:])], key) == ranks
    args = SimpleNamespace(bootstrap=200, seed=0)
    win, md = human_eval.figure2b_human_win_rates(args, tmp_path, ranks, len(filled))
    # the same direction as the model-based evaluation of these qualities
    assert win["so_help"]["help"]["win_rate"] < 0.5 < win["so_help"]["safe"]["win_rate"]
    assert win["so_safe"]["safe"]["win_rate"] < 0.5 < win["so_safe"]["help"]["win_rate"]
    assert win["reference"]["help"]["win_rate"] > 0.5 and win["reference"]["safe"]["win_rate"] > 0.5
    assert (tmp_path / "fig2b_human_win_rates.png").exists() and "ranked by 3 evaluators" in md[0]
    lo, hi = win["so_help"]["help"]["ci95"]
    assert lo <= win["so_help"]["help"]["win_rate"] <= hi

    def broken(edit, name):
        p = tmp_path / name
        fill_sheet(sheet, p, key, quality, 0.15, 9, edit)
        with pytest.raises(SystemExit) as e:
            human_eval.read_human_sheets([str(p)], key)
        return str(e.value)

    def blank(rows):
        rows[4][5] = ""

    def seven(rows):
        rows[6][6] = "7"

    def other_key(rows):
        for r in rows:
            r[0] = "sheet-1-30x4-deadbeef"

    assert "bad_blank.csv, row 6 (p001a): help_rank is empty; rank every answer from 1 to 4" in broken(blank, "bad_blank.csv")
    assert "bad_range.csv, row 8 (p001c): safe_rank 7 is outside 1..4" in broken(seven, "bad_range.csv")
    assert "was made with another key" in broken(other_key, "bad_key.csv")


def test_lagrangian_section_reads_only_lagrangian_runs():
    fast_rl = [{"step": i + 1, "state/lambda": 1.0, "state/weights": [0.5, 0.5]} for i in range(12)]
    lag = [{"step": i + 1, "state/lambda": 1.0 + i / 10, "state/mean_cost": 0.5 - i / 10} for i in range(12)]
    md = R.lagrangian_markdown({"fast_rl": fast_rl, "lagrangian": lag})
    rows = [l for l in md if l.startswith("| lagrangian |")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "10", "12"] and not any(l.startswith("| fast_rl") for l in md)
    assert R.lagrangian_markdown({"fast_rl": fast_rl}) == []


def test_mean_ci_is_students_t_interval():
    m, lo, hi = S.mean_ci([1.0, 2.0, 3.0])            # sd 1, n 3: half-width t(0.975, 2) / sqrt(3)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - 4.303 / 3**0.5, 2.0 + 4.303 / 3**0.5))
    m, lo, hi = S.mean_ci([0.5] * 4)
    assert (m, lo, hi) == pytest.approx((0.5, 0.5, 0.5))


def test_at_kl_interpolates_where_a_run_first_reaches_a_kl():
    curve = [(0.1, 0.2, 0.9), (0.3, 0.4, 0.7), (0.2, 0.0, 0.0), (0.5, 0.6, 0.5)]
    status, there = S.at_kl(curve, 0.2)
    assert status == "reached" and there == pytest.approx((0.3, 0.8))   # halfway between the first two iterations
    assert S.at_kl(curve, 0.1) == ("reached", (0.2, 0.9))              # its first point, exactly at that KL
    assert S.at_kl(curve, 0.05) == ("starts above", None)              # never passed through it: no comparison
    assert S.at_kl(curve, 0.6) == ("never", None)                      # never gets there
    assert S.verdict([0.1, 0.2, 0.15]) == "> 0 holds" and S.verdict([-0.1, 0.1, 0.0]) == "not distinguishable from 0"


def test_t_pvalue_is_the_test_of_the_t_interval_and_holm_adjusts_a_family():
    # at the 97.5% quantile of t with df degrees of freedom, the two-sided p is 0.05 (the interval's edge touches 0)
    for df in range(1, 15):
        se = 0.1 / stats.T975[df - 1]              # values whose t statistic is exactly T975[df]: mean 0.1
        n = df + 1
        spread = se * math.sqrt(n) * math.sqrt((n - 1) / 2)     # two values +-spread, the rest at the mean
        values = [0.1 + spread, 0.1 - spread] + [0.1] * (n - 2)
        assert stats.t_pvalue(values) == pytest.approx(0.05, abs=2e-4), df
    assert stats.t_pvalue([0.1, 0.1, 0.1]) == 0.0 and stats.t_pvalue([0.0, 0.0]) == 1.0 and math.isnan(stats.t_pvalue([1.0]))
    assert stats.t_pvalue([-1.0, 1.0, 0.0]) == pytest.approx(1.0)
    # df = 1: the Cauchy distribution, p = 1 - 2 atan(t) / pi
    assert stats.t_pvalue([1.0, 3.0]) == pytest.approx(1 - 2 * math.atan(2.0) / math.pi)
    # Holm by hand: sorted 0.01, 0.02, 0.04 over m = 3 -> 0.03, 0.04, max(0.04, 0.04) = 0.04
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.001, float("nan")])[:2] == pytest.approx([0.5, 0.002])
    rows = S.family([("a", "qa", [0.1, 0.11, 0.09]), ("b", "qb", [0.05, -0.01, 0.03]), ("c", "qc", [-0.2, -0.21, -0.19])])
    assert [r["verdict_holm"] for r in rows] == ["> 0 holds", "not distinguishable from 0", "< 0 holds"]
    assert rows[1]["p_holm"] >= rows[1]["p"] and all(r["p_holm"] <= 1 for r in rows)


def _twin_metrics(path, rng, iterations=60):
    """One run drawn from a process where the KL levels off and the truth keeps rising slowly with the iteration
    (the shape of the tiny world's runs): per iteration objective/kl and truth/help, truth/safe, with noise."""
    rows = []
    for i in range(1, iterations + 1):
        kl = 0.3 * (1 - math.exp(-i / 12)) + rng.gauss(0, 0.02)
        rows.append({"step": i, "objective/kl": kl, "truth/help": 0.3 + 0.3 * kl + 0.002 * i + rng.gauss(0, 0.03),
                     "truth/safe": 0.8 - 0.1 * kl + rng.gauss(0, 0.03)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_equal_kl_of_twin_runs_is_centred_on_zero(tmp_path):
    """Pairs of runs from one process: the equal-KL difference has mean 0, and a 3-seed interval covers 0 about 95%
    of the time. The rule it replaced (MOLMA at its last point, the other where it first reaches that KL) is shown
    biased on the same runs, so this test can fail."""
    rng = random.Random(0)
    seeds = [str(i) for i in range(240)]
    for x in seeds:
        for n in ("molma", "twin"):
            _twin_metrics(tmp_path / "whiten_false" / f"seed{x}" / n / "metrics.jsonl", rng)
    eq = S.equal_kl(tmp_path, "whiten_false", seeds, ["molma", "twin"])
    d = eq["models"]["twin"]
    assert d["never"] == [] and len(d["seeds"]) >= 235            # the expanding window starts every curve near 0
    for o in ("help", "safe"):
        v = d[f"molma_minus_{o}"]
        m, se = sum(v) / len(v), statistics.stdev(v) / math.sqrt(len(v))
        assert abs(m) < 3 * se, (o, m, se)
        covered = [lo <= 0 <= hi for lo, hi in (S.mean_ci(v[k:k + 3])[1:] for k in range(0, len(v) - 2, 3))]
        assert 0.88 <= sum(covered) / len(covered) <= 0.995, (o, sum(covered) / len(covered))
    old = []                                                       # the replaced rule, on the same curves
    for mc, c in zip(eq["curves"]["molma"], eq["curves"]["twin"]):
        status, there = S.at_kl(c, mc[-1][0])
        if status == "reached":
            old.append(mc[-1][1] - there[0])
    m, se = sum(old) / len(old), statistics.stdev(old) / math.sqrt(len(old))
    assert m > 3 * se, (m, se)                                     # in MOLMA's favour with no real difference


def _fake_study(root, seeds, models, value, objectives=("help", "safe"), settings=("whiten_false", "whiten_true")):
    """Per-seed reports in 04's report.json layout; value(setting, seed, model) -> a true score per objective."""
    for setting in settings:
        for seed in seeds:
            d = root / setting / f"seed{seed}"
            (d / "report").mkdir(parents=True)
            truth, scores = {}, {}
            for n in models:
                t = value(setting, seed, n)
                truth[n] = {**{f"true_{o}": x for o, x in zip(objectives, t)}, "mean_answer_area": math.prod(t)}
                scores[n] = [x + 0.1 for x in t]
                if n != "reference":
                    (d / n).mkdir()
                    (d / n / "metrics.jsonl").write_text("".join(json.dumps(
                        {"step": i, "objective/kl": 0.01 * i, **{f"truth/{o}": x * (i / 20 if o == "help" else 1)
                                                                 for o, x in zip(objectives, t)}}) + "\n"
                        for i in range(1, 21)))
            win = {n: {o: {"win_rate": 0.6 - 0.1 * k} for k, o in enumerate(objectives)} for n in models if n != "molma"}
            front = stats.pareto_front({n: tuple(t[f"true_{o}"] for o in objectives) for n, t in truth.items()})
            (d / "report" / "report.json").write_text(json.dumps({"objectives": list(objectives), "truth": truth,
                                                                 "mean_scores": scores, "win_rates": win,
                                                                 "pareto_front": front}))


def test_study_report_over_seeds(tmp_path):
    models = ["reference", "molma", "so_help"]
    # molma beats so_help on safety by 0.1 in every seed, and whitening adds 0.05 to molma's helpfulness
    value = lambda setting, seed, n: ({"reference": 0.3, "molma": 0.4, "so_help": 0.5}[n] + 0.01 * seed
                                      + (0.05 if setting == "whiten_true" and n == "molma" else 0.0),
                                      {"reference": 0.7, "molma": 0.8, "so_help": 0.7}[n] + 0.02 * (seed % 2))
    _fake_study(tmp_path, [0, 1, 2], models, value)
    S.study_report(tmp_path)
    out = json.loads((tmp_path / "study.json").read_text())
    q = out["settings"]["whiten_false"]["models"]["molma"]
    assert q["true_help"]["values"] == pytest.approx([0.40, 0.41, 0.42])
    assert (q["true_help"]["mean"], q["true_help"]["low"]) == pytest.approx((0.41, 0.41 - 4.303 * 0.01 / 3**0.5))
    assert q["kl"]["mean"] == pytest.approx(sum(0.01 * i for i in range(11, 21)) / 10)     # the last 10 iterations
    assert q["on_front"]["values"] == [1.0, 1.0, 1.0]
    d = out["settings"]["whiten_false"]["molma_minus"]["so_help"]
    assert d["true_safe"] == pytest.approx([0.1, 0.1, 0.1])                       # identical per seed: zero width
    assert out["whiten_true_minus_false"]["molma"]["true_help"] == pytest.approx([0.05, 0.05, 0.05])
    assert out["whiten_true_minus_false"]["so_help"]["true_help"] == pytest.approx([0.0, 0.0, 0.0])
    whitening = {c["claim"]: c["verdict_holm"] for c in out["whiten_claims"]}
    assert whitening["Whitening raises molma's true help"] == "> 0 holds"
    assert whitening["Whitening raises so_help's true help"] == "not distinguishable from 0"
    # at equal KL: both climb the same KL path, so MOLMA's final point (10-iteration means: KL 0.155, help x 0.775)
    # meets so_help's at the same iteration
    eq = out["settings"]["whiten_false"]["equal_kl"]["so_help"]
    assert eq["seeds"] == ["0", "1", "2"] and eq["molma_minus_help"] == pytest.approx([-0.1 * 0.775] * 3)
    assert eq["molma_minus_safe"] == pytest.approx([0.1] * 3)
    claims = {c["claim"]: c["verdict_holm"] for c in out["settings"]["whiten_false"]["claims"]}
    assert claims["MOLMA beats so_help in true safe (final answers)"] == "> 0 holds"
    assert claims["MOLMA beats so_help in true help at equal KL"] == "< 0 holds"
    assert claims["MOLMA ends closer to pi_0 than so_help"] == "not distinguishable from 0"
    md = (tmp_path / "study.md").read_text()
    assert "| molma | 0.410 [" in md and "3 of 3 seeds" in md and (tmp_path / "fig_study.png").exists()
    # a seed whose run starts above the KL compared never passed through it: counted apart, left out of the verdicts
    m = tmp_path / "whiten_false" / "seed1" / "so_help" / "metrics.jsonl"
    m.write_text("".join(json.dumps({**r, "objective/kl": r["objective/kl"] + 1.0}) + "\n"
                         for r in map(json.loads, m.read_text().splitlines())))
    S.study_report(tmp_path)
    out = json.loads((tmp_path / "study.json").read_text())
    eq = out["settings"]["whiten_false"]["equal_kl"]["so_help"]
    assert eq["seeds"] == ["0", "2"] and eq["starts_above"] == ["1"] and eq["never"] == []
    assert "| so_help | 2 of 3 | 1 |" in (tmp_path / "study.md").read_text()
    quantity = {c["claim"]: c["quantity"] for c in out["settings"]["whiten_false"]["claims"]}
    assert "(2 seeds)" in quantity["MOLMA beats so_help in true help at equal KL"]
    # a model missing from one seed's report is an error that says what to do
    rep = tmp_path / "whiten_true" / "seed2" / "report" / "report.json"
    r = json.loads(rep.read_text())
    del r["truth"]["so_help"]
    rep.write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="so_help is in 2 of the 3 seeds' reports"):
        S.study_report(tmp_path)
    # a seed whose report is missing stops the report, naming it; --allow-missing-seeds reports the others, aloud
    rep.unlink()
    with pytest.raises(SystemExit, match=r"whiten_true: 1 of 3 seeds have no report: .*seed2/report/report.json"):
        S.study_report(tmp_path)
    S.study_report(tmp_path, allow_missing=True)
    assert json.loads((tmp_path / "study.json").read_text())["settings"]["whiten_true"]["seeds"] == ["0", "1"]
    assert "seeds 0, 1 (seeds 2: no report, left out by --allow-missing-seeds)" in (tmp_path / "study.md").read_text()


def test_the_study_of_three_objectives_counts_the_weightings_that_match_molma(tmp_path):
    objectives = ("help", "safe", "honest")
    base = {"reference": (0.30, 0.78, 0.65), "molma": (0.40, 0.80, 0.70), "so_help": (0.60, 0.70, 0.60),
            "fast_rl": (0.45, 0.79, 0.69),
            "so_weighted": (0.41, 0.81, 0.69),             # misses on honesty by 0.01 in every seed
            "so_weighted_w0.6_0.2_0.2": (0.50, 0.82, 0.71),  # beats MOLMA on all three in every seed
            "so_weighted_w0.2_0.6_0.2": (0.39, 0.85, 0.75),  # less helpful
            "so_weighted_w0.2_0.2_0.6": (0.40, 0.80, 0.72)}  # ties MOLMA on help and safety, more honest

    def value(setting, seed, n):
        h, s, o = base[n]
        if n == "so_weighted_w0.2_0.2_0.6":                 # 0.01 less helpful than MOLMA in seed 1 only
            h, o = (0.39 if seed == 1 else 0.40), 0.72 + 0.02 * seed
        return h, s, o

    _fake_study(tmp_path, [0, 1, 2], list(base), value, objectives, settings=("whiten_false",))
    weights = {"so_weighted": [1 / 3] * 3, "so_weighted_w0.6_0.2_0.2": [0.6, 0.2, 0.2]}
    for n, w in weights.items():
        (tmp_path / "whiten_false" / "seed0" / n / "run_summary.json").write_text(json.dumps({"state": {"weights": w}}))
    S.study_report(tmp_path)
    out = json.loads((tmp_path / "study.json").read_text())
    assert out["objectives"] == list(objectives)
    setting = out["settings"]["whiten_false"]
    assert setting["models"]["molma"]["true_honest"]["values"] == pytest.approx([0.70] * 3)
    assert setting["molma_minus"]["so_help"]["true_honest"] == pytest.approx([0.1] * 3)
    w = setting["weightings_needed"]
    assert w["weightings"][0] == "so_weighted"               # equal weights: the one a user tries first
    end = w["summary"]["end"]
    # w0.6_0.2_0.2 matches in every seed; w0.2_0.2_0.6 is 0.01 less helpful in seed 1 only: its means are
    # -0.0033 in help, so it did not match by the means, and matched in 2 seeds of 3
    assert end["weightings"] == 4 and end["matched_by_means"] == 1 and not end["equal_weights_matched"]
    assert end["expected_tries_random_order"] == pytest.approx(5 / 2)
    assert end["matched_per_seed"] == [2, 1, 2]
    rows = w["rows"]["end"]
    assert rows["so_weighted_w0.6_0.2_0.2"]["weights"] == [0.6, 0.2, 0.2] and rows["so_weighted_w0.6_0.2_0.2"]["beats"]
    assert rows["so_weighted_w0.2_0.2_0.6"]["seeds_matched"] == 2 and not rows["so_weighted_w0.2_0.2_0.6"]["by_means"]
    assert rows["so_weighted"]["molma_better_on"] == ["honest"] and rows["so_weighted_w0.2_0.6_0.2"]["molma_better_on"] == ["help"]
    assert "fast_rl" in rows and "fast_rl" not in w["weightings"]          # beside the count, not in it
    # at equal KL: every run climbs the same KL path, so each meets MOLMA's final KL at its last iteration
    assert w["summary"]["equal_kl"]["matched_per_seed"] == [2, 1, 2]
    md = (tmp_path / "study.md").read_text()
    assert "1 of 4 weightings matched or beat MOLMA on every objective by the means" in md
    assert "needs 2.5 of them on average" in md and "| true help | true safe | true honest |" in md
    assert (tmp_path / "fig_study.png").exists() and (tmp_path / "fig_kl_whiten_false.png").exists()
    # reports on other objectives in the same study are refused
    rep = tmp_path / "whiten_false" / "seed2" / "report" / "report.json"
    r = json.loads(rep.read_text())
    rep.write_text(json.dumps({**r, "objectives": ["help", "safe"]}))
    with pytest.raises(SystemExit, match="one study, one set of objectives"):
        S.study_report(tmp_path)


def _mark_finished(study):
    """A fake study's cost model and every run finished (run_summary.json), each seed evaluated after them."""
    (study / "rm_cost").mkdir()
    for f in [study / "rm_cost", *study.glob("whiten_*/seed*/*")]:
        if f.name != "report":
            (f / "run_summary.json").write_text("{}")
    for f in study.glob("whiten_*/seed*/report/report.json"):       # evaluated after every run finished
        f.touch()


@pytest.mark.skipif(not (ROOT / ".venv" / ".installed-requirements").exists(), reason="run.sh would install .venv first")
@pytest.mark.parametrize("objectives", ["help,safe", "help,safe,honest"])
def test_run_sh_study_skips_finished_runs_and_writes_the_report_over_seeds(tmp_path, objectives):
    import os
    import subprocess

    if objectives == "help,safe":
        methods = ["molma", "molma_representation", "so_help", "so_safe", "so_weighted", "so_piecewise", "fast_rl",
                   "lagrangian"]
        sweep = [f"so_weighted_w{w}" for w in (0.1, 0.3, 0.7, 0.9)]
        settings = ("whiten_false", "whiten_true")
    else:       # no so_piecewise; the grid on the simplex; without whitening only
        methods = ["molma", "molma_representation", "so_help", "so_safe", "so_weighted", "fast_rl", "lagrangian"]
        sweep = [f"so_weighted_w{w}" for w in ("0.6_0.2_0.2", "0.2_0.6_0.2", "0.2_0.2_0.6", "0.4_0.4_0.2",
                                               "0.4_0.2_0.4", "0.2_0.4_0.4")]
        settings = ("whiten_false",)
    k = objectives.count(",") + 1
    _fake_study(tmp_path, [0, 1], ["reference", *methods, *sweep], lambda st, seed, n: (0.3 + 0.01 * seed, *[0.8] * (k - 1)),
                tuple(objectives.split(",")), settings)
    _mark_finished(tmp_path)
    # every run and report exists, so nothing trains: only the report over seeds is written (a run the loop
    # expects but the fake study lacks would start training, and fail on the missing world)
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text(S.RESULTS_HEAD + "\n<!-- 05_study.py --study elsewhere -->\nanother study's section\n"
                       "<!-- end of elsewhere -->\n")
    env = {**os.environ, "STUDY": str(tmp_path), "SEEDS": "0 1", "OBJECTIVES": objectives, "RESULTS": str(results)}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "study"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "torch.distributed.run" not in out.stdout + out.stderr and "the study done in" in out.stdout
    md = (tmp_path / "study.md").read_text()
    assert f"Objectives: {objectives.replace(',', ', ')}." in md and "## whiten = false: seeds 0, 1" in md
    assert ("## whiten = true: seeds 0, 1" in md) == (objectives == "help,safe")
    assert "matched or beat MOLMA on every objective by the means" in md
    assert "| The representation aligner changes MOLMA's true help (final answers) | MOLMA - molma_representation, " \
           "true_help |" in md
    # the same report is this study's section of the results file, written twice: replaced, the other kept
    again = subprocess.run(["bash", str(ROOT / "run.sh"), "study"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"its section of {results}" in again.stdout, again.stdout[-2000:]
    text = results.read_text()
    assert text.startswith("# Results over seeds") and text.count(f"<!-- 05_study.py --study {tmp_path} -->") == 1
    assert "another study's section" in text and f"--results {results.name}` on " in text
    section = text[text.index(f"--study {tmp_path} -->"):]
    assert "### whiten = false: seeds 0, 1" in section and "](../fig_study.png)" in section
    assert md.split("\n", 2)[2].split("\n## ")[0].strip() in section   # study.md's text, as written
    if objectives == "help,safe":             # METHODS="": MOLMA and its representation-aligner twin only
        only = tmp_path / "only"
        _fake_study(only, [0, 1], ["reference", "molma", "molma_representation"], lambda st, seed, n: (0.3 + 0.01 * seed,
                    0.8), settings=("whiten_false",))
        _mark_finished(only)
        out = subprocess.run(["bash", str(ROOT / "run.sh"), "study"], capture_output=True, text=True, timeout=300,
                             env={**env, "STUDY": str(only), "METHODS": "", "WHITENING": "false"})
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "torch.distributed.run" not in out.stdout + out.stderr
        md = (only / "study.md").read_text()
        assert "The representation aligner changes MOLMA's KL to pi_0" in md and "so_weighted" not in md
    bad = subprocess.run(["bash", str(ROOT / "run.sh"), "study"], env={**env, "OBJECTIVES": "help,honest"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "the study runs on help,safe (the default) or help,safe,honest" in bad.stderr


def test_the_evaluation_imports_the_tiny_world_only_when_the_ground_truth_is_asked_for():
    code = ("import importlib, sys; sys.path.insert(0, '.'); E = importlib.import_module('04_evaluate'); "
            "assert 'tiny_world' not in sys.modules; E.true_scores('Instruct: hi', 'ok'); "
            "assert 'tiny_world' in sys.modules; print('lazy')")
    assert "lazy" in run_script("-c", code)


def test_hypervolume_in_three_dimensions_against_a_grid_count():
    g = random.Random(3)
    pts = [tuple(g.random() for _ in range(3)) for _ in range(12)]
    n = 40                                                   # cell centres of a 40^3 grid: dominated by any point?
    centre = [(i + 0.5) / n for i in range(n)]
    inside = sum(any(x <= p[0] and y <= p[1] and z <= p[2] for p in pts) for x in centre for y in centre for z in centre)
    assert stats.hypervolume(pts) == pytest.approx(inside / n**3, abs=0.02)
    assert stats.hypervolume([(0.5, 0.5, 0.5)]) == pytest.approx(0.125)
    assert stats.hypervolume([(0.5, 0.5, 0.5), (0.4, 0.4, 0.4)]) == pytest.approx(0.125)       # dominated: adds nothing
    assert stats.hypervolume([(1.0, 0.5, 0.5), (0.5, 1.0, 0.5)]) == pytest.approx(0.25 + 0.25 - 0.125)
    # two dimensions: the same numbers as before (the paper's pipeline)
    assert stats.hypervolume([(0.5, 0.5), (0.2, 0.9)]) == pytest.approx(0.25 + 0.2 * 0.4)


def test_pareto_front_in_three_dimensions():
    pts = {"a": (0.9, 0.1, 0.5), "b": (0.5, 0.5, 0.5), "c": (0.4, 0.4, 0.4), "d": (0.5, 0.5, 0.6), "e": (0.1, 0.2, 0.9)}
    assert stats.pareto_front(pts) == ["a", "d", "e"]


def test_pi0_alone_is_evaluated_and_runs_that_never_trained_are_listed(world, reward_models, tmp_path):
    """04 before any RL run: pi_0's answers, scores and truth; a folder left by a dry run or a crash before the first
    checkpoint, and one stopped at a checkpoint, are listed as not trained, and block nothing."""
    runs = tmp_path / "runs"
    (runs / "molma").mkdir(parents=True)
    (runs / "molma" / ".lock").write_text("{}")                # what a failed dry run left
    (runs / "so_help" / "checkpoint").mkdir(parents=True)
    (runs / "so_help" / "checkpoint" / "trainer_state.json").write_text('{"iteration": 3}')
    run_script(ROOT / "04_evaluate.py", "--preset", "tiny", "--runs-dir", runs, "--policy", world / "base",
               "--data-root", world / "data", "--reward-models", f"{reward_models['help']},{reward_models['safe']}",
               "--num-prompts", "16", "--rm-eval-size", "20", "--bootstrap", "50")
    report = json.loads((runs / "report" / "report.json").read_text())
    assert list(report["mean_scores"]) == ["reference"] and report["win_rates"] == {}
    assert set(report["truth"]) == {"reference"} and 0 <= report["eos_rate"]["reference"] <= 1
    assert report["missing"]["molma"].startswith("not trained (no checkpoint")
    assert report["missing"]["so_help"].startswith("not trained (stopped at iteration 3")
    assert report["missing"]["so_safe"] == "no run"
    md = (runs / "report" / "report.md").read_text()
    assert "No trained MOLMA run: no win rates" in md and "so_help (not trained (stopped at iteration 3" in md


def test_the_evaluations_numbers_are_checked_when_parsed(tmp_path):
    """04's sizes, sample counts and temperature: refused by name at start, not as a traceback after all sampling."""
    from conftest import fail_together

    outs = fail_together(*([ROOT / "04_evaluate.py", "--preset", "tiny", "--runs-dir", tmp_path, flag, "0"]
                           for flag in ("--batch-size", "--num-prompts", "--temperature", "--bootstrap", "--rm-eval-size")))
    for flag, text in zip(("--batch-size", "--num-prompts", "--temperature", "--bootstrap", "--rm-eval-size"), outs):
        assert f"{flag} must be positive, got 0" in text and "Traceback" not in text
