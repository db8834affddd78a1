"""Generalization benchmark: leave-one-site-out Dice of the teacher, the plain student and four distillation methods.

For every held-out site and seed, on the synthetic six-site set (or ``--data``), through the real bundles:

1. the teacher bundle (DeepLabV3+) is trained on the other five sites;
2. each student bundle (``--students``, ENet by default in ``--quick``) is trained once per method
   (``--methods``), all with the same teacher, by overriding the ``distillation`` section only:

   ============  =========================================================  ===============================
   method        overrides                                                   what it is
   ============  =========================================================  ===============================
   ``nokd``      ``lambda_logits = lambda_km = lambda_aa = 0``               the student alone (baseline)
   ``hinton``    ``lambda_km = lambda_aa = 0``                               pixel-wise logits KD (Hinton)
   ``skd``       ``lambda_logits = lambda_km = 0``, ``pair_weights=uniform``, pair-wise affinity of structured
                 ``aa_grid = --skd_grid``                                    KD (Liu et al., CVPR 2019)
   ``ours``      the bundle's defaults (logits + kernel matrix + adaptive     relational KD
                 affinity)
   ============  =========================================================  ===============================

   The λ of a kept term is the bundle's default (``configs/train.json``), so every method weighs a term alike.
3. every model is evaluated with the bundle's ``evaluate.json`` on the validation cases of the training sites
   and on the held-out site (``evaluation_split = ["validation", "test"]``);
4. a ``run.json`` per (site, seed) in the format of ``relkd demo`` is written, then ``report/report.md`` with
   its plots (:func:`monai_relkd.reports.write_report`) over all runs.

Layout of ``--out``::

    data/                       the synthetic set (shared by all runs)
    runs/<SITE>_seed<S>/        datalist.json, run.json, teacher/, <student>_<method>/ (models/, eval/, runs/)
    report/                     report.md, report.json, PNG plots
    benchmark.json              the settings and the wall-clock time of every step

A model whose checkpoint and summary exist from an earlier call with the same overrides is not trained again
(``--force`` retrains), so an interrupted benchmark resumes where it stopped.

Settings: ``--quick`` (2 held-out sites, 1 seed, ENet, image size 64, 25 epochs; about 30 min on 2 CPU cores)
or the default full setting (6 sites x 3 seeds x 3 students, image size 128, 100 epochs: for a GPU). Explicit
flags override the preset. Run it on a shared machine under the CPU lock::

    flock /tmp/relkd-cpu.lock python benchmarks/generalization.py --quick --out relkd_generalization
    # smoke test
    python benchmarks/generalization.py --sites HK --seeds 0 --teacher_epochs 1 --student_epochs 1 \\
        --scale 0.1 --size 32 --image_size 32 --out /tmp/relkd_gen_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monai_relkd.demo import TEACHER, find_bundles_dir, run_bundle, write_json_atomic

SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
METHODS = {  # key: (name suffix, role)
    "nokd": ("(no KD)", "baseline"),
    "hinton": ("+ Hinton KD", "student"),
    "skd": ("+ structured KD", "student"),
    "ours": ("+ relational KD", "student"),
}
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"sites": ",".join(SITES), "seeds": "0,1,2", "students": "enet,espnet,erfnet", "teacher_epochs": 100,
             "student_epochs": 100, "scale": 1.0, "size": 128, "image_size": 128},
    "quick": {"sites": "HK,UCL", "seeds": "0", "students": "enet", "teacher_epochs": 25, "student_epochs": 25,
              "scale": 0.5, "size": 96, "image_size": 64},
}
# CPU seconds per epoch at image size 64, data scale 0.5, batch 16, 4 slices per volume, 2 cores (measured)
_EPOCH_S = {"teacher": 7.0, "nokd": 1.5, "kd": 5.0}
_EVAL_S = 15.0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU preset (about 30 min on 2 cores); default: full (GPU)")
    ap.add_argument("--out", default="relkd_generalization", help="output folder")
    ap.add_argument("--sites", help="held-out sites, comma-separated (full: all six; quick: HK,UCL)")
    ap.add_argument("--seeds", help="seeds of split and training, comma-separated (full: 0,1,2; quick: 0)")
    ap.add_argument("--students", help="student bundles: enet,espnet,erfnet (quick: enet)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--teacher_epochs", type=int, help="teacher epochs (full 100, quick 25)")
    ap.add_argument("--student_epochs", type=int, help="student epochs (full 100, quick 25)")
    ap.add_argument("--scale", type=float, help="synthetic case-count scale (full 1.0, quick 0.5)")
    ap.add_argument("--size", type=int, help="synthetic in-plane matrix (full 128, quick 96)")
    ap.add_argument("--image_size", type=int, help="in-plane size the networks see (full 128, quick 64)")
    ap.add_argument("--num_samples", type=int, default=4, help="slices drawn per volume and epoch")
    ap.add_argument("--batch_size", type=int, default=16, help="slices per batch")
    ap.add_argument("--data", default=None, help="six-site data folder; default: the synthetic set in OUT/data")
    ap.add_argument("--data_seed", type=int, default=0, help="seed of the synthetic set")
    ap.add_argument("--skd_grid", default="2",
                    help="aa_grid of the structured-KD baseline: an int (grid of N x N nodes) or 'none' (the "
                         "smaller feature map's own size); default 2, the 2x2 grid of docs/method.md")
    ap.add_argument("--fsd", action="store_true", help="also compute the FSD at each network's first tap")
    ap.add_argument("--latency", action="store_true", help="CPU latency in the report's efficiency table")
    ap.add_argument("--no_report", action="store_true", help="do not write the report at the end")
    ap.add_argument("--force", action="store_true", help="retrain models whose results exist")
    ap.add_argument("--dry_run", action="store_true", help="print the plan and the time estimate only")
    ap.add_argument("--bundles", default=None, help="folder holding the bundles (default: ./bundles)")
    args = ap.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sites, args.students, args.methods = _csv(args.sites), _csv(args.students), _csv(args.methods)
    args.seeds = [int(s) for s in _csv(args.seeds)]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    bad = [s for s in args.sites if s not in SITES] if args.data is None else []
    if bad:
        ap.error(f"unknown site(s) {bad}; the synthetic set has {list(SITES)}")
    if not args.sites or not args.seeds or not args.students or not args.methods:
        ap.error("sites, seeds, students and methods must not be empty")
    if min(args.teacher_epochs, args.student_epochs, args.image_size, args.size) < 1 or args.scale <= 0:
        ap.error("epochs, sizes and scale must be positive")
    args.skd_grid = None if str(args.skd_grid).lower() in ("none", "null", "") else int(args.skd_grid)
    return args


def estimate_seconds(args: argparse.Namespace) -> float:
    """Rough CPU estimate from per-epoch timings at image size 64 and scale 0.5 (scaled by pixels and cases)."""
    f = (args.image_size / 64) ** 2 * (args.scale / 0.5) * (args.num_samples / 4)
    per_student = sum(
        args.student_epochs * f * (_EPOCH_S["nokd"] if m == "nokd" else _EPOCH_S["kd"]) + _EVAL_S for m in args.methods
    )
    per_run = args.teacher_epochs * f * _EPOCH_S["teacher"] + _EVAL_S + len(args.students) * per_student
    return len(args.sites) * len(args.seeds) * per_run


def _bundle_defaults(bundle: Path) -> dict[str, Any]:
    with open(bundle / "configs" / "train.json") as f:
        return json.load(f)["distillation"]


def method_overrides(method: str, defaults: dict[str, Any], skd_grid: int | None) -> dict[str, Any]:
    """The ``distillation#...`` overrides of one method (see the module docstring)."""
    lam = {k: float(defaults[k]) for k in ("lambda_logits", "lambda_km", "lambda_aa")}
    if method == "nokd":
        lam = dict.fromkeys(lam, 0.0)
    elif method == "hinton":
        lam.update(lambda_km=0.0, lambda_aa=0.0)
    elif method == "skd":
        lam.update(lambda_logits=0.0, lambda_km=0.0)
    out: dict[str, Any] = {f"distillation#{k}": v for k, v in lam.items()}
    if method == "skd":
        out["distillation#pair_weights"] = "uniform"
        out["distillation#aa_grid"] = skd_grid
    return out


