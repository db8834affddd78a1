"""monai_relkd.evaluation: per-case metrics against hand values, empty-mask policy, folder evaluation, summary files."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from monai_relkd.evaluation import (
    CASES_CSV,
    CSV_COLUMNS,
    EMPTY_POLICY,
    METRICS,
    SUMMARY_JSON,
    evaluate_case,
    evaluate_command,
    evaluate_folder,
    find_prediction,
    format_site_table,
    summarize_cases,
    write_summary,
)

SPACING = (0.5, 0.5, 3.0)


def cube(shape=(12, 12, 10), lo=(3, 3, 3), size=(4, 4, 4), value=1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, a + s) for a, s in zip(lo, size))] = value
    return m


# ----------------------------------------------------------------------------------------------- per-case metrics
@pytest.mark.parametrize("shift, dice", [(0, 1.0), (1, 0.75), (2, 0.5), (4, 0.0)])
def test_dice_offset_cubes(shift, dice):
    gt = cube(value=2)  # public labels use 1 and 2: > 0 is foreground
    pr = cube(lo=(3 + shift, 3, 3))
    assert evaluate_case(pr, gt, SPACING)["dice"] == pytest.approx(dice)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_shift_anisotropic(axis):
    # 2x2x2 block, every voxel on the surface; shifted by one voxel: per direction, 4 surface voxels at distance 0
    # and 4 at distance spacing[axis] -> HD95 = spacing[axis], ASD (symmetric) = spacing[axis] / 2, Dice = 0.5
    gt = cube(size=(2, 2, 2))
    pr = np.roll(gt, 1, axis=axis)
    r = evaluate_case(pr, gt, SPACING)
    assert r["dice"] == pytest.approx(0.5)
    assert r["hd95"] == pytest.approx(SPACING[axis])
    assert r["asd"] == pytest.approx(SPACING[axis] / 2)


def test_single_voxel_diagonal_shift_mm():
    gt = np.zeros((6, 6, 6), np.int64)
    pr = gt.copy()
    gt[2, 2, 2] = 1
    pr[3, 2, 3] = 1
    d = math.hypot(0.5, 3.0)
    r = evaluate_case(torch.as_tensor(pr), torch.as_tensor(gt), SPACING)  # tensors accepted
    assert r == pytest.approx({"dice": 0.0, "hd95": d, "asd": d})
    assert evaluate_case(pr, gt, 2.0)["hd95"] == pytest.approx(2.0 * math.sqrt(2))  # isotropic scalar spacing


def _reference_distances(pr: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """Brute force over MONAI's surface definition (mask XOR erosion): HD95 and symmetric ASD in mm."""
    ep = np.argwhere(pr ^ binary_erosion(pr)) * np.asarray(spacing)
    eg = np.argwhere(gt ^ binary_erosion(gt)) * np.asarray(spacing)
    d = cdist(ep, eg)
    d_pg, d_gp = d.min(1), d.min(0)
    return max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), float(np.concatenate([d_pg, d_gp]).mean())


def test_distances_match_brute_force_on_ellipsoids():
    z, y, x = np.meshgrid(np.arange(20), np.arange(18), np.arange(9), indexing="ij")
    gt = ((z - 9.5) / 6) ** 2 + ((y - 8) / 5) ** 2 + ((x - 4) / 3) ** 2 <= 1
    pr = ((z - 11) / 5) ** 2 + ((y - 9) / 6) ** 2 + ((x - 5) / 2.5) ** 2 <= 1
    spacing = (0.7, 0.9, 2.5)
    hd95, asd = _reference_distances(pr, gt, spacing)
    r = evaluate_case(pr, gt.astype(np.float32), spacing)
    assert r["hd95"] == pytest.approx(hd95, rel=1e-4)
    assert r["asd"] == pytest.approx(asd, rel=1e-4)
    assert r["dice"] == pytest.approx(2 * (pr & gt).sum() / (pr.sum() + gt.sum()))
    # spacing is applied per array axis: permuting the spacing changes the distances
    assert evaluate_case(pr, gt, spacing[::-1])["hd95"] != pytest.approx(hd95, rel=1e-3)


