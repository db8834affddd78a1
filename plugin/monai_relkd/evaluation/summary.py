"""Aggregate per-case metrics per site and overall, write ``summary.json`` + a per-case CSV, format a table.

The JSON follows nnU-Net's ``summary.json`` in spirit::

    {
      "metric_per_case": [{"case": "Case01", "site": "RUNMC", "prediction": "...", "reference": "...",
                           "spacing": [0.6, 0.6, 3.6], "empty_prediction": false, "empty_reference": false,
                           "metrics": {"dice": 0.87, "hd95": 4.1, "asd": 1.2}}, ...],
      "per_site": {"RUNMC": {"n_cases": 30,
                             "dice": {"mean": 0.87, "std": 0.03, "n": 30, "n_undefined": 0}, "hd95": {...}, ...}},
      "overall": {"n_cases": 116, "dice": {"mean":..., "std":..., "n":..., "n_undefined":...}, ...},
      "mean": {"dice": ..., "hd95": ..., "asd": ...},                 # over cases, all sites pooled
      "mean_of_site_means": {"dice": ..., "hd95": ..., "asd": ...},
      "n_cases": 116,
      "policy": {...}                                                  # EMPTY_POLICY
    }

Undefined values (a distance with exactly one empty mask) are ``null`` and never enter a mean; a statistic with no
defined value is ``null`` too, so the file never holds NaN or inf.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..data._io import atomic_write_text
from .metrics import EMPTY_POLICY, METRICS

__all__ = ["summarize_cases", "write_summary", "format_site_table", "SUMMARY_JSON", "CASES_CSV", "CSV_COLUMNS"]

PathLike = Union[str, "os.PathLike[str]"]

SUMMARY_JSON = "summary.json"
CASES_CSV = "metric_per_case.csv"
#: columns of the per-case CSV, in order
CSV_COLUMNS: tuple[str, ...] = (
    "case",
    "site",
    *METRICS,
    "empty_prediction",
    "empty_reference",
    "spacing",
    "prediction",
    "reference",
)
_UNITS = {"dice": "", "hd95": " (mm)", "asd": " (mm)"}
_LABELS = {"dice": "Dice", "hd95": "HD95", "asd": "ASD"}


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """mean/std (ddof=0)/n over the defined values, plus how many were undefined (None)."""
    defined = [float(v) for v in values if v is not None]
    if any(not math.isfinite(v) for v in defined):
        raise ValueError(f"non-finite metric value in {defined}; undefined values must be None.")
    n_undef = len(values) - len(defined)
    if not defined:
        return {"mean": None, "std": None, "n": 0, "n_undefined": n_undef}
    arr = np.asarray(defined, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size), "n_undefined": n_undef}


def summarize_cases(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    Per-site and overall statistics of per-case results.

    Args:
        cases: entries shaped like ``summary["metric_per_case"]``: each a mapping with ``"site"`` (str) and
            ``"metrics"`` (``{"dice": float, "hd95": float | None, "asd": float | None}``); other keys are kept
            as they are.

    Returns:
        ``{"metric_per_case", "per_site", "overall", "mean", "mean_of_site_means", "n_cases", "policy"}`` as
        described in this module's docstring; sites are sorted by name.

    Example::

        >>> s = summarize_cases([{"case": "a", "site": "X", "metrics": {"dice": 0.5, "hd95": 2.0, "asd": 1.0}},
        ...                      {"case": "b", "site": "X", "metrics": {"dice": 0.0, "hd95": None, "asd": None}}])
        >>> s["per_site"]["X"]["hd95"]
        {'mean': 2.0, 'std': 0.0, 'n': 1, 'n_undefined': 1}
    """
    if isinstance(cases, (str, bytes)) or not isinstance(cases, Sequence):
        raise TypeError(f"cases must be a sequence of per-case mappings, got {type(cases).__name__}.")
    for i, c in enumerate(cases):
        if not isinstance(c, Mapping) or "site" not in c or not isinstance(c.get("metrics"), Mapping):
            raise ValueError(f"case #{i} must be a mapping with 'site' and a 'metrics' mapping, got {c!r}.")
        missing = [m for m in METRICS if m not in c["metrics"]]
        if missing:
            raise ValueError(f"case #{i} ({c.get('case', '?')}) lacks metrics {missing}.")
        if c["metrics"]["dice"] is None:
            raise ValueError(f"case #{i} ({c.get('case', '?')}): Dice is always defined, got None.")

    sites = sorted({str(c["site"]) for c in cases})
    per_site: dict[str, Any] = {}
    for site in sites:
        sc = [c for c in cases if str(c["site"]) == site]
        per_site[site] = {"n_cases": len(sc), **{m: _stats([c["metrics"][m] for c in sc]) for m in METRICS}}
    overall = {"n_cases": len(cases), **{m: _stats([c["metrics"][m] for c in cases]) for m in METRICS}}
    mean_of_site_means = {
        m: _stats([per_site[s][m]["mean"] for s in sites if per_site[s][m]["mean"] is not None])["mean"]
        for m in METRICS
    }
    return {
        "metric_per_case": [dict(c) for c in cases],
        "per_site": per_site,
        "overall": overall,
        "mean": {m: overall[m]["mean"] for m in METRICS},
        "mean_of_site_means": mean_of_site_means,
        "n_cases": len(cases),
        "policy": EMPTY_POLICY,
    }


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "x".join(f"{float(x):g}" for x in v)
    return v


