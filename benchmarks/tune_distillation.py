"""Choose the λs and temperature of a student bundle on the validation split only.

For one held-out site and seed, with the same data, datalist, schedule and teacher as
``benchmarks/generalization.py`` (the teacher cell is trained there, or reused when it exists), the student is
trained once per grid point; its score is the **validation** Dice of the training sites' validation cases, averaged
over the last ``last_k`` validations (as the benchmark's score, but on validation cases). The held-out site is never
predicted, so nothing about it can leak into the choice.

A grid point is ``λ_logits,λ_km,λ_aa,T``. Output under ``OUT/tuning/<student>_<SITE>_seed<S>/``: one folder per
point (models/, runs/, point.json), ``tuning.json`` and ``tuning.md`` (the table, best first). A point whose
``point.json`` exists with the same settings is not trained again, so points can be added later::

    flock /tmp/relkd-cpu.lock nice python benchmarks/tune_distillation.py --out /work/runs/loso
    python benchmarks/tune_distillation.py --grid "0.1,1,0.1,4 1,1,1,4" --site HK --out /work/runs/loso
    python benchmarks/tune_distillation.py --quick --out /tmp/tune_smoke

Every schedule flag (``--student_steps``, ``--val_every``, ``--image_size``, ...) is ``generalization.py``'s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generalization as gen  # noqa: E402  (the sibling benchmark script)

DEFAULT_GRID = (
    "0,0,0,4",  # no distillation (reference)
    "1,0,0,4",  # logits only (Hinton)
    "0.1,0,0,4",
    "0.1,0.1,0.1,4",
    "0.1,1,0.1,4",
    "0.1,0.1,1,4",
    "1,1,1,4",
    "1,1,1,1",
)
KEYS = ("lambda_logits", "lambda_km", "lambda_aa", "temperature")


def parse_point(text: str) -> dict[str, float]:
    values = [float(v) for v in str(text).split(",")]
    if len(values) != 4 or min(values) < 0 or values[3] <= 0:
        raise ValueError(f"grid point {text!r}: expected λ_logits,λ_km,λ_aa,T (λ ≥ 0, T > 0)")
    return dict(zip(KEYS, values))


def point_tag(point: dict[str, float]) -> str:
    """``"logits1_km0.01_aa1_T4"`` for a grid point."""
    return "_".join(f"{short}{point[k]:g}" for short, k in zip(("logits", "km", "aa", "T"), KEYS))


def main(out: str = "relkd_generalization", grid: str = " ".join(DEFAULT_GRID), student: str = "enet",
         site: str = "HK", seed: int = 0, quick: bool = False, **flags: Any) -> None:
    """Train every grid point on (``site``, ``seed``) and rank them by validation Dice (``tuning.md``)."""
    points = [parse_point(p) for p in str(grid).split()]
    s = gen.make_settings(out, quick=quick, folds=site, seeds=str(seed), rows="teacher", **flags)
    gen.run(s)  # the fold's teacher (trained once, shared with the benchmark)
    bundle = gen.find_bundles_dir(s.bundles) / f"prostate_mri_student_{student}"
    defaults = json.loads((bundle / "configs" / "train.json").read_text())["distillation"]
    fs_dir = s.out / "cells" / f"{site}_seed{seed}"
    teacher_ckpt = str(fs_dir / "teacher" / "models" / "model.pt")
    common = {"dataset_dir": str(s.out / "data" if s.data is None else Path(s.data).resolve()),
              "datalist_file": str(fs_dir / "datalist.json"), "test_site": site, "seed": seed,
              "image_size": s.image_size, "num_samples": s.num_samples, "batch_size": s.batch_size,
              "num_workers": 0, "val_every_steps": s.val_every}
    tune_dir = s.out / "tuning" / f"{student}_{site}_seed{seed}"
    settings = {**s.cell_settings(student, site), "student": student}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, point in enumerate(points):
        tag = point_tag(point)
        point_dir = tune_dir / tag
        done = point_dir / "point.json"
        if done.is_file() and not s.force and json.loads(done.read_text()).get("settings") == settings:
            rows.append(json.loads(done.read_text())["row"])
            continue
        extra: dict[str, Any] = {"num_steps": s.student_steps, "teacher_ckpt": teacher_ckpt,
                                 **{f"distillation#{k}": v for k, v in point.items()}}
        if (point["lambda_logits"] or point["lambda_km"] or point["lambda_aa"]) and s.cache:
            extra.update(teacher_input_key="teacher_image",
                         teacher_cache=f"$monai_relkd.engines.TeacherOutputCache.shared({teacher_ckpt!r})")
        print(f"[tune {i + 1}/{len(points)} | {(time.perf_counter() - start) / 60:.1f} min] {student} {tag}",
              flush=True)
        t = time.perf_counter()
        result = gen.run_cell(s, bundle, common, point_dir, extra, held_out=False)
        last = [d for _, d in result["curve"][-s.last_k:]]
        row = {**point, "tag": tag, "val_score": sum(last) / len(last), "best_val_dice": max(last),
               "curve": result["curve"], "seconds": round(time.perf_counter() - t, 1)}
        gen.atomic_write_json(done, {"row": row, "settings": settings, "overrides": extra})
        rows.append(row)
        print(f"    {tag}: validation Dice over the last {s.last_k} evaluations {row['val_score']:.3f}", flush=True)
    from monai_relkd.engines import TeacherOutputCache

    TeacherOutputCache.release(teacher_ckpt)

    rows.sort(key=lambda r: -r["val_score"])
    lines = ["| λ_logits | λ_km | λ_aa | T | validation Dice (mean of the last evaluations) |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['lambda_logits']:g} | {r['lambda_km']:g} | {r['lambda_aa']:g} | {r['temperature']:g} | "
              f"{r['val_score']:.3f} |" for r in rows]
    table = "\n".join(lines)
    gen.atomic_write_json(tune_dir / "tuning.json", {
        "student": student, "held_out_site_not_used": site, "seed": seed, "settings": settings,
        "bundle_defaults": {k: defaults[k] for k in KEYS}, "rows": rows, "best": rows[0] if rows else None})
    gen.atomic_write_text(tune_dir / "tuning.md", table + "\n")
    print(table, flush=True)


if __name__ == "__main__":
    fire.Fire(main)