def test_empty_masks_policy_and_finite_means():
    gt, empty = cube(), np.zeros((12, 12, 10), np.uint8)
    assert evaluate_case(empty, gt, SPACING) == {"dice": 0.0, "hd95": None, "asd": None}
    assert evaluate_case(gt, empty, SPACING) == {"dice": 0.0, "hd95": None, "asd": None}
    both = evaluate_case(empty, empty, SPACING)
    assert both == {"dice": 1.0, "hd95": 0.0, "asd": 0.0}
    assert both == {k: EMPTY_POLICY["both_empty"][k] for k in METRICS}

    good = evaluate_case(np.roll(gt, 1, axis=2), gt, SPACING)
    cases = [
        {"case": "a", "site": "S", "metrics": good},
        {"case": "b", "site": "S", "metrics": evaluate_case(empty, gt, SPACING)},
        {"case": "c", "site": "S", "metrics": evaluate_case(gt, empty, SPACING)},
        {"case": "d", "site": "S", "metrics": both},
    ]
    s = summarize_cases(cases)
    assert s["mean"]["dice"] == pytest.approx(np.mean([good["dice"], 0, 0, 1]))
    assert s["mean"]["hd95"] == pytest.approx(np.mean([good["hd95"], 0.0]))
    assert s["per_site"]["S"]["hd95"]["n"] == 2 and s["per_site"]["S"]["hd95"]["n_undefined"] == 2
    assert s["per_site"]["S"]["dice"]["n_undefined"] == 0
    assert all(math.isfinite(v) for v in s["mean"].values())
    assert s["policy"] == EMPTY_POLICY
    # a site where every distance is undefined gives null, not NaN
    s2 = summarize_cases([{"case": "b", "site": "T", "metrics": evaluate_case(empty, gt, SPACING)}])
    assert s2["per_site"]["T"]["asd"] == {"mean": None, "std": None, "n": 0, "n_undefined": 1}
    json.dumps(s2, allow_nan=False)


def test_evaluate_case_validates_inputs():
    gt = cube()
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_case(gt[:-1], gt, SPACING)
    with pytest.raises(ValueError, match="one value per spatial axis"):
        evaluate_case(gt, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        evaluate_case(gt, gt, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="probabilities"):
        evaluate_case(gt * 0.4, gt, SPACING)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        evaluate_case(gt[None], gt[None], SPACING)
    with pytest.raises(TypeError):
        evaluate_case(gt.tolist(), gt, SPACING)


# --------------------------------------------------------------------------------------------- folder evaluation
def _save(path, arr, spacing=SPACING, offset=(0.0, 0.0, 0.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = offset
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), aff), str(path))


@pytest.fixture
def fixture_dirs(tmp_path):
    """Two sites with three and two cases; labels use values 1 and 2; predictions flat or per case folder."""
    data, pred = tmp_path / "data", tmp_path / "pred"
    gt = cube()
    gt[4, 4, 4] = 2
    specs = {  # case -> (site, prediction, spacing, layout)
        "Case00": ("RUNMC", np.roll(cube(), 1, axis=0), SPACING, "flat"),
        "Case01": ("RUNMC", np.roll(cube(), 1, axis=2), SPACING, "folder"),
        "Case02": ("RUNMC", np.zeros_like(gt), SPACING, "flat"),  # empty prediction
        "Case10": ("BMC", cube(lo=(4, 3, 3)), (0.6, 0.6, 4.0), "folder"),
        "Case11": ("BMC", cube(lo=(3, 5, 3), size=(4, 3, 4)), (0.6, 0.6, 4.0), "flat"),
    }
    entries, expected = [], {}
    for case, (site, pr, sp, layout) in specs.items():
        _save(data / site / f"{case}.nii.gz", gt * 100, sp)  # image content does not matter
        _save(data / site / f"{case}_segmentation.nii.gz", gt, sp)
        _save(pred / (f"{case}/" if layout == "folder" else "") / f"{case}_seg.nii.gz", pr, sp)
        entries.append(
            {
                "image": f"{site}/{case}.nii.gz",
                "label": f"{site}/{case}_segmentation.nii.gz",
                "site": site,
                "case": case,
            }
        )
        expected[case] = (site, evaluate_case(pr, gt, sp))
    datalist = data / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "test": entries}))
    return pred, datalist, expected


