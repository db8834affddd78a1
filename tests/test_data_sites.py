"""The six-site reader, its validation, datalists and the synthetic generator, on trees the tests build."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_relkd.data.sites import DataError, datalist_command, make_datalist, scan_sites
from monai_relkd.data.synthetic import SITE_PROFILES, generate_six_site_dataset

PUBLIC_COUNTS = {"RUNMC": 30, "BMC": 30, "I2CVB": 19, "UCL": 13, "BIDMC": 12, "HK": 12}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate_six_site_dataset(root, scale=0.2, size=32, seed=0)
    return root


def _fingerprint(root: Path) -> dict[str, tuple[float, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generator_writes_the_public_layout_with_scaled_counts(synth_root):
    assert set(PUBLIC_COUNTS) == set(SITE_PROFILES)
    scan = scan_sites(synth_root)
    assert scan.problems == []
    counts = {site: len(cases) for site, cases in scan.by_site().items()}
    assert counts == {site: max(1, round(n * 0.2)) for site, n in PUBLIC_COUNTS.items()}
    names = {Path(c.label).name.replace(c.case, "") for c in scan.cases}
    assert names == {"_segmentation.nii.gz", "_Segmentation.nii.gz"}, "both capitalisations are generated and read"
    assert any(2 in c.label_values for c in scan.cases) and all(c.foreground_voxels > 0 for c in scan.cases)


def test_minimum_one_case_per_site(tmp_path):
    generate_six_site_dataset(tmp_path / "d", scale=0.01, size=32, seed=0)
    assert all(len(v) == 1 for v in scan_sites(tmp_path / "d").by_site().values())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth_root):
    generate_six_site_dataset(tmp_path / "again", scale=0.2, size=32, seed=0)
    generate_six_site_dataset(tmp_path / "other", scale=0.2, size=32, seed=1)
    ref = {k: v[1] for k, v in _fingerprint(synth_root).items()}
    assert {k: v[1] for k, v in _fingerprint(tmp_path / "again").items()} == ref
    other = {k: v[1] for k, v in _fingerprint(tmp_path / "other").items()}
    assert sum(other[k] != ref[k] for k in ref if k.endswith(".nii.gz")) > 0


def test_niftis_load_in_monai_with_their_spacing_and_site_effects(synth_root):
    from monai.transforms import LoadImage

    spacings = {}
    for site in ("RUNMC", "HK"):
        case = sorted((synth_root / site).glob("Case*[0-9].nii.gz"))[0]
        img = LoadImage(image_only=True)(str(case))
        header = nib.load(str(case)).header.get_zooms()
        np.testing.assert_allclose(img.pixdim[:3].numpy(), header[:3], rtol=1e-5)
        assert img.ndim == 3
        spacings[site] = tuple(float(z) for z in header[:3])
    assert spacings["RUNMC"] != spacings["HK"], "sites differ in spacing"


def test_label_two_is_foreground_after_the_bundle_transforms(synth_root):
    """Files keep 1 and 2; the bundles' loading transforms make every value > 0 prostate."""
    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[1]
    parser = ConfigParser()
    parser.read_config(str(repo / "bundles" / "prostate_mri_teacher" / "configs" / "train.json"))
    parser["image_size"] = 32
    transforms = parser.get_parsed_content("train#deterministic_transforms")
    case = next(c for c in scan_sites(synth_root).cases if 2 in c.label_values)
    from monai.transforms import Compose

    out = Compose(transforms)({"image": case.image, "label": case.label})
    values = set(np.unique(out["label"].numpy()).tolist())
    assert values == {0.0, 1.0}


# --- bad cases -----------------------------------------------------------------------------------------------


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0]) if affine is None else affine), str(path))


def _good(site_dir: Path, case: str, suffix: str = "_segmentation", label_value: int = 1) -> None:
    site_dir.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(0).normal(100, 10, (16, 16, 4)).astype(np.float32)
    lab = np.zeros((16, 16, 4), np.uint8)
    lab[5:10, 5:10, 1:3] = label_value
    _write(site_dir / f"{case}.nii.gz", img)
    _write(site_dir / f"{case}{suffix}.nii.gz", lab)


