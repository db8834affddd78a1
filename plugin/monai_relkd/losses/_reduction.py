# Licensed under the Apache License, Version 2.0 (the "License").
"""MONAI-style ``reduction`` of per-sample loss values, shared by the distillation losses."""

from __future__ import annotations

import torch
from monai.utils import LossReduction

__all__ = ["check_reduction", "reduce_per_sample"]

_REDUCTIONS = tuple(r.value for r in LossReduction)


def check_reduction(reduction: LossReduction | str) -> str:
    """The reduction as a plain string (``"mean"``, ``"sum"`` or ``"none"``); a clear error for anything else."""
    value = reduction.value if isinstance(reduction, LossReduction) else reduction
    if value not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}.')
    return value


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) per-sample values -> scalar mean, scalar sum, or the (B,) tensor itself for ``"none"``."""
    if reduction == LossReduction.MEAN.value:
        return per_sample.mean()
    if reduction == LossReduction.SUM.value:
        return per_sample.sum()
    return per_sample