def test_evaluate_folder_per_site_stats(fixture_dirs):
    pred, datalist, expected = fixture_dirs
    s = evaluate_folder(pred, datalist, split="test", pred_postfix="_seg")
    assert [c["case"] for c in s["metric_per_case"]] == list(expected)
    for c in s["metric_per_case"]:
        assert c["site"] == expected[c["case"]][0]
        assert c["metrics"] == pytest.approx(expected[c["case"]][1])
    assert s["metric_per_case"][1]["metrics"]["hd95"] == pytest.approx(3.0)  # z spacing read from the label header
    assert s["metric_per_case"][2]["empty_prediction"] and s["metric_per_case"][2]["metrics"]["hd95"] is None

    site_means = {m: [] for m in METRICS}
    for site in ("BMC", "RUNMC"):
        assert s["per_site"][site]["n_cases"] == sum(v[0] == site for v in expected.values())
        for m in METRICS:
            vals = [r[m] for st, r in expected.values() if st == site and r[m] is not None]
            st = s["per_site"][site][m]
            assert st["mean"] == pytest.approx(np.mean(vals)) and st["std"] == pytest.approx(np.std(vals))
            assert st["n"] == len(vals)
            site_means[m].append(np.mean(vals))
    assert s["per_site"]["RUNMC"]["hd95"]["n_undefined"] == 1
    for m in METRICS:
        pooled = [r[m] for _, r in expected.values() if r[m] is not None]
        assert s["mean"][m] == pytest.approx(np.mean(pooled))
        assert s["overall"][m]["std"] == pytest.approx(np.std(pooled))
        assert s["mean_of_site_means"][m] == pytest.approx(np.mean(site_means[m]))
    assert list(s["per_site"]) == ["BMC", "RUNMC"]


def test_write_summary_json_csv_and_table(fixture_dirs, tmp_path, capsys):
    pred, datalist, expected = fixture_dirs
    s = evaluate_folder(pred, datalist, pred_postfix="_seg")
    jp, cp = write_summary(s, tmp_path / "out")
    assert (jp.name, cp.name) == (SUMMARY_JSON, CASES_CSV)
    assert not [p for p in jp.parent.iterdir() if p.name.endswith(".tmp")]  # temp files replaced, none left
    js = json.loads(jp.read_text())
    assert {"metric_per_case", "per_site", "mean", "mean_of_site_means", "overall", "policy", "n_cases"} <= set(js)
    assert set(js["metric_per_case"][0]) >= {"case", "site", "prediction", "reference", "metrics"}
    assert set(js["metric_per_case"][0]["metrics"]) == set(METRICS)
    assert set(js["per_site"]["BMC"]["dice"]) == {"mean", "std", "n", "n_undefined"}
    assert js["metric_per_case"][2]["metrics"]["hd95"] is None and js["policy"]["both_empty"]["dice"] == 1.0
    rows = list(csv.DictReader(cp.open()))
    assert len(rows) == len(expected) and tuple(rows[0]) == CSV_COLUMNS
    assert [r["case"] for r in rows] == list(expected)
    assert rows[2]["hd95"] == "" and float(rows[0]["dice"]) == pytest.approx(expected["Case00"][1]["dice"])

    table = format_site_table(s)
    lines = table.splitlines()
    assert lines[0].startswith("| Site | n | Dice | HD95 (mm) | ASD (mm) |") and len(lines) == 2 + 2 + 2
    assert lines[3].startswith("| RUNMC | 3 |") and "1 undef." in lines[3]

    evaluate_command(str(pred), str(datalist), out=str(tmp_path / "cli"), pred_postfix="seg")  # MONAI-style postfix
    out = capsys.readouterr().out
    assert "| BMC | 2 |" in out and (tmp_path / "cli" / SUMMARY_JSON).is_file()
    assert (tmp_path / "cli" / CASES_CSV).is_file()


