"""``relkd new-student`` end to end, for networks the house has never seen: MONAI's ``UNet`` and ``SegResNet`` become
bundles that ``python -m monai.bundle`` verifies, trains for a few steps against the teacher bundle (its network
and a checkpoint of it) and runs inference with, all at toy size on the synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "bundles" / "prostate_mri_teacher"
IMAGE_SIZE = 32

NETWORKS = {
    "unet": ("monai.networks.nets.UNet",
             {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2]}),
    "segresnet": ("monai.networks.nets.SegResNet",
                  {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_filters": 8,
                   "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}),
}


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Synthetic six-site set at toy size and a checkpoint of the teacher bundle's network (its weights are not
    trained: training the student against it exercises the whole distillation path at no teacher-training cost)."""
    from monai.bundle import ConfigParser

    from monai_relkd.data.synthetic import generate_six_site_dataset

    run = tmp_path_factory.mktemp("new_student")
    generate_six_site_dataset(run / "data", scale=0.15, size=IMAGE_SIZE, seed=0)
    parser = ConfigParser()
    parser.read_config(str(TEACHER / "configs" / "train.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), run / "teacher.pt")
    return run


@pytest.mark.parametrize("key", sorted(NETWORKS))
def test_new_student_bundle_verifies_trains_against_the_teacher_and_infers(run_dir, key, tmp_path):
    network, args = NETWORKS[key]
    bundle = tmp_path / f"prostate_mri_student_{key}"
    # the spelling, dashes and all
    proc = _run(["-m", "monai_relkd.cli", "new-student", "--network", network, "--network-args", json.dumps(args),
                 "--teacher-bundle", str(TEACHER), "--out", str(bundle)], cwd=tmp_path)
    assert "candidate taps" in proc.stdout and "taps (student <-> teacher)" in proc.stdout
    taps = json.loads((bundle / "configs" / "train.json").read_text())["distillation"]["taps"]
    assert taps and all(t["student"] in proc.stdout for t in taps)

    configs = bundle / "configs"
    _run(["-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", str(configs / "metadata.json"),
          "--config_file", str(configs / "inference.json"), "--device", "cpu", "--n", "4"], cwd=tmp_path)

    _run(["-m", "monai.bundle", "run", "training", "--config_file", str(configs / "train.json"),
          "--bundle_root", str(bundle), "--dataset_dir", str(run_dir / "data"), "--test_site", "HK",
          "--image_size", str(IMAGE_SIZE), "--num_steps", "2", "--val_every_steps", "2", "--num_samples", "2",
          "--batch_size", "4", "--teacher_ckpt", str(run_dir / "teacher.pt")], cwd=tmp_path)
    ckpt = bundle / "models" / "model.pt"
    assert ckpt.is_file()
    # every distillation term was computed: the KM connectors of each tap pair were trained and saved
    last = torch.load(bundle / "models" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert len([k for k in last["loss"] if "connector" in k and k.endswith("weight")]) == len(taps), last["loss"].keys()

    image = sorted((run_dir / "data" / "HK").glob("Case*[0-9].nii.gz"))[0]
    out = tmp_path / "pred"
    _run(["-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"), "--bundle_root", str(bundle),
          "--input_path", str(image), "--image_size", str(IMAGE_SIZE), "--output_dir", str(out), "--device", "cpu"],
         cwd=tmp_path)
    written = list(out.glob("*.nii.gz"))
    assert [p.name for p in written] == [image.name.replace(".nii.gz", "_seg.nii.gz")]
    mask = nib.load(str(written[0]))
    assert mask.shape == nib.load(str(image)).shape
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([bundle.name, "pred"])  # nothing written to the cwd
