# Licensed under the Apache License, Version 2.0 (the "License").
"""Kernel (Gram) matrix distillation with a learnable 1x1 connector on the student features; scale-free by default."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._reduction import check_reduction, reduce_per_sample
from .logits import _compute_dtype, _no_autocast

__all__ = ["KernelMatrixLoss", "GRAM_NORMALIZATIONS"]

#: ``normalize`` choices: unit Frobenius norm (default), ICKD row-normalised, none (the original, scale-dependent)
GRAM_NORMALIZATIONS = ("frobenius", "row", "none")
_CONNECTOR_NORMS = ("none", "batch")


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


class KernelMatrixLoss(_Loss):
    """
    Kernel matrix (channel Gram / style matrix) distillation.

    Per sample, the feature map is flattened to ``F ∈ R^{C×N}`` (N pixels) and its Gram matrix is
    ``G = F Fᵀ / N`` (C×C). The student features first pass a learnable 1×1 connector ``g`` (channel mixing
    ``C_s -> C_t``: ``y = W x + b`` at every pixel, optionally followed by BatchNorm as in ICKD) so both Gram
    matrices are ``C_t × C_t``. Each Gram matrix is then normalised (``normalize``):

    - ``"frobenius"`` (default): ``Ĝ = G / max(‖G‖_F, ε)`` and, per sample, ``L_b = ‖Ĝ_s − Ĝ_t‖²_F ∈ [0, 4]``;
    - ``"row"`` (ICKD, Liu et al. ICCV 2021): every row of ``G`` is L2-normalised,
      ``L_b = (1/C_t) Σ_i ‖ĝ_s,i − ĝ_t,i‖² ∈ [0, 4]``;
    - ``"none"``: the unnormalised form ``L_b = ‖G_s − G_t‖²_F / C_t²`` (for comparison only: it grows with the
      4th power of the feature scale, so its size depends on how large either network's activations happen to be).

    With ``"frobenius"`` and ``"row"`` the loss is invariant to a positive rescaling of either feature map, and
    (like ``G`` itself) to the spatial resolution: a map upsampled by nearest neighbour has the same Gram matrix,
    so student and teacher taps may differ in resolution (not in the number of spatial dims).

    The connector is the module's own ``nn.Parameter`` pair ``connector_weight`` (C_t, C_s) and
    ``connector_bias`` (C_t,), applied with ``einsum`` so the same module serves 2-D and 3-D features (plus a
    ``BatchNorm1d`` over the flattened pixels when ``connector_norm="batch"``); it is returned by
    ``loss.parameters()`` and must be given to the optimizer together with the student. When
    ``student_channels == teacher_channels`` it is initialised to the identity (W = I, b = 0), so equal features
    give exactly zero at initialisation (with ``connector_norm="none"``); otherwise it is initialised like
    ``nn.Conv2d`` with a 1×1 kernel (Kaiming-uniform). The teacher features are a fixed target: they are detached.
    The Gram matrices and the reduction are computed in float32 (float64 for float64 inputs), also under
    ``torch.autocast``.

    Without the BatchNorm the student's Gram matrix can be formed without the connector's C_t-channel map: with
    ``X`` the (C_s × N) features and ``m = X 1 / N``,
    ``G_s = W (X Xᵀ / N) Wᵀ + (W m) bᵀ + b (W m)ᵀ + b bᵀ``, which costs ``C_s²·N + C_t·C_s² + C_t²·C_s``
    multiply-adds per sample instead of ``C_t·C_s·N + C_t²·N``. By default (``factored=None``) each call takes the
    cheaper form for its sizes (the ENet student's decoder tap, 64 channels against 256 teacher channels: half the
    multiply-adds at 12×12, a thirteenth at 48×48); both give the same loss up to rounding.

    Shapes:
        - ``student_features``: (B, C_s, *S_s), S_s = (H, W) or (D, H, W).
        - ``teacher_features``: (B, C_t, *S_t), same B and number of spatial dims; S_t may differ from S_s.
        - output: scalar for ``reduction="mean"``/``"sum"``, (B,) per-sample values for ``"none"``.

    Example::

        >>> import torch
        >>> from monai_relkd.losses import KernelMatrixLoss
        >>> loss = KernelMatrixLoss(student_channels=16, teacher_channels=64)
        >>> f_s = torch.randn(2, 16, 32, 32, requires_grad=True)
        >>> f_t = torch.randn(2, 64, 16, 16)
        >>> value = loss(f_s, f_t)  # in [0, 4]; the same for 1000 * f_t
        >>> value.backward()  # gradients reach f_s and loss.connector_weight / loss.connector_bias
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        normalize: str = "frobenius",
        connector_norm: str | None = None,
        eps: float = 1e-12,
        factored: bool | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            student_channels: number of channels ``C_s`` of the student feature map.
            teacher_channels: number of channels ``C_t`` of the teacher feature map.
            normalize: ``"frobenius"`` (default), ``"row"`` or ``"none"``: how each Gram matrix is normalised.
            connector_norm: ``None``/``"none"`` (default) or ``"batch"``: a BatchNorm after the 1×1 connector.
            eps: lower bound of the norms divided by (guards all-zero features).
            factored: True: form the student's Gram matrix from ``X Xᵀ`` and the connector (see above); False:
                from the connector's output; None (default): whichever costs fewer multiply-adds, see
                :meth:`uses_factored`. True needs ``connector_norm`` None/"none".
            reduction: ``"mean"`` (default) or ``"sum"`` over the batch, or ``"none"`` for per-sample values (B,).

        Raises:
            ValueError: when a channel count is not a positive int, or an option is not one of its choices.
        """
        super().__init__(reduction=check_reduction(reduction))
        self.student_channels = _check_positive_int("student_channels", student_channels)
        self.teacher_channels = _check_positive_int("teacher_channels", teacher_channels)
        if normalize not in GRAM_NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {GRAM_NORMALIZATIONS}, got {normalize!r}.")
        self.normalize = normalize
        connector_norm = "none" if connector_norm is None else connector_norm
        if connector_norm not in _CONNECTOR_NORMS:
            raise ValueError(f"connector_norm must be None or one of {_CONNECTOR_NORMS}, got {connector_norm!r}.")
        self.connector_norm = connector_norm
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}.")
        self.eps = float(eps)
        if factored is not None and not isinstance(factored, bool):
            raise ValueError(f"factored must be True, False or None, got {factored!r}.")
        if factored and connector_norm == "batch":
            raise ValueError('factored=True needs connector_norm None: the BatchNorm acts on the connector\'s output.')
        self.factored = factored
        self.connector_weight = nn.Parameter(torch.empty(teacher_channels, student_channels))
        self.connector_bias = nn.Parameter(torch.empty(teacher_channels))
        self.connector_bn = nn.BatchNorm1d(teacher_channels) if connector_norm == "batch" else None
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
        if self.connector_bn is not None:
            self.connector_bn.reset_parameters()

    def connector(self, student_features: torch.Tensor) -> torch.Tensor:
        """Apply the 1×1 connector (and its BatchNorm): (B, C_s, *S) -> (B, C_t, *S), in the input's dtype."""
        w = self.connector_weight.to(student_features.dtype)
        b = self.connector_bias.to(student_features.dtype)
        y = torch.einsum("oc,bc...->bo...", w, student_features)
        # contiguous: the Gram matmul then sees the same memory layout as for the teacher (bit-equal results)
        y = (y + b.view(1, -1, *([1] * (student_features.ndim - 2)))).contiguous()
        if self.connector_bn is None:
            return y
        return self._batch_norm(y.reshape(y.shape[0], y.shape[1], -1)).reshape(y.shape)

    def _batch_norm(self, flat: torch.Tensor) -> torch.Tensor:
        """The connector's BatchNorm on (B, C_t, N) in the dtype of ``flat`` (the module's own dtype is kept)."""
        bn = self.connector_bn
        if flat.dtype == bn.weight.dtype:
            return bn(flat)
        mean, var = bn.running_mean.to(flat.dtype), bn.running_var.to(flat.dtype)
        out = F.batch_norm(
            flat, mean, var, bn.weight.to(flat.dtype), bn.bias.to(flat.dtype), bn.training, bn.momentum, bn.eps
        )
        if bn.training:  # F.batch_norm updated the float64 copies of the running statistics
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.add_(1)
        return out

    def uses_factored(self, pixels: int) -> bool:
        """Whether a call with ``pixels`` student pixels per sample forms the student's Gram matrix from ``X Xᵀ``:
        ``factored`` when set, else without the BatchNorm and when ``C_s²·N + C_t·C_s² + C_t²·C_s`` is less than
        ``C_t·C_s·N + C_t²·N``."""
        if self.factored is not None or self.connector_bn is not None:
            return bool(self.factored)
        cs, ct, n = self.student_channels, self.teacher_channels, pixels
        return cs * cs * n + ct * cs * cs + ct * ct * cs < ct * cs * n + ct * ct * n

    def student_gram(self, student_features: torch.Tensor) -> torch.Tensor:
        """The unnormalised Gram matrix of the connector's output for (B, C_s, *S) student features: (B, C_t, C_t)."""
        flat = student_features.reshape(student_features.shape[0], self.student_channels, -1)
        if not self.uses_factored(flat.shape[-1]):
            return self.gram(self.connector(student_features))
        w = self.connector_weight.to(flat.dtype)
        b = self.connector_bias.to(flat.dtype)
        u = self.gram(flat)  # (B, C_s, C_s) = X Xᵀ / N
        wm = torch.matmul(flat.mean(dim=-1), w.t())  # (B, C_t) = W m
        cross = wm.unsqueeze(2) * b.view(1, 1, -1)  # (B, C_t, C_t) = (W m) bᵀ
        return torch.matmul(torch.matmul(w, u), w.t()) + cross + cross.transpose(1, 2) + torch.outer(b, b)

    @staticmethod
    def gram(features: torch.Tensor) -> torch.Tensor:
        """Per-sample Gram matrix ``F Fᵀ / N`` of (B, C, *S) features: (B, C, C)."""
        flat = features.reshape(features.shape[0], features.shape[1], -1)
        return torch.matmul(flat, flat.transpose(1, 2)) / flat.shape[-1]

    def normalize_gram(self, g: torch.Tensor) -> torch.Tensor:
        """A (B, C, C) Gram matrix normalised as ``normalize`` says: (B, C, C)."""
        if self.normalize == "frobenius":
            norm = g.flatten(1).norm(dim=1).clamp_min(self.eps)
            return g / norm.view(-1, 1, 1)
        if self.normalize == "row":
            return F.normalize(g, p=2.0, dim=2, eps=self.eps)
        return g

    def _check_inputs(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> None:
        s, t = student_features, teacher_features
        if s.ndim < 3 or t.ndim < 3:
            raise ValueError(
                "features must be (B, C, *S) with at least 3 dims, got student "
                f"{tuple(s.shape)} and teacher {tuple(t.shape)}."
            )
        if s.ndim != t.ndim:
            raise ValueError(
                f"student and teacher features must have the same number of dims, got student "
                f"{tuple(s.shape)} and teacher {tuple(t.shape)}."
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"batch sizes differ: student {s.shape[0]}, teacher {t.shape[0]}.")
        if s.shape[1] != self.student_channels:
            raise ValueError(
                f"student_features: expected {self.student_channels} channels, got {s.shape[1]} "
                f"(shape {tuple(s.shape)})."
            )
        if t.shape[1] != self.teacher_channels:
            raise ValueError(
                f"teacher_features: expected {self.teacher_channels} channels, got {t.shape[1]} "
                f"(shape {tuple(t.shape)})."
            )

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_features: (B, C_s, *S_s).
            teacher_features: (B, C_t, *S_t).

        Raises:
            ValueError: when a channel count differs from the one given at construction, or the batch sizes
                or numbers of spatial dims differ.
        """
        self._check_inputs(student_features, teacher_features)
        dtype = _compute_dtype(student_features, teacher_features)
        with _no_autocast(student_features.device):
            g_s = self.normalize_gram(self.student_gram(student_features.to(dtype)))
            g_t = self.normalize_gram(self.gram(teacher_features.detach().to(dtype)))
            per_sample = (g_s - g_t).pow(2).sum(dim=(1, 2))
            if self.normalize == "none":
                per_sample = per_sample / float(self.teacher_channels**2)
            elif self.normalize == "row":
                per_sample = per_sample / float(self.teacher_channels)
            return reduce_per_sample(per_sample, self.reduction)
