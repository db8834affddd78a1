"""Choose the default λs and temperature of a student bundle on the validation split only.

For one held-out site and seed (the same data, datalist and teacher as ``benchmarks/generalization.py`` with the
same settings, so the benchmark reuses the teacher trained here), the student bundle is trained once per grid
point and evaluated **only on the validation cases of the training sites** (``evaluation_split =
["validation"]``): the held-out site is never predicted, so nothing about it can leak into the choice. The
checkpoint kept by the bundle is itself chosen on those validation cases (``CheckpointSaver`` on
``val_mean_dice``), as in every other run.

A grid point is ``λ_logits,λ_km,λ_aa,T``. Output under ``OUT/tuning/<student>_<SITE>_seed<S>/``: one folder per
point (models/, eval/summary.json, runs/), ``tuning.json`` and ``tuning.md`` (the table, best first). A point
whose checkpoint and summary exist with the same overrides is not trained again, so points can be added later.

    flock /tmp/relkd-cpu.lock python benchmarks/tune_distillation.py --quick --out relkd_generalization
    python benchmarks/tune_distillation.py --quick --grid "1,0.01,1,4 0.1,0.01,1,4" --out relkd_generalization

Every other flag (``--quick``, ``--image_size``, ``--student_epochs``, ...) is ``generalization.py``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generalization as gen  # noqa: E402  (the sibling benchmark script)

DEFAULT_GRID = (
    "0,0,0,4",  # no distillation (reference)
    "1,0,0,4",  # logits only (Hinton)
    "1,0.01,1,4",  # the provisional defaults
    "0.1,0.01,1,4",
    "1,0.01,0.1,4",
    "0.1,0.001,0.1,4",  # every term ten times lighter
    "1,0.01,1,1",
)
KEYS = ("lambda_logits", "lambda_km", "lambda_aa", "temperature")


def parse_point(text: str) -> dict[str, float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4 or min(values) < 0 or values[3] <= 0:
        raise argparse.ArgumentTypeError(f"grid point {text!r}: expected λ_logits,λ_km,λ_aa,T (λ ≥ 0, T > 0)")
    return dict(zip(KEYS, values))


def point_tag(point: dict[str, float]) -> str:
    """``"logits1_km0.01_aa1_T4"`` for a grid point."""
    return "_".join(f"{short}{point[k]:g}" for short, k in zip(("logits", "km", "aa", "T"), KEYS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=" ".join(DEFAULT_GRID), help="space-separated λ_logits,λ_km,λ_aa,T points")
    ap.add_argument("--student", default="enet", help="student bundle: enet, espnet or erfnet")
    ap.add_argument("--site", default="HK", help="held-out site of the fold tuned on (never evaluated)")
    ap.add_argument("--seed", type=int, default=0, help="seed of split and training")
    own, rest = ap.parse_known_args(argv)
    args = gen.parse_args([*rest, "--sites", own.site, "--seeds", str(own.seed), "--students", own.student])
    grid = [parse_point(p) for p in own.grid.split()]

    bundles = gen.find_bundles_dir(args.bundles)
    student_bundle = bundles / f"prostate_mri_student_{own.student}"
    defaults = gen._bundle_defaults(student_bundle)
    out = Path(args.out).resolve()
    tune_dir = out / "tuning" / f"{own.student}_{own.site}_seed{own.seed}"
    progress = gen.Progress(1 + 1 + 2 * len(grid))
    start = progress.step(f"data ({out / 'data'})")
    data_dir = gen.prepare_data(args, out)
    run_dir, datalist_path, common = gen.prepare_run(args, out, data_dir, own.site, own.seed)
    gen._train_and_evaluate(bundles / gen.TEACHER, common, run_dir / "teacher", gen.teacher_extra(args), args.force,
                            progress, f"{own.site} seed {own.seed} | teacher", splits=())
    teacher_ckpt = str(run_dir / "teacher" / "models" / "model.pt")

    rows: list[dict[str, Any]] = []
    for point in grid:
        tag = point_tag(point)
        extra = {**gen.student_extra(args, teacher_ckpt), **{f"distillation#{k}": v for k, v in point.items()}}
        seconds = gen._train_and_evaluate(student_bundle, common, tune_dir / tag, extra, args.force, progress,
                                          f"{own.student} {tag}", splits=("validation",))
        with open(tune_dir / tag / "eval" / "summary.json") as f:
            summary = json.load(f)
        if own.site in summary["per_site"]:
            raise RuntimeError(f"{tag}: the held-out site {own.site} was evaluated; the tuning must not see it")
        row = {**point, "tag": tag, "val_dice": summary["mean"]["dice"],
               "val_dice_site_mean": summary["mean_of_site_means"]["dice"],
               "per_site": {s: v["dice"]["mean"] for s, v in summary["per_site"].items()},
               "train_s": seconds.get("train")}
        rows.append(row)
        print(f"    {tag}: validation mean Dice {row['val_dice']:.3f} (mean of site means "
              f"{row['val_dice_site_mean']:.3f})", flush=True)

    rows.sort(key=lambda r: -r["val_dice"])
    sites = sorted(rows[0]["per_site"])
    lines = ["| λ_logits | λ_km | λ_aa | T | validation Dice (cases) | mean of site means | "
             + " | ".join(sites) + " |", "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(sites)]
    for r in rows:
        lines.append(f"| {r['lambda_logits']:g} | {r['lambda_km']:g} | {r['lambda_aa']:g} | {r['temperature']:g} | "
                     f"{r['val_dice']:.3f} | {r['val_dice_site_mean']:.3f} | "
                     + " | ".join(f"{r['per_site'][s]:.3f}" for s in sites) + " |")
    table = "\n".join(lines)
    record = {"student": own.student, "held_out_site_not_used": own.site, "seed": own.seed,
              "bundle_defaults": {k: defaults[k] for k in KEYS}, "settings": vars(args), "rows": rows,
              "best": rows[0], "seconds": time.perf_counter() - start}
    gen.write_json_atomic(tune_dir / "tuning.json", record)
    (tune_dir / "tuning.md.part").write_text(table + "\n")
    (tune_dir / "tuning.md.part").replace(tune_dir / "tuning.md")
    print(table)
    print(f"best on validation: {rows[0]['tag']}; {record['seconds'] / 60:.1f} min; {tune_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
