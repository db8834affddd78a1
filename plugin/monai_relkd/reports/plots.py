"""PNG plots of a report (matplotlib, Agg canvas; no pyplot global state, so it is safe in threads and servers).

Every function writes one PNG atomically (:func:`monai_relkd.data._io.atomic_write`) and returns its
path. Colours are fixed per model through ``colors`` so that all plots of a report agree.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data._io import atomic_write

__all__ = [
    "model_colors",
    "save_figure",
    "plot_dice_per_site",
    "plot_dice_vs_params",
    "read_scalars",
    "plot_training_curves",
    "plot_overlays",
    "CURVE_TAGS",
    "GT_COLOR",
]

logger = logging.getLogger(__name__)

#: TensorBoard scalar tags drawn as training curves, in panel order (students: total and terms; teacher: train_loss)
CURVE_TAGS: tuple[str, ...] = ("loss", "train_loss", "loss_seg", "loss_logits", "loss_km", "loss_aa", "val_mean_dice")
_TAG_TITLES = {
    "loss": "total loss (students)",
    "train_loss": "total loss (teacher)",
    "loss_seg": "L_seg",
    "loss_logits": "L_logits",
    "loss_km": "L_KM",
    "loss_aa": "L_AA",
    "val_mean_dice": "validation Dice",
}
#: colour of the ground-truth contour
GT_COLOR = "#ffd700"
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#7f7f7f"]


def model_colors(names: Sequence[str]) -> dict[str, str]:
    """A distinct colour per model name (cycled after 9), none of them the ground truth's."""
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def save_figure(fig: Any, path: os.PathLike | str, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically (:func:`monai_relkd.data._io.atomic_write`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def plot_dice_per_site(
    groups: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float] | None]]],
    models: Sequence[str],
    path: os.PathLike | str,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """
    Grouped bars: Dice mean ± std per site and model, one panel per held-out site.

    Args:
        groups: ``{held_out_site: {site: {model: {"mean", "std"} or None}}}``; sites in drawing order (the
            held-out one is labelled "(held out)" and its bars hatched).
        models: model names, bar order.
        path: output PNG.
        colors: colour per model (default :func:`model_colors`).
    """
    colors = dict(colors or model_colors(models))
    n = max(1, len(groups))
    fig = _figure((max(6.0, 1.1 * max((len(s) for s in groups.values()), default=1) * max(1, len(models)) * 0.45 + 3),
                   2.8 * n + 0.6))
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)[:, 0])
    width = 0.8 / max(1, len(models))
    for ax, (held, per_site) in zip(axes, groups.items()):
        sites = list(per_site)
        x = np.arange(len(sites))
        for j, name in enumerate(models):
            means = [(per_site[s].get(name) or {}).get("mean", np.nan) for s in sites]
            stds = [(per_site[s].get(name) or {}).get("std", 0.0) for s in sites]
            bars = ax.bar(x + (j - (len(models) - 1) / 2) * width, np.nan_to_num(means, nan=0.0), width,
                          yerr=stds, capsize=2, color=colors[name], label=name, error_kw={"lw": 0.8})
            for s, bar in zip(sites, bars):
                if s == held:
                    bar.set_hatch("//")
                    bar.set_edgecolor("black")
        ax.set_xticks(x, [f"{s}\n(held out)" if s == held else s for s in sites])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("Dice")
        ax.set_title(f"held-out site {held}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, max(1, len(models))), fontsize="small")
    return save_figure(fig, path)


def plot_dice_vs_params(
    points: Sequence[Mapping[str, Any]],
    path: os.PathLike | str,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """
    Dice against parameter count (log x): per model a filled marker for the held-out site(s) and a hollow one for
    the training sites (validation cases).

    Args:
        points: ``[{"name", "params", "held_out": float | None, "training": float | None}]``.
        path: output PNG.
        colors: colour per model name.
    """
    colors = dict(colors or model_colors([p["name"] for p in points]))
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    for i, p in enumerate(points):
        if not p.get("params"):
            continue
        c = colors.get(p["name"], "black")
        if p.get("held_out") is not None:
            ax.scatter(p["params"], p["held_out"], color=c, s=50, zorder=3, label=p["name"])
            ax.annotate(p["name"], (p["params"], p["held_out"]), textcoords="offset points",
                        xytext=(6, 4 if i % 2 else -10), fontsize="x-small")
        if p.get("training") is not None:
            ax.scatter(p["params"], p["training"], facecolors="none", edgecolors=c, s=50, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("Dice")
    ax.set_title("Dice vs parameters (filled: held-out site, hollow: training sites)", fontsize="small")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")
    return save_figure(fig, path)


def read_scalars(log_dir: os.PathLike | str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """
    Every scalar series in the TensorBoard event files under ``log_dir`` (searched recursively; files written by
    several writers into one folder are merged): ``{tag: (steps, values)}`` sorted by step. Empty if none.
    """
    if log_dir is None or not Path(log_dir).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for event_file in sorted(glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)):
        try:
            acc = EventAccumulator(event_file, size_guidance={"scalars": 0})
            acc.Reload()
        except Exception as err:  # noqa: BLE001 - a truncated file should not stop the report
            logger.warning("cannot read TensorBoard file %s: %s", event_file, err)
            continue
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                series.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    return {t: (np.array(sorted(s)), np.array([s[k] for k in sorted(s)])) for t, s in series.items()}


def _smooth(values: np.ndarray) -> np.ndarray:
    w = max(1, len(values) // 20)
    if w == 1:
        return values
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_training_curves(
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: os.PathLike | str,
    title: str = "",
    colors: Mapping[str, str] | None = None,
) -> Path | None:
    """
    One panel per loss term (:data:`CURVE_TAGS` present in any model's logs), one line per model: the raw values
    (faint) and a moving average over 1/20 of the run.

    Args:
        curves: ``{model: {tag: (steps, values)}}`` as from :func:`read_scalars`.
        path: output PNG.
        title: figure title.
        colors: colour per model.

    Returns:
        the path, or None when no model has any of the tags.
    """
    colors = dict(colors or model_colors(list(curves)))
    tags = [t for t in CURVE_TAGS if any(t in c and len(c[t][0]) for c in curves.values())]
    if not tags:
        return None
    ncols = min(3, len(tags))
    nrows = (len(tags) + ncols - 1) // ncols
    fig = _figure((4.0 * ncols, 2.9 * nrows + 0.4))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, tag in zip(axes, tags):
        for name, series in curves.items():
            if tag not in series or not len(series[tag][0]):
                continue
            steps, values = series[tag]
            c = colors.get(name, "black")
            marker = "o" if len(steps) < 30 else None
            ax.plot(steps, values, color=c, alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth(values), color=c, lw=1.5, label=name, marker=marker, ms=3)
        ax.set_title(_TAG_TITLES.get(tag, tag), fontsize="small")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes[len(tags):]:
        ax.set_visible(False)
    handles, labels = {}, []
    for ax in axes[: len(tags)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(4, len(handles)),
               fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (1.0, 99.0))
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _contour(ax: Any, mask: Any, color: str, width: float, style: str) -> None:
    """Contour of a (i, j) mask drawn transposed; zero-padded so a mask touching the border (or filling the slice)
    is closed, and skipped when empty."""
    m = np.asarray(mask, dtype=np.float32)
    if not m.any():
        return
    padded = np.pad(m, 1)
    xs, ys = np.arange(-1, m.shape[0] + 1), np.arange(-1, m.shape[1] + 1)
    ax.contour(xs, ys, padded.T, levels=[0.5], colors=[color], linewidths=width, linestyles=style)


def plot_overlays(
    panels: Sequence[Mapping[str, Any]],
    path: os.PathLike | str,
    colors: Mapping[str, str] | None = None,
    title: str = "",
) -> Path | None:
    """
    Predicted and true contours on image slices, one panel per case.

    Args:
        panels: ``[{"title": str, "image": (H, W) array, "truth": (H, W) bool, "predictions": {model: (H, W) bool}}]``;
            arrays are in NIfTI array order (i, j) and drawn transposed with the origin at the bottom.
        path: output PNG.
        colors: colour per model; the ground truth is :data:`GT_COLOR`, drawn dashed and thicker.
        title: figure title.

    Returns:
        the path, or None when ``panels`` is empty.
    """
    from matplotlib.lines import Line2D

    if not panels:
        return None
    names = list(dict.fromkeys(n for p in panels for n in p["predictions"]))
    colors = dict(colors or model_colors(names))
    fig = _figure((max(3.3 * len(panels), 7.5), 3.9 + 0.25 * ((len(names) + 1) // 3)))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False).ravel())
    for ax, p in zip(axes, panels):
        ax.imshow(_window(np.asarray(p["image"], dtype=np.float32)).T, cmap="gray", origin="lower",
                  interpolation="nearest")
        for name, mask in p["predictions"].items():
            _contour(ax, mask, colors.get(name, "black"), 1.2, "-")
        _contour(ax, p["truth"], GT_COLOR, 1.8, "--")
        ax.set_title(p.get("title", ""), fontsize="small")
        ax.set_axis_off()
    handles = [Line2D([], [], color=GT_COLOR, lw=1.8, ls="--", label="ground truth")]
    handles += [Line2D([], [], color=colors.get(n, "black"), lw=1.2, label=n) for n in names]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)
