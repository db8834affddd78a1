"""monai_relkd.reports: a report with every plot from a small fake run folder, combined runs, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import BUNDLES
from monai_relkd.evaluation import evaluate_folder, write_summary
from monai_relkd.reports import load_run, read_scalars, report_command, site_stat, write_report

SITES = {"RUNMC": "training", "BMC": "validation", "HK": "test"}
MODELS = [  # name, role, bundle, shrink of the predicted square (0: perfect)
    ("teacher", "teacher", "prostate_mri_teacher", 0),
    ("enet (no KD)", "baseline", "prostate_mri_student_enet", 2),
    ("enet + relational KD", "student", "prostate_mri_student_enet", 1),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(root: Path, seed: int = 0, data: Path | None = None) -> Path:
    """A run folder like relkd demo's: data, datalist, predictions, summaries, TensorBoard logs, run.json."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    data = data or root / "data"
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    datalist: dict[str, list] = {"training": [], "validation": [], "test": []}
    for site, split in SITES.items():
        (data / site).mkdir(parents=True, exist_ok=True)
        for c in range(2):
            ip, lp = data / site / f"Case0{c}.nii.gz", data / site / f"Case0{c}_segmentation.nii.gz"
            if not ip.exists():
                lab = np.zeros((24, 24, 5), np.uint8)
                lab[6 + c : 18, 6:18, 1:4] = 1
                lab[8:16, 8:16, 2] = 1
                img = rng.normal(size=lab.shape).astype(np.float32) + 2.0 * lab
                nib.save(nib.Nifti1Image(img, aff), str(ip))
                nib.save(nib.Nifti1Image(lab, aff), str(lp))
            datalist[split].append({"image": str(ip), "label": str(lp), "site": site, "case": f"Case0{c}"})
    (root / "datalist.json").write_text(json.dumps(datalist))
    models = []
    for i, (name, role, bundle, shrink) in enumerate(MODELS):
        key = f"m{i}"
        pred_dir, log_dir = root / key / "eval" / "predictions", root / key / "runs"
        pred_dir.mkdir(parents=True)
        for e in datalist["validation"] + datalist["test"]:
            lab = np.asarray(nib.load(e["label"]).dataobj)
            pred = np.zeros_like(lab)
            s = shrink + (seed if e["site"] == "HK" else 0)
            pred[6 + s : 18 - s, 6 + s : 18, 1:4] = 1
            nib.save(nib.Nifti1Image(pred, aff), str(pred_dir / f"{e['site']}_{e['case']}_seg.nii.gz"))
        summary = evaluate_folder(pred_dir, {"ev": datalist["validation"] + datalist["test"]}, split="ev",
                                  pred_postfix="_seg")
        write_summary(summary, root / key / "eval")
        with SummaryWriter(str(log_dir)) as w:
            tags = ["train_loss"] if role == "teacher" else ["loss", "loss_seg", "loss_logits", "loss_km", "loss_aa"]
            for step in range(1, 41):
                for t in tags:
                    w.add_scalar(t, 1.0 / step + 0.01 * rng.random(), step)
        with SummaryWriter(str(log_dir)) as w:  # a second writer in the same folder (the validator's)
            for epoch in range(1, 5):
                w.add_scalar("val_mean_dice", 0.5 + 0.1 * epoch, epoch)
        models.append({"name": name, "role": role, "bundle": str(BUNDLES / bundle),
                       "ckpt": str(root / key / "model.pt"),
                       "summary": str(root / key / "eval" / "summary.json"), "prediction_dir": str(pred_dir),
                       "log_dir": str(log_dir)})
    manifest = {"held_out_site": "HK", "dataset_dir": str(data), "datalist": str(root / "datalist.json"),
                "image_size": 32, "seed": seed, "models": models}
    (root / "run.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "HK_seed0")


def test_report_renders_every_plot(run_dir, tmp_path):
    report = write_report([run_dir], tmp_path / "report")
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert pngs == ["curves_HK_seed0.png", "dice_per_site.png", "dice_vs_params.png", "overlay_HK_seed0.png"]
    for name in pngs:
        blob = (report.parent / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000, name
        assert f"]({name})" in text, name
    assert not list(report.parent.glob(".*.tmp"))
    # the per-site numbers of every summary, the held-out mark, the distillation sentence, the efficiency table
    for i, (name, _, _, _) in enumerate(MODELS):
        summary = json.loads((run_dir / f"m{i}" / "eval" / "summary.json").read_text())
        for site, stats in summary["per_site"].items():
            assert f"{stats['dice']['mean']:.3f} ± {stats['dice']['std']:.3f}" in text, (name, site)
        assert f"| {name} |" in text
    assert "**HK (held out)**" in text
    m = re.search(r"enet \+ relational KD vs enet \(no KD\): ([+-]\d\.\d{3}) Dice on HK", text)
    assert m and float(m.group(1)) > 0
    assert "1×1×32×32" in text and "DeepLabV3Plus" in text and "ENet" in text
    data = json.loads((report.parent / "report.json").read_text())
    assert data["deltas"][0]["delta_held_out"] > 0 and len(data["efficiency"]) == 2


def test_combined_runs_and_command(run_dir, tmp_path, capsys):
    second = _make_run(tmp_path / "HK_seed1", seed=1, data=Path(json.loads((run_dir / "run.json").read_text())
                                                                ["dataset_dir"]))
    runs = [load_run(run_dir), load_run(second)]
    sums = [m.summary for r in runs for m in r.models if m.name == "teacher"]
    pooled = site_stat(sums, "HK")
    assert pooled["n"] == 4 and pooled["n_runs"] == 2
    values = [c["metrics"]["dice"] for s in sums for c in s["metric_per_case"] if c["site"] == "HK"]
    assert pooled["mean"] == pytest.approx(np.mean(values)) and pooled["std"] == pytest.approx(np.std(values))
    report_command(str(run_dir), str(second), out=str(tmp_path / "both"), overlay_cases=1)
    assert "wrote" in capsys.readouterr().out
    text = (tmp_path / "both" / "report.md").read_text()
    assert "(2 runs)" in text and f"{pooled['mean']:.3f} ± {pooled['std']:.3f}" in text
    assert (tmp_path / "both" / "curves_HK_seed1.png").is_file()
    # the spread across seeds: each seed's own held-out mean, their std, and the difference from the baseline
    per_seed = {r.seed: {m.name: site_stat([m.summary], "HK")["mean"] for m in r.models} for r in runs}
    student, base = "enet + relational KD", "enet (no KD)"
    assert per_seed[0][student] != per_seed[1][student]
    seeds = np.array([per_seed[0][student], per_seed[1][student]])
    deltas = np.array([per_seed[sd][student] - per_seed[sd][base] for sd in (0, 1)])
    assert "### Spread across seeds" in text
    assert f"| {student} | HK | {seeds[0]:.3f} (s0), {seeds[1]:.3f} (s1) | {seeds.mean():.3f} ± {seeds.std():.3f} |" in text
    data = json.loads((tmp_path / "both" / "report.json").read_text())
    rec = next(r for r in data["seed_spread"] if r["model"] == student and r["held_out"] == "HK")
    assert rec["std"] == pytest.approx(seeds.std()) and rec["std"] > 0
    assert rec["delta_mean"] == pytest.approx(deltas.mean()) and rec["delta_std"] == pytest.approx(deltas.std())
    assert rec["baseline"] == base
    assert f"| {student} | mean over held-out sites |" not in text  # one held-out site: no row repeating it
    assert all(r["held_out"] == "HK" for r in data["seed_spread"])
    # a single seed has no spread to report
    one = (tmp_path / "one" / "report.md")
    write_report([run_dir], one.parent, overlay_cases=0)
    assert "Spread across seeds" not in one.read_text()


def test_read_scalars_merges_writers(run_dir):
    scalars = read_scalars(run_dir / "m1" / "runs")
    assert {"loss", "loss_aa", "val_mean_dice"} <= set(scalars)
    steps, values = scalars["loss"]
    assert steps.tolist() == list(range(1, 41)) and len(values) == 40
    assert read_scalars(run_dir / "nothing") == {}


def test_errors(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="run.json"):
        write_report([tmp_path], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest["models"][0]["role"] = "mentor"
    (bad / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="role 'mentor'"):
        write_report([bad], tmp_path / "out")
    for m in manifest["models"]:
        m["role"], m["summary"] = "student", str(tmp_path / "none.json")
    manifest["models"] = manifest["models"][1:]
    (bad / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no model .* has a summary.json"):
        write_report([bad], tmp_path / "out")
