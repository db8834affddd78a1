"""Evaluation: per-case Dice / HD95 / ASD in mm (MONAI metrics), per-site statistics, nnU-Net-style summary.json.

Empty masks follow :data:`EMPTY_POLICY` (both empty: Dice 1, HD95 0, ASD 0; exactly one empty: Dice 0, distances
undefined = null, excluded from distance means and counted as ``n_undefined``).

Example::

    from monai_relkd.evaluation import evaluate_folder, write_summary, format_site_table
    summary = evaluate_folder("pred", "datalist.json", split="test", pred_postfix="_seg")
    write_summary(summary, "pred")          # pred/summary.json, pred/metric_per_case.csv
    print(format_site_table(summary))
"""

from .bundle import evaluate_bundle_predictions, format_models_table
from .fsd import frechet_distance, fsd_command, fsd_for_bundle, gaussian_fit, pooled_features
from .folder import evaluate_command, evaluate_folder, find_prediction, load_datalist_split, load_mask
from .metrics import EMPTY_POLICY, METRICS, binarize, evaluate_case
from .summary import CASES_CSV, CSV_COLUMNS, SUMMARY_JSON, format_site_table, summarize_cases, write_summary

__all__ = [
    "evaluate_bundle_predictions",
    "format_models_table",
    "METRICS",
    "EMPTY_POLICY",
    "SUMMARY_JSON",
    "CASES_CSV",
    "CSV_COLUMNS",
    "binarize",
    "evaluate_case",
    "summarize_cases",
    "write_summary",
    "format_site_table",
    "load_datalist_split",
    "find_prediction",
    "load_mask",
    "evaluate_folder",
    "evaluate_command",
    "frechet_distance", "gaussian_fit", "pooled_features", "fsd_for_bundle", "fsd_command",
]
