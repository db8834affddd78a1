"""Inference input checks: every bad file of a folder is named with its cause before the network runs, the good files
are still segmented, outputs are never re-read, and the run ends non-zero with the list - not MONAI's traceback."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES, subprocess_env
from monai_relkd.demo import run_bundle
from monai_relkd.inference import InferenceFailed, InputCheckError, check_image_header, check_weights
from monai_relkd.networks import ENet

STUDENT = BUNDLES / "prostate_mri_student_enet"
AFFINE = np.diag([0.6, 0.6, 3.0, 1.0])


def _volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (32, 32, 6)).astype(np.float32)
    img[10:22, 10:22, 1:5] += 80
    return img


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def _lying_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A small .nii.gz whose header declares ``shape`` (float32) but holds 4x4x4 voxels."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes()))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.manual_seed(0)
    torch.save(ENet(in_channels=1, out_channels=2).state_dict(), path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    _save(d / "good_a.nii.gz", _volume())
    _save(d / "good_b.nii", _volume()[::-1].copy())
    nan = _volume()
    nan[3:6, 3:6, 2] = np.nan
    _save(d / "nan_patch.nii.gz", nan)
    _lying_header(d / "huge_header.nii.gz", (5000, 5000, 200))
    _lying_header(d / "lying_size.nii.gz", (500, 500, 200))
    raw = (d / "good_b.nii").read_bytes()
    (d / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    _save(d / "series4d.nii.gz", np.stack([_volume()] * 3, axis=-1))
    (d / "not_nifti.nii.gz").write_bytes(b"\x1f\x8b this is not gzip")
    _save(d / "good_a_seg.nii.gz", np.zeros((32, 32, 6), np.uint8))  # an output of an earlier run
    return d


BAD = {
    "nan_patch.nii.gz": "NaN or Inf",
    "huge_header.nii.gz": "above the limit",
    "lying_size.nii.gz": "compressed file has only",
    "truncated.nii": "truncated",
    "series4d.nii.gz": "4-D series or multi-channel",
    "not_nifti.nii.gz": "not a readable NIfTI",
}


def test_header_checks_name_the_file_and_allocate_nothing(folder):
    assert check_image_header(folder / "good_a.nii.gz") == (32, 32, 6)
    for name in ("huge_header.nii.gz", "lying_size.nii.gz", "truncated.nii", "series4d.nii.gz", "not_nifti.nii.gz"):
        with pytest.raises(InputCheckError) as err:
            check_image_header(folder / name)
        assert str(err.value).startswith(str(folder / name)) and BAD[name] in str(err.value), str(err.value)
    with pytest.raises(InputCheckError, match="above the limit of 1e-05 GiB"):
        check_image_header(folder / "good_a.nii.gz", max_image_gib=1e-5)


def test_a_folder_with_bad_files_segments_the_rest_and_fails_listing_them(folder, weights):
    """Output folder == input folder, run twice: outputs are never inputs; the error's first line is the cause."""
    configs = STUDENT / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(STUDENT), "--input_path", str(folder),
           "--output_dir", str(folder), "--ckpt_path", str(weights), "--image_size", "32", "--device", "cpu"]
    env = subprocess_env()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()
        head = next(i for i, line in enumerate(last) if line.startswith("inference: "))
        assert last[head] == "inference: 6 of 8 file(s) could not be segmented (2 segmented):", last[head:]
        listed = "\n".join(last[head + 1:])
        for name, cause in BAD.items():
            assert f"  {folder / name}: " in listed, listed
            assert cause in listed.split(f"  {folder / name}: ", 1)[1].splitlines()[0], listed
        assert "Traceback" not in "\n".join(last[head:]) and "ConfigExpression" not in "\n".join(last[head:])
        written = sorted(p.name for p in folder.iterdir() if p.name not in before)
        assert written == ["good_b_seg.nii.gz"], written  # good_a_seg existed: overwritten, not segmented again
        assert not (folder / "good_a_seg_seg.nii.gz").exists()
    for name, data in before.items():
        if name != "good_a_seg.nii.gz":
            assert (folder / name).read_bytes() == data, f"input {name} was modified"
    mask = nib.load(str(folder / "good_b_seg.nii.gz"))
    assert mask.shape == (32, 32, 6) and set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


def test_nonfinite_replace_mode_segments_with_a_warning(folder, weights, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        run_bundle(STUDENT, ["inference.json"], input_path=str(folder / "nan_patch.nii.gz"), output_dir=str(out),
                   ckpt_path=str(weights), image_size=32, device="cpu", nonfinite="replace")
    assert "replaced 9 NaN/Inf voxel(s)" in caplog.text and "nan_patch.nii.gz" in caplog.text
    assert [p.name for p in out.iterdir()] == ["nan_patch_seg.nii.gz"]


def test_truncated_or_foreign_weights_are_refused_naming_the_file(weights, tmp_path, folder):
    cut = tmp_path / "model.pt"
    cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(InferenceFailed) as err:
        run_bundle(STUDENT, ["inference.json"], input_path=str(folder / "good_a.nii.gz"), output_dir=str(tmp_path),
                   ckpt_path=str(cut), image_size=32, device="cpu")
    assert str(err.value).startswith(f"{cut}: cannot load the weights") and "truncated or corrupt" in str(err.value)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Conv2d(1, 2, 3).state_dict(), other)
    with pytest.raises(InferenceFailed, match="do not match the bundle's network ENet"):
        check_weights(other, ENet(1, 2))
    with pytest.raises(InferenceFailed, match="weights not found"):
        check_weights(tmp_path / "absent.pt")
    assert set(check_weights(weights, ENet(1, 2))) == set(ENet(1, 2).state_dict())
