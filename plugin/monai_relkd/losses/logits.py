# Licensed under the Apache License, Version 2.0 (the "License").
"""Pixel-wise logits distillation (Hinton KD with temperature), mean over batch and pixels."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._reduction import check_reduction, reduce_per_sample

__all__ = ["LogitsDistillationLoss"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise (half/bfloat16 inputs are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` so the reductions run in the dtype we chose."""
    is_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


class LogitsDistillationLoss(_Loss):
    """
    Pixel-wise knowledge distillation on the logits (Hinton et al. 2015, as used for segmentation by EMKD):

    .. math::

        L = T^2 \\cdot \\frac{1}{B \\cdot |S|} \\sum_{b, x} \\mathrm{KL}\\big(\\mathrm{softmax}(z_t/T) \\,\\|\\,
        \\mathrm{softmax}(z_s/T)\\big)

    The KL divergence sums over the K classes at each pixel; per sample it is averaged over all pixels, so it does
    not grow with the image size, and ``reduction`` combines the samples (``"mean"``: the formula above). The factor ``T²`` keeps the gradient scale independent
    of the temperature. The teacher logits are a fixed target: they are detached. The computation runs in
    float32 (float64 if an input is float64), also under ``torch.autocast``.

    Shapes:
        - ``student_logits``: (B, K, *S) with S one spatial size (H, W) or (D, H, W).
        - ``teacher_logits``: (B, K, *S), the same shape.
        - output: scalar for ``reduction="mean"``/``"sum"``, (B,) per-sample values for ``"none"``.

    Example::

        >>> import torch
        >>> from monai_relkd.losses import LogitsDistillationLoss
        >>> loss = LogitsDistillationLoss(temperature=4.0)
        >>> z_s = torch.randn(2, 3, 32, 32, requires_grad=True)
        >>> z_t = torch.randn(2, 3, 32, 32)
        >>> value = loss(z_s, z_t)  # scalar, >= 0
        >>> value.backward()
    """

    def __init__(self, temperature: float = 4.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        """
        Args:
            temperature: softmax temperature ``T`` (> 0). Defaults to 4.
            reduction: ``"mean"`` (default) or ``"sum"`` over the batch, or ``"none"`` for per-sample values (B,).

        Raises:
            ValueError: when ``temperature`` is not a finite positive number or ``reduction`` is unknown.
        """
        super().__init__(reduction=check_reduction(reduction))
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: student logits (B, K, *S).
            teacher_logits: teacher logits (B, K, *S).

        Raises:
            ValueError: when the inputs have fewer than 3 dimensions or different shapes.
        """
        if student_logits.ndim < 3:
            raise ValueError(
                f"student_logits must be (B, K, *S) with at least 3 dims, got {tuple(student_logits.shape)}."
            )
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student_logits and teacher_logits must have the same shape, "
                f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
            )
        dtype = _compute_dtype(student_logits, teacher_logits)
        t = self.temperature
        with _no_autocast(student_logits.device):
            log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=1)
            log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / t, dim=1)
            # KL(p_t || p_s) = sum_k p_t (log p_t - log p_s); summed over classes, mean over pixels per sample
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
            per_sample = kl.reshape(kl.shape[0], -1).mean(dim=1) * (t * t)
            return reduce_per_sample(per_sample, self.reduction)
