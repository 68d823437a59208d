"""The statistics the evaluation (04) and the study over seeds (05) share: plain functions of tensors and lists,
each tested against a direct computation.

  one report (04)      win rates with bootstrap intervals over prompts, the Pareto front, the hypervolume, Fast RL's
                       worst case and disparity
  over seeds (05)      Student's t interval of a mean, paired differences, the t-test's p-value, Holm's adjustment
"""
from __future__ import annotations

import math

import torch


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


def hypervolume(points: list[tuple[float, ...]], ref: tuple[float, ...] | None = None) -> float:
    """Volume dominated by a set of points (every coordinate maximised) and bounded below by ref (default 0s).

    Two dimensions: a sweep over x. More: slices along the last coordinate, each slice the hypervolume of the
    points at or above it in one dimension fewer (exact; fine for the few hundred points of a report)."""
    if not points:
        return 0.0
    d = len(points[0])
    ref = tuple(ref) if ref is not None else (0.0,) * d
    if d > 2:
        pts = sorted((p for p in points if all(a > r for a, r in zip(p, ref))), key=lambda p: p[-1], reverse=True)
        volume = 0.0
        for i, p in enumerate(pts):
            next_z = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
            if p[-1] > next_z:
                volume += (p[-1] - next_z) * hypervolume([q[:-1] for q in pts[: i + 1]], ref[:-1])
        return volume
    pts = sorted((p for p in points if p[0] > ref[0] and p[1] > ref[1]), reverse=True)
    area, best_y = 0.0, ref[1]
    for i, (x, y) in enumerate(pts):
        best_y = max(best_y, y)
        next_x = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (x - next_x) * (best_y - ref[1])
    return area


def pareto_front(points: dict[str, tuple[float, ...]]) -> list[str]:
    """Names whose point no other point weakly dominates with one strict improvement (any number of objectives)."""
    return [n for n, p in points.items()
            if not any(all(b >= a for a, b in zip(p, q)) and q != p for m, q in points.items() if m != n)]


def worst_case_and_disparity(means: list[float]) -> tuple[float, float]:
    """Fast RL's yardstick (its Eq. 2) for one model: the infimum over simplex weights w of sum_i w_i E[r_i] is
    reached at a vertex, so it is the worst objective's mean reward; disparity: best mean minus worst mean."""
    return min(means), max(means) - min(means)


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """-> (mean, low, high): Student's t 95% interval of the mean over seeds (n - 1 degrees of freedom)."""
    n, m = len(values), sum(values) / len(values)
    if n < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = (T975[n - 2] if n - 2 < len(T975) else 1.96) * sd / math.sqrt(n)
    return m, m - half, m + half


def paired(a: dict, b: dict, keys) -> dict:
    """Two models' {quantity: [value per seed]}, seeds in the same order -> {quantity: [a - b per seed]}."""
    return {k: [x - y for x, y in zip(a[k], b[k])] for k in keys}


def t_pvalue(values: list[float]) -> float:
    """Two-sided p-value of Student's one-sample t-test of mean 0, the test whose 95% interval mean_ci gives
    (p < 0.05 exactly when that interval excludes 0). The t distribution's CDF for an integer number of degrees of
    freedom in closed form (Abramowitz and Stegun 26.7.3-4). nan with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return 0.0 if m != 0 else 1.0
    df, t = n - 1, abs(m) / (sd / math.sqrt(n))
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(2 if df % 2 else 1, df - 1, 2):       # the series' terms, cos^2 theta times k/(k+1) each
        term *= c2 * k / (k + 1)
        total += term
    inside = (math.sin(theta) * total if df % 2 == 0                              # P(|T| < t)
              else 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0)))
    return min(1.0, max(0.0, 1.0 - inside))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment for a family of m tests: the k-th smallest p times (m - k + 1), made monotone,
    at most 1. A claim holds for the family at 5% when its adjusted p < 0.05; the chance that any true null of the
    family is rejected is then at most 5% (family-wise error), whatever the tests' dependence. nan stays nan."""
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    out, running = [float("nan")] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out
