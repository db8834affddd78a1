"""Reports: Markdown tables and PNG plots from run folders (``run.json`` + evaluation summaries + TensorBoard logs).

Example::

    from monai_relkd.reports import write_report
    write_report(["runs/HK_seed0", "runs/UCL_seed0"], "runs/report")   # -> runs/report/report.md
"""

from .plots import (
    CURVE_TAGS,
    model_colors,
    plot_dice_per_site,
    plot_dice_vs_params,
    plot_overlays,
    plot_training_curves,
    read_scalars,
)
from .report import REPORT_MD, efficiency_rows, report_command, write_report
from .runs import ROLES, ModelEntry, RunInfo, group_by_site, load_run, matching_baseline, site_stat

__all__ = [
    "write_report",
    "report_command",
    "efficiency_rows",
    "REPORT_MD",
    "load_run",
    "RunInfo",
    "ModelEntry",
    "ROLES",
    "group_by_site",
    "site_stat",
    "matching_baseline",
    "read_scalars",
    "model_colors",
    "plot_dice_per_site",
    "plot_dice_vs_params",
    "plot_training_curves",
    "plot_overlays",
    "CURVE_TAGS",
]
