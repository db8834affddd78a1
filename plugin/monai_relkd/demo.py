"""``relkd demo``: the whole method on the embedded synthetic set, through the real bundles.

Steps, each a MONAI bundle workflow (``monai.bundle.ConfigWorkflow``) run with overrides only:

1. generate the synthetic six-site set;
2. train the teacher bundle on five sites (the sixth is held out);
3. train the ENet student bundle with every lambda at 0 (no distillation: the baseline);
4. distil the same student bundle from that teacher;

Training follows the bundles' step schedule (optimizer steps of ``batch_size`` slices, polynomial LR decay,
validation every ``val_every`` steps), so teacher and students reach their plateau; the distilled student reads the
teacher through a :class:`monai_relkd.engines.TeacherOutputCache` (the teacher sees each slice before intensity
augmentation; ``cache=False`` runs it live on the student's input).
5. evaluate the three on the validation cases of the training sites and on the held-out site, and print the
   per-site Dice table (also written to ``<out>/demo_summary.json`` and ``<out>/demo_table.md``).

The run folder's ``run.json`` lists each model (name, role, bundle, checkpoint, summary, predictions, TensorBoard
logs) for ``relkd report``.

Nothing is written into the bundles: checkpoints, logs and predictions go under ``--out``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .data._io import atomic_write_json, atomic_write_text

__all__ = ["find_bundles_dir", "run_bundle", "run_demo", "demo_command", "TEACHER"]

logger = logging.getLogger("monai_relkd.demo")

TEACHER = "prostate_mri_teacher"


def find_bundles_dir(bundles: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the monai-relkd bundles.

    Looked up in order: ``bundles`` if given, ``./bundles``, then the ``bundles/`` folder of the source checkout
    this package was installed from (editable install).
    """
    candidates = [Path(bundles)] if bundles else [Path.cwd() / "bundles", Path(__file__).resolve().parents[2] / "bundles"]
    for candidate in candidates:
        if (candidate / TEACHER / "configs" / "train.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no monai-relkd bundles found in {', '.join(str(c) for c in candidates)}: run from the repository root "
        "or pass --bundles DIR (the folder holding prostate_mri_teacher/ and the student bundles)."
    )


def run_bundle(bundle_dir: Path, configs: list[str], run_id: str = "run", **override: Any) -> Any:
    """Run one workflow of a bundle, as ``python -m monai.bundle run RUN_ID --config_file ...`` would."""
    from monai.bundle import ConfigWorkflow

    config_files = [str(bundle_dir / "configs" / c) for c in configs]
    workflow = ConfigWorkflow(
        config_file=config_files,
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        logging_file=False,
        run_id=run_id,
        workflow_type=None,
        bundle_root=str(bundle_dir),
        **override,
    )
    workflow.initialize()
    try:
        return workflow.run()
    finally:
        workflow.finalize()


def _model_key(name: str) -> str:
    """Folder of a model inside the run folder."""
    return "teacher" if name == "teacher" else ("student_nokd" if "no KD" in name else "student_kd")


def _step(index: int, total: int, message: str) -> float:
    logger.info(f"[{index}/{total}] {message}")
    print(f"[relkd demo {index}/{total}] {message}", flush=True)
    return time.perf_counter()


def _prepare_data(run_dir: Path, test_site: str, scale: float, size: int, seed: int) -> tuple[Path, Path]:
    """Generate the synthetic six-site set in ``run_dir/data`` (unless there) and write ``run_dir/datalist.json``;
    returns both paths."""
    from monai_relkd.bundle_support import bundle_datalist
    from monai_relkd.data.synthetic import generate_six_site_dataset

    data_dir = run_dir / "data"
    if not (data_dir / "dataset.json").is_file():
        generate_six_site_dataset(data_dir, scale=scale, size=size, seed=seed)
    datalist = bundle_datalist(data_dir, test_site=test_site, seed=seed)
    datalist_path = run_dir / "datalist.json"
    atomic_write_json(datalist_path, datalist, default=str)
    return data_dir, datalist_path


def _demo_models(teacher_bundle: Path, student_bundle: Path, student: str, teacher_steps: int, student_steps: int,
                 teacher_ckpt: str, cache: bool) -> dict[str, tuple[Path, dict[str, Any]]]:
    """``{model name: (bundle folder, its overrides)}`` of the teacher, the student without and with distillation."""
    kd_extra: dict[str, Any] = {"num_steps": student_steps}
    if cache:
        kd_extra.update(teacher_input_key="teacher_image",
                        teacher_cache=f"$monai_relkd.engines.TeacherOutputCache.shared({teacher_ckpt!r})")
    return {
        "teacher": (teacher_bundle, {"num_steps": teacher_steps}),
        f"{student} (no KD)": (
            student_bundle,
            {"num_steps": student_steps, "distillation#lambda_logits": 0.0, "distillation#lambda_km": 0.0,
             "distillation#lambda_aa": 0.0},
        ),
        f"{student} + relational KD": (student_bundle, kd_extra),
    }


def _model_override(run_dir: Path, name: str, bundle_dir: Path, common: dict[str, Any], extra: dict[str, Any],
                    teacher_ckpt: str, **more: Any) -> dict[str, Any]:
    """The bundle overrides of model ``name``: the shared ones, its folders under ``run_dir``, its own, ``more``,
    and the teacher checkpoint for a student."""
    base = run_dir / _model_key(name)
    override = {**common, "ckpt_dir": str(base / "models"), "output_dir": str(base / "eval"),
                "log_dir": str(base / "runs"), **extra, **more}
    if bundle_dir.name != TEACHER:
        override["teacher_ckpt"] = teacher_ckpt
    return override


