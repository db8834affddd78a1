"""nnU-Net v2 plugin: converter, settings, and the whole pipeline through nnU-Net's own CLI on CPU.

The converter and settings tests need only nibabel. The pipeline test (synthetic set -> ``relkd to-nnunet`` ->
``nnUNetv2_plan_and_preprocess`` -> a tiny teacher -> the ENet KD student -> ``nnUNetv2_predict``) needs the
``nnunet`` extra and is skipped, with that reason, when ``nnunetv2`` is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_relkd.data._io import write_nifti
from monai_relkd.data.sites import DataError, make_datalist, scan_sites
from monai_relkd.data.synthetic import generate_six_site_dataset
from monai_relkd.nnunet import extension_path
from monai_relkd.nnunet.config import resolve_schedule, resolve_settings
from monai_relkd.nnunet.convert import convert_to_nnunet

HAS_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(
    not HAS_NNUNET, reason='nnunetv2 is not installed (optional extra: pip install -e ".[nnunet]")'
)
DATASET = "Dataset501_ProstateLOSOHK"
TIMEOUT = 420  # seconds per nnU-Net command; each takes well under a minute here


@pytest.fixture(scope="module")
def six_sites(tmp_path_factory) -> Path:
    """A tiny synthetic six-site set: 11 cases of 48 x 48 x ~20 voxels."""
    root = tmp_path_factory.mktemp("six") / "data"
    generate_six_site_dataset(root, scale=0.1, size=48, seed=0)
    return root


# ---------------------------------------------------------------------------------------------- converter


def test_convert_layout_split_and_labels(six_sites, tmp_path):
    r = convert_to_nnunet(six_sites, tmp_path / "raw", 501, "HK")
    ds = Path(r["dataset_dir"])
    assert ds.name == DATASET
    meta = json.loads((ds / "dataset.json").read_text())
    images = sorted(p.name for p in (ds / "imagesTr").iterdir())
    assert meta["numTraining"] == len(images) == 10 and meta["labels"] == {"background": 0, "prostate": 1}
    assert all(n.endswith("_0000.nii.gz") for n in images)
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == ["HK_Case00_0000.nii.gz"]
    # fold 0 is exactly the leave-one-site-out datalist's training/validation split
    dl = make_datalist(scan_sites(six_sites), "HK")
    (split,) = json.loads((ds / "splits_final.json").read_text())
    assert split["train"] == sorted(f"{i['site']}_{i['case']}" for i in dl["training"])
    assert split["val"] == sorted(f"{i['site']}_{i['case']}" for i in dl["validation"])
    # labels are binary, on the image grid; images keep their intensities
    src_img = nib.load(six_sites / "RUNMC" / "Case00.nii.gz")
    img = nib.load(ds / "imagesTr" / "RUNMC_Case00_0000.nii.gz")
    lab = nib.load(ds / "labelsTr" / "RUNMC_Case00.nii.gz")
    np.testing.assert_allclose(img.get_fdata(), src_img.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(lab.affine, img.affine)
    assert set(np.unique(np.asarray(lab.dataobj))) == {0, 1}
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_convert_refuses_used_id_and_names_bad_cases(six_sites, tmp_path):
    raw = tmp_path / "raw"
    mine = raw / "Dataset501_Mine"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="already used"):
        convert_to_nnunet(six_sites, raw, 501, "HK")
    assert (mine / "keep.txt").read_text() == "user data"

    # a case whose label grid differs from its image is named with its file; nothing is written
    bad_root = tmp_path / "bad"
    for site in ("RUNMC", "HK"):
        for f in (six_sites / site).iterdir():
            (bad_root / site).mkdir(parents=True, exist_ok=True)
            (bad_root / site / f.name).write_bytes(f.read_bytes())
    label = bad_root / "RUNMC" / "Case01_segmentation.nii.gz"
    lab = nib.load(label)
    write_nifti(label, np.asarray(lab.dataobj)[:, :, :-1], lab.affine)
    with pytest.raises(DataError) as err:
        convert_to_nnunet(bad_root, raw, 502, "HK", strict=True)
    assert "RUNMC/Case01" in str(err.value)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset501_Mine"]


def test_cli_commands(six_sites, tmp_path, monkeypatch, capsys):
    from monai_relkd.cli import commands

    cmds = commands()
    assert Path(cmds["nnunet-path"]()).joinpath("relkd_trainers.py").is_file()
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(DataError, match="nnUNet_raw"):
        cmds["to-nnunet"](root=str(six_sites), dataset_id=7, test_site="UCL")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    out = cmds["to-nnunet"](root=str(six_sites), dataset_id=7, test_site="UCL")
    assert out == str(tmp_path / "raw" / "Dataset007_ProstateLOSOUCL")
    assert "Dataset007_ProstateLOSOUCL: 10 training cases" in capsys.readouterr().out


def test_convert_rejects_bad_arguments(six_sites, tmp_path):
    with pytest.raises(DataError, match="1..999"):
        convert_to_nnunet(six_sites, tmp_path, 1000, "HK")
    with pytest.raises(DataError, match="inside the data folder"):
        convert_to_nnunet(six_sites, six_sites / "nnunet_raw", 501, "HK")
    with pytest.raises(DataError):
        convert_to_nnunet(six_sites, tmp_path, 501, "NOSUCHSITE")


# ---------------------------------------------------------------------------------------------- settings

DEFAULTS = {
    "teacher": "",
    "teacher_fold": "",
    "teacher_checkpoint": "checkpoint_final.pth",
    "teacher_taps": (),
    "student_taps": ("encoder.stage3", "decoder.stage4"),
    "lambda_logits": 0.1,
    "lambda_km": 0.001,
    "lambda_aa": 0.1,
    "temperature": 4.0,
    "pair_weights": "label",
    "aa_grid": None,
}


def test_settings_precedence_class_json_env(tmp_path):
    cfg = tmp_path / "kd.json"
    cfg.write_text(json.dumps({"lambda_km": 0.5, "lambda_aa": 0.2, "num_epochs": 3}))
    env = {"RELKD_NNUNET_CONFIG": str(cfg), "RELKD_LAMBDA_AA": "0", "RELKD_TEACHER_TAPS": "a.b, c"}
    s = resolve_settings(DEFAULTS, env)
    assert (s["lambda_logits"], s["lambda_km"], s["lambda_aa"]) == (0.1, 0.5, 0.0)
    assert s["teacher_taps"] == ["a.b", "c"] and s["student_taps"] == ["encoder.stage3", "decoder.stage4"]
    assert resolve_schedule({**env, "RELKD_NNUNET_ITERS": "2"}) == {"num_epochs": 3, "num_iterations_per_epoch": 2}


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RELKD_LAMBDA_KM": "-1"}, "lambda_km"),
        ({"RELKD_LAMBDA_KM": "abc"}, "RELKD_LAMBDA_KM"),
        ({"RELKD_NNUNET_CONFIG": "/no/such/kd.json"}, "no such file"),
        ({"RELKD_NNUNET_EPOCHS": "0"}, "positive integer"),
    ],
)
def test_settings_errors_name_the_setting(env, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        resolve_settings(DEFAULTS, env)
        resolve_schedule(env)


def test_settings_json_unknown_key(tmp_path):
    cfg = tmp_path / "kd.json"
    cfg.write_text(json.dumps({"lamda_km": 1}))
    with pytest.raises(ValueError, match="lamda_km"):
        resolve_settings(DEFAULTS, {"RELKD_NNUNET_CONFIG": str(cfg)})


def test_teacher_errors_say_what_to_set(tmp_path):
    from monai_relkd.nnunet.teacher import load_any_teacher

    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="RELKD_TEACHER"):
        load_any_teacher("", 0, "checkpoint_final.pth", 1, 2, cpu)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any_teacher(str(tmp_path / "missing"), 0, "checkpoint_final.pth", 1, 2, cpu)
    with pytest.raises(FileNotFoundError, match="plans.json is missing"):
        load_any_teacher(str(tmp_path), 0, "checkpoint_final.pth", 1, 2, cpu)
    for name in ("plans.json", "dataset.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "checkpoint_best.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"fold_1/checkpoint_best\.pth"):
        load_any_teacher(str(tmp_path), 0, "checkpoint_final.pth", 1, 2, cpu)


# ---------------------------------------------------------------------------------------------- pipeline


@needs_nnunet
def test_nnunet_finds_every_trainer_through_ext_path():
    """nnU-Net's own lookup (as nnUNetv2_train/predict do it) finds each trainer; each builds its student."""
    code = """
import json
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from monai_relkd.nnunet.trainers import __all__ as names
out = {}
for name in names:
    cls = recursive_find_trainer_class_by_name(name)
    if cls.__name__.startswith("nnUNetTrainerRelKDTeacher"):
        out[name] = None
        continue
    net = cls.build_network_architecture(None, None, 1, 2, enable_deep_supervision=False)
    out[name] = [type(net).__name__, sum(p.numel() for p in net.parameters())]
print("RESULT" + json.dumps(out))
"""
    env = {**os.environ, "nnUNet_extTrainer": extension_path()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (
        "nnU-Net could not look up the trainers; if the error is 'operator torchvision::nms does not exist', "
        "torchvision does not match torch (see README, nnunet extra):\n" + proc.stderr[-4000:]
    )
    found = json.loads(proc.stdout.split("RESULT")[-1])
    from monai_relkd.networks import ENet, ERFNet, ESPNet

    for net in (ENet, ESPNet, ERFNet):
        n = sum(p.numel() for p in net(1, 2).parameters())
        assert found[f"nnUNetTrainerRelKD_{net.__name__}"] == [net.__name__, n]
        assert found[f"nnUNetTrainerStudent_{net.__name__}"] == [net.__name__, n]


def _entry_point(name: str) -> str:
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == name]
    return ep.value