@pytest.fixture
def bad_root(tmp_path) -> Path:
    root = tmp_path / "data"
    for site in ("RUNMC", "HK", "MYSITE"):
        _good(root / site, "Case00")
        _good(root / site, "Case01", suffix="_Segmentation", label_value=2)
    site = root / "RUNMC"
    img = np.ones((16, 16, 4), np.float32)
    lab = np.zeros((16, 16, 4), np.uint8)
    lab[4:8, 4:8, 1] = 1
    # missing segmentation
    _write(site / "Case10.nii.gz", img)
    # unreadable segmentation
    _write(site / "Case11.nii.gz", img)
    (site / "Case11_segmentation.nii.gz").write_bytes(b"not a nifti file")
    # shape mismatch
    _write(site / "Case12.nii.gz", img)
    _write(site / "Case12_segmentation.nii.gz", lab[:, :, :3])
    # affine mismatch
    _write(site / "Case13.nii.gz", img)
    _write(site / "Case13_segmentation.nii.gz", lab, np.diag([0.7, 0.7, 3.0, 1.0]))
    # not 3-D
    _write(site / "Case14.nii.gz", img[:, :, 0])
    _write(site / "Case14_segmentation.nii.gz", lab[:, :, 0])
    # NaN intensities
    nan = img.copy()
    nan[0, 0, 0] = np.nan
    _write(site / "Case15.nii.gz", nan)
    _write(site / "Case15_segmentation.nii.gz", lab)
    # empty label
    _write(site / "Case16.nii.gz", img)
    _write(site / "Case16_segmentation.nii.gz", np.zeros_like(lab))
    # unknown label value
    odd = lab.copy()
    odd[10, 10, 2] = 7
    _write(site / "Case17.nii.gz", img)
    _write(site / "Case17_segmentation.nii.gz", odd)
    return root


def test_every_bad_case_is_reported_with_its_file_and_left_out(bad_root):
    before = _fingerprint(bad_root)
    scan = scan_sites(bad_root)
    assert _fingerprint(bad_root) == before, "the reader must not touch the data folder"
    assert sorted(scan.sites) == ["HK", "MYSITE", "RUNMC"], "a folder following the pattern is a site"
    assert {(c.site, c.case) for c in scan.cases} == {(s, c) for s in ("RUNMC", "HK", "MYSITE") for c in ("Case00", "Case01")}
    problems = {p.case: p for p in scan.problems}
    assert set(problems) == {f"Case{i}" for i in range(10, 18)}
    for case, p in problems.items():
        assert case in p.path and str(bad_root) in p.path, str(p)
        assert p.problem
    text = {case: str(p).lower() for case, p in problems.items()}
    assert "segmentation" in text["Case10"] or "missing" in text["Case10"]
    assert "shape" in text["Case12"]
    assert "affine" in text["Case13"]
    assert "3-d" in text["Case14"] or "3d" in text["Case14"] or "dimension" in text["Case14"]
    assert "nan" in text["Case15"]
    assert "empty" in text["Case16"]
    assert "7" in text["Case17"]


def test_strict_fails_listing_every_problem(bad_root):
    with pytest.raises(DataError) as err:
        scan_sites(bad_root, strict=True)
    for i in range(10, 18):
        assert f"Case{i}" in str(err.value)


