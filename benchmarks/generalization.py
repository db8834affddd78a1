"""Leave-one-site-out generalization benchmark: converged teacher and students, one JSON record per cell.

A cell is one (held-out site = fold, seed, row). Rows (``--rows``; the standard setting is the first five):

==================  ===========================================================================================
row                 what is trained (through the real bundles, overriding the schedule and ``distillation`` only)
==================  ===========================================================================================
``teacher``         the teacher bundle (DeepLabV3+); the students of its (fold, seed) distil from it
``no_kd``           ENet, every λ = 0 (the baseline every other row is paired with)
``hinton``          ENet, logits KD only (λ_km = λ_aa = 0; λ_logits and T from the bundle)
``skd``             ENet, structured KD: pair-wise affinity only with uniform pair weights and SKD's node
                    pooling (:data:`SKD_OVERRIDES`); λ_aa from the bundle
``full``            ENet, the bundle's defaults (logits + kernel matrix + adaptive affinity)
``full_minus_aa``   extended: the full loss with λ_aa = 0
``full_minus_km``   extended: the full loss with λ_km = 0
``espnet_no_kd``,   extended: ESPNet / ERFNet without distillation and with the full loss
``espnet_full``,
``erfnet_no_kd``,
``erfnet_full``
``gkd``             generalizable distillation (Qi et al.): ENet with ``L_seg`` + ACT + DCGD + DICD through the
                    bundle's ``configs/gkd.json`` (every relational λ = 0); the fold teacher's MSAN is pre-trained
                    once per teacher (``pretrain_msan``) and saved next to the teacher's model
``gkd_full``        the GKD terms together with the full relational loss (``gkd.json`` on the bundle defaults)
==================  ===========================================================================================

Every student cell also records the FSD (:func:`monai_relkd.evaluation.fsd_for_bundle`, Fréchet distance between the
training sites' and the held-out site's globally pooled features of prostate slices) of its best checkpoint
(``models/model.pt``) at the network's first student tap (``encoder.stage3`` for ENet), so FSD is compared at the
same tap for every row of one network; the teacher's at its own first tap (``aspp``).

Schedule (optimizer steps of ``batch_size`` slices, poly LR, see the bundles' model cards): students
``student_steps`` (800), teacher ``teacher_steps`` (900, and 1600 for the UCL fold, whose teacher is still rising at 900
and 1200 steps by the plateau rule of ``docs/results.md``; its training forward in ``teacher_precision``, bfloat16 by
default), validation on the training sites' validation cases every ``val_every`` steps. The held-out site is never
used for any choice: it is evaluated (Dice per case at the networks' resolution, ``image_size``) at each of the last
``last_k`` validations, and the **score** of a cell is the mean
held-out Dice over those ``last_k`` evaluations (declared in ``docs/results.md``). Distilled students read the
teacher through a :class:`monai_relkd.engines.TeacherOutputCache` filled once per fold teacher, before its first
student, with every training-site slice and flip in a fixed order (:func:`fill_fold_cache`, saved beside the teacher's
model as ``teacher_outputs_<taps>.pt``), so every seed and row of a fold reads the same teacher outputs whichever job
filled them; the teacher sees the slice before intensity augmentation (``--cache False`` runs the teacher live on the
student's own input, the bundles' default).

Output in ``--out``::

    data/                              the synthetic six-site set (``--scale``, ``--size``; generated once)
    cells/<FOLD>_seed<S>/datalist.json
    cells/<FOLD>_seed<S>/<row>/        models/, runs/ (TensorBoard), cell.json (the record + curve + settings)
    cells/<FOLD>_seed<T>/teacher/models/teacher_outputs_<taps>.pt   the fold teacher's cached outputs (float16)
    curves/curves_<FOLD>_seed<S>.png   validation Dice against optimizer steps, one line per row
    results.json                       every finished cell's record (a JSON list), rewritten atomically
    report.md                          per-cell scores and the paired statistics (monai_relkd.reports.paired)
    logs/<job>.log                     each child process's output (``--workers``)

Cells run side by side in ``--workers`` child processes (default: the CPUs, at most 4), each with ``--threads``
torch threads (default 1): a fold's teacher first, then one process per (fold, seed) for its students (see
:func:`plan_jobs`); each child's output is in ``logs/<job>.log`` and the parent prints a line when a job starts and
ends. The thread count is fixed because a cell's score depends on it: the same cell gave held-out Dice 0.694 with
2 threads and 0.665 with 1 (docs/results.md). A cell's score does not depend on whether it ran in a child or alone.

A cell whose ``cell.json`` exists with the same settings is not run again (``--force`` re-runs), so an interrupted
benchmark resumes where it stopped; a distilled student's settings include its teacher's, so a re-trained teacher
re-runs them. Examples::

    flock /tmp/relkd-cpu.lock nice python benchmarks/generalization.py --out /work/runs/loso
    python benchmarks/generalization.py --folds HK --seeds 0 --rows no_kd --out DIR
    python benchmarks/generalization.py --quick --out /tmp/loso_smoke          # CI-size smoke run (about a minute)
    python benchmarks/generalization.py --rows full_minus_aa,full_minus_km --seeds 0 --out /work/runs/loso
    python benchmarks/generalization.py --dry_run                                 # the plan and a time estimate
    python benchmarks/generalization.py --workers 1 --threads 2 --out DIR        # one process, two threads
    python benchmarks/generalization.py --teacher_seed each --out /work/runs/loso # a teacher per fold and seed
    python benchmarks/generalization.py --rows gkd --folds UCL --seeds 0 --out DIR \
        --merge docs/generalization/results.json      # new cells joined with the committed ones in DIR/report.md

Each ``cell.json`` records where the cell's time went (``timing``: training, validation and held-out evaluation
seconds, with their counts) and the machine's load average, so the first cells of a run tell how long the rest
will take (the progress line's estimate does the same).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fire

from monai_relkd.data._io import atomic_write_json, atomic_write_text
from monai_relkd.demo import TEACHER, find_bundles_dir

SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
STANDARD_ROWS = ("teacher", "no_kd", "hinton", "skd", "full")
EXTENDED_ROWS = ("full_minus_aa", "full_minus_km", "espnet_no_kd", "espnet_full", "erfnet_no_kd", "erfnet_full")
LAMBDAS = ("lambda_logits", "lambda_km", "lambda_aa")

#: the structured-KD baseline (Liu et al., CVPR 2019): pair-wise affinity with uniform pair weights on max-pooled
#: nodes of half the map side (2×2 nodes), as in SKD
SKD_OVERRIDES: dict[str, Any] = {"distillation#pair_weights": "uniform", "distillation#aa_grid": 2,
                                 "distillation#aa_pool": "max", "distillation#aa_node_size": None}

#: per row: (network, λ keys set to 0, extra distillation overrides[, config files added to train.json])
ROWS: dict[str, tuple] = {
    "no_kd": ("enet", LAMBDAS, {}),
    "hinton": ("enet", ("lambda_km", "lambda_aa"), {}),
    "skd": ("enet", ("lambda_logits", "lambda_km"), SKD_OVERRIDES),
    "full": ("enet", (), {}),
    "full_minus_aa": ("enet", ("lambda_aa",), {}),
    "full_minus_km": ("enet", ("lambda_km",), {}),
    "espnet_no_kd": ("espnet", LAMBDAS, {}),
    "espnet_full": ("espnet", (), {}),
    "erfnet_no_kd": ("erfnet", LAMBDAS, {}),
    "erfnet_full": ("erfnet", (), {}),
    "gkd": ("enet", LAMBDAS, {}, ("gkd.json",)),
    "gkd_full": ("enet", (), {}, ("gkd.json",)),
}
GKD_ROWS = ("gkd", "gkd_full")


def config_files(row: str) -> tuple[str, ...]:
    """The bundle config files a student row trains with: ``train.json`` plus the row's additions."""
    return ("train.json", *(ROWS[row][3] if len(ROWS[row]) > 3 else ()))


