"""nnU-Net v2 integration (optional extra ``pip install "monai-relkd[nnunet]"``).

- :mod:`monai_relkd.nnunet.trainers`: ``nnUNetTrainerRelKD_{ENet,ESPNet,ERFNet}`` (a small student distilled from
  a frozen teacher inside nnU-Net's own pipeline), ``nnUNetTrainerStudent_*`` (the same students without
  distillation) and ``nnUNetTrainerRelKDTeacher`` (nnU-Net's default trainer with an env-configurable schedule).
  Needs ``nnunetv2``; nnU-Net finds them through ``nnUNet_extTrainer`` (:func:`extension_path`).
- :mod:`monai_relkd.nnunet.convert`: the six-site layout (or the synthetic set) as an nnU-Net raw dataset with
  the leave-one-site-out split (``relkd to-nnunet``). Needs only nibabel.
- :mod:`monai_relkd.nnunet.config`: how the distillation settings are read (class attributes, JSON, env).

Importing this package does not import nnU-Net.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["extension_path", "nnunet_path_command"]


def extension_path() -> str:
    """The folder to export as ``nnUNet_extTrainer`` so that nnU-Net finds the monai-relkd trainers."""
    return str(Path(__file__).resolve().parent / "ext")


def nnunet_path_command() -> str:
    """Print the value for ``nnUNet_extTrainer``: ``export nnUNet_extTrainer=$(relkd nnunet-path)``."""
    return extension_path()