def test_missing_prediction_names_case_and_file(fixture_dirs):
    pred, datalist, _ = fixture_dirs
    (pred / "Case11_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"Case11") as e:
        evaluate_folder(pred, datalist, pred_postfix="_seg")
    msg = str(e.value)
    assert str(pred / "Case11_seg.nii.gz") in msg and str(pred / "Case11" / "Case11_seg.nii.gz") in msg


def test_geometry_mismatch_names_both_files(fixture_dirs):
    pred, datalist, _ = fixture_dirs
    label = datalist.parent / "BMC" / "Case11_segmentation.nii.gz"
    bad = pred / "Case11_seg.nii.gz"
    _save(bad, cube(shape=(12, 12, 9)), (0.6, 0.6, 4.0))
    with pytest.raises(ValueError, match="shape") as e:
        evaluate_folder(pred, datalist, pred_postfix="_seg")
    assert str(bad) in str(e.value) and str(label) in str(e.value)
    _save(bad, cube(lo=(3, 5, 3), size=(4, 3, 4)), (0.6, 0.6, 4.0), offset=(0.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="affine") as e:
        evaluate_folder(pred, datalist, pred_postfix="_seg")
    assert str(bad) in str(e.value) and str(label) in str(e.value)


def test_prediction_lookup_layouts(tmp_path):
    pred = tmp_path / "pred"
    _save(pred / "RUNMC" / "Case00" / "Case00_trans.nii.gz", cube())
    assert find_prediction(pred, "x/Case00.nii.gz", site="RUNMC").name == "Case00_trans.nii.gz"  # auto postfix
    _save(pred / "RUNMC" / "Case00" / "Case00_seg.nii.gz", cube())
    with pytest.raises(ValueError, match="pred_postfix"):
        find_prediction(pred, "x/Case00.nii.gz", site="RUNMC")
    assert find_prediction(pred, "x/Case00.nii.gz", "_seg", site="RUNMC").parent.name == "Case00"
    with pytest.raises(FileNotFoundError, match="Case00"):
        find_prediction(pred, "x/Case00.nii.gz", "_seg", site="BMC")
    _save(pred / "Case01.nii", cube())  # bare stem, uncompressed
    assert find_prediction(pred, "x/Case01.nii.gz", "").name == "Case01.nii"
    assert find_prediction(pred, "x/Case01.nii.gz").name == "Case01.nii"
    assert find_prediction(pred, "x/Case010.nii.gz", "", case="Case01").name == "Case01.nii"  # case id as stem


def test_datalist_errors_and_duplicate_predictions(tmp_path):
    data, pred = tmp_path / "d", tmp_path / "p"
    entries = []
    for site in ("A", "B"):  # same case name in two sites, predictions saved flat: ambiguous
        _save(data / site / "Case00_segmentation.nii.gz", cube())
        entries.append({"image": f"{site}/Case00.nii.gz", "label": f"{site}/Case00_segmentation.nii.gz", "site": site})
    _save(pred / "Case00_seg.nii.gz", cube())
    dl = {"test": entries, "validation": []}
    with pytest.raises(KeyError, match=r"'training'.*\['test', 'validation'\]"):
        evaluate_folder(pred, dl, split="training", base_dir=data)
    with pytest.raises(ValueError, match="both resolve"):
        evaluate_folder(pred, dl, base_dir=data, pred_postfix="_seg")
    (pred / "Case00_seg.nii.gz").unlink()
    for site in ("A", "B"):  # per-site folders disambiguate
        _save(pred / site / "Case00_seg.nii.gz", cube())
    s = evaluate_folder(pred, dl, base_dir=data, pred_postfix="_seg")
    assert s["mean"]["dice"] == 1.0 and s["config"]["datalist"] == "<dict>"
    assert [c["case"] for c in s["metric_per_case"]] == ["Case00", "Case00"]
