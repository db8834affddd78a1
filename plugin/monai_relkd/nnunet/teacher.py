"""The frozen teacher of the nnU-Net trainers: a trained nnU-Net model folder, or a teacher bundle checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_relkd.engines.taps import FeatureTaps
from monai_relkd.engines.teacher import freeze, load_teacher

__all__ = ["Teacher", "load_nnunet_teacher", "load_bundle_teacher", "load_any_teacher", "default_nnunet_taps"]

#: Taps of the bundle teacher (DeepLabV3+), as in the student bundles' ``distillation.taps``.
BUNDLE_TEACHER_TAPS = ["aspp", "decoder"]


@dataclass
class Teacher:
    """A frozen teacher network, where it came from, and its default taps."""

    network: nn.Module
    source: str
    kind: str  # "nnunet" or "bundle"
    default_taps: list[str]
    spacing: tuple[float, ...] | None = None


def default_nnunet_taps(network: nn.Module) -> list[str]:
    """
    Default taps of an nnU-Net U-Net (``PlainConvUNet``, ``ResidualEncoderUNet``): the deepest encoder stage (the
    bottleneck, paired with the student's deepest encoder tap) and the last decoder stage (full-resolution
    features before the segmentation head, paired with the student's decoder tap).

    Raises:
        ValueError: the network has no ``encoder.stages`` / ``decoder.stages`` (set ``RELKD_TEACHER_TAPS``).
    """
    modules = dict(network.named_modules())
    enc, dec = modules.get("encoder.stages"), modules.get("decoder.stages")
    if not isinstance(enc, nn.Sequential) or not isinstance(dec, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"teacher {type(network).__name__} has no encoder.stages/decoder.stages: name its taps with "
            "RELKD_TEACHER_TAPS (module names of named_modules())."
        )
    return [f"encoder.stages.{len(enc) - 1}", f"decoder.stages.{len(dec) - 1}"]


def load_nnunet_teacher(
    model_folder: str | os.PathLike, fold: int | str, checkpoint_name: str, device: torch.device
) -> Teacher:
    """
    Load a trained nnU-Net model (``$nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<config>``) with nnU-Net's
    own predictor (so any trainer's ``build_network_architecture`` is honoured), frozen, deep supervision off.

    Raises:
        FileNotFoundError: the folder lacks ``plans.json``/``dataset.json`` or the fold's checkpoint (the message
            lists the folds and checkpoints found).
    """
    folder = Path(model_folder).expanduser().resolve()
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"teacher {str(folder)!r} is not a trained nnU-Net model folder: {name} is missing. Expected "
                "$nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration> (from nnUNetv2_train)."
            )
    fold_dir = folder / (f"fold_{fold}")
    if not (fold_dir / checkpoint_name).is_file():
        found = sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/*.pth"))
        raise FileNotFoundError(
            f"teacher checkpoint {str(fold_dir / checkpoint_name)!r} not found (found: {found or 'none'}); "
            "set RELKD_TEACHER_FOLD / RELKD_TEACHER_CHECKPOINT."
        )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(fold,), checkpoint_name=checkpoint_name)
    network = freeze(predictor.network.to(device))
    return Teacher(
        network=network,
        source=str(fold_dir / checkpoint_name),
        kind="nnunet",
        default_taps=default_nnunet_taps(network),
        spacing=tuple(float(s) for s in predictor.configuration_manager.spacing),
    )


def load_bundle_teacher(
    checkpoint: str | os.PathLike, in_channels: int, out_channels: int, device: torch.device, **network_kwargs: Any
) -> Teacher:
    """
    Load the teacher bundle's DeepLabV3+ (``bundles/prostate_mri_teacher/models/model.pt``), frozen.

    The bundle teacher was trained on MONAI-preprocessed slices (its own spacing and intensity normalisation);
    nnU-Net feeds it nnU-Net-preprocessed patches, so prefer an nnU-Net teacher when one can be trained.
    """
    from monai_relkd.networks import DeepLabV3Plus

    kwargs = {"backbone": "resnet50", "output_stride": 16, **network_kwargs}
    network = load_teacher(DeepLabV3Plus(in_channels=in_channels, out_channels=out_channels, **kwargs), checkpoint)
    return Teacher(network=network.to(device), source=str(checkpoint), kind="bundle", default_taps=list(BUNDLE_TEACHER_TAPS))


def load_any_teacher(
    path: str, fold: int | str, checkpoint_name: str, in_channels: int, out_channels: int, device: torch.device
) -> Teacher:
    """
    A folder is an nnU-Net model folder, a file a teacher bundle checkpoint.

    Raises:
        FileNotFoundError: nothing at ``path`` (the message says how to set it).
    """
    if not path:
        raise FileNotFoundError(
            "no teacher given: set RELKD_TEACHER to a trained nnU-Net model folder "
            "($nnUNet_results/DatasetXXX/nnUNetTrainer__nnUNetPlans__2d) or to a teacher bundle checkpoint (.pt)."
        )
    p = Path(path).expanduser()
    if p.is_dir():
        return load_nnunet_teacher(p, fold, checkpoint_name, device)
    if p.is_file():
        return load_bundle_teacher(p, in_channels, out_channels, device)
    raise FileNotFoundError(
        f"teacher {path!r} does not exist: RELKD_TEACHER must name a trained nnU-Net model folder or a teacher "
        "bundle checkpoint file."
    )


def tap_channels(network: nn.Module, names: list[str], in_channels: int, patch: tuple[int, ...], device: torch.device) -> list[int]:
    """
    Channels of each tapped module, from one forward pass of a zero patch (1, in_channels, *patch) under
    ``no_grad`` (the network is put in eval mode for it and restored).
    """
    was_training = network.training
    network.eval()
    try:
        with FeatureTaps(network, names, detach=True) as taps, torch.no_grad():
            network(torch.zeros((1, in_channels, *patch), device=device))
            return [int(f.shape[1]) for f in taps.features()]
    finally:
        network.train(was_training)
