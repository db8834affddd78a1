"""The loss budget of a student bundle at its first steps, and a short comparison of KM connector variants.

1. Trains the teacher bundle as ``relkd demo`` does (synthetic set, HK held out), once: a finished teacher in
   ``OUT/teacher`` is reused.
2. For each distillation variant, runs the ENet student bundle for ``epochs`` epochs and records, per iteration,
   each raw term and its share ``λ·L / L`` of the total, and the validation Dice (training sites' validation
   cases only) at every validation.
3. Prints a Markdown table: the shares at step 1 (no term may dominate ``L_seg``), the mean shares over the run,
   and the best and last validation Dice.

    python benchmarks/loss_budget.py --out /tmp/loss_budget --epochs 30 --seeds 0,1

Variants: the bundle defaults; ``lambda_km = 1`` with the plain connector; ``lambda_km = 1`` with a BatchNorm after
the connector (ICKD); ``lambda_km = 1`` with ICKD's row-normalised Gram.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fire

from monai_relkd.bundle_support import bundle_datalist
from monai_relkd.data import generate_six_site_dataset
from monai_relkd.data._io import atomic_write_json
from monai_relkd.demo import TEACHER, find_bundles_dir

VARIANTS: dict[str, dict[str, Any]] = {
    "bundle defaults": {},
    "λ_km=1, plain connector": {"distillation#lambda_km": 1.0},
    "λ_km=1, connector + BatchNorm": {"distillation#lambda_km": 1.0, "distillation#km_connector_norm": "batch"},
    "λ_km=1, ICKD rows": {"distillation#lambda_km": 1.0, "distillation#km_normalize": "row"},
}
TERMS = ("seg", "logits", "km", "aa")


def _workflow(bundle_dir: Path, override: dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle_dir / "configs" / "train.json"),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        logging_file=False, workflow_type=None, bundle_root=str(bundle_dir), **override,
    )
    workflow.initialize()
    return workflow


def _train_teacher(bundles: Path, common: dict[str, Any], out: Path, epochs: int) -> str:
    ckpt = out / "teacher" / "models" / "model.pt"
    if ckpt.is_file():
        return str(ckpt)
    override = {**common, "max_epochs": epochs, "val_interval": max(1, epochs // 4),
                "ckpt_dir": str(ckpt.parent), "log_dir": str(out / "teacher" / "runs")}
    workflow = _workflow(bundles / TEACHER, override)
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return str(ckpt)


def _run_student(bundles: Path, override: dict[str, Any]) -> dict[str, Any]:
    from ignite.engine import Events

    workflow = _workflow(bundles / "prostate_mri_student_enet", override)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    steps: list[dict[str, float]] = []
    dice: list[float] = []

    def record(engine) -> None:
        out = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        steps.append({k: float(v) for k, v in out.items() if k.startswith(("loss_", "share_"))})

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: dice.append(float(e.state.metrics["val_mean_dice"])))
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return {"steps": steps, "val_dice": dice}


def main(out: str = "/tmp/loss_budget", epochs: int = 30, teacher_epochs: int = 40, seeds: Any = "0",
         variants: str | None = None) -> None:
    """Train the teacher once, then each variant for ``epochs`` epochs per seed; print the budget table."""
    out_dir = Path(out)
    bundles = find_bundles_dir()
    data_dir = out_dir / "data"
    if not (data_dir / "dataset.json").is_file():
        generate_six_site_dataset(data_dir, scale=0.5, size=96, seed=0)
    datalist_path = out_dir / "datalist.json"
    atomic_write_json(datalist_path, bundle_datalist(data_dir, test_site="HK", seed=0))
    common = {"dataset_dir": str(data_dir), "datalist_file": str(datalist_path), "test_site": "HK", "seed": 0,
              "image_size": 64, "num_samples": 4, "batch_size": 16, "num_workers": 0}
    t0 = time.perf_counter()
    teacher = _train_teacher(bundles, common, out_dir, teacher_epochs)
    print(f"teacher: {teacher} ({time.perf_counter() - t0:.0f} s)", flush=True)
    chosen = list(VARIANTS) if variants is None else [v.strip() for v in str(variants).split(";")]
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in chosen:
        for seed in _ints(seeds):
            key = f"{name} | seed {seed}"
            if key in results:
                continue
            run = out_dir / "students" / f"{list(VARIANTS).index(name)}_{seed}"
            override = {**common, **VARIANTS[name], "seed": seed, "teacher_ckpt": teacher, "max_epochs": epochs,
                        "val_interval": max(1, epochs // 6), "ckpt_dir": str(run / "models"),
                        "log_dir": str(run / "runs"), "log_every": 1000}
            t = time.perf_counter()
            results[key] = {**_run_student(bundles, override), "seconds": time.perf_counter() - t}
            atomic_write_json(results_path, results)
            print(f"{key}: {results[key]['seconds']:.0f} s, val Dice {results[key]['val_dice']}", flush=True)
    print(budget_table(results))


def _ints(value: Any) -> list[int]:
    """``0``, ``"0,1"`` or fire's ``(0, 1)`` -> ``[0, 1]``."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).split(",")]


def budget_table(results: dict[str, Any]) -> str:
    """Markdown: per variant and seed, the share of each term at step 1 and over the run, and validation Dice."""
    lines = ["| variant | seed | steps | share at step 1 (seg / logits / km / aa) | mean share over the run | "
             "val Dice best / last |", "|---|---:|---:|---|---|---|"]
    for key, res in results.items():
        name, seed = key.split(" | seed ")
        first = res["steps"][0]
        mean = {t: statistics.mean(s.get(f"share_{t}", 0.0) for s in res["steps"]) for t in TERMS}
        dice = res["val_dice"] or [float("nan")]
        lines.append(
            f"| {name} | {seed} | {len(res['steps'])} | "
            + " / ".join(f"{first.get(f'share_{t}', 0.0):.2f}" for t in TERMS) + " | "
            + " / ".join(f"{mean[t]:.2f}" for t in TERMS) + f" | {max(dice):.3f} / {dice[-1]:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(fire.Fire(main))