class Progress:
    """Numbered progress lines with elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.start = total, 0, time.perf_counter()

    def step(self, message: str) -> float:
        self.index += 1
        elapsed = (time.perf_counter() - self.start) / 60
        print(f"[generalization {self.index}/{self.total} | {elapsed:.1f} min] {message}", flush=True)
        return time.perf_counter()


def _train_and_evaluate(bundle: Path, common: dict[str, Any], model_dir: Path, extra: dict[str, Any],
                        force: bool, progress: Progress, label: str,
                        splits: tuple[str, ...] = ("validation", "test")) -> dict[str, float]:
    """Train and evaluate one model (on the datalist's ``splits``) unless its results exist with the same overrides.

    With no ``splits`` the model is trained only (the tuning script's teacher, evaluated later by the benchmark).
    """
    override = {**common, **extra, "ckpt_dir": str(model_dir / "models"), "output_dir": str(model_dir / "eval"),
                "log_dir": str(model_dir / "runs")}
    record = model_dir / "overrides.json"
    ckpt, summary = model_dir / "models" / "model.pt", model_dir / "eval" / "summary.json"
    same = record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(override, default=str))
    seconds: dict[str, float] = {}
    if same and ckpt.is_file() and not force:
        progress.step(f"{label}: checkpoint exists, not retrained")
    else:
        t = progress.step(f"{label}: training {extra['max_epochs']} epochs with {bundle.name}")
        model_dir.mkdir(parents=True, exist_ok=True)
        if record.exists():
            record.unlink()
        if summary.exists():
            summary.unlink()
        run_bundle(bundle, ["train.json"], **override)
        if not ckpt.is_file():
            raise RuntimeError(f"{label}: training wrote no checkpoint {ckpt} (no validation run? check val_interval)")
        write_json_atomic(record, override)
        seconds["train"] = time.perf_counter() - t
    if not splits:
        return seconds
    if summary.is_file() and "train" not in seconds and not force:
        progress.step(f"{label}: summary exists, not re-evaluated")
    else:
        t = progress.step(f"{label}: evaluating on the {' and '.join(splits)} cases")
        run_bundle(bundle, ["train.json", "evaluate.json"], **override, evaluation_split=list(splits))
        seconds["evaluate"] = time.perf_counter() - t
    return seconds


def prepare_data(args: argparse.Namespace, out: Path) -> Path:
    """The six-site folder: ``--data``, or the synthetic set in ``OUT/data`` (generated once)."""
    if args.data is not None:
        return Path(args.data).resolve()
    from monai_relkd.data.synthetic import generate_six_site_dataset

    data_dir = out / "data"
    if not (data_dir / "dataset.json").is_file():
        generate_six_site_dataset(data_dir, scale=args.scale, size=args.size, seed=args.data_seed)
    return data_dir


def prepare_run(args: argparse.Namespace, out: Path, data_dir: Path, site: str,
                seed: int) -> tuple[Path, Path, dict[str, Any]]:
    """``(run_dir, datalist_path, common bundle overrides)`` of one (held-out site, seed) run."""
    from monai_relkd.bundle_support import bundle_datalist

    run_dir = out / "runs" / f"{site}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    datalist_path = run_dir / "datalist.json"
    write_json_atomic(datalist_path, bundle_datalist(data_dir, test_site=site, seed=seed))
    common = {"dataset_dir": str(data_dir), "datalist_file": str(datalist_path), "test_site": site,
              "seed": seed, "image_size": args.image_size, "num_samples": args.num_samples,
              "batch_size": args.batch_size, "num_workers": 0}
    return run_dir, datalist_path, common


def teacher_extra(args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's own overrides (epochs and validation interval)."""
    return {"max_epochs": args.teacher_epochs, "val_interval": max(1, args.teacher_epochs // 4)}


def student_extra(args: argparse.Namespace, teacher_ckpt: str) -> dict[str, Any]:
    """A student's own overrides (epochs, validation interval, teacher checkpoint), before its method's λs."""
    return {"max_epochs": args.student_epochs, "val_interval": max(1, args.student_epochs // 4),
            "teacher_ckpt": teacher_ckpt}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    bundles = find_bundles_dir(args.bundles)
    teacher_bundle = bundles / TEACHER
    student_bundles = {s: bundles / f"prostate_mri_student_{s}" for s in args.students}
    for s, b in student_bundles.items():
        if not (b / "configs" / "train.json").is_file():
            raise FileNotFoundError(f"student bundle {s!r} not found: {b}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_models = 1 + len(args.students) * len(args.methods)
    total = 1 + len(args.sites) * len(args.seeds) * (2 * n_models) + (0 if args.no_report else 1)
    est = estimate_seconds(args)
    print(f"generalization benchmark: held-out {args.sites}, seeds {args.seeds}, students {args.students}, "
          f"methods {args.methods}; teacher {args.teacher_epochs} / students {args.student_epochs} epochs, "
          f"image size {args.image_size}, data scale {args.scale} size {args.size}; {n_models} models per run.\n"
          f"Rough CPU estimate (2 cores): {est / 60:.0f} min (GPU: much less). Output: {out}", flush=True)
    if args.dry_run:
        return {"estimate_s": est}
    progress = Progress(total)
    record: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items()},
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": {},
        "runs": [],
    }
    try:
        import torch

        record["machine"].update(torch=torch.__version__, cuda=torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        pass

    t = progress.step("data")
    data_dir = prepare_data(args, out)
    record["seconds"]["data"] = time.perf_counter() - t

    run_dirs: list[Path] = []
    for site in args.sites:
        for seed in args.seeds:
            run_dir, datalist_path, common = prepare_run(args, out, data_dir, site, seed)
            teacher_ckpt = str(run_dir / "teacher" / "models" / "model.pt")
            plan: list[tuple[str, str, Path, Path, dict[str, Any], str | None]] = [(
                "teacher", "teacher", teacher_bundle, run_dir / "teacher", teacher_extra(args), "aspp")]
            for student, bundle in student_bundles.items():
                defaults = _bundle_defaults(bundle)
                for method in args.methods:
                    suffix, role = METHODS[method]
                    extra = {**student_extra(args, teacher_ckpt), **method_overrides(method, defaults, args.skd_grid)}
                    tap = defaults["taps"][0]["student"] if defaults.get("taps") else None
                    plan.append((f"{student} {suffix}", role, bundle, run_dir / f"{student}_{method}", extra, tap))
            models = []
            for name, role, bundle, model_dir, extra, tap in plan:
                label = f"{site} seed {seed} | {name}"
                seconds = _train_and_evaluate(bundle, common, model_dir, extra, args.force, progress, label)
                record["seconds"][f"{site}_seed{seed}/{model_dir.name}"] = seconds
                entry = {
                    "name": name, "role": role, "bundle": str(bundle), "ckpt": str(model_dir / "models" / "model.pt"),
                    "summary": str(model_dir / "eval" / "summary.json"),
                    "prediction_dir": str(model_dir / "eval" / "predictions"), "log_dir": str(model_dir / "runs"),
                }
                if args.fsd and tap:
                    from monai_relkd.evaluation import fsd_for_bundle

                    entry["fsd"] = fsd_for_bundle(bundle, datalist_path, tap, ckpt=entry["ckpt"],
                                                  image_size=args.image_size, max_slices=256)
                    print(f"    FSD at {tap}: {entry['fsd']['fsd']:.4f}", flush=True)
                models.append(entry)
                with open(entry["summary"]) as f:
                    dice = json.load(f)["per_site"].get(site, {}).get("dice", {}).get("mean")
                print(f"    {name}: Dice on held-out {site} = {dice:.3f}" if dice is not None else
                      f"    {name}: no Dice on {site}", flush=True)
            write_json_atomic(run_dir / "run.json", {
                "held_out_site": site, "dataset_dir": str(data_dir), "datalist": str(datalist_path),
                "image_size": args.image_size, "seed": seed, "models": models})
            run_dirs.append(run_dir)
            record["runs"].append(str(run_dir))
            write_json_atomic(out / "benchmark.json", record)

    if not args.no_report:
        from monai_relkd.reports import write_report

        t = progress.step("report")
        report = write_report(run_dirs, out / "report", latency=args.latency, image_size=args.image_size)
        record["report"] = str(report)
        record["seconds"]["report"] = time.perf_counter() - t
        print(f"report: {report}", flush=True)
    record["seconds"]["total"] = time.perf_counter() - progress.start
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(out / "benchmark.json", record)
    print(f"generalization benchmark: done in {record['seconds']['total'] / 60:.1f} min; results in {out}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    run_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