def _run_manifest(run_dir: Path, models: dict[str, tuple[Path, dict[str, Any]]], test_site: str, data_dir: Path,
                  datalist_path: Path, image_size: int, seed: int) -> dict[str, Any]:
    """The ``run.json`` that ``relkd report`` reads: held-out site, data, and each model's files."""
    return {
        "held_out_site": test_site,
        "dataset_dir": str(data_dir),
        "datalist": str(datalist_path),
        "image_size": image_size,
        "seed": seed,
        "models": [
            {
                "name": name,
                "role": "teacher" if bundle_dir.name == TEACHER else ("baseline" if "no KD" in name else "student"),
                "bundle": str(bundle_dir),
                "ckpt": str(run_dir / key / "models" / "model.pt"),
                "summary": str(run_dir / key / "eval" / "summary.json"),
                "prediction_dir": str(run_dir / key / "eval" / "predictions"),
                "log_dir": str(run_dir / key / "runs"),
            }
            for name, (bundle_dir, _) in models.items()
            for key in [_model_key(name)]
        ],
    }


def run_demo(
    out: str | os.PathLike = "relkd_demo",
    test_site: str = "HK",
    student: str = "enet",
    scale: float = 0.5,
    size: int = 96,
    image_size: int = 64,
    teacher_steps: int = 400,
    student_steps: int = 800,
    val_every: int = 100,
    num_samples: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    bundles: str | os.PathLike | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Run the demo and return ``{"table": markdown, "models": {name: summary}, "seconds": {...}}``.

    Args:
        out: run folder (created); the synthetic set, checkpoints, logs and predictions go there.
        test_site: the held-out site.
        student: student bundle suffix (``enet``, ``espnet`` or ``erfnet``).
        scale, size: synthetic set size (fraction of the public case counts) and in-plane matrix.
        image_size: in-plane size the networks see.
        teacher_steps, student_steps: optimizer steps (rounded up to whole validation intervals).
        val_every: optimizer steps between validations.
        num_samples: slices drawn per volume each time it is drawn.
        batch_size: slices per optimizer step (a multiple of ``num_samples``).
        seed: seed of the data split and the training.
        bundles: folder holding the bundles (see :func:`find_bundles_dir`).
        cache: distil through a teacher-output cache (see above).
    """
    from monai_relkd.engines import TeacherOutputCache
    from monai_relkd.evaluation import format_models_table

    bundles_dir = find_bundles_dir(bundles)
    student_bundle = bundles_dir / f"prostate_mri_student_{student}"
    if not (student_bundle / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"student bundle not found: {student_bundle}")
    run_dir = Path(out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    total = 5
    start = time.perf_counter()

    t = _step(1, total, f"synthetic six-site set (scale {scale}, {size}x{size}) in {run_dir / 'data'}")
    data_dir, datalist_path = _prepare_data(run_dir, test_site, scale, size, seed)
    seconds["data"] = time.perf_counter() - t
    common = {"dataset_dir": str(data_dir), "datalist_file": str(datalist_path), "test_site": test_site, "seed": seed,
              "image_size": image_size, "num_samples": num_samples, "batch_size": batch_size, "num_workers": 0,
              "val_every_steps": val_every}
    teacher_ckpt = str(run_dir / "teacher" / "models" / "model.pt")
    models = _demo_models(bundles_dir / TEACHER, student_bundle, student, teacher_steps, student_steps, teacher_ckpt,
                          cache)

    for step, (name, (bundle_dir, extra)) in enumerate(models.items(), start=2):
        key = _model_key(name)
        t = _step(min(step, total), total,
                  f"training {name} ({extra['num_steps']} optimizer steps) with {bundle_dir.name}")
        # each model trains afresh: the bundles keep a better model.pt (and resume a last state) across runs, which
        # would let a re-run into the same --out report an earlier run's model
        shutil.rmtree(run_dir / key / "models", ignore_errors=True)
        run_bundle(bundle_dir, ["train.json"],
                   **_model_override(run_dir, name, bundle_dir, common, extra, teacher_ckpt, resume=False))
        seconds[key] = time.perf_counter() - t
    TeacherOutputCache.release(teacher_ckpt)

    t = _step(total, total, "evaluating the three models on every site (validation cases + held-out site)")
    summaries: dict[str, Any] = {}
    for name, (bundle_dir, extra) in models.items():
        override = _model_override(run_dir, name, bundle_dir, common, extra, teacher_ckpt,
                                   evaluation_split=["validation", "test"])
        run_bundle(bundle_dir, ["train.json", "evaluate.json"], **override)
        with open(Path(override["output_dir"]) / "summary.json") as f:
            summaries[name] = json.load(f)
    seconds["evaluation"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    manifest = _run_manifest(run_dir, models, test_site, data_dir, datalist_path, image_size, seed)
    atomic_write_json(run_dir / "run.json", manifest, default=str)
    table = format_models_table(summaries, held_out=test_site)
    result = {"table": table, "models": summaries, "seconds": seconds, "held_out_site": test_site}
    atomic_write_json(run_dir / "demo_summary.json", result, default=str)
    atomic_write_text(run_dir / "demo_table.md", table + "\n")
    print(table, flush=True)
    print(f"relkd demo: done in {seconds['total'] / 60:.1f} min; results in {run_dir}", flush=True)
    return result


# ``relkd demo``: run_demo with INFO logging; it prints the table and returns nothing for fire to print. Its options
# and help are run_demo's (functools.wraps copies the docstring and fire follows ``__wrapped__`` to the signature).
@functools.wraps(run_demo)
def demo_command(*args: Any, **kwargs: Any) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_demo(*args, **kwargs)
