"""Bundle helpers: locating the bundle, the embedded data default, datalist errors, inference inputs, names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_relkd import bundle_support as bs


def _bundle(tmp_path: Path, config: dict) -> Path:
    root = tmp_path / "my_bundle"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.0.1"}))
    return root


REPO = Path(__file__).resolve().parents[1]
ALL_BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


#: every runnable config (with the variants merged over it) of every bundle
RUNNABLE = [(b, configs) for b in ALL_BUNDLES
            for configs in (("train.json",), ("inference.json",), ("inference.json", "inference_onnx.json"))
            if all((b / "configs" / c).is_file() for c in configs)]


@pytest.mark.parametrize("bundle, configs", RUNNABLE, ids=[f"{b.name}:{'+'.join(c)}" for b, c in RUNNABLE])
def test_a_bundle_run_from_another_folder_stops_with_how_to_pass_bundle_root_and_writes_nothing(
        bundle, configs, tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(tmp_path)
    wf = ConfigWorkflow(config_file=[str(bundle / "configs" / c) for c in configs], logging_file=False,
                        workflow_type=None)
    with pytest.raises(Exception) as err:
        wf.initialize()
    text = repr(err.value) + repr(err.value.__cause__)
    assert "--bundle_root" in text and "is not a bundle folder" in text
    assert list(tmp_path.iterdir()) == []


def test_bundle_root_is_the_current_folder_or_the_override(tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    root = _bundle(tmp_path, {"imports": ["$import monai_relkd"], "bundle_root": ".",
                              "initialize": ["$monai_relkd.bundle_support.check_bundle_root(@bundle_root)"],
                              "run": ["$@bundle_root"]})
    monkeypatch.chdir(root)  # MONAI's convention: run from inside the bundle
    wf = ConfigWorkflow(config_file="configs/inference.json", logging_file=False, workflow_type=None)
    wf.initialize()
    assert Path(wf.run()[0]).resolve() == root.resolve()
    monkeypatch.chdir(tmp_path)
    wf = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"), logging_file=False,
                        workflow_type=None, bundle_root=str(root))
    wf.initialize()
    assert wf.run()[0] == str(root)


def test_a_student_run_from_its_folder_finds_the_teacher_beside_it(monkeypatch):
    from monai.bundle import ConfigParser

    student = next(b for b in ALL_BUNDLES if "student" in b.name)
    monkeypatch.chdir(student)
    parser = ConfigParser()
    parser.read_config(str(student / "configs" / "train.json"))
    assert Path(parser.get_parsed_content("teacher_bundle_dir")) == REPO / "bundles" / "prostate_mri_teacher"


def test_check_bundle_root(tmp_path):
    root = _bundle(tmp_path, {})
    assert bs.check_bundle_root(root) == str(root)
    with pytest.raises(FileNotFoundError, match=r"--bundle_root <bundle>"):
        bs.check_bundle_root(tmp_path)


def test_missing_dataset_dir_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bs.bundle_datalist(tmp_path / "nope")


def test_missing_datalist_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist_file"):
        bs.bundle_datalist(tmp_path, datalist_file=tmp_path / "missing.json")


def test_list_images_file_folder_glob_and_errors(tmp_path):
    for name in ("Case00.nii.gz", "Case00_segmentation.nii.gz", "Case01.nii.gz", "Case01_Segmentation.nii.gz", "x.txt"):
        (tmp_path / name).write_bytes(b"")
    expected = [str(tmp_path / "Case00.nii.gz"), str(tmp_path / "Case01.nii.gz")]
    assert bs.list_images(tmp_path) == expected
    assert bs.list_images(str(tmp_path / "Case*.nii.gz")) == expected
    assert bs.list_images(tmp_path / "Case01.nii.gz") == [expected[1]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bs.list_images(tmp_path / "absent.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no NIfTI image"):
        bs.list_images(empty)


def test_split_cases_concatenates_and_names_missing_splits():
    datalist = {"training": [{"case": "a"}], "validation": [{"case": "b"}], "test": [{"case": "c"}]}
    assert [c["case"] for c in bs.split_cases(datalist, ["validation", "test"])] == ["b", "c"]
    assert [c["case"] for c in bs.split_cases(datalist, "test")] == ["c"]
    with pytest.raises(KeyError, match="holdout"):
        bs.split_cases(datalist, ["holdout"])


def test_site_prefixed_prediction_names_do_not_collide_and_match_saveimaged(tmp_path):
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    from monai_relkd.evaluation import find_prediction

    written = []
    for site in ("BMC", "HK"):
        image = f"/data/{site}/Case00.nii.gz"
        saver = SaveImage(output_dir=tmp_path, output_postfix="seg", separate_folder=False, resample=False,
                          output_name_formatter=bs.site_name_formatter, print_log=False)
        saver(MetaTensor(torch.zeros(1, 4, 4, 2), affine=np.eye(4), meta={"filename_or_obj": image}))
        expected = find_prediction(tmp_path, image, "seg", site=site)
        assert expected.name == f"{site}_Case00_seg.nii.gz"
        written.append(expected)
    assert written[0] != written[1]


def test_embedded_default_is_generated_once_with_a_log_line(tmp_path, monkeypatch, caplog):
    import logging

    from monai_relkd.data import scan_sites

    monkeypatch.setenv(bs.DATA_DIR_ENV, str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="monai_relkd.bundle_support"):
        first = bs.default_dataset_dir(scale=0.01, size=32, seed=0)
    assert any("generating the synthetic six-site set" in r.getMessage() for r in caplog.records)
    assert Path(first).parent == tmp_path / "cache"
    assert len(scan_sites(first).sites) == 6
    stamp = {p: p.stat().st_mtime_ns for p in Path(first).rglob("*.nii.gz")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_relkd.bundle_support"):
        assert bs.default_dataset_dir(scale=0.01, size=32, seed=0) == first
    assert not caplog.records, "the second call reuses the set silently"
    assert {p: p.stat().st_mtime_ns for p in Path(first).rglob("*.nii.gz")} == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(first).name], "no staging folder left behind"


def test_bundles_default_to_the_embedded_set():
    repo = Path(__file__).resolve().parents[1]
    for train in (repo / "bundles").glob("*/configs/train.json"):
        cfg = json.loads(train.read_text())
        assert cfg["dataset_dir"] == "$monai_relkd.bundle_support.default_dataset_dir()", train


def test_volumes_per_batch_gives_slices_per_step():
    from monai_relkd.bundle_support import volumes_per_batch

    assert volumes_per_batch(16, 4) == 4
    assert volumes_per_batch(16, 16) == 1
    with pytest.raises(ValueError, match="multiple of num_samples"):
        volumes_per_batch(16, 5)
    with pytest.raises(ValueError, match=">= 1"):
        volumes_per_batch(0, 4)