def test_fatal_conditions_fail_before_training(tmp_path, synth_root):
    with pytest.raises(DataError):
        scan_sites(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        scan_sites(tmp_path / "empty")
    with pytest.raises(DataError, match="NOWHERE"):
        make_datalist(scan_sites(synth_root), test_site="NOWHERE")


# --- datalists -----------------------------------------------------------------------------------------------


def _keys(entries):
    return [(e["site"], e["case"]) for e in entries]


def test_datalist_is_deterministic_disjoint_and_leaves_one_site_out(synth_root):
    scan = scan_sites(synth_root)
    a = make_datalist(scan, test_site="UCL", val_fraction=0.2, seed=0)
    b = make_datalist(scan, test_site="UCL", val_fraction=0.2, seed=0)
    c = make_datalist(scan, test_site="UCL", val_fraction=0.5, seed=3)
    assert a == b
    assert _keys(a["validation"]) != _keys(c["validation"])
    train, val, test = (set(_keys(a[k])) for k in ("training", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert {s for s, _ in test} == {"UCL"} and len(test) == len(scan.by_site()["UCL"])
    assert "UCL" not in {s for s, _ in train | val}
    for site, cases in scan.by_site().items():
        if site != "UCL" and len(cases) >= 2:
            assert any(s == site for s, _ in val), f"no validation case drawn from {site}"
    assert len(train) + len(val) + len(test) == len(scan.cases)


def test_datalist_command_writes_monai_datalists_and_never_into_the_data(tmp_path, synth_root):
    from monai.data import load_decathlon_datalist

    before = _fingerprint(synth_root)
    out = tmp_path / "datalist.json"
    datalist_command(root=str(synth_root), test_site="HK", out=str(out), val_fraction=0.2, seed=0)
    for split in ("training", "validation", "test"):
        items = load_decathlon_datalist(str(out), data_list_key=split)
        assert items and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
    assert {e["site"] for e in json.loads(out.read_text())["test"]} == {"HK"}

    folds = datalist_command(root=str(synth_root), all_folds=True, out=str(tmp_path / "folds"))
    assert sorted(Path(f).name for f in folds) == sorted(f"datalist_{s}.json" for s in PUBLIC_COUNTS)

    with pytest.raises(DataError, match="inside the data folder"):
        datalist_command(root=str(synth_root), test_site="HK", out=str(synth_root / "datalist.json"))
    assert _fingerprint(synth_root) == before


def test_relkd_cli_names_the_data_commands():
    from monai_relkd.cli import commands

    table = commands()
    assert table["datalist"] is datalist_command
    from monai_relkd.data.synthetic import synth_command

    assert table["synth"] is synth_command


# --- a site with no usable case, and the CLI's errors ----------------------------------------------------------


@pytest.fixture
def site_without_cases(bad_root) -> Path:
    """``bad_root`` plus a site BIDMC whose only two cases are unusable (empty label, missing segmentation)."""
    site = bad_root / "BIDMC"
    site.mkdir()
    img = np.ones((16, 16, 4), np.float32)
    _write(site / "Case00.nii.gz", img)
    _write(site / "Case00_segmentation.nii.gz", np.zeros((16, 16, 4), np.uint8))
    _write(site / "Case01.nii.gz", img)
    return bad_root


def test_a_site_with_no_usable_case_is_reported_and_left_out(site_without_cases, tmp_path, capsys):
    scan = scan_sites(site_without_cases)
    assert scan.empty_sites() == ["BIDMC"]
    assert {p.case for p in scan.problems if p.site == "BIDMC"} == {"Case00", "Case01"}
    out = tmp_path / "dl.json"
    datalist_command(root=str(site_without_cases), test_site="HK", out=str(out))
    printed = capsys.readouterr().out
    assert "site BIDMC left out: no usable case" in printed
    assert "BIDMC/Case00" in printed and "empty segmentation" in printed
    assert "BIDMC/Case01" in printed and "missing segmentation" in printed
    dl = json.loads(out.read_text())
    assert "BIDMC" not in {e["site"] for k in ("training", "validation", "test") for e in dl[k]}
    assert "BIDMC" not in dl["meta"]["training_sites"]
    folds = datalist_command(root=str(site_without_cases), all_folds=True, out=str(tmp_path / "folds"))
    assert sorted(Path(f).name for f in folds) == ["datalist_HK.json", "datalist_MYSITE.json", "datalist_RUNMC.json"]

    with pytest.raises(DataError, match="strict"):
        datalist_command(root=str(site_without_cases), test_site="HK", out=str(out), strict=True)
    with pytest.raises(DataError, match="(?s)held-out site 'BIDMC' has no usable case.*empty segmentation"):
        datalist_command(root=str(site_without_cases), test_site="BIDMC", out=str(out))


def test_no_training_site_left_is_an_error(tmp_path):
    _good(tmp_path / "d" / "HK", "Case00")
    bad = tmp_path / "d" / "UCL"
    bad.mkdir()
    _write(bad / "Case00.nii.gz", np.ones((16, 16, 4), np.float32))
    with pytest.raises(DataError, match="no training case left"):
        datalist_command(root=str(tmp_path / "d"), test_site="HK", out=str(tmp_path / "dl.json"))


def test_relkd_user_errors_are_one_line_with_status_2_and_debug_shows_the_traceback(site_without_cases, tmp_path,
                                                                                    capsys):
    from monai_relkd.cli import main

    for args, message in [
        (("datalist", "--root", str(tmp_path / "nowhere"), "--test_site", "HK"), "does not exist"),
        (("datalist", "--root", str(site_without_cases), "--test_site", "HK", "--strict"), "strict mode"),
        (("datalist", "--root", str(site_without_cases), "--test_site", "BIDMC"), "has no usable case"),
        (("package", "--bundle", str(tmp_path / "no_bundle"), "--out", str(tmp_path / "rel")), "no_bundle"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (args, err)
        assert err.splitlines()[0].startswith(f"relkd {args[0]}: error: ") and message in err, err
        assert "Traceback" not in err
    with pytest.raises(DataError, match="does not exist"):  # --debug: the exception and its traceback
        main(["datalist", "--root", str(tmp_path / "nowhere"), "--test_site", "HK", "--debug"])
    main(["datalist", "--root", str(site_without_cases), "--test_site", "HK", "--out", str(tmp_path / "x.json")])
    assert "site BIDMC left out" in capsys.readouterr().out
