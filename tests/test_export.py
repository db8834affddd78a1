"""``relkd export`` (TorchScript and ONNX; needs the onnx extra, which the CI installs), ``OnnxRuntimeNetwork`` and the students' ``configs/inference_onnx.json``.

The bundle is a scratch copy of ``prostate_mri_student_enet`` whose ENet is trained for a few steps on one synthetic
volume, so that its mask holds both classes (randomly initialised, it calls nearly every voxel prostate and any
comparison of masks would be trivially equal).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_relkd.export import ExportMismatch, export_bundle, load_bundle_network, volume_slices
from monai_relkd.inference import InferenceFailed, OnnxRuntimeNetwork, check_onnx_model

REPO = Path(__file__).resolve().parents[1]
STUDENTS = sorted(REPO.glob("bundles/prostate_mri_student_*"))
NAME = "prostate_mri_student_enet"
IMAGE_SIZE = 32
TRAIN_STEPS = 30


def _train_briefly(image: Path, label: Path) -> dict:
    """ENet trained for TRAIN_STEPS Adam steps on the axial slices of one volume (resized to IMAGE_SIZE)."""
    from monai.losses import DiceCELoss

    from monai_relkd.networks import ENet

    def slices(path: Path, mode: str) -> torch.Tensor:
        vol = torch.as_tensor(np.asanyarray(nib.load(str(path)).dataobj), dtype=torch.float32)
        vol = vol.permute(2, 0, 1)[:, None]  # (D, 1, H, W)
        return torch.nn.functional.interpolate(vol, size=(IMAGE_SIZE, IMAGE_SIZE), mode=mode)

    x = slices(image, "area")
    x = (x - x.mean()) / x.std()
    y = (slices(label, "nearest") > 0).float()
    torch.manual_seed(0)
    net = ENet(in_channels=1, out_channels=2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss(net(x), y).backward()
        optimizer.step()
    return net.state_dict()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from monai_relkd.data.synthetic import generate_six_site_dataset

    root = tmp_path_factory.mktemp("export")
    generate_six_site_dataset(root / "data", scale=0.05, size=IMAGE_SIZE * 2, seed=0)
    image = sorted((root / "data" / "HK").glob("Case*[0-9].nii.gz"))[0]
    label = next(image.parent.glob(image.name.replace(".nii.gz", "_[Ss]egmentation.nii.gz")))
    path = root / NAME
    shutil.copytree(REPO / "bundles" / NAME, path, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    (path / "models").mkdir()
    torch.save(_train_briefly(image, label), path / "models" / "model.pt")
    return {"path": path, "image": image, "root": root}


def test_inference_onnx_config_is_the_same_in_every_student():
    texts = {b.name: (b / "configs" / "inference_onnx.json").read_text() for b in STUDENTS}
    assert len(STUDENTS) == 3 and len(set(texts.values())) == 1, sorted(texts)
    config = json.loads(next(iter(texts.values())))
    assert config["network"]["_target_"] == "monai_relkd.inference.OnnxRuntimeNetwork"


def test_export_onnx_and_torchscript_match_the_eager_model(bundle, tmp_path):
    path, image = bundle["path"], bundle["image"]
    eager = load_bundle_network(path)

    onnx = export_bundle(path, "onnx", image=image, image_size=IMAGE_SIZE, opset=18)
    assert onnx["path"] == str(path / "models" / "model.onnx") and onnx["opset"] == 18
    ts = export_bundle(path, "torchscript", out=tmp_path / "enet.ts", image=image, image_size=IMAGE_SIZE)
    depth = nib.load(str(image)).shape[2]
    for result in (onnx, ts):
        assert result["slices"] == (depth, 1, IMAGE_SIZE, IMAGE_SIZE)
        assert 0.0 <= result["max_abs_diff"] <= 1e-4

    # each file on its own, at a batch and in-plane size other than the volume's: the axes are dynamic
    x = torch.randn(3, 1, 40, 24)
    with torch.inference_mode():
        reference = eager(x)
        from_onnx = OnnxRuntimeNetwork(onnx["path"], num_threads=1)(x)
        from_ts = torch.jit.load(ts["path"])(x)
    assert from_onnx.shape == reference.shape == (3, 2, 40, 24)
    torch.testing.assert_close(from_onnx, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(from_ts, reference, atol=1e-5, rtol=0)


def test_export_refuses_a_mismatch_and_writes_nothing(bundle, tmp_path, monkeypatch):
    import monai_relkd.export as export

    monkeypatch.setattr(export, "_max_abs_difference", lambda *args: 0.5)
    out = tmp_path / "bad.ts"
    with pytest.raises(ExportMismatch, match=r"differs from the eager model by up to 0\.5.*nothing was written"):
        export_bundle(bundle["path"], "torchscript", out=out, image=bundle["image"], image_size=IMAGE_SIZE)
    assert not out.exists()
    with pytest.raises(ValueError, match="format must be one of"):
        export_bundle(bundle["path"], "tflite")


def test_relkd_export_cli_prints_the_difference(bundle, tmp_path):
    out = tmp_path / "cli.ts"
    proc = subprocess.run(
        [sys.executable, "-m", "monai_relkd.cli", "export", "--bundle", str(bundle["path"]), "--format", "torchscript",
         "--out", str(out), "--image", str(bundle["image"]), "--image_size", str(IMAGE_SIZE)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"relkd export: {out} (torchscript)" in proc.stdout
    assert "max |exported - eager| = " in proc.stdout and out.is_file()


def test_inference_onnx_segments_like_the_eager_inference(bundle, tmp_path):
    """``python -m monai.bundle run --config_file "['configs/inference.json','configs/inference_onnx.json']"`` writes
    the mask the eager ``inference.json`` writes."""
    path, image = bundle["path"], bundle["image"]
    if not (path / "models" / "model.onnx").is_file():
        export_bundle(path, "onnx", image=image, image_size=IMAGE_SIZE)
    masks = {}
    for variant, configs in (("eager", ["inference.json"]), ("onnx", ["inference.json", "inference_onnx.json"])):
        config_file = str([str(path / "configs" / c) for c in configs]).replace('"', "'")
        out = tmp_path / variant
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", str(path),
             "--input_path", str(image),
             "--image_size", str(IMAGE_SIZE), "--output_dir", str(out), "--device", "cpu"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        written = out / image.name.replace(".nii.gz", "_seg.nii.gz")
        masks[variant] = np.asanyarray(nib.load(str(written)).dataobj)
    eager, onnx = masks["eager"], masks["onnx"]
    assert eager.shape == onnx.shape == nib.load(str(image)).shape
    assert 0.001 < eager.mean() < 0.999, "the check needs a mask with both classes"
    agreement = float((eager == onnx).mean())
    assert agreement >= 0.999, f"ONNX and eager masks agree on {agreement:.4%} of the voxels"


def test_a_missing_onnx_model_names_the_file_and_the_export_command(tmp_path):
    missing = tmp_path / "models" / "model.onnx"
    with pytest.raises(InferenceFailed, match=f"{missing}: ONNX model not found.*relkd export"):
        check_onnx_model(missing)
    with pytest.raises(FileNotFoundError, match="relkd export --format onnx"):
        OnnxRuntimeNetwork(missing)
    with pytest.raises(ValueError, match="graph_optimization_level"):
        OnnxRuntimeNetwork(missing, graph_optimization_level="fast")


def test_volume_slices_follow_the_inference_preprocessing(bundle):
    slices = volume_slices(bundle["path"], bundle["image"], image_size=IMAGE_SIZE)
    assert slices.dtype == torch.float32 and slices.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert abs(float(slices.mean())) < 0.1 and 0.5 < float(slices.std()) < 1.05  # z-scored, then area-resized
