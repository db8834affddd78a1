"""Loading and freezing the teacher network."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["load_teacher", "freeze", "strip_wrappers", "teacher_required"]

TEACHER_HOWTO = (
    "Train the teacher bundle first: "
    "`python -m monai.bundle run training --config_file bundles/prostate_mri_teacher/configs/train.json "
    "--bundle_root bundles/prostate_mri_teacher`, "
    "or pass an existing checkpoint with `--teacher_ckpt PATH`."
)

_STATE_KEYS = ("model", "network", "state_dict")


def strip_wrappers(module: nn.Module) -> nn.Module:
    """Return the module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``torch.compile`` kept)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def freeze(network: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and switch to eval mode; returns ``network``."""
    network.requires_grad_(False)
    return network.eval()


def load_teacher(network: nn.Module, checkpoint: str | os.PathLike, strict: bool = True) -> nn.Module:
    """
    Load teacher weights into ``network``, freeze it and set eval mode.

    The checkpoint is read with ``torch.load(checkpoint, map_location="cpu", weights_only=True)`` and may be

        - a flat state dict (what MONAI's ``CheckpointSaver`` writes for ``save_dict={"model": net}``), or
        - a dict holding the state dict under ``"model"``, ``"network"`` or ``"state_dict"`` (first found).

    A ``"module."`` prefix on every key (saved from a DDP-wrapped model) is stripped.

    Example::

        teacher = load_teacher(monai.networks.nets.UNet(2, 1, 2, (16, 32, 64), (2, 2)), "models/teacher.pt")

    Args:
        network: the teacher architecture (DDP/DataParallel wrappers are removed).
        checkpoint: path to the ``.pt`` file.
        strict: passed to ``load_state_dict``.

    Returns:
        the unwrapped ``network`` with weights loaded, ``requires_grad=False`` and in eval mode.

    Raises:
        FileNotFoundError: the checkpoint does not exist (the message says how to get one).
        ValueError: the file does not hold a state dict.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Teacher checkpoint not found: {path!r}. {TEACHER_HOWTO}")
    network = strip_wrappers(network)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping):
        for key in _STATE_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path!r} does not hold a state dict (a flat mapping of tensors, or one under "
            f"{'/'.join(_STATE_KEYS)}); got keys {list(state)[:8] if isinstance(state, Mapping) else type(state)}."
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    network.load_state_dict(state, strict=strict)
    return freeze(network)


_LAMBDAS = ("lambda_logits", "lambda_km", "lambda_aa")


def teacher_required(distillation: Any) -> bool:
    """Whether a distillation setup needs the teacher at all: any of its lambdas above 0, or any further term
    (``terms``) with a weight above 0.

    Args:
        distillation: the bundle's ``distillation`` section (a mapping), or a loss: its ``teacher_required``
            attribute when it has one (``WeightedDistillationLoss``), else its ``lambda_*`` attributes.

    With every lambda at 0 the student trains on ``L_seg`` alone (the no-distillation baseline): the teacher is
    neither loaded nor run. Bundle config::

        "teacher": "$monai_relkd.engines.load_teacher(@distillation#teacher#network_def, @teacher_ckpt)
                    if monai_relkd.engines.teacher_required(@distillation) else None"
    """
    if not isinstance(distillation, Mapping):
        flag = getattr(distillation, "teacher_required", None)
        if isinstance(flag, bool):
            return flag
        return any(float(getattr(distillation, k, 0.0) or 0.0) > 0 for k in _LAMBDAS)
    if any(float(distillation.get(k, 0.0) or 0.0) > 0 for k in _LAMBDAS):
        return True
    return any(_term_weight(term) > 0 for term in (distillation.get("terms") or {}).values())


def _term_weight(term: Any) -> float:
    """The weight of a further term: a ``DistillationTerm`` or its (raw or resolved) config mapping."""
    weight = term.get("weight", 1.0) if isinstance(term, Mapping) else getattr(term, "weight", 1.0)
    try:
        return float(weight)
    except (TypeError, ValueError):  # an unresolved reference: assume it is on
        return 1.0
