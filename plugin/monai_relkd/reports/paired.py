"""Paired statistics of the leave-one-site-out benchmark: method − baseline per (held-out site, seed).

Input: the records of ``benchmarks/generalization.py`` (``results.json``), one per (fold, seed, row)::

    {"fold": "HK", "seed": 0, "row": "full", "score": 0.71, "per_case": {"HK/Case00": 0.69, ...}, ...}

The statistics declared in ``docs/results.md`` before the runs:

* the paired difference ``d = score(method) − score(baseline)`` of every (fold, seed) where both ran;
* their mean, a two-sided 95 % Student-t interval ``mean ± t(0.975, n−1) · sd / √n`` (sd with ddof = 1) and the
  count of wins (``d > 0``), losses and ties;
* a per-case paired test: each held-out case's Dice averaged over seeds, for method and baseline, and the Wilcoxon
  signed-rank test (two-sided, ``scipy.stats.wilcoxon``) over those cases;
* the verdict "distillation helps": mean > 0, the interval's lower end > 0, and wins in more than half the cells.

Example::

    from monai_relkd.reports.paired import compare
    stats = compare(records, "full", baseline="no_kd")
    stats["mean"], stats["ci95"], stats["wins"], stats["wilcoxon_p"], stats["helps"]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["paired_differences", "t_interval", "per_case_wilcoxon", "compare", "paired_table"]


def _index(records: Iterable[Mapping[str, Any]], row: str) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(str(r["fold"]), int(r["seed"])): r for r in records if r.get("row") == row and r.get("score") is not None}


def paired_differences(records: Iterable[Mapping[str, Any]], method: str,
                       baseline: str = "no_kd") -> list[dict[str, Any]]:
    """``[{"fold", "seed", "method", "baseline", "diff"}]`` for every (fold, seed) where both rows have a score,
    sorted by fold then seed."""
    records = list(records)
    m, b = _index(records, method), _index(records, baseline)
    return [{"fold": k[0], "seed": k[1], "method": float(m[k]["score"]), "baseline": float(b[k]["score"]),
             "diff": float(m[k]["score"]) - float(b[k]["score"])} for k in sorted(set(m) & set(b))]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided Student-t interval of the mean (sd with ddof = 1).

    With one value the interval is ``(-inf, inf)``; with none every entry is NaN.
    """
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def per_case_wilcoxon(records: Iterable[Mapping[str, Any]], method: str,
                      baseline: str = "no_kd") -> dict[str, Any]:
    """Wilcoxon signed-rank test over held-out cases: each case's Dice averaged over the seeds where both rows ran.

    Returns:
        ``{"n_cases", "median_diff", "statistic", "p"}`` (``statistic``/``p`` None with fewer than 2 cases or when
        every difference is 0).
    """
    from scipy import stats

    records = list(records)
    m, b = _index(records, method), _index(records, baseline)
    per_case: dict[tuple[str, str], list[float]] = defaultdict(list)
    for key in sorted(set(m) & set(b)):
        cm, cb = m[key].get("per_case") or {}, b[key].get("per_case") or {}
        for case in sorted(set(cm) & set(cb)):
            per_case[(key[0], case)].append(float(cm[case]) - float(cb[case]))
    diffs = [sum(v) / len(v) for v in per_case.values()]
    out: dict[str, Any] = {"n_cases": len(diffs), "statistic": None, "p": None, "median_diff": None}
    if len(diffs) >= 2 and any(d != 0 for d in diffs):
        res = stats.wilcoxon(diffs, alternative="two-sided")
        out.update(statistic=float(res.statistic), p=float(res.pvalue))
    if diffs:
        s = sorted(diffs)
        out["median_diff"] = float(s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)
    return out


def compare(records: Iterable[Mapping[str, Any]], method: str, baseline: str = "no_kd") -> dict[str, Any]:
    """Every declared statistic of ``method`` against ``baseline`` and the verdict (see the module docstring)."""
    records = list(records)
    pairs = paired_differences(records, method, baseline)
    diffs = [p["diff"] for p in pairs]
    mean, low, high = t_interval(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    case = per_case_wilcoxon(records, method, baseline)
    helps = bool(diffs) and mean > 0 and low > 0 and wins > len(diffs) / 2
    return {"method": method, "baseline": baseline, "n": len(diffs), "pairs": pairs, "mean": mean,
            "ci95": (low, high), "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses,
            "wilcoxon_n_cases": case["n_cases"], "wilcoxon_median_diff": case["median_diff"],
            "wilcoxon_statistic": case["statistic"], "wilcoxon_p": case["p"], "helps": helps}


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def paired_table(records: Iterable[Mapping[str, Any]], methods: Sequence[str], baseline: str = "no_kd") -> str:
    """Markdown: per method the mean paired difference, its 95 % interval, wins/losses/ties, the per-case
    Wilcoxon test and the verdict."""
    records = list(records)
    lines = [f"| method | cells | mean − {baseline} | 95 % t-interval | wins / losses / ties | "
             "cases | median per-case diff | Wilcoxon p | helps? |", "|---|---:|---:|---|---|---:|---:|---:|---|"]
    for method in methods:
        s = compare(records, method, baseline)
        p = "–" if s["wilcoxon_p"] is None else f"{s['wilcoxon_p']:.3g}"
        lines.append(f"| {method} | {s['n']} | {_f(s['mean'], True)} | [{_f(s['ci95'][0], True)}, "
                     f"{_f(s['ci95'][1], True)}] | {s['wins']} / {s['losses']} / {s['ties']} | "
                     f"{s['wilcoxon_n_cases']} | {_f(s['wilcoxon_median_diff'], True)} | {p} | "
                     f"{'yes' if s['helps'] else 'no'} |")
    return "\n".join(lines)
