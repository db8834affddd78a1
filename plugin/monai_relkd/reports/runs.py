"""Reading run folders (``run.json`` manifests) and combining their evaluation summaries.

A run folder is what ``relkd demo`` or ``benchmarks/generalization.py`` writes: ``run.json`` ::

    {"held_out_site": "HK", "dataset_dir": "...", "datalist": ".../datalist.json", "image_size": 64, "seed": 0,
     "models": [{"name": "teacher", "role": "teacher", "bundle": ".../prostate_mri_teacher",
                 "ckpt": ".../model.pt", "summary": ".../summary.json", "prediction_dir": ".../predictions",
                 "log_dir": ".../runs"}, ...]}

``role`` is ``teacher``, ``baseline`` (a student trained without distillation) or ``student`` (with distillation).
An optional ``"fsd"`` entry per model (the dict of :func:`monai_relkd.evaluation.fsd_for_bundle`) is reported too.
Relative paths are relative to the run folder.

Several runs with the same held-out site (e.g. seeds) are combined by pooling their cases: the mean ± std of a
site is over all cases of all those runs (``n`` = cases x runs); with one run it is the summary's own statistic.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = ["ModelEntry", "RunInfo", "ROLES", "load_run", "group_by_site", "site_stat", "model_names",
           "matching_baseline"]

PathLike = Union[str, "os.PathLike[str]"]
ROLES = ("teacher", "baseline", "student")
_REQUIRED = ("held_out_site", "models")
_MODEL_REQUIRED = ("name", "role")


@dataclass
class ModelEntry:
    """One model of a run: manifest fields, and its loaded ``summary.json`` (None when missing)."""

    name: str
    role: str
    bundle: Path | None
    ckpt: Path | None
    summary_path: Path | None
    prediction_dir: Path | None
    log_dir: Path | None
    summary: dict[str, Any] | None = None
    fsd: dict[str, Any] | None = None


@dataclass
class RunInfo:
    """One run folder: held-out site, seed, datalist and models."""

    path: Path
    held_out_site: str
    seed: Any
    image_size: int | None
    datalist: Path | None
    dataset_dir: Path | None
    models: list[ModelEntry] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Short id, e.g. ``HK_seed0``."""
        return f"{self.held_out_site}_seed{self.seed}" if self.seed is not None else str(self.held_out_site)


def _path(value: Any, base: Path) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(os.fspath(value)).expanduser()
    return p if p.is_absolute() else base / p


def load_run(run_dir: PathLike) -> RunInfo:
    """
    Read ``run_dir/run.json`` and each model's summary.

    Raises:
        FileNotFoundError: no ``run.json`` in ``run_dir``.
        ValueError: the manifest lacks ``held_out_site``/``models``, a model lacks ``name``/``role``, a role is not
            one of :data:`ROLES`, or a model name appears twice.
    """
    root = Path(run_dir).expanduser().resolve()
    manifest = root / "run.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found: a run folder holds the run.json that `relkd demo` or "
            "benchmarks/generalization.py write."
        )
    with open(manifest, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, Mapping) or any(k not in data for k in _REQUIRED):
        raise ValueError(f"{manifest} must be an object with keys {list(_REQUIRED)}.")
    if not isinstance(data["models"], Sequence) or not data["models"]:
        raise ValueError(f"{manifest}: 'models' must be a non-empty list.")
    models: list[ModelEntry] = []
    for i, m in enumerate(data["models"]):
        if not isinstance(m, Mapping) or any(k not in m for k in _MODEL_REQUIRED):
            raise ValueError(f"{manifest}: models[{i}] needs keys {list(_MODEL_REQUIRED)}, got {m!r}.")
        if m["role"] not in ROLES:
            raise ValueError(
                f"{manifest}: models[{i}] ({m['name']!r}) has role {m['role']!r}; expected one of {ROLES}."
            )
        if any(e.name == m["name"] for e in models):
            raise ValueError(f"{manifest}: model name {m['name']!r} appears twice.")
        entry = ModelEntry(
            name=str(m["name"]),
            role=str(m["role"]),
            bundle=_path(m.get("bundle"), root),
            ckpt=_path(m.get("ckpt"), root),
            summary_path=_path(m.get("summary"), root),
            prediction_dir=_path(m.get("prediction_dir"), root),
            log_dir=_path(m.get("log_dir"), root),
            fsd=dict(m["fsd"]) if isinstance(m.get("fsd"), Mapping) else None,
        )
        if entry.summary_path is not None and entry.summary_path.is_file():
            with open(entry.summary_path, encoding="utf-8") as f:
                entry.summary = json.load(f)
        models.append(entry)
    image_size = data.get("image_size")
    return RunInfo(
        path=root,
        held_out_site=str(data["held_out_site"]),
        seed=data.get("seed"),
        image_size=int(image_size) if isinstance(image_size, (int, float)) else None,
        datalist=_path(data.get("datalist"), root),
        dataset_dir=_path(data.get("dataset_dir"), root),
        models=models,
    )


def group_by_site(runs: Sequence[RunInfo]) -> dict[str, list[RunInfo]]:
    """Runs grouped by held-out site, sites in order of first appearance."""
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(run.held_out_site, []).append(run)
    return groups


def model_names(runs: Sequence[RunInfo]) -> list[str]:
    """Model names in order of first appearance, teachers first, then baselines, then students."""
    seen: dict[str, str] = {}
    for run in runs:
        for m in run.models:
            seen.setdefault(m.name, m.role)
    return sorted(seen, key=lambda n: (ROLES.index(seen[n]), list(seen).index(n)))


def site_stat(summaries: Sequence[Mapping[str, Any]], site: str, metric: str = "dice") -> dict[str, Any] | None:
    """
    Statistic of ``metric`` on ``site`` over one or several summaries.

    One summary: its ``per_site[site][metric]`` (``mean``, ``std``, ``n``). Several: the cases of ``site`` in
    every summary's ``metric_per_case`` are pooled (undefined values skipped), std with ddof=0 as in the
    summaries. Returns None when no summary has a defined value for the site.
    """
    summaries = [s for s in summaries if s]
    if not summaries:
        return None
    if len(summaries) == 1:
        stat = summaries[0].get("per_site", {}).get(site, {}).get(metric)
        if not stat or stat.get("mean") is None:
            return None
        return {"mean": float(stat["mean"]), "std": float(stat.get("std") or 0.0), "n": int(stat.get("n", 0)),
                "n_runs": 1}
    values: list[float] = []
    n_runs = 0
    for s in summaries:
        cases = [c for c in s.get("metric_per_case", []) if str(c.get("site")) == site]
        vals = [float(c["metrics"][metric]) for c in cases if c.get("metrics", {}).get(metric) is not None]
        if vals:
            n_runs += 1
            values += vals
        elif s.get("per_site", {}).get(site, {}).get(metric, {}).get("mean") is not None:  # no per-case list
            n_runs += 1
            values.append(float(s["per_site"][site][metric]["mean"]))
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "n": len(values), "n_runs": n_runs}


def matching_baseline(student: ModelEntry, models: Sequence[ModelEntry]) -> ModelEntry | None:
    """The baseline trained with the same bundle as ``student`` (else the only baseline, else None)."""
    baselines = [m for m in models if m.role == "baseline"]
    same = [b for b in baselines if b.bundle is not None and student.bundle is not None
            and b.bundle.name == student.bundle.name]
    if same:
        return same[0]
    return baselines[0] if len(baselines) == 1 else None
