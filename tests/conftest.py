"""Shared fixtures and helpers: every test runs on CPU with a fixed seed and small tensors.

Test modules import the plain helpers with ``from conftest import ...`` (pytest puts ``tests/`` on ``sys.path``
because it has no ``__init__.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PLUGIN = str(REPO / "plugin")

#: Tap names of :func:`toy_teacher` and :func:`toy_student`; shapes for a (B, 1, 32, 32) input in the comments.
TOY_TEACHER_TAPS = ["model.1.submodule.0", "model.1.submodule.1.submodule.0"]  # (B, 16, 8, 8), (B, 32, 4, 4)
TOY_STUDENT_TAPS = ["model.0", "model.1.submodule.0"]  # (B, 4, 16, 16), (B, 8, 8, 8)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a test subprocess: one OpenMP thread, this checkout's ``plugin/`` first on ``PYTHONPATH``,
    then ``extra``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = PLUGIN + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def toy_teacher() -> torch.nn.Module:
    """A small 2-D MONAI ``UNet`` teacher (1 -> 2 channels, 4 levels); taps :data:`TOY_TEACHER_TAPS`."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                num_res_units=1)


def toy_student() -> torch.nn.Module:
    """A smaller 2-D MONAI ``UNet`` student (1 -> 2 channels, 3 levels); taps :data:`TOY_STUDENT_TAPS`."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def assert_mask_like(image: Path, out: Path) -> None:
    """``out`` holds exactly one mask, ``<image name>_seg.nii.gz``, with ``image``'s shape and affine and values in
    {0, 1}."""
    import nibabel as nib
    import numpy as np

    written = list(Path(out).glob("*.nii.gz"))
    assert [p.name for p in written] == [image.name.replace(".nii.gz", "_seg.nii.gz")]
    src, mask = nib.load(str(image)), nib.load(str(written[0]))
    assert mask.shape == src.shape
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
