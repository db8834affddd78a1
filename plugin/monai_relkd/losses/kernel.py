# Licensed under the Apache License, Version 2.0 (the "License").
"""Kernel (Gram) matrix distillation with a learnable 1x1 connector on the student features."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.modules.loss import _Loss

from .logits import _compute_dtype, _no_autocast

__all__ = ["KernelMatrixLoss"]


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


class KernelMatrixLoss(_Loss):
    """
    Kernel matrix (channel Gram / style matrix) distillation.

    Per sample, the feature map is flattened to ``F ∈ R^{C×N}`` (N pixels) and its Gram matrix is
    ``G = F Fᵀ / N`` (C×C). The student features first pass a learnable 1×1 connector (channel mixing
    ``C_s -> C_t``: ``y = W x + b`` at every pixel) so both Gram matrices are ``C_t × C_t``:

    .. math::

        L = \\frac{1}{B} \\sum_b \\frac{\\| G_s^{(b)} - G_t^{(b)} \\|_F^2}{C_t^2}

    The Gram matrix does not depend on the spatial size, so student and teacher taps may differ in
    resolution (and in the number of spatial dims' sizes, not in the number of spatial dims).

    The connector is the module's own ``nn.Parameter`` pair ``connector_weight`` (C_t, C_s) and
    ``connector_bias`` (C_t,), applied with ``einsum`` so the same module serves 2-D and 3-D features; it
    is returned by ``loss.parameters()`` and must be given to the optimizer together with the student.
    When ``student_channels == teacher_channels`` it is initialised to the identity (W = I, b = 0), so equal
    features give exactly zero at initialisation; otherwise it is initialised like ``nn.Conv2d`` with a 1×1
    kernel (Kaiming-uniform). The teacher features are a fixed target: they are detached. The Gram matrices
    and the reduction are computed in float32 (float64 for float64 inputs), also under ``torch.autocast``.

    Shapes:
        - ``student_features``: (B, C_s, *S_s), S_s = (H, W) or (D, H, W).
        - ``teacher_features``: (B, C_t, *S_t), same B and number of spatial dims; S_t may differ from S_s.
        - output: scalar tensor.

    Example::

        >>> import torch
        >>> from monai_relkd.losses import KernelMatrixLoss
        >>> loss = KernelMatrixLoss(student_channels=16, teacher_channels=64)
        >>> f_s = torch.randn(2, 16, 32, 32, requires_grad=True)
        >>> f_t = torch.randn(2, 64, 16, 16)
        >>> value = loss(f_s, f_t)
        >>> value.backward()  # gradients reach f_s and loss.connector_weight / loss.connector_bias
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        """
        Args:
            student_channels: number of channels ``C_s`` of the student feature map.
            teacher_channels: number of channels ``C_t`` of the teacher feature map.

        Raises:
            ValueError: when a channel count is not a positive int.
        """
        super().__init__()
        self.student_channels = _check_positive_int("student_channels", student_channels)
        self.teacher_channels = _check_positive_int("teacher_channels", teacher_channels)
        self.connector_weight = nn.Parameter(torch.empty(teacher_channels, student_channels))
        self.connector_bias = nn.Parameter(torch.empty(teacher_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity when ``C_s == C_t``, otherwise the default initialisation of a 1×1 ``nn.Conv``."""
        with torch.no_grad():
            if self.student_channels == self.teacher_channels:
                self.connector_weight.copy_(torch.eye(self.teacher_channels))
                self.connector_bias.zero_()
            else:
                nn.init.kaiming_uniform_(self.connector_weight, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(self.student_channels)
                nn.init.uniform_(self.connector_bias, -bound, bound)

    def connector(self, student_features: torch.Tensor) -> torch.Tensor:
        """Apply the 1×1 connector: (B, C_s, *S) -> (B, C_t, *S), in the dtype of the input."""
        w = self.connector_weight.to(student_features.dtype)
        b = self.connector_bias.to(student_features.dtype)
        y = torch.einsum("oc,bc...->bo...", w, student_features)
        # contiguous: the Gram matmul then sees the same memory layout as for the teacher (bit-equal results)
        return (y + b.view(1, -1, *([1] * (student_features.ndim - 2)))).contiguous()

    @staticmethod
    def gram(features: torch.Tensor) -> torch.Tensor:
        """Per-sample Gram matrix ``F Fᵀ / N`` of (B, C, *S) features: (B, C, C)."""
        flat = features.reshape(features.shape[0], features.shape[1], -1)
        return torch.matmul(flat, flat.transpose(1, 2)) / flat.shape[-1]

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_features: (B, C_s, *S_s).
            teacher_features: (B, C_t, *S_t).

        Raises:
            ValueError: when a channel count differs from the one given at construction, or the batch sizes
                or numbers of spatial dims differ.
        """
        if student_features.ndim < 3 or teacher_features.ndim < 3:
            raise ValueError(
                "features must be (B, C, *S) with at least 3 dims, got student "
                f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}."
            )
        if student_features.ndim != teacher_features.ndim:
            raise ValueError(
                f"student and teacher features must have the same number of dims, got student "
                f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}."
            )
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(
                f"batch sizes differ: student {student_features.shape[0]}, teacher {teacher_features.shape[0]}."
            )
        if student_features.shape[1] != self.student_channels:
            raise ValueError(
                f"student_features: expected {self.student_channels} channels, got {student_features.shape[1]} "
                f"(shape {tuple(student_features.shape)})."
            )
        if teacher_features.shape[1] != self.teacher_channels:
            raise ValueError(
                f"teacher_features: expected {self.teacher_channels} channels, got {teacher_features.shape[1]} "
                f"(shape {tuple(teacher_features.shape)})."
            )
        dtype = _compute_dtype(student_features, teacher_features)
        with _no_autocast(student_features.device):
            projected = self.connector(student_features.to(dtype))
            g_s = self.gram(projected)
            g_t = self.gram(teacher_features.detach().to(dtype))
            per_sample = (g_s - g_t).pow(2).sum(dim=(1, 2)) / float(self.teacher_channels**2)
            return per_sample.mean()