def relational(row: str) -> bool:
    """Whether a student row keeps the kernel-matrix term, or the affinity term on the bundle's grid (not SKD's)."""
    _, zero, extra = ROWS[row][:3]
    return "lambda_km" not in zero or ("lambda_aa" not in zero and "distillation#aa_grid" not in extra)


def distils(row: str) -> bool:
    """Whether a student row reads the teacher (some relational λ is kept, or it adds GKD terms)."""
    return ROWS[row][1] != LAMBDAS or len(config_files(row)) > 1

DEFAULTS: dict[str, Any] = dict(
    folds="HK,UCL,BMC", seeds="0,1,2", rows=",".join(STANDARD_ROWS), scale=1.0, size=96, image_size=48,
    student_steps=800, teacher_steps="900,UCL=1600", val_every=100, last_k=3, batch_size=16, num_samples=4,
    teacher_seed=0, teacher_precision="bfloat16",
)
QUICK: dict[str, Any] = dict(
    folds="HK", seeds="0", rows="teacher,no_kd,full", scale=0.15, size=32, image_size=32, student_steps=4,
    teacher_steps=4, val_every=2, last_k=2, batch_size=4, num_samples=2, teacher_seed=0, teacher_precision="bfloat16",
)
# Seconds at 48x48, 16 slices per step, one thread per job with two jobs side by side: means over the cells of the
# reference run (docs/results.md, 2026-12-06/07, Intel Xeon): training seconds per step of each kind ("kd": logits
# and/or SKD's 2x2 affinity, read from the cache; "kd_relational": a kernel-matrix or full-grid affinity term), one
# validation or held-out evaluation, a cell's start-up and FSD, a fold's cache fill, the teacher MSAN's pre-training.
# The teacher's step is the 900-step bfloat16 run's (2026-12-07, same machine type, a slower session: its float32
# student cells took 0.90-1.29x their time in the reference run): 1.07-1.10 s. The teacher and "kd_relational" steps
# are then scaled by benchmarks/step_time.py's ratios for the fused AdamW and the matrix-product affinity pooling
# (teacher 0.756 / 0.926 s, distilled ENet 0.270 / 0.310 s, 2026-12-07), the students' steps by a 200-step no_kd
# cell's without the training post-processing (39.7 / 42.1 s): not yet measured in a run.
_STEP_S = {"teacher": 0.89, "no_kd": 0.164, "kd": 0.16, "kd_relational": 0.245}
_EVAL_S = {"teacher": 8.0, "student": 1.3}
_CELL_S = 8.0
_CACHE_FILL_S = 80.0
_MSAN_S = 190.0


