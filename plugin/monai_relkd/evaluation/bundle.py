"""Evaluation as the bundles run it, and the comparison table of several models."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .folder import evaluate_folder
from .summary import format_site_table, write_summary

__all__ = ["evaluate_bundle_predictions", "format_models_table"]

logger = logging.getLogger(__name__)


def evaluate_bundle_predictions(
    prediction_dir: str | os.PathLike,
    cases: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    model_name: str | None = None,
    pred_postfix: str = "_seg",
) -> dict[str, Any]:
    """Evaluate the masks a bundle's ``evaluate.json`` wrote and write ``summary.json`` and the per-case CSV.

    Args:
        prediction_dir: where ``SaveImaged`` wrote the predictions (site-prefixed names are found too).
        cases: the evaluated datalist entries ``{"image", "label", "site", "case"}``.
        output_dir: where ``summary.json`` and ``metric_per_case.csv`` go.
        model_name: recorded in the summary as ``"model"``.
        pred_postfix: the ``SaveImaged`` postfix.

    Returns:
        the summary dict (see :func:`monai_relkd.evaluation.evaluate_folder`).
    """
    summary = evaluate_folder(prediction_dir, {"evaluated": list(cases)}, split="evaluated", pred_postfix=pred_postfix)
    if model_name is not None:
        summary["model"] = model_name
    json_path, csv_path = write_summary(summary, output_dir)
    logger.info("evaluation of %s:\n%s\nwritten to %s and %s", model_name or prediction_dir,
                format_site_table(summary), json_path, csv_path)
    return summary


def format_models_table(summaries: Mapping[str, Mapping[str, Any]], held_out: str | None = None,
                        metric: str = "dice") -> str:
    """A Markdown table with one row per model and one column per site (mean of ``metric`` over its cases).

    Args:
        summaries: ``{model name: summary}`` as written by :func:`evaluate_bundle_predictions`.
        held_out: the held-out site: its column is marked and the table adds the mean over the other sites.
        metric: ``"dice"``, ``"hd95"`` or ``"asd"``.
    """
    sites = sorted({site for s in summaries.values() for site in s["per_site"]})
    if held_out is not None and held_out in sites:
        sites = [s for s in sites if s != held_out] + [held_out]

    def cell(stats: Mapping[str, Any] | None) -> str:
        if not stats or stats.get("mean") is None:
            return "–"
        return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats.get("n", 0) > 1 else f"{stats['mean']:.3f}"

    header = [f"{s} (held out)" if s == held_out else s for s in sites]
    if held_out is not None:
        header.append("mean of training sites")
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, summary in summaries.items():
        per_site = summary["per_site"]
        row = [cell(per_site.get(s, {}).get(metric)) for s in sites]
        if held_out is not None:
            means = [per_site[s][metric]["mean"] for s in sites if s != held_out and s in per_site
                     and per_site[s][metric]["mean"] is not None]
            row.append(f"{sum(means) / len(means):.3f}" if means else "–")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)
