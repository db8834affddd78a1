"""Dice of an nnU-Net-trained ENet with and without relational KD, on one leave-one-site-out fold.

Everything runs through nnU-Net's own CLI with the monai-relkd trainers (``nnUNet_extTrainer``):

1. ``relkd synth`` (synthetic six-site set) and ``relkd to-nnunet`` (held-out site -> imagesTs/labelsTs);
2. ``nnUNetv2_plan_and_preprocess -c 2d``;
3. teacher: ``nnUNetTrainerRelKDTeacher`` (nnU-Net's default U-Net and trainer, short schedule);
4. ``nnUNetTrainerStudent_ENet`` (no KD) and ``nnUNetTrainerRelKD_ENet`` (KD from that teacher), same schedule;
5. ``nnUNetv2_predict`` on the held-out site and ``nnUNetv2_evaluate_simple`` against labelsTs (foreground Dice).

The schedule is ``--epochs`` x ``--iters`` optimizer steps per network (nnU-Net's batch size from the plans).
Prints a Markdown table and writes ``results.json`` to ``--out``. Trainings run one after another.

    flock /tmp/relkd-cpu.lock nice python benchmarks/nnunet_loso.py --out /tmp/nnunet_loso
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import fire

from monai_relkd.data.synthetic import generate_six_site_dataset
from monai_relkd.nnunet import extension_path
from monai_relkd.nnunet.convert import convert_to_nnunet


def nnunet(name: str, *args: str, env: dict, log: Path) -> float:
    """Run nnU-Net's console script ``name`` through its entry point with this interpreter; returns seconds."""
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == name]
    module, func = ep.value.split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{name} {' '.join(args)} failed, see {log}")
    return time.time() - start


def main(
    out: str = "nnunet_loso",
    scale: float = 0.3,
    size: int = 96,
    test_site: str = "HK",
    epochs: int = 10,
    iters: int = 25,
    teacher_epochs: int | None = None,
    seed: int = 0,
) -> None:
    """Run the fold and print the table (options also spelled ``--test-site``, ``--teacher-epochs``).

    Args:
        out: work folder (nnU-Net raw, preprocessed and results folders, logs, ``results.json``).
        scale, size: synthetic set size (fraction of the public case counts) and in-plane matrix.
        test_site: the held-out site.
        epochs, iters: nnU-Net epochs and iterations per epoch of each student.
        teacher_epochs: epochs of the teacher (default: ``epochs``).
        seed: seed of the synthetic set.
    """
    args = SimpleNamespace(**locals())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset_id, did = 501, "501"
    env = {
        **os.environ,
        "nnUNet_raw": str(out / "raw"),
        "nnUNet_preprocessed": str(out / "pre"),
        "nnUNet_results": str(out / "res"),
        "nnUNet_extTrainer": extension_path(),
        "RELKD_NNUNET_ITERS": str(args.iters),
        "RELKD_NNUNET_VAL_ITERS": "5",
    }
    times: dict[str, float] = {}
    if not (out / "raw").exists():
        generate_six_site_dataset(out / "six", scale=args.scale, size=args.size, seed=args.seed)
        convert_to_nnunet(out / "six", out / "raw", dataset_id, args.test_site)
        times["plan"] = nnunet("nnUNetv2_plan_and_preprocess", "-d", did, "-c", "2d", "-np", "1", env=env, log=out / "plan.log")
    (dataset,) = [d.name for d in (out / "raw").iterdir() if d.name.startswith("Dataset")]
    train_env = {**env, "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false"}
    teacher = out / "res" / dataset / "nnUNetTrainerRelKDTeacher__nnUNetPlans__2d"
    arms = [
        ("teacher", "nnUNetTrainerRelKDTeacher", {"RELKD_NNUNET_EPOCHS": str(args.teacher_epochs or args.epochs)}),
        ("ENet", "nnUNetTrainerStudent_ENet", {"RELKD_NNUNET_EPOCHS": str(args.epochs)}),
        ("ENet + relational KD", "nnUNetTrainerRelKD_ENet",
         {"RELKD_NNUNET_EPOCHS": str(args.epochs), "RELKD_TEACHER": str(teacher)}),
    ]
    rows = []
    for label, trainer, extra in arms:
        folder = out / "res" / dataset / f"{trainer}__nnUNetPlans__2d"
        if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
            times[f"train {label}"] = nnunet(
                "nnUNetv2_train", did, "2d", "0", "-tr", trainer, "-device", "cpu",
                env={**train_env, **extra}, log=out / f"train_{trainer}.log",
            )
        pred = out / f"pred_{trainer}"
        ckpt = folder / "fold_0" / "checkpoint_final.pth"
        done = (pred / "summary.json").is_file() and (pred / "summary.json").stat().st_mtime > ckpt.stat().st_mtime
        if not done:  # a re-run only redoes what is missing or older than its checkpoint
            times[f"predict {label}"] = nnunet(
                "nnUNetv2_predict", "-i", str(out / "raw" / dataset / "imagesTs"), "-o", str(pred), "-d", did,
                "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
                env=env, log=out / f"pred_{trainer}.log",
            )
            nnunet(
                "nnUNetv2_evaluate_simple", str(out / "raw" / dataset / "labelsTs"), str(pred), "-l", "1",
                env=env, log=out / f"eval_{trainer}.log",
            )
        summary = json.loads((pred / "summary.json").read_text())
        per_case = {Path(c["prediction_file"]).name: c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]}
        rows.append({
            "arm": label,
            "trainer": trainer,
            "test_dice_mean": summary["foreground_mean"]["Dice"],
            "test_dice_per_case": per_case,
            "train_seconds": times.get(f"train {label}"),
        })
    steps = args.epochs * args.iters
    print(f"held-out site {args.test_site}; {steps} steps per student ({args.epochs} epochs x {args.iters}), "
          f"teacher {(args.teacher_epochs or args.epochs) * args.iters} steps")
    print("| network | trainer | Dice on held-out site (mean over cases) | train time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        t = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"
        print(f"| {r['arm']} | `{r['trainer']}` | {r['test_dice_mean']:.4f} | {t} |")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "times": times}, indent=2) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