def _nnunet(name: str, *args: str, env: dict, cwd: Path) -> str:
    """Run nnU-Net's console script ``name`` (its entry point, with this interpreter) and return its output."""
    module, func = _entry_point(name).split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def pipeline(six_sites, tmp_path_factory) -> dict:
    """Raw data -> plans -> tiny teacher -> ENet KD student (1 epoch of 3 iterations each) -> predictions."""
    work = tmp_path_factory.mktemp("nnunet")
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "pre"),
        "nnUNet_results": str(work / "res"),
        "nnUNet_extTrainer": extension_path(),
        "nnUNet_compile": "false",
        "RELKD_NNUNET_EPOCHS": "1",
        "RELKD_NNUNET_ITERS": "3",
        "RELKD_NNUNET_VAL_ITERS": "1",
        "OMP_NUM_THREADS": "2",
    }
    convert_to_nnunet(six_sites, work / "raw", 501, "HK")
    _nnunet("nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "2d", "-np", "1", env=env, cwd=work)
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    _nnunet("nnUNetv2_train", "501", "2d", "0", "-tr", "nnUNetTrainerRelKDTeacher", "-device", "cpu", env=train_env, cwd=work)
    teacher = work / "res" / DATASET / "nnUNetTrainerRelKDTeacher__nnUNetPlans__2d"
    log = _nnunet(
        "nnUNetv2_train", "501", "2d", "0", "-tr", "nnUNetTrainerRelKD_ENet", "-device", "cpu",
        env={**train_env, "RELKD_TEACHER": str(teacher)}, cwd=work,
    )
    pred = work / "pred"
    _nnunet(
        "nnUNetv2_predict", "-i", str(work / "raw" / DATASET / "imagesTs"), "-o", str(pred), "-d", "501",
        "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerRelKD_ENet", "-device", "cpu", "-npp", "1", "-nps", "1",
        "--disable_tta", env=env, cwd=work,
    )
    student = work / "res" / DATASET / "nnUNetTrainerRelKD_ENet__nnUNetPlans__2d" / "fold_0"
    return {"work": work, "student": student, "log": log, "pred": pred}


@needs_nnunet
def test_student_checkpoint_is_enet_with_connectors(pipeline):
    from monai_relkd.networks import ENet

    ckpt = torch.load(pipeline["student"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerRelKD_ENet"
    n_ckpt = sum(v.numel() for k, v in ckpt["network_weights"].items() if "running_" not in k and "num_batches" not in k)
    n_enet = sum(p.numel() for p in ENet(in_channels=1, out_channels=2).parameters())
    assert n_ckpt == n_enet
    connectors = ckpt["relkd"]["connectors"]
    assert connectors and all(torch.isfinite(v).all() for v in connectors.values())
    # the connectors were trained: they are in the optimizer (second parameter group)
    assert len(ckpt["optimizer_state"]["param_groups"]) == 2
    plans = json.loads((pipeline["work"] / "pre" / DATASET / "nnUNetPlans.json").read_text())
    n = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"]
    assert ckpt["relkd"]["settings"]["teacher_taps"] == [f"encoder.stages.{n - 1}", f"decoder.stages.{n - 2}"]


@needs_nnunet
def test_each_kd_term_is_logged(pipeline):
    ckpt = torch.load(pipeline["student"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logs = sorted(pipeline["student"].glob("training_log_*.txt"))
    text = "".join(p.read_text() for p in logs)
    for term in ("logits", "km", "aa"):
        values = ckpt["logging"][f"train_kd_{term}"]
        assert len(values) == 1 and np.isfinite(values[0]) and values[0] > 0, (term, values)
        assert f"train_kd_{term} " in text and f"train_kd_{term} " in pipeline["log"]
    assert "relational KD: teacher nnunet" in text


@needs_nnunet
def test_predict_with_the_student_trainer(pipeline):
    (out,) = sorted(pipeline["pred"].glob("*.nii.gz"))
    assert out.name == "HK_Case00.nii.gz"
    src = nib.load(pipeline["work"] / "raw" / DATASET / "imagesTs" / "HK_Case00_0000.nii.gz")
    seg = nib.load(out)
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
