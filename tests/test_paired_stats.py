"""Paired statistics of the benchmark against numbers computed by hand."""

from __future__ import annotations

import math

import pytest

from monai_relkd.reports.paired import compare, paired_differences, paired_table, per_case_wilcoxon, t_interval


def _rec(fold, seed, row, score, per_case=None):
    return {"fold": fold, "seed": seed, "row": row, "score": score, "per_case": per_case or {}}


RECORDS = [
    _rec("HK", 0, "no_kd", 0.50), _rec("HK", 1, "no_kd", 0.60), _rec("UCL", 0, "no_kd", 0.40),
    _rec("HK", 0, "full", 0.55), _rec("HK", 1, "full", 0.58), _rec("UCL", 0, "full", 0.50),
    _rec("UCL", 1, "full", 0.90),  # no baseline for (UCL, 1): not paired
    _rec("HK", 0, "teacher", 0.8),
]


def test_paired_differences_mean_t_interval_and_wins_by_hand():
    pairs = paired_differences(RECORDS, "full")
    assert [(p["fold"], p["seed"]) for p in pairs] == [("HK", 0), ("HK", 1), ("UCL", 0)]
    assert [p["diff"] for p in pairs] == pytest.approx([0.05, -0.02, 0.10])
    s = compare(RECORDS, "full")
    # mean 0.13 / 3; sd (ddof 1) = sqrt(0.0072667 / 2) = 0.060277; t(0.975, 2) = 4.302653
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.0433333, abs=1e-6)
    assert s["ci95"][0] == pytest.approx(0.0433333 - 0.149737, abs=1e-5)
    assert s["ci95"][1] == pytest.approx(0.0433333 + 0.149737, abs=1e-5)
    assert (s["wins"], s["losses"], s["ties"]) == (2, 1, 0)
    assert s["helps"] is False  # the interval includes 0


def test_helps_needs_interval_above_zero_and_a_majority_of_wins():
    recs = [_rec("HK", i, "no_kd", 0.5) for i in range(3)] + [_rec("HK", i, "full", 0.6 + 0.01 * i) for i in range(3)]
    s = compare(recs, "full")
    assert s["mean"] == pytest.approx(0.11) and s["ci95"][0] > 0 and s["wins"] == 3 and s["helps"] is True
    assert compare(recs, "no_kd", baseline="full")["helps"] is False


def test_t_interval_edge_cases():
    assert all(math.isnan(v) for v in t_interval([]))
    assert t_interval([0.2]) == (0.2, -math.inf, math.inf)


def test_per_case_wilcoxon_averages_seeds_then_ranks_by_hand():
    # per-case differences, averaged over the two HK seeds: a 0.2, b 0.2 (0.1, 0.3), c -0.05, d 0.3; UCL e 0.15
    base = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}
    recs = [
        _rec("HK", 0, "no_kd", 0.5, base), _rec("HK", 1, "no_kd", 0.5, base),
        _rec("HK", 0, "full", 0.6, {"a": 0.6, "b": 0.6, "c": 0.45, "d": 0.8}),
        _rec("HK", 1, "full", 0.6, {"a": 0.8, "b": 0.8, "c": 0.45, "d": 0.8}),
        _rec("UCL", 0, "no_kd", 0.5, {"e": 0.5}), _rec("UCL", 0, "full", 0.6, {"e": 0.65}),
    ]
    # diffs 0.2, 0.2, -0.05, 0.3, 0.15 -> |d| ranks 3.5, 3.5, 1, 5, 2; W- = 1; exact two-sided p = 2 * 2/32
    w = per_case_wilcoxon(recs, "full")
    assert w["n_cases"] == 5 and w["median_diff"] == pytest.approx(0.2)
    assert w["statistic"] == pytest.approx(1.0)
    assert w["p"] == pytest.approx(0.125, abs=0.01)
    table = paired_table(recs, ["full"])
    # three cells, each +0.1: the interval collapses to the mean
    assert table.splitlines()[2] == "| full | 3 | +0.100 | [+0.100, +0.100] | 3 / 0 / 0 | 5 | +0.200 | 0.125 | yes |"