def _csv(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [t.strip() for t in str(value).split(",") if t.strip()]


@dataclass
class Settings:
    """The benchmark's settings (command-line flags after presets)."""

    out: Path
    folds: list[str]
    seeds: list[int]
    rows: list[str]
    scale: float
    size: int
    image_size: int
    student_steps: int
    teacher_steps: dict[str, int]  # per fold of ``folds`` (:func:`parse_teacher_steps`)
    val_every: int
    last_k: int
    batch_size: int
    num_samples: int
    cache: bool = True
    teacher_seed: int | None = None
    data: str | None = None
    data_seed: int = 0
    bundles: str | None = None
    force: bool = False
    merge: str | None = None
    teacher_output_stride: int | None = None
    teacher_precision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def teacher_steps_for(self, fold: str) -> int:
        """The optimizer steps of ``fold``'s teacher (``--teacher_steps``: ``900,UCL=1600`` gives UCL 1600)."""
        return self.teacher_steps[fold]

    def cell_settings(self, row: str, fold: str) -> dict[str, Any]:
        """What the cell (``fold``, any seed, ``row``)'s result depends on (a cell is re-run when this changes)."""
        steps = self.teacher_steps_for(fold) if row == "teacher" else self.student_steps
        out = {"scale": self.scale, "size": self.size, "image_size": self.image_size, "steps": steps,
               "val_every": self.val_every, "last_k": self.last_k, "batch_size": self.batch_size,
               "num_samples": self.num_samples, "cache": self._cache_setting(row), "data": self.data,
               "data_seed": self.data_seed}
        if self.teacher_seed is not None and row != "teacher":
            out["teacher_seed"] = self.teacher_seed
        if self.teacher_output_stride is not None and (row == "teacher" or distils(row)):
            out["teacher_output_stride"] = self.teacher_output_stride
        if self.teacher_precision is not None and (row == "teacher" or distils(row)):
            out["teacher_precision"] = self.teacher_precision
        if row != "teacher" and distils(row):  # a re-trained teacher re-runs the students that read it
            out["teacher_steps"] = self.teacher_steps_for(fold)
        return out

    def _cache_setting(self, row: str) -> bool | str:
        """``"fold"`` for a student that reads its fold's filled cache (:func:`fill_fold_cache`), else whether the
        cache is on (a student without distillation never reads it)."""
        on = self.cache and row != "teacher"
        return "fold" if on and distils(row) else on

    def teacher_overrides(self, row: str) -> dict[str, Any]:
        """The bundle overrides that give the teacher row, and every student that builds the teacher to read it, the
        teacher's ``output_stride`` (none: the bundles' own, 16)."""
        if self.teacher_output_stride is None:
            return {}
        key = "network_def#output_stride" if row == "teacher" else "distillation#teacher#network_def#output_stride"
        return {key: self.teacher_output_stride}

    def teacher_training_overrides(self) -> dict[str, Any]:
        """The teacher row's training inferer: the forward under ``torch.autocast`` in ``teacher_precision`` (none:
        float32, the bundle's ``SimpleInferer``). Validation and the students' teacher forward stay float32."""
        if self.teacher_precision is None:
            return {}
        return {"train#inferer": {"_target_": "monai_relkd.inferers.AutocastInferer", "dtype": self.teacher_precision}}

    def cell_todo(self, fold: str, seed: int, row: str) -> bool:
        """Whether the cell is to be run: not finished with these settings, or ``force`` and ``row`` asked for (a
        teacher run only because its students need it is not re-trained by ``force``)."""
        if self.force and row in self.rows:
            return True
        return _done(self.out / "cells" / f"{fold}_seed{seed}" / row, self.cell_settings(row, fold)) is None

    def teacher_seeds(self) -> list[int]:
        """The seeds a teacher is trained for: every seed, or ``teacher_seed`` alone (shared by all seeds)."""
        return list(self.seeds) if self.teacher_seed is None else [self.teacher_seed]


def parse_teacher_steps(value: Any) -> tuple[int | None, dict[str, int]]:
    """``--teacher_steps``: one number for every fold, ``FOLD=N`` pairs, or both (``900,UCL=1600``: 1600 for UCL, 900
    for the others). Returns the number for the folds not named (``None`` if none is given) and the pairs."""
    if isinstance(value, dict):
        items = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [str(value)]
    else:
        items = _csv(value)
    default: int | None = None
    by_fold: dict[str, int] = {}
    for item in items:
        fold, sep, number = item.rpartition("=")
        try:
            steps = int(number)
        except ValueError:
            steps = 0
        if steps < 1 or (sep and not fold.strip()):
            raise ValueError(f"teacher_steps: {item!r} is not a number of steps >= 1 or FOLD=STEPS (got {value!r})")
        if not sep and default is not None:
            raise ValueError(f"teacher_steps: two numbers for the folds not named ({default} and {steps}) in {value!r}")
        if sep:
            by_fold[fold.strip()] = steps
        else:
            default = steps
    return default, by_fold


def make_settings(out: str, quick: bool = False, **flags: Any) -> Settings:
    """Presets (``DEFAULTS`` or ``QUICK``) overridden by the given flags, validated."""
    values = {**(QUICK if quick else DEFAULTS), **{k: v for k, v in flags.items() if v is not None}}
    rows = _csv(values.pop("rows"))
    unknown = [r for r in rows if r != "teacher" and r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; choose from {['teacher', *ROWS]}")
    folds = _csv(values.pop("folds"))
    default_steps, steps_by_fold = parse_teacher_steps(values["teacher_steps"])
    for what, names in (("", folds), ("teacher_steps names ", steps_by_fold)):
        unknown_folds = [f for f in names if values.get("data") is None and f not in SITES]
        if unknown_folds:
            raise ValueError(f"{what}unknown fold(s) {unknown_folds}; the sites are {list(SITES)}")
    seeds = [int(s) for s in _csv(values.pop("seeds"))]
    unset = [f for f in folds if default_steps is None and f not in steps_by_fold]
    if unset:
        raise ValueError(f"teacher_steps gives no steps for fold(s) {unset}: add a number for the folds not named "
                         f"(e.g. 900,UCL=1600)")
    values["teacher_steps"] = {f: steps_by_fold.get(f, default_steps) for f in folds}
    if str(values.get("teacher_seed")).lower() in ("each", "none"):
        values["teacher_seed"] = None  # one teacher per (fold, seed)
    elif values.get("teacher_seed") is not None:
        values["teacher_seed"] = int(values["teacher_seed"])
    if not rows or not folds or not seeds:
        raise ValueError("folds, seeds and rows must not be empty")
    s = Settings(out=Path(out).resolve(), folds=folds, seeds=seeds, rows=rows,
                 **{k: values.pop(k) for k in list(values) if k in Settings.__dataclass_fields__})
    for name in ("student_steps", "val_every", "last_k", "image_size", "size", "batch_size"):
        if int(getattr(s, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.teacher_output_stride is not None and s.teacher_output_stride not in (8, 16):
        raise ValueError(f"teacher_output_stride must be 8 or 16, got {s.teacher_output_stride!r}")
    if str(s.teacher_precision).lower() in ("none", "float32"):
        s.teacher_precision = None
    if s.teacher_precision not in (None, "bfloat16", "float16"):
        raise ValueError(f"teacher_precision must be bfloat16, float16 or float32, got {s.teacher_precision!r}")
    shortest = min([s.student_steps] + [s.teacher_steps_for(f) for f in s.folds])
    if s.last_k * s.val_every > shortest + s.val_every - 1:
        raise ValueError(f"last_k ({s.last_k}) evaluations every {s.val_every} steps do not fit in {shortest} steps")
    return s


def row_overrides(row: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The ``distillation#...`` overrides of a student row, given the bundle's ``distillation`` section."""
    _, zero, extra = ROWS[row][:3]
    out: dict[str, Any] = {f"distillation#{k}": 0.0 if k in zero else float(defaults[k]) for k in LAMBDAS}
    out.update(extra)
    return out


def estimate_seconds(s: Settings) -> float:
    """Rough estimate of the seconds of one process for the runs still to do, from the per-step costs measured at
    48x48 (scaled by pixels and batch size); two workers take about half."""
    f = _size_factor(s)
    evals_s = -(-s.student_steps // s.val_every) + s.last_k
    per_cell: dict[str, float] = {}
    for row in ROWS:
        kind = "kd_relational" if relational(row) else "kd" if distils(row) else "no_kd"
        per_cell[row] = s.student_steps * _STEP_S[kind] * f + evals_s * _EVAL_S["student"] + _CELL_S
    rows = set(s.rows) | ({"teacher"} if any(r != "teacher" and distils(r) for r in s.rows) else set())
    n_teachers = len(s.folds) * len(s.teacher_seeds())
    teachers = sum(teacher_seconds(s, fold) for fold in s.folds) * len(s.teacher_seeds()) if "teacher" in rows else 0.0
    fill = _CACHE_FILL_S * f * n_teachers if s.cache and any(distils(r) for r in rows - {"teacher"}) else 0.0
    msan = _MSAN_S * f * n_teachers if any(r in GKD_ROWS for r in rows) else 0.0
    return teachers + fill + msan + sum(per_cell[r] for r in rows - {"teacher"}) * len(s.folds) * len(s.seeds)


def teacher_seconds(s: Settings, fold: str) -> float:
    """Rough estimate of the seconds of ``fold``'s teacher cell in one process (see :func:`estimate_seconds`)."""
    steps = s.teacher_steps_for(fold)
    evals = -(-steps // s.val_every) + s.last_k
    return steps * _STEP_S["teacher"] * _size_factor(s) + evals * _EVAL_S["teacher"] + _CELL_S


def _size_factor(s: Settings) -> float:
    """The per-step costs measured at 48x48 and 16 slices, scaled by pixels and batch size."""
    return (s.image_size / 48) ** 2 * (s.batch_size / 16)


class Progress:
    """``[generalization i/N | elapsed | ~left] message`` lines; what is left is extrapolated from the cells done."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def line(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        left = f" | ~{elapsed / self.done * (self.total - self.done) / 60:.0f} min left" if self.done else ""
        print(f"[generalization {self.done}/{self.total} | {elapsed / 60:.1f} min{left}] {message}", flush=True)


def prepare_data(s: Settings) -> Path:
    """The six-site folder: ``--data``, or the synthetic set in ``OUT/data`` (generated once)."""
    if s.data is not None:
        return Path(s.data).resolve()
    from monai_relkd.data.synthetic import generate_six_site_dataset

    data_dir = s.out / "data"
    if not (data_dir / "dataset.json").is_file():
        generate_six_site_dataset(data_dir, scale=s.scale, size=s.size, seed=s.data_seed)
    return data_dir


class _HeldOut:
    """Held-out-site evaluation at the last ``last_k`` validations of a training run, plus the validation curve.

    Dice per case at the networks' resolution (``validate#preprocessing``: RAS, z-score, resize to ``image_size``),
    with the bundle's own inferer and post-processing; the held-out Dice never feeds back into training or
    checkpoint choice.
    """

    def __init__(self, parser: Any, last_k: int, held_out: bool = True) -> None:
        from monai.data import CacheDataset, DataLoader
        from monai.engines import SupervisedEvaluator
        from monai.handlers import MeanDice, from_engine

        self.trainer = parser.get_parsed_content("train#trainer")
        self.validator = parser.get_parsed_content("validate#evaluator")
        self.last_k = last_k if held_out else 0
        self.evaluator: Any = None
        if held_out:
            cases = parser.get_parsed_content("datalist")["test"]
            self.case_ids = [f"{c.get('site', '')}/{c.get('case', Path(str(c['image'])).name)}" for c in cases]
            dataset = CacheDataset(cases, transform=parser.get_parsed_content("validate#preprocessing"),
                                   cache_rate=1.0, num_workers=0, progress=False)
            self.evaluator = SupervisedEvaluator(
                device=parser.get_parsed_content("device"), val_data_loader=DataLoader(dataset, batch_size=1),
                network=parser.get_parsed_content("network"), inferer=parser.get_parsed_content("validate#inferer"),
                postprocessing=parser.get_parsed_content("validate#postprocessing"),
                key_val_metric={"dice": MeanDice(include_background=False, save_details=True,
                                                 output_transform=from_engine(["pred", "label"]))})
        self.curve: list[tuple[int, float]] = []
        self.held_out: list[dict[str, Any]] = []
        from ignite.engine import Events

        #: wall-clock seconds spent in validation and in held-out evaluation (the rest of the run is training)
        self.timing = {"validation_s": 0.0, "held_out_s": 0.0, "validations": 0, "held_out_evaluations": 0}
        self._t0 = 0.0
        self.validator.add_event_handler(Events.STARTED, self._before_validation)
        self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._after_validation)

    def _before_validation(self, _validator: Any) -> None:
        self._t0 = time.perf_counter()

    def _after_validation(self, _validator: Any) -> None:
        self.timing["validation_s"] += time.perf_counter() - self._t0
        self.timing["validations"] += 1
        step = int(self.trainer.state.iteration)
        self.curve.append((step, float(self.validator.state.metrics["val_mean_dice"])))
        if self.last_k and self.trainer.state.epoch > self.trainer.state.max_epochs - self.last_k:
            t = time.perf_counter()
            self.evaluator.run()
            self.timing["held_out_s"] += time.perf_counter() - t
            self.timing["held_out_evaluations"] += 1
            per_case = self.evaluator.state.metric_details["dice"].reshape(len(self.case_ids), -1).mean(1)
            self.held_out.append({"step": step, "dice": float(self.evaluator.state.metrics["dice"]),
                                  "per_case": dict(zip(self.case_ids, [float(v) for v in per_case]))})


def _workflow(bundle: Path, configs: Sequence[str], run_id: str, override: dict[str, Any]) -> Any:
    """The bundle's workflow ``run_id`` from ``configs`` (file names under ``bundle/configs``), initialised."""
    from monai.bundle import ConfigWorkflow

    files = [str(bundle / "configs" / c) for c in configs]
    workflow = ConfigWorkflow(config_file=files if len(files) > 1 else files[0],
                              meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                              run_id=run_id, workflow_type=None, bundle_root=str(bundle), **override)
    workflow.initialize()
    return workflow


def pretrain_msan(bundle: Path, common: dict[str, Any], teacher_ckpt: str, msan_ckpt: Path,
                  teacher_overrides: dict[str, Any] | None = None) -> float:
    """The fold teacher's MSAN (``gkd.json``'s ``pretrain_msan``), trained once and saved at ``msan_ckpt``;
    returns the seconds it took (0 when it exists). ``teacher_overrides``: see :meth:`Settings.teacher_overrides`."""
    if msan_ckpt.is_file():
        return 0.0
    t = time.perf_counter()
    workflow = _workflow(bundle, config_files("gkd"), "pretrain_msan",
                         {**common, "teacher_ckpt": teacher_ckpt, "gkd#teacher_msan_ckpt": str(msan_ckpt),
                          **(teacher_overrides or {})})
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return time.perf_counter() - t


def fold_cache_path(teacher_ckpt: str | Path, taps: Sequence[str]) -> Path:
    """Where a fold teacher's outputs at ``taps`` are cached (beside its model, so a re-trained teacher drops them)."""
    return Path(teacher_ckpt).parent / f"teacher_outputs_{'+'.join(taps)}.pt"


def fill_fold_cache(bundle: Path, common: dict[str, Any], teacher_ckpt: str, batch_size: int,
                    teacher_overrides: dict[str, Any] | None = None) -> float:
    """The fold teacher's logits and tapped features for every slice of every training-site case, unflipped and
    flipped as ``RandFlipd`` flips them, computed once and saved at :func:`fold_cache_path`; returns the seconds it
    took (0 when the file exists).

    What a student reads must not depend on which job fills the cache first: a DeepLabV3+ output depends in its last
    bits on the batch it is computed in, and float16 keeps some of them. So the fill covers all cases of the fold's
    training sites (any seed's training split), in a fixed order (cases by image path, slices bottom to top, each
    unflipped then flipped, ``batch_size`` at a time), whichever job runs it; a lock file makes a second job wait for
    the first and then read its file. Like a cell's score, the slices depend on torch's thread count (the intensity
    normalisation sums over the volume), which ``--threads`` fixes for every job. ``bundle``: a student bundle (its
    deterministic transforms, teacher and taps)."""
    import fcntl

    import torch
    from monai.transforms import Compose

    from monai_relkd.bundle_support import bundle_datalist
    from monai_relkd.engines import FeatureTaps, TeacherOutputCache
    from monai_relkd.engines.trainer import DistillationLossAdapter

    defaults = json.loads((bundle / "configs" / "train.json").read_text())["distillation"]
    teacher_taps = [tap["teacher"] for tap in defaults["taps"]]
    path = fold_cache_path(teacher_ckpt, teacher_taps)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if path.is_file():
            return 0.0
        t = time.perf_counter()
        workflow = _workflow(bundle, ("train.json",), "training",
                             {**common, "teacher_ckpt": teacher_ckpt, **row_overrides("full", defaults),
                              **(teacher_overrides or {})})
        parser = workflow.parser
        teacher = parser.get_parsed_content("teacher")
        taps = FeatureTaps(teacher, teacher_taps, detach=True)
        teacher_fn = DistillationLossAdapter(None, teacher, FeatureTaps(torch.nn.Identity(), []), taps)._teacher_forward
        load = Compose(parser.get_parsed_content("train#deterministic_transforms"))
        split = bundle_datalist(common["dataset_dir"], test_site=common["test_site"], seed=common["seed"])
        cases = sorted(split["training"] + split["validation"], key=lambda c: str(c["image"]))
        slices: list[torch.Tensor] = []
        for case in cases:
            volume = load(dict(case))["image"].as_tensor()  # (C, H, W, D)
            for z in range(volume.shape[-1]):
                image = volume[..., z]
                slices += [image, torch.flip(image, dims=(1,))]  # RandFlipd(spatial_axis=0) flips dim 1
        cache = TeacherOutputCache()
        teacher.eval()
        for i in range(0, len(slices), batch_size):
            cache(teacher_fn, torch.stack(slices[i:i + batch_size]))
        cache.save(path)
        taps.remove()
        return time.perf_counter() - t


def cell_fsd(bundle: Path, datalist: Path, ckpt: Path, tap: str, image_size: int,
             network_overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """FSD of a trained cell's ``ckpt`` at ``tap`` (None when the model was never written); ``network_overrides``:
    the network arguments the cell was trained with where they differ from the bundle's."""
    from monai_relkd.evaluation import fsd_for_bundle

    if not ckpt.is_file():
        return None
    r = fsd_for_bundle(bundle, datalist, tap=tap, ckpt=ckpt, image_size=image_size,
                       network_overrides=network_overrides)
    return {k: r[k] for k in ("fsd", "tap", "channels", "n_train", "n_test", "slices")}


def run_cell(s: Settings, bundle: Path, common: dict[str, Any], cell_dir: Path, extra: dict[str, Any],
             held_out: bool = True, configs: Sequence[str] = ("train.json",)) -> dict:
    """Train one model with the bundle's ``configs`` (``train.json`` first) and return its held-out evaluations
    and curve.

    With ``held_out=False`` the held-out site is never predicted (the tuning script's runs)."""
    # a cell (re)starts from scratch: a model, record or last state of an earlier run with other settings must
    # neither be resumed nor kept as "best" (the bundle's checkpoints never replace a better model.pt)
    shutil.rmtree(cell_dir / "models", ignore_errors=True)
    override = {**common, **extra, "ckpt_dir": str(cell_dir / "models"), "output_dir": str(cell_dir / "eval"),
                "log_dir": str(cell_dir / "runs"), "resume": False}
    workflow = _workflow(bundle, configs, "training", override)
    try:
        probe = _HeldOut(workflow.parser, s.last_k, held_out=held_out)
        t = time.perf_counter()
        workflow.run()
        probe.timing["run_s"] = time.perf_counter() - t
    finally:
        workflow.finalize()
    cache = workflow.parser.get_parsed_content("teacher_cache") if "teacher_cache" in workflow.parser else None
    timing = {k: round(v, 2) for k, v in probe.timing.items()}
    if "run_s" in timing:
        timing["train_s"] = round(timing["run_s"] - timing["validation_s"] - timing["held_out_s"], 2)
    return {"curve": probe.curve, "held_out": probe.held_out, "steps": int(probe.trainer.state.iteration),
            "cache": repr(cache) if cache is not None else None, "timing": timing}


def _record(fold: str, seed: int, row: str, network: str, result: dict, dist: dict[str, Any] | None,
            seconds: float) -> dict[str, Any]:
    held = result["held_out"]
    per_case: dict[str, float] = {}
    for case in held[0]["per_case"] if held else []:
        per_case[case] = sum(h["per_case"][case] for h in held) / len(held)
    return {"fold": fold, "seed": seed, "row": row, "network": network,
            "score": sum(h["dice"] for h in held) / len(held) if held else None, "steps": result["steps"],
            "lambdas": {k: dist[k] for k in LAMBDAS} if dist else None,
            "temperature": dist["temperature"] if dist else None, "seconds": round(seconds, 1),
            "per_case": per_case, "held_out_steps": [h["step"] for h in held],
            "best_val_dice": max((d for _, d in result["curve"]), default=None)}


def environment() -> dict[str, Any]:
    """What a cell's numbers may depend on besides its settings: library versions, CPU model, the instruction set
    torch dispatches its kernels to (``cpu_capability``, e.g. AVX2 or AVX512) and torch's threads.

    The same code and settings gave held-out Dice 0.694 here and 0.656 in an earlier environment, and a teacher
    trained on an Intel Xeon (AVX512) scored 0.583 where the same cell on an AMD EPYC scored 0.572
    (docs/results.md), so each record carries this, and ``--check`` prints it beside a score that does not reproduce.
    """
    import monai
    import numpy
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu": cpu, "torch": torch.__version__, "monai": monai.__version__, "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def check_lines(reference: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                tolerance: float = 0.01) -> tuple[list[str], bool]:
    """Each of ``records`` against the record of the same (fold, seed, row) in ``reference``.

    Returns one line per compared cell (score here, score there, difference, and the environment keys that differ
    where both records have one) and whether every compared score is within ``tolerance``. A cell that ``reference``
    lacks is said so and does not count as a mismatch; no compared cell at all counts as one.
    """
    key = lambda r: (r["fold"], int(r["seed"]), r["row"])  # noqa: E731
    ref = {key(r): r for r in reference}
    lines, compared, ok = [], 0, True
    for r in records:
        other = ref.get(key(r))
        name = f"{r['fold']} seed {r['seed']} {r['row']}"
        if other is None or r["score"] is None or other["score"] is None:
            lines.append(f"{name}: no score to compare in the reference")
            continue
        compared += 1
        diff = r["score"] - other["score"]
        within = abs(diff) <= tolerance
        ok &= within
        env_here, env_there = r.get("environment"), other.get("environment")
        if env_here and env_there:
            changed = [f"{k} {env_there.get(k)} -> {env_here.get(k)}" for k in sorted(set(env_here) | set(env_there))
                       if env_here.get(k) != env_there.get(k)]
            env = "same environment" if not changed else "environment differs: " + "; ".join(changed)
        else:
            env = "the reference does not record its environment"
        verdict = "reproduced" if within else f"NOT reproduced (more than {tolerance})"
        lines.append(f"{name}: {r['score']:.4f} here, {other['score']:.4f} in the reference, "
                     f"difference {diff:+.4f}: {verdict}; {env}")
    return lines, ok and compared > 0


def _done(cell_dir: Path, settings: dict[str, Any]) -> dict | None:
    path = cell_dir / "cell.json"
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    return cell if cell.get("settings") == json.loads(json.dumps(settings)) else None


def _sorted_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {r: i for i, r in enumerate(("teacher", *ROWS))}
    return sorted(records, key=lambda r: (r["fold"], r["seed"], order.get(r["row"], 99)))


def collect(out: Path) -> list[dict[str, Any]]:
    """Every finished cell's record under ``out/cells``, sorted by fold, seed and row order."""
    return _sorted_records([json.loads(p.read_text())["record"] for p in sorted((out / "cells").glob("*/*/cell.json"))])


def merge_records(earlier: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``earlier`` (e.g. a committed ``results.json``) with each (fold, seed, row) of ``records`` added or replaced."""
    key = lambda r: (r["fold"], int(r["seed"]), r["row"])  # noqa: E731
    merged = {key(r): r for r in earlier}
    merged.update({key(r): r for r in records})
    return _sorted_records(list(merged.values()))


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``results.json``, checked to be a list of cell records; the error names the file."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read a results.json ({err})") from err
    need = {"fold", "seed", "row", "score"}
    if not isinstance(records, list) or not all(isinstance(r, dict) and need <= set(r) for r in records):
        raise ValueError(f"{path}: expected a JSON list of cell records with keys {sorted(need)}")
    return records


def fsd_table(records: Sequence[dict[str, Any]]) -> str:
    """Per row: cells, mean score and mean FSD (with its tap) over the cells that have one."""
    lines = ["| row | cells | mean score | mean FSD | FSD tap |", "|---|---:|---:|---:|---|"]
    for row in dict.fromkeys(r["row"] for r in records):
        cells = [r for r in records if r["row"] == row and r["score"] is not None]
        fsds = [r["fsd"] for r in cells if r.get("fsd")]
        score = sum(r["score"] for r in cells) / len(cells) if cells else None
        fsd = f"{sum(f['fsd'] for f in fsds) / len(fsds):.3g}" if fsds else "–"
        taps = ", ".join(sorted({f["tap"] for f in fsds})) or "–"
        lines.append(f"| {row} | {len(cells)} | {'–' if score is None else f'{score:.3f}'} | {fsd} | {taps} |")
    return "\n".join(lines)


def comparison_sections(records: Sequence[dict[str, Any]]) -> list[str]:
    """The report's paired comparisons (Markdown lines), each where both of its rows have cells: every ENet row
    against ``no_kd``; ``full`` against plain KD (``hinton``, ``skd``); the ablations against ``full`` (what a
    relational term adds); the GKD rows against ``full``; ESPNet and ERFNet ``full`` against their ``no_kd``; and
    the mean per row."""
    from monai_relkd.reports.paired import paired_table

    present = {x["row"] for x in records}
    lines: list[str] = []
    methods = [r for r in ROWS if r != "no_kd" and ROWS[r][0] == "enet" and r in present]
    if "no_kd" in present and methods:
        lines += ["", "## Paired differences against no_kd", "", paired_table(records, methods)]
    for base in ("hinton", "skd"):  # the secondary question: do the relational terms add to plain KD?
        if {base, "full"} <= present:
            lines += ["", f"## full against {base}", "", paired_table(records, ["full"], baseline=base)]
    ablations = [r for r in ("full_minus_aa", "full_minus_km") if r in present]
    if ablations and "full" in present:  # what one relational term adds: full minus a term against full
        lines += ["", "## ablations against full", "", paired_table(records, ablations, baseline="full")]
    lines += ["", "## Mean per row", "", fsd_table(records)]
    gkd = [r for r in GKD_ROWS if r in present]
    if gkd and "full" in present:  # the two methods against each other
        lines += ["", "## generalizable distillation against the full relational loss", "",
                  paired_table(records, gkd, baseline="full")]
    for net in ("espnet", "erfnet"):
        if {f"{net}_no_kd", f"{net}_full"} <= present:
            lines += ["", f"## {net}: full against no_kd", "",
                      paired_table(records, [f"{net}_full"], baseline=f"{net}_no_kd")]
    return lines


def write_outputs(s: Settings, fold_seeds: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    """``results.json``, the curve PNGs of ``fold_seeds`` and ``report.md`` from every finished cell."""
    from monai_relkd.reports.plots import plot_training_curves

    records = collect(s.out)
    if s.merge:
        records = merge_records(load_records(s.merge), records)
    atomic_write_json(s.out / "results.json", records)
    for fold, seed in fold_seeds:
        curves = {}
        for cell in sorted((s.out / "cells" / f"{fold}_seed{seed}").glob("*/cell.json")):
            data = json.loads(cell.read_text())
            if data["curve"]:
                steps, dice = zip(*data["curve"])
                curves[data["record"]["row"]] = {"val_mean_dice": (list(steps), list(dice))}
        if curves:
            import numpy as np

            curves = {r: {t: (np.asarray(a), np.asarray(b)) for t, (a, b) in c.items()} for r, c in curves.items()}
            plot_training_curves(curves, s.out / "curves" / f"curves_{fold}_seed{seed}.png",
                                 title=f"{fold} held out, seed {seed}")
    lines = ["# Leave-one-site-out benchmark", "",
             "Score: mean held-out Dice over the last evaluations (see docs/results.md).", "",
             "| fold | seed | row | network | score | steps | best validation Dice | FSD (tap) | seconds |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        score = "–" if r["score"] is None else f"{r['score']:.3f}"
        best = "–" if r.get("best_val_dice") is None else f"{r['best_val_dice']:.3f}"
        fsd = "–" if not r.get("fsd") else f"{r['fsd']['fsd']:.3g} ({r['fsd']['tap']})"
        lines.append(f"| {r['fold']} | {r['seed']} | {r['row']} | {r['network']} | {score} | {r['steps']} | "
                     f"{best} | {fsd} | {r['seconds']:.0f} |")
    lines += comparison_sections(records)
    atomic_write_text(s.out / "report.md", "\n".join(lines) + "\n")
    return records


def run(s: Settings) -> list[dict[str, Any]]:
    """Run every missing cell of ``s``, then write the outputs; returns the records."""
    from monai_relkd.bundle_support import bundle_datalist
    from monai_relkd.engines import TeacherOutputCache

    bundles = find_bundles_dir(s.bundles)
    s.out.mkdir(parents=True, exist_ok=True)
    needs_teacher = any(r != "teacher" and distils(r) for r in s.rows)
    rows = (["teacher"] if "teacher" in s.rows or needs_teacher else []) + [r for r in ROWS if r in s.rows]
    seeds = s.seeds if s.teacher_seed is None else [s.teacher_seed] + [x for x in s.seeds if x != s.teacher_seed]
    plan = [(f, sd, r) for f in s.folds for sd in seeds for r in rows
            if r != "teacher" or sd in s.teacher_seeds()]
    plan = [c for c in plan if c[2] == "teacher" or c[1] in s.seeds]
    todo = [c for c in plan if s.cell_todo(*c)]
    teacher_steps = ", ".join(f"{f} {s.teacher_steps_for(f)}" for f in s.folds)
    print(f"generalization: folds {s.folds}, seeds {s.seeds}, rows {rows}; students {s.student_steps} / teacher "
          f"({teacher_steps}) steps of {s.batch_size} slices at {s.image_size}x{s.image_size}, validation every "
          f"{s.val_every}, score over the last {s.last_k}; {len(plan)} cells, {len(todo)} to run "
          f"(rough estimate for all {len(plan)}: {estimate_seconds(s) / 60:.0f} min in one process). Output: {s.out}",
          flush=True)
    progress = Progress(len(todo))
    data_dir = prepare_data(s)
    for fold in s.folds:
        for seed in seeds:
            fs_dir = s.out / "cells" / f"{fold}_seed{seed}"
            fs_dir.mkdir(parents=True, exist_ok=True)
            datalist_path = fs_dir / "datalist.json"
            atomic_write_json(datalist_path, bundle_datalist(data_dir, test_site=fold, seed=seed))
            common = {"dataset_dir": str(data_dir), "datalist_file": str(datalist_path), "test_site": fold,
                      "seed": seed, "image_size": s.image_size, "num_samples": s.num_samples,
                      "batch_size": s.batch_size, "num_workers": 0, "val_every_steps": s.val_every}
            t_seed = seed if s.teacher_seed is None else s.teacher_seed
            teacher_ckpt = str(s.out / "cells" / f"{fold}_seed{t_seed}" / "teacher" / "models" / "model.pt")
            for row in rows:
                if (fold, seed, row) not in plan:
                    continue
                cell_dir, settings = fs_dir / row, s.cell_settings(row, fold)
                if not s.cell_todo(fold, seed, row):
                    continue
                configs: tuple[str, ...] = ("train.json",)
                extra_record: dict[str, Any] = {}
                if row == "teacher":
                    bundle, network, dist = bundles / TEACHER, "deeplabv3plus", None
                    extra: dict[str, Any] = {"num_steps": s.teacher_steps_for(fold), **s.teacher_overrides(row),
                                             **s.teacher_training_overrides()}
                    tap = "aspp"
                else:
                    network = ROWS[row][0]
                    bundle = bundles / f"prostate_mri_student_{network}"
                    defaults = json.loads((bundle / "configs" / "train.json").read_text())["distillation"]
                    tap, configs = defaults["taps"][0]["student"], config_files(row)
                    extra = {"num_steps": s.student_steps, "teacher_ckpt": teacher_ckpt,
                             **row_overrides(row, defaults), **(s.teacher_overrides(row) if distils(row) else {})}
                    if row in GKD_ROWS:
                        msan_ckpt = Path(teacher_ckpt).parent / "msan_teacher.pt"
                        progress.line(f"{fold} seed {seed} | {row}: the teacher's MSAN")
                        msan_s = pretrain_msan(bundle, common, teacher_ckpt, msan_ckpt, s.teacher_overrides(row))
                        if msan_s:
                            progress.line(f"{fold}: teacher MSAN pre-trained in {msan_s / 60:.1f} min")
                            extra_record["msan_pretrain_seconds"] = round(msan_s, 1)
                        extra["gkd#teacher_msan_ckpt"] = str(msan_ckpt)
                    if distils(row) and s.cache:
                        fill_s = fill_fold_cache(bundle, {**common, "seed": t_seed}, teacher_ckpt, s.batch_size,
                                                 s.teacher_overrides(row))
                        if fill_s:
                            progress.line(f"{fold}: teacher outputs cached in {fill_s / 60:.1f} min")
                            extra_record["cache_fill_seconds"] = round(fill_s, 1)
                        cache_file = fold_cache_path(teacher_ckpt, [t["teacher"] for t in defaults["taps"]])
                        extra.update(teacher_input_key="teacher_image",
                                     teacher_cache=f"$monai_relkd.engines.TeacherOutputCache.shared("
                                                   f"{teacher_ckpt!r}, path={str(cache_file)!r})")
                    dist = {**defaults, **{k.split("#", 1)[1]: v for k, v in extra.items()
                                           if k.startswith("distillation#")}}
                progress.line(f"{fold} seed {seed} | {row} ({network}): training {settings['steps']} steps")
                t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                result = run_cell(s, bundle, common, cell_dir, {**extra, **s.extra}, configs=configs)
                record = _record(fold, seed, row, network, result, dist, time.perf_counter() - t)
                record.update(extra_record, environment=environment())
                record["fsd"] = cell_fsd(bundle, datalist_path, cell_dir / "models" / "model.pt", tap, s.image_size,
                                         s.teacher_overrides(row) if row == "teacher" else None)
                end = resource.getrusage(resource.RUSAGE_SELF)
                record["cpu_seconds"] = round(end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime, 1)
                atomic_write_json(cell_dir / "cell.json", {
                    "record": record, "curve": result["curve"], "held_out": result["held_out"],
                    "settings": settings, "overrides": {**extra, **s.extra}, "cache": result["cache"],
                    "timing": result["timing"], "load_average": os.getloadavg(),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": record["environment"]})
                progress.done += 1
                score = "–" if record["score"] is None else f"{record['score']:.3f}"
                progress.line(f"{fold} seed {seed} | {row}: held-out Dice {score} (last {s.last_k} evaluations), "
                              f"{record['seconds'] / 60:.1f} min; {result['cache'] or ''}")
                write_outputs(s, [(fold, seed)])
            if s.teacher_seed is None:
                TeacherOutputCache.release(teacher_ckpt)
        TeacherOutputCache.release()
    records = write_outputs(s, [(f, sd) for f in s.folds for sd in s.seeds])
    print(f"generalization: done in {(time.perf_counter() - progress.start) / 60:.1f} min; "
          f"{s.out / 'results.json'}, {s.out / 'report.md'}", flush=True)
    return records


@dataclass
class Job:
    """Cells of one fold run by one child process (``--workers``): ``rows`` for ``seeds``, after the jobs ``after``."""

    name: str
    fold: str
    seeds: list[int]
    rows: list[str]
    after: list[str] = field(default_factory=list)


def plan_jobs(s: Settings) -> list[Job]:
    """The cells still to run, split into jobs that can run side by side.

    With one teacher per fold (``teacher_seed``): a ``teacher`` job per fold, then one job per (fold, seed) for the
    student rows, which waits for its fold's teacher; with GKD rows a fold's later seeds also wait for its first,
    which pre-trains the teacher's MSAN once. With a teacher per (fold, seed): one job per (fold, seed). A job whose
    cells are all done is left out, and so is a dependency on it. Order (the order jobs start in): teachers, then the
    jobs that wait for no other student job, then the rest.
    """
    students = [r for r in ROWS if r in s.rows]
    wants_teacher = "teacher" in s.rows or any(distils(r) for r in students)
    jobs: list[Job] = []
    for fold in s.folds:
        if s.teacher_seed is None:
            rows = (["teacher"] if wants_teacher else []) + students
            jobs += [Job(f"{fold}_seed{sd}", fold, [sd], rows) for sd in s.seeds
                     if any(s.cell_todo(fold, sd, r) for r in rows)]
            continue
        teacher = f"{fold}_teacher"
        teacher_queued = wants_teacher and s.cell_todo(fold, s.teacher_seed, "teacher")
        if teacher_queued:
            jobs.append(Job(teacher, fold, [s.teacher_seed], ["teacher"]))
        first: str | None = None
        for sd in s.seeds:
            if not any(s.cell_todo(fold, sd, r) for r in students):
                continue
            after = [teacher] if teacher_queued and any(distils(r) for r in students) else []
            after += [first] if first and set(GKD_ROWS) & set(students) else []
            jobs.append(Job(f"{fold}_seed{sd}", fold, [sd], students, after))
            first = first or jobs[-1].name
    # teachers first (every student waits for one), then the jobs that wait for no other student job (with GKD rows,
    # each fold's first seed), so that no worker idles at the end while a fold's later seeds wait for its first
    # the longest teacher starts first, so that it does not run alone at the end of the teachers
    teachers = {j.name for j in jobs if j.rows == ["teacher"]}
    return sorted(jobs, key=lambda j: (j.rows != ["teacher"], -s.teacher_steps_for(j.fold) if j.name in teachers else 0,
                                       any(a not in teachers for a in j.after)))


def runs_side_by_side(jobs: Sequence[Job]) -> bool:
    """Whether two of ``jobs`` can run at the same time (they are not one chain, each waiting for the one before)."""
    depth: dict[str, int] = {}
    for job in jobs:  # a job's dependencies come before it
        depth[job.name] = 1 + max((depth.get(a, 0) for a in job.after), default=0)
    return len(jobs) > 1 and max(depth.values()) < len(jobs)


def child_command(args: dict[str, Any], job: Job) -> list[str]:
    """This script's command line for ``job``: the parent's options, the job's fold, seeds and rows, one worker."""
    skip = {"folds", "seeds", "rows", "workers", "check", "dry_run", "merge"}
    argv = [f"--{k}={v}" for k, v in args.items() if k not in skip and v is not None]
    return [sys.executable, str(Path(__file__).resolve()), *argv, f"--folds={job.fold}",
            f"--seeds={','.join(map(str, job.seeds))}", f"--rows={','.join(job.rows)}", "--workers=1"]


def run_jobs(jobs: Sequence[Job], command: Callable[[Job], list[str]], workers: int, threads: int,
             logs: Path) -> list[str]:
    """Run ``jobs`` as child processes, ``workers`` at a time and each after the jobs it waits for, with
    ``threads`` torch/OpenMP threads each; each child's output is appended to ``logs/<job>.log`` after a line that
    names the job, its rows and the time. A failed job's dependents
    are not started. Returns the names of the jobs that failed or were not started; on an interrupt the children are
    stopped (their finished cells are kept, so a re-run resumes)."""
    unknown = sorted({a for job in jobs for a in job.after} - {job.name for job in jobs})
    if unknown:  # such a job would wait forever
        raise ValueError(f"jobs wait for {unknown}, which are not among the jobs to run")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, done, failed = list(jobs), {}, set(), []
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[generalization jobs {len(done)}/{len(jobs)} | {(time.perf_counter() - start) / 60:.1f} min] "
              f"{message}", flush=True)

    try:
        while pending or running:
            for job in list(pending):
                if any(a in failed for a in job.after):
                    pending.remove(job)
                    failed.append(job.name)
                    say(f"{job.name}: not started, it needs {', '.join(a for a in job.after if a in failed)}")
                elif len(running) < workers and all(a in done for a in job.after):
                    pending.remove(job)
                    # appended: a later run into the same --out (e.g. extended rows) keeps the earlier run's log
                    log = open(logs / f"{job.name}.log", "a")  # noqa: SIM115 (closed when the child ends)
                    log.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {job.name}: "
                              f"{', '.join(job.rows)} ===\n")
                    log.flush()
                    proc = subprocess.Popen(command(job), stdout=log, stderr=subprocess.STDOUT, env=env)
                    running[job.name] = (proc, log, time.perf_counter())
                    say(f"{job.name}: {', '.join(job.rows)} started (log {log.name})")
            time.sleep(0.5)
            for name, (proc, log, t) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                minutes = (time.perf_counter() - t) / 60
                if proc.returncode == 0:
                    done.add(name)
                    say(f"{name}: done in {minutes:.1f} min")
                else:
                    failed.append(name)
                    tail = "".join(Path(log.name).read_text(errors="replace").splitlines(True)[-5:])
                    say(f"{name}: FAILED (exit {proc.returncode}) after {minutes:.1f} min; {log.name} ends:\n{tail}")
    finally:
        for proc, log, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    return failed


def run_in_children(s: Settings, jobs: Sequence[Job], args: dict[str, Any], workers: int,
                    threads: int) -> tuple[list[dict[str, Any]], list[str]]:
    """``jobs`` in child processes of this script (``args``: :func:`main`'s arguments), then the outputs of every
    finished cell; returns the records and the jobs that failed or were not started."""
    print(f"generalization: {len(jobs)} jobs, {workers} at a time with {threads} thread(s) each "
          f"(rough estimate in one process: {estimate_seconds(s) / 60:.0f} min); output {s.out}", flush=True)
    t = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    prepare_data(s)  # once, before the children read it
    failed = run_jobs(jobs, lambda job: child_command(args, job), workers, threads, s.out / "logs")
    records = write_outputs(s, [])  # every child has drawn the curves of its cells
    print(f"generalization: done in {(time.perf_counter() - t) / 60:.1f} min; {s.out / 'results.json'}, "
          f"{s.out / 'report.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return records, failed


def main(out: str = "relkd_generalization", quick: bool = False, folds: str | None = None,
         seeds: str | None = None, rows: str | None = None, scale: float | None = None, size: int | None = None,
         image_size: int | None = None, student_steps: int | None = None, teacher_steps: int | str | None = None,
         val_every: int | None = None, last_k: int | None = None, batch_size: int | None = None,
         num_samples: int | None = None, cache: bool = True, teacher_seed: int | str | None = None,
         data: str | None = None, data_seed: int = 0,
         bundles: str | None = None, force: bool = False, merge: str | None = None, check: str | None = None,
         teacher_output_stride: int | None = None, teacher_precision: str | None = None,
         workers: int | None = None, threads: int = 1, dry_run: bool = False) -> None:
    """Run the benchmark (see the module docstring); ``--dry_run`` prints the plan and the estimate only.

    Args:
        out: output folder (resumable).
        quick: CI-size preset (one fold, one seed, tiny images and schedules).
        folds, seeds, rows: comma-separated held-out sites, seeds and rows (defaults: HK,UCL,BMC; 0,1,2; the
            standard rows teacher,no_kd,hinton,skd,full).
        scale, size: synthetic set (fraction of the public case counts; in-plane matrix).
        image_size: in-plane size the networks see.
        student_steps, teacher_steps, val_every: schedule in optimizer steps. ``teacher_steps`` is one number for
            every fold, ``FOLD=N`` pairs, or both: the default ``900,UCL=1600`` gives UCL's teacher 1600 steps and
            the others 900 (each teacher's plateau by the rule of ``docs/results.md``). A fold's students distilled
            from a teacher of other steps are re-run.
        last_k: held-out evaluations averaged into the score (the last ``last_k`` validations).
        batch_size, num_samples: slices per step; slices drawn per volume.
        cache: students read the teacher through a TeacherOutputCache (the teacher sees the slice before intensity
            augmentation); False runs the teacher live on the student's own input.
        teacher_seed: one teacher per fold, trained with this seed (and its split), distils every seed's students
            (default 0); ``each`` trains one teacher per (fold, seed). A shared teacher has seen some training-site
            cases that other seeds hold out for validation; the held-out site, and so the score, is unaffected.
        data: a six-site data folder instead of the synthetic set; data_seed: seed of the synthetic set.
        bundles: folder holding the bundles. force: re-run the finished cells of ``rows`` (a finished teacher that
            is only needed by the students is kept).
        merge: an earlier ``results.json`` (e.g. ``docs/generalization/results.json``) whose records are kept in
            ``OUT/results.json`` and ``OUT/report.md`` where this run has no cell of the same (fold, seed, row), so
            cells run later or elsewhere join the committed table; the file itself is only read.
        teacher_output_stride: the teacher's DeepLabV3+ output stride, 8 or 16 (default: the teacher bundle's, 16);
            given to the teacher row and to every student that builds the teacher to read it. At 48×48 inputs,
            stride 16 leaves a 3×3 map to the ASPP.
        teacher_precision: the teacher row's training forward under ``torch.autocast`` in this dtype (default
            ``bfloat16``: 0.71–0.77× the float32 step on a CPU with AMX, ``benchmarks/step_time.py``; slower than
            float32 on a CPU without bfloat16 support), or ``float32``. Its validation, and the teacher outputs the
            students read, are float32.
        check: a ``results.json`` to compare this run's cells with (e.g. the committed one, after re-running one
            cell): per cell the two scores, their difference and any difference of environment are printed and
            written to ``OUT/check.txt``; the command exits with status 1 if a score differs by more than 0.01.
        workers: cells run side by side in this many child processes (default: the CPUs this process may use, at
            most 4), split by :func:`plan_jobs`; each child writes ``OUT/logs/<job>.log``. One worker, or a plan
            that is one chain (e.g. one fold's teacher and its students), runs in this process.
        threads: torch (and OpenMP) threads per process, recorded in each cell's ``environment``. A cell's score
            depends on it (the summation order changes the rounding, and 800 steps amplify it to a few hundredths
            of Dice), so it is fixed (default 1) rather than left to the machine's core count.
    """
    args = dict(locals())
    from monai_relkd.profiling import TorchThreads

    with TorchThreads(int(threads)):  # called in-process (tests, notebooks), torch is left as it was
        _run_main(args)


def _run_main(args: dict[str, Any]) -> None:
    """:func:`main` after its thread setting: settings, the plan, then the run in this process or in children."""
    a = dict(args)
    out, check, dry_run, threads, workers = a.pop("out"), a.pop("check"), a.pop("dry_run"), a.pop("threads"), \
        a.pop("workers")
    s = make_settings(out, **a)
    reference = load_records(check) if check else None  # a bad file fails before hours of training, not after
    if s.merge:
        load_records(s.merge)
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    workers = int(workers)
    jobs = plan_jobs(s) if workers > 1 else []
    if dry_run:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()}, indent=1))
        for job in jobs if runs_side_by_side(jobs) else []:
            print(f"job {job.name}: {', '.join(job.rows)}" + (f" after {', '.join(job.after)}" if job.after else ""))
        print(f"rough estimate: {estimate_seconds(s) / 60:.0f} min in one process, about half with two workers")
        return
    failed: list[str] = []
    if runs_side_by_side(jobs):
        records, failed = run_in_children(s, jobs, args, workers, int(threads))
    else:
        records = run(s)
    if reference is not None:
        ran = {(f, sd, r) for f in s.folds for sd in s.seeds for r in s.rows}
        lines, ok = check_lines(reference, [r for r in records if (r["fold"], r["seed"], r["row"]) in ran])
        text = f"check against {check}:\n" + "\n".join(lines) + "\n"
        atomic_write_text(s.out / "check.txt", text)
        print(text, end="", flush=True)
        if not ok:
            raise SystemExit(1)
    if failed:
        raise SystemExit(f"generalization: {len(failed)} job(s) failed or were not started: {', '.join(failed)} "
                         f"(logs in {s.out / 'logs'}); finished cells are kept, so the same command resumes")


if __name__ == "__main__":
    fire.Fire(main)