def write_summary(summary: Mapping[str, Any], out_dir: PathLike) -> tuple[Path, Path]:
    """
    Write ``summary.json`` and ``metric_per_case.csv`` (one row per case, columns :data:`CSV_COLUMNS`, undefined
    values as empty cells) into ``out_dir``, each atomically (:func:`monai_relkd.data._io.atomic_write_text`).

    Args:
        summary: as returned by :func:`evaluate_folder` or :func:`summarize_cases`; must hold ``"metric_per_case"``.
        out_dir: folder, created if missing.

    Returns:
        ``(json_path, csv_path)``.

    Raises:
        ValueError: when the summary holds NaN/inf (undefined values must be ``None``).
    """
    if not isinstance(summary, Mapping) or "metric_per_case" not in summary:
        raise ValueError("summary must be a mapping with a 'metric_per_case' list (see summarize_cases).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(summary, indent=2, allow_nan=False, default=_json_default)
    except ValueError as e:
        raise ValueError(f"summary holds NaN or inf; undefined values must be None ({e}).") from e
    json_path, csv_path = out / SUMMARY_JSON, out / CASES_CSV

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for c in summary["metric_per_case"]:
        row = {k: _csv_cell(c.get(k)) for k in CSV_COLUMNS if k not in METRICS}
        row.update({m: _csv_cell(c["metrics"].get(m)) for m in METRICS})
        writer.writerow(row)

    atomic_write_text(json_path, text + "\n")
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _fmt(stat: Mapping[str, Any], metric: str) -> str:
    if stat["mean"] is None:
        cell = "n/a"
    else:
        digits = 3 if metric == "dice" else 2
        cell = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat.get("n_undefined"):
        cell += f" ({stat['n_undefined']} undef.)"
    return cell


def format_site_table(summary: Mapping[str, Any]) -> str:
    """
    Markdown table of per-site mean ± std of Dice, HD95 and ASD, then the pooled cases and the mean of site means.

    Args:
        summary: as returned by :func:`evaluate_folder` or :func:`summarize_cases` (``"per_site"``, ``"overall"``
            and ``"mean_of_site_means"`` are used).

    Example::

        | Site | n | Dice | HD95 (mm) | ASD (mm) |
        |---|---:|---:|---:|---:|
        | BIDMC | 12 | 0.812 ± 0.051 | 6.10 ± 2.31 | 1.90 ± 0.70 |
        | **All cases** | 12 | 0.812 ± 0.051 | 6.10 ± 2.31 | 1.90 ± 0.70 |
        | **Mean of sites** | 1 | 0.812 | 6.10 | 1.90 |
    """
    for key in ("per_site", "overall", "mean_of_site_means"):
        if key not in summary:
            raise ValueError(f"summary lacks '{key}'; build it with summarize_cases or evaluate_folder.")
    head = "| Site | n | " + " | ".join(_LABELS[m] + _UNITS[m] for m in METRICS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(METRICS)]
    for site, st in summary["per_site"].items():
        lines.append(f"| {site} | {st['n_cases']} | " + " | ".join(_fmt(st[m], m) for m in METRICS) + " |")
    ov = summary["overall"]
    lines.append(f"| **All cases** | {ov['n_cases']} | " + " | ".join(_fmt(ov[m], m) for m in METRICS) + " |")
    msm = summary["mean_of_site_means"]
    cells = ["n/a" if msm[m] is None else (f"{msm[m]:.3f}" if m == "dice" else f"{msm[m]:.2f}") for m in METRICS]
    lines.append(f"| **Mean of sites** | {len(summary['per_site'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
