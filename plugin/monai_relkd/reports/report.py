"""``relkd report``: a Markdown report with tables and PNG plots from one or several run folders.

What it holds (files in ``out_dir``):

- ``report.md``: the held-out-site Dice of every model per held-out site, one sentence per held-out site with the
  Dice differences distillation made (numbers only), per-site tables (teacher, student without distillation,
  students with distillation; mean ± std over cases; the held-out site marked), the efficiency table (parameters,
  GFLOPs = 2 x MACs at a stated input, optional CPU latency; from each bundle's ``network_def`` via
  :mod:`monai_relkd.profiling`), the FSD when the manifests carry one, and the plots below;
- ``dice_per_site.png``: bars per site and model, one panel per held-out site;
- ``dice_vs_params.png``: Dice (held-out and training sites) against parameters, log x;
- ``curves_<SITE>_seed<S>.png``: training curves of each loss term per run (TensorBoard logs in each ``log_dir``);
- ``overlay_<SITE>_seed<S>.png``: teacher / student / ground-truth contours on held-out-site slices (the slice
  with the most prostate of up to ``overlay_cases`` cases);
- ``report.json``: the numbers of the tables.

Every file is written atomically (:mod:`monai_relkd.data._io`).

Example::

    >>> from monai_relkd.reports import write_report
    >>> write_report(["relkd_demo"], "relkd_demo/report")  # doctest: +SKIP
    PosixPath('relkd_demo/report/report.md')
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..data._io import atomic_write_text
from . import plots
from .runs import RunInfo, group_by_site, load_run, matching_baseline, model_names, site_stat

__all__ = ["write_report", "report_command", "efficiency_rows", "REPORT_MD"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
REPORT_MD = "report.md"


def _cell(stat: Mapping[str, Any] | None) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat.get("n", 0) > 1 else f"{stat['mean']:.3f}"


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "run"


def _sites(runs: Sequence[RunInfo], held: str) -> list[str]:
    sites = sorted({s for r in runs for m in r.models if m.summary for s in m.summary.get("per_site", {})})
    return [s for s in sites if s != held] + ([held] if held in sites else [])


def _summaries(runs: Sequence[RunInfo], name: str) -> list[dict[str, Any]]:
    return [m.summary for r in runs for m in r.models if m.name == name and m.summary]


def _training_mean(runs: Sequence[RunInfo], name: str, held: str) -> float | None:
    means = [st["mean"] for s in _sites(runs, held) if s != held
             for st in [site_stat(_summaries(runs, name), s)] if st]
    return float(np.mean(means)) if means else None


def _seed_means(group: Sequence[RunInfo], name: str, held: str) -> dict[int, float]:
    """``{seed: mean Dice of model `name` on the held-out site in that seed's run}``."""
    out: dict[int, float] = {}
    for r in group:
        for m in r.models:
            st = site_stat([m.summary], held) if m.name == name and m.summary else None
            if st:
                out[int(r.seed)] = st["mean"]
    return out


def seed_spread(
    groups: Mapping[str, Sequence[RunInfo]], names: Sequence[str], roles: Mapping[str, str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """
    Markdown lines and records of the spread across seeds of the held-out Dice, and of each student's difference
    from its baseline, per held-out site and for the mean over held-out sites (seeds holding every site).

    Each run contributes its own mean over the held-out site's cases; the spread is the standard deviation
    (ddof=0) of those per-seed means. Nothing is returned when no held-out site has runs of two seeds.
    """
    if not any(len({r.seed for r in g}) > 1 for g in groups.values()):
        return [], []
    per: dict[str, dict[str, dict[int, float]]] = {
        name: {held: _seed_means(g, name, held) for held, g in groups.items()} for name in names}
    wheres = [*groups, "mean over held-out sites"] if len(groups) > 1 else list(groups)
    for name in names if len(groups) > 1 else ():  # the mean over held-out sites, for seeds holding every site
        seeds = set.intersection(*(set(v) for v in per[name].values()))
        per[name]["mean over held-out sites"] = {
            sd: float(np.mean([per[name][h][sd] for h in groups])) for sd in sorted(seeds)}
    baselines: dict[str, str] = {}
    for g in groups.values():
        models = {m.name: m for r in g for m in r.models}
        for m in models.values():
            base = matching_baseline(m, list(models.values())) if m.role == "student" else None
            if base is not None:
                baselines.setdefault(m.name, base.name)
    lines = ["", "### Spread across seeds", "",
             "Each run's mean Dice on its held-out site, per seed; then mean ± std (ddof=0) over seeds. The last "
             "column is the same for the difference from the student's baseline (seeds where both ran).", "",
             "| model | held-out site | per seed | mean ± std over seeds | − baseline: mean ± std over seeds |",
             "|---|---|---|---:|---:|"]
    records: list[dict[str, Any]] = []
    for where in wheres:
        for name in names:
            vals = per[name][where]
            if len(vals) < 2:
                continue
            arr = np.array(list(vals.values()))
            rec: dict[str, Any] = {"model": name, "role": roles[name], "held_out": where, "per_seed": vals,
                                   "mean": float(arr.mean()), "std": float(arr.std())}
            delta_cell = "–"
            base = per.get(baselines.get(name, ""), {}).get(where, {})
            common = sorted(set(vals) & set(base))
            if common:
                d = np.array([vals[sd] - base[sd] for sd in common])
                rec.update(baseline=baselines[name], delta_per_seed={sd: float(vals[sd] - base[sd]) for sd in common},
                           delta_mean=float(d.mean()), delta_std=float(d.std()))
                delta_cell = f"{_signed(float(d.mean()))} ± {d.std():.3f} (n={len(common)})"
            records.append(rec)
            lines.append(f"| {name} | {where} | " + ", ".join(f"{v:.3f} (s{sd})" for sd, v in vals.items())
                         + f" | {arr.mean():.3f} ± {arr.std():.3f} | {delta_cell} |")
    return lines, records


def efficiency_rows(
    runs: Sequence[RunInfo], image_size: int, latency: bool = False, repeats: int = 20, threads: int | None = None
) -> list[dict[str, Any]]:
    """
    Parameters, MACs/FLOPs at (1, 1, image_size, image_size) and optionally the CPU latency of each distinct
    bundle's ``network_def`` (``configs/inference.json``), with the models that use it.

    Returns:
        ``[{"bundle", "models", "network", "params", "gflops", "gmacs", "latency_ms", "threads", "error"}]``.
    """
    from monai_relkd.profiling import count_flops, count_parameters, measure_latency, resolve_network

    bundles: dict[str, list[str]] = {}
    for r in runs:
        for m in r.models:
            key = str(m.bundle) if m.bundle is not None else ""
            if m.name not in bundles.setdefault(key, []):
                bundles[key].append(m.name)
    rows = []
    shape = (1, 1, image_size, image_size)
    for bundle, names in bundles.items():
        row: dict[str, Any] = {"bundle": bundle, "models": names, "network": None, "params": None, "gflops": None,
                               "gmacs": None, "latency_ms": None, "threads": None, "error": None}
        try:
            if not bundle:
                raise ValueError("no bundle in run.json")
            net = resolve_network(bundle)
            row["network"] = type(net).__name__
            row["params"] = count_parameters(net)
            flops = count_flops(net, shape)
            row["gflops"], row["gmacs"] = flops["gflops"], flops["gmacs"]
            if latency:
                lat = measure_latency(net, shape, repeats=repeats, warmup=3, threads=threads)
                row["latency_ms"], row["threads"] = lat["latency_ms_median"], lat["threads"]
        except Exception as err:  # noqa: BLE001 - one broken bundle path should not stop the report
            logger.warning("cannot profile bundle %s: %s", bundle, err)
            row["error"] = str(err)
        rows.append(row)
    return rows


def _load_array(path: Path) -> np.ndarray:
    import nibabel as nib

    arr = np.asanyarray(nib.load(str(path)).dataobj)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _overlay_panels(run: RunInfo, max_cases: int) -> list[dict[str, Any]]:
    from monai_relkd.evaluation import find_prediction, load_datalist_split

    if run.datalist is None or not run.datalist.is_file() or max_cases < 1:
        return []
    try:
        cases = load_datalist_split(run.datalist, "test")
    except (KeyError, ValueError) as err:
        logger.warning("no overlays for %s: %s", run.path, err)
        return []
    cases = sorted((c for c in cases if c["site"] == run.held_out_site), key=lambda c: c["case"]) or cases
    if not cases:
        return []
    pick = sorted(set(np.linspace(0, len(cases) - 1, min(max_cases, len(cases))).round().astype(int).tolist()))
    panels = []
    for i in pick:
        case = cases[i]
        if not case["image"].is_file() or not case["label"].is_file():
            continue
        image, truth = _load_array(case["image"]).astype(np.float32), _load_array(case["label"]) > 0
        if image.ndim != 3 or truth.shape != image.shape:
            continue
        k = int(np.argmax(truth.sum(axis=(0, 1))))
        preds = {}
        for m in run.models:
            if m.prediction_dir is None or not m.prediction_dir.is_dir():
                continue
            try:
                pred = _load_array(find_prediction(m.prediction_dir, case["image"], "_seg", site=case["site"],
                                                   case=case["case"]))
            except (FileNotFoundError, ValueError):
                continue
            if pred.shape == truth.shape:
                preds[m.name] = pred[..., k] > 0
        panels.append({"title": f"{case['site']}/{case['case']}, slice {k}", "image": image[..., k],
                       "truth": truth[..., k], "predictions": preds})
    return panels


@dataclass
class _Report:
    """What every section of the report reads (the runs, grouped by held-out site) and writes (Markdown lines,
    the ``report.json`` record, PNGs in ``out``)."""

    runs: list[RunInfo]
    out: Path
    size: int
    groups: dict[str, list[RunInfo]] = field(init=False)
    names: list[str] = field(init=False)
    roles: dict[str, str] = field(init=False)
    colors: dict[str, str] = field(init=False)
    md: list[str] = field(default_factory=lambda: ["# monai-relkd report", ""])
    data: dict[str, Any] = field(default_factory=lambda: {
        "runs": [], "held_out": {}, "per_site": {}, "deltas": [], "efficiency": [], "plots": []})

    def __post_init__(self) -> None:
        self.groups = group_by_site(self.runs)
        self.names = model_names(self.runs)
        self.roles = {m.name: m.role for r in self.runs for m in r.models}
        self.colors = plots.model_colors(self.names)

    def evaluated(self) -> list[str]:
        """Models with a summary in at least one run."""
        return [n for n in self.names if any(_summaries(g, n) for g in self.groups.values())]


def _load_runs(run_dirs: Sequence[PathLike] | PathLike, overlay_cases: int) -> list[RunInfo]:
    """Check the arguments of :func:`write_report` and load its run folders."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("give at least one run folder.")
    if isinstance(overlay_cases, bool) or not isinstance(overlay_cases, int) or overlay_cases < 0:
        raise ValueError(f"overlay_cases must be an int >= 0, got {overlay_cases!r}.")
    runs = [load_run(d) for d in run_dirs]
    if not any(m.summary for r in runs for m in r.models):
        raise ValueError(
            f"no model of {[str(r.path) for r in runs]} has a summary.json: evaluate the models first "
            "(the bundles' evaluate.json)."
        )
    return runs


def _runs_section(rep: _Report) -> None:
    """The run folders: held-out site, seed, image size and models of each; the models not evaluated."""
    runs, md = rep.runs, rep.md
    missing = [f"{r.label}: {m.name}" for r in runs for m in r.models if not m.summary]
    md += [f"{len(runs)} run folder(s); held-out sites: {', '.join(rep.groups)}; seeds: "
           f"{', '.join(sorted({str(r.seed) for r in runs}))}. Dice is the mean ± std over cases (pooled over the "
           "runs of a held-out site); training sites are scored on their validation cases.", "",
           "| run | held-out site | seed | image size | models |", "|---|---|---|---:|---|"]
    for r in runs:
        md.append(f"| `{r.path}` | {r.held_out_site} | {r.seed} | {r.image_size} | "
                  f"{', '.join(f'{m.name} ({m.role})' for m in r.models)} |")
        rep.data["runs"].append({"path": str(r.path), "held_out_site": r.held_out_site, "seed": r.seed,
                                 "image_size": r.image_size, "models": [m.name for m in r.models]})
    if missing:
        md += ["", f"Not evaluated (no summary.json): {', '.join(missing)}."]


def _held_out_section(rep: _Report) -> dict[str, float | None]:
    """Held-out Dice of every model per held-out site; returns each model's mean over held-out sites."""
    groups = rep.groups
    rep.md += ["", "## Generalization: Dice on the held-out site", "",
               "| model | role | " + " | ".join(groups) + " | mean over held-out sites |",
               "|---|---|" + "---:|" * (len(groups) + 1)]
    held_means: dict[str, float | None] = {}
    for name in rep.names:
        stats = {h: site_stat(_summaries(g, name), h) for h, g in groups.items()}
        rep.data["held_out"][name] = stats
        means = [s["mean"] for s in stats.values() if s]
        held_means[name] = float(np.mean(means)) if means else None
        mean_cell = f"{held_means[name]:.3f}" if means else "–"
        rep.md.append(f"| {name} | {rep.roles[name]} | " + " | ".join(_cell(stats[h]) for h in groups)
                      + f" | {mean_cell} |")
    return held_means


def _distillation_deltas(rep: _Report, held: str, g: Sequence[RunInfo]) -> list[str]:
    """Sentences comparing each student of held-out site ``held`` with its baseline (recorded in ``deltas``)."""
    parts = []
    models = {m.name: m for r in g for m in r.models}
    for name in rep.names:
        m = models.get(name)
        if m is None or m.role != "student":
            continue
        base = matching_baseline(m, list(models.values()))
        if base is None:
            continue
        s, b = site_stat(_summaries(g, name), held), site_stat(_summaries(g, base.name), held)
        if not s or not b:
            continue
        text = (f"{name} vs {base.name}: {_signed(s['mean'] - b['mean'])} Dice on {held} "
                f"({s['mean']:.3f} vs {b['mean']:.3f})")
        ts, tb = _training_mean(g, name, held), _training_mean(g, base.name, held)
        if ts is not None and tb is not None:
            text += f", {_signed(ts - tb)} on the training sites ({ts:.3f} vs {tb:.3f})"
        parts.append(text)
        rep.data["deltas"].append({"held_out_site": held, "student": name, "baseline": base.name,
                                   "delta_held_out": s["mean"] - b["mean"],
                                   "delta_training": None if ts is None or tb is None else ts - tb})
    return parts


def _distillation_section(rep: _Report) -> None:
    """What distillation changed, per held-out site: student minus baseline, and the teachers' Dice."""
    rep.md += ["", "### What distillation changed", ""]
    for held, g in rep.groups.items():
        parts = _distillation_deltas(rep, held, g)
        teachers = [n for n in rep.names if rep.roles[n] == "teacher" and site_stat(_summaries(g, n), held)]
        for t in teachers:
            parts.append(f"{t}: {site_stat(_summaries(g, t), held)['mean']:.3f} on {held}")
        n_runs = len(g)
        rep.md.append(f"- **{held} held out** ({n_runs} run{'s' if n_runs > 1 else ''}): "
                      + ("; ".join(parts) if parts else "no student/baseline pair evaluated") + ".")


def _per_site_section(rep: _Report) -> None:
    """One table per held-out site of every model's Dice on every site, and the ``dice_per_site.png`` plot."""
    plot_groups: dict[str, dict[str, dict[str, Any]]] = {}
    for held, g in rep.groups.items():
        sites = _sites(g, held)
        header = [f"**{s} (held out)**" if s == held else s for s in sites]
        rep.md += ["", f"## Per-site Dice, held-out site {held}", "",
                   "| model | role | " + " | ".join(header) + " | mean of training sites |",
                   "|---|---|" + "---:|" * (len(sites) + 1)]
        plot_groups[held] = {s: {} for s in sites}
        rep.data["per_site"][held] = {}
        for name in rep.names:
            sums = _summaries(g, name)
            if not sums:
                continue
            stats = {s: site_stat(sums, s) for s in sites}
            for s in sites:
                plot_groups[held][s][name] = stats[s]
            rep.data["per_site"][held][name] = stats
            tm = _training_mean(g, name, held)
            tm_cell = f"{tm:.3f}" if tm is not None else "–"
            rep.md.append(f"| {name} | {rep.roles[name]} | " + " | ".join(_cell(stats[s]) for s in sites)
                          + f" | {tm_cell} |")
    p = plots.plot_dice_per_site(plot_groups, rep.evaluated(), rep.out / "dice_per_site.png", rep.colors)
    rep.md += ["", f"![Dice per site and model]({p.name})"]
    rep.data["plots"].append(p.name)


def _efficiency_section(rep: _Report, held_means: Mapping[str, float | None], latency: bool, repeats: int,
                        threads: int | None) -> None:
    """Parameters, GFLOPs and (optionally) CPU latency of each bundle, and the ``dice_vs_params.png`` plot."""
    size, md = rep.size, rep.md
    rows = efficiency_rows(rep.runs, size, latency=latency, repeats=repeats, threads=threads)
    rep.data["efficiency"] = rows
    lat_head = "CPU latency (ms, median)" if latency else "CPU latency"
    md += ["", "## Efficiency", "",
           f"Parameters and GFLOPs (= 2 × MACs; convolutions and matrix products, torch FlopCounterMode) of each "
           f"bundle's `network_def` for one 1×1×{size}×{size} input."
           + (f" Latency: median of {repeats} eval-mode forwards of that input on CPU." if latency else
              " Latency not measured (pass `latency=True` / `--latency`)."), "",
           f"| model(s) | network | params (M) | GFLOPs | {lat_head} |", "|---|---|---:|---:|---:|"]
    params_of: dict[str, int] = {}
    for row in rows:
        for n in row["models"]:
            if row["params"]:
                params_of[n] = row["params"]
        if row["error"]:
            md.append(f"| {', '.join(row['models'])} | n/a | n/a | n/a | n/a |")
            continue
        lat = f"{row['latency_ms']:.1f} ({row['threads']} threads)" if row["latency_ms"] is not None else "–"
        md.append(f"| {', '.join(row['models'])} | {row['network']} | {row['params'] / 1e6:.3f} "
                  f"| {row['gflops']:.3f} | {lat} |")
    errors = [f"`{r['bundle'] or '?'}`: {r['error']}" for r in rows if r["error"]]
    if errors:
        md += ["", "Not profiled: " + "; ".join(errors)]
    points = [{"name": n, "params": params_of.get(n), "held_out": held_means.get(n),
               "training": (float(np.mean(tms)) if (tms := [t for h, g in rep.groups.items()
                                                            for t in [_training_mean(g, n, h)] if t is not None])
                            else None)}
              for n in rep.evaluated()]
    p = plots.plot_dice_vs_params(points, rep.out / "dice_vs_params.png", rep.colors)
    md += ["", f"![Dice against parameters]({p.name})"]
    rep.data["plots"].append(p.name)


def _fsd_section(rep: _Report) -> None:
    """The Fréchet semantic distances the run manifests carry (nothing when none does)."""
    fsd_rows = [(r, m) for r in rep.runs for m in r.models if m.fsd and m.fsd.get("fsd") is not None]
    if not fsd_rows:
        return
    rep.md += ["", "## Fréchet semantic distance (training sites vs held-out site; lower: more domain-invariant)",
               "", "FSD values of different networks or taps are not comparable (their feature scales differ); "
               "compare a network with itself (e.g. a student with and without distillation) at the same tap.", "",
               "| run | model | tap | FSD | slices (train / held out) |", "|---|---|---|---:|---|"]
    for r, m in fsd_rows:
        rep.md.append(f"| {r.label} | {m.name} | `{m.fsd.get('tap')}` | {m.fsd['fsd']:.4f} | "
                      f"{m.fsd.get('n_train')} / {m.fsd.get('n_test')} |")


def _curves_and_overlays_section(rep: _Report, overlay_cases: int) -> None:
    """Per run: the training curves (TensorBoard scalars) and contours on held-out slices, one PNG each."""
    rep.md += ["", "## Training curves", ""]
    used: set[str] = set()

    def unique(stem: str) -> str:
        name, i = stem, 1
        while name in used:
            i += 1
            name = f"{stem}_{i}"
        used.add(name)
        return name

    overlay_md: list[str] = []
    for r in rep.runs:
        stem = unique(_slug(r.label))
        title = f"held-out {r.held_out_site}, seed {r.seed}"
        curves = {m.name: plots.read_scalars(m.log_dir) for m in r.models}
        p = plots.plot_training_curves({k: v for k, v in curves.items() if v}, rep.out / f"curves_{stem}.png",
                                 title=title, colors=rep.colors)
        if p is None:
            rep.md.append(f"- {r.label}: no TensorBoard scalars found in the models' log_dir.")
        else:
            rep.md += [f"### {r.held_out_site}, seed {r.seed}", "", f"![Training curves {r.label}]({p.name})", ""]
            rep.data["plots"].append(p.name)
        panels = _overlay_panels(r, overlay_cases)
        p = (plots.plot_overlays(panels, rep.out / f"overlay_{stem}.png", colors=rep.colors, title=title)
             if panels else None)
        if p is None:
            overlay_md.append(f"- {r.label}: no held-out case with image, label and predictions found.")
        else:
            overlay_md += [f"### {r.held_out_site}, seed {r.seed}", "",
                           "Slice with the most prostate of each case; ground truth dashed.", "",
                           f"![Contours {r.label}]({p.name})", ""]
            rep.data["plots"].append(p.name)
    if overlay_cases:
        rep.md += ["", "## Contours on held-out-site slices", ""] + overlay_md


def write_report(
    run_dirs: Sequence[PathLike],
    out_dir: PathLike,
    latency: bool = False,
    image_size: int | None = None,
    overlay_cases: int = 3,
    latency_repeats: int = 20,
    threads: int | None = None,
) -> Path:
    """
    Write ``report.md``, its PNG plots and ``report.json`` into ``out_dir`` from one or several run folders.

    Args:
        run_dirs: run folders, each holding a ``run.json`` (see :mod:`monai_relkd.reports.runs`); runs with the
            same held-out site (seeds) are combined by pooling their cases.
        out_dir: output folder (created).
        latency: also time the networks on CPU (costs a few seconds per bundle).
        image_size: in-plane input size of the efficiency table (default: the runs' ``image_size``, else 128).
        overlay_cases: held-out cases drawn per run in the contour overlays (0: no overlays).
        latency_repeats, threads: timed forward passes and CPU threads of the latency.

    Returns:
        path of ``report.md``.

    Raises:
        ValueError: no run folder, or no model of any run has a ``summary.json``.
        FileNotFoundError: a folder without ``run.json``.
    """
    runs = _load_runs(run_dirs, overlay_cases)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r.image_size for r in runs if r.image_size})
    rep = _Report(runs, out, int(image_size or (sizes[0] if sizes else 128)))
    _runs_section(rep)
    held_means = _held_out_section(rep)
    _distillation_section(rep)
    spread_md, rep.data["seed_spread"] = seed_spread(rep.groups, rep.names, rep.roles)
    rep.md += spread_md
    _per_site_section(rep)
    _efficiency_section(rep, held_means, latency, latency_repeats, threads)
    _fsd_section(rep)
    _curves_and_overlays_section(rep, overlay_cases)

    report = out / REPORT_MD
    atomic_write_text(out / "report.json", json.dumps(rep.data, indent=2, default=str) + "\n")
    atomic_write_text(report, "\n".join(rep.md).rstrip() + "\n")
    return report


def report_command(
    *run_dirs: str,
    out: str | None = None,
    latency: bool = False,
    image_size: int | None = None,
    overlay_cases: int = 3,
) -> None:
    """
    ``relkd report RUN_DIR [RUN_DIR ...] [--out DIR] [--latency] [--image_size N] [--overlay_cases 3]``: write the
    Markdown report with plots (see :func:`write_report`). ``out`` defaults to ``RUN_DIR/report`` for one run and
    to ``report/`` in the runs' common parent folder for several.
    """
    if not run_dirs:
        raise ValueError("usage: relkd report RUN_DIR [RUN_DIR ...] [--out DIR]")
    if out is None:
        paths = [str(Path(d).resolve()) for d in run_dirs]
        out = os.path.join(paths[0] if len(paths) == 1 else os.path.commonpath(paths), "report")
    path = write_report(list(run_dirs), out, latency=latency, image_size=image_size, overlay_cases=overlay_cases)
    print(f"wrote {path}")
