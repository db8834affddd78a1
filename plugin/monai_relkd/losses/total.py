# Licensed under the Apache License, Version 2.0 (the "License").
"""The total distillation objective L = L_seg + λ1·L_logits + λ2·L_KM + λ3·L_AA, each term logged on its own."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.losses import DiceCELoss
from torch.nn.modules.loss import _Loss

from .affinity import AdaptiveAffinityLoss
from .kernel import KernelMatrixLoss
from .logits import LogitsDistillationLoss

__all__ = ["RelationalDistillationLoss"]

TERMS = ("loss", "seg", "logits", "km", "aa")


class RelationalDistillationLoss(_Loss):
    """
    Total loss of relation-based distillation:

    .. math::

        L = L_{seg} + \\lambda_1 L_{logits} + \\lambda_2 L_{KM} + \\lambda_3 L_{AA}

    - ``L_seg``: ``seg_loss(student_logits, label)``, by default MONAI ``DiceCELoss(to_onehot_y=True,
      softmax=True)``;
    - ``L_logits``: :class:`LogitsDistillationLoss` with ``temperature``;
    - ``L_KM``: mean over feature pairs of :class:`KernelMatrixLoss`, one per pair (its connector parameters
      are parameters of this module: give ``loss.parameters()`` to the optimizer with the student's);
    - ``L_AA``: mean over feature pairs of :class:`AdaptiveAffinityLoss` (``aa_grid``, ``pair_weights``,
      ``w_intra``, ``w_inter``, ``num_classes``).

    Feature pair i is student tap i with teacher tap i. A λ of 0 switches its term off: the term is not
    computed (it is reported as a zero tensor) and, for ``lambda_km == 0``, no connector is built. With
    ``lambda_km = lambda_aa = 0`` this is plain Hinton KD; with uniform pair weights and ``aa_grid=2`` the
    affinity term is the pair-wise loss of structured KD. Teacher logits and features are detached.

    The forward returns a dict with the keys ``"loss"`` (the weighted total, to back-propagate) and ``"seg"``,
    ``"logits"``, ``"km"``, ``"aa"`` (the unweighted terms, for logging).

    Shapes:
        - ``student_logits``, ``teacher_logits``: (B, K, *S), S = (H, W) or (D, H, W).
        - ``student_features[i]``: (B, student_channels[i], *S_i); ``teacher_features[i]``:
          (B, teacher_channels[i], *S'_i).
        - ``label``: (B, 1, *S) class indices (int or float dtype).

    Example::

        >>> import torch
        >>> from monai_relkd.losses import RelationalDistillationLoss
        >>> loss = RelationalDistillationLoss(lambda_logits=1.0, lambda_km=0.5, lambda_aa=1.0,
        ...                                   student_channels=[16], teacher_channels=[64], aa_grid=16)
        >>> z_s, z_t = torch.randn(2, 2, 64, 64, requires_grad=True), torch.randn(2, 2, 64, 64)
        >>> f_s, f_t = [torch.randn(2, 16, 32, 32, requires_grad=True)], [torch.randn(2, 64, 16, 16)]
        >>> label = torch.randint(0, 2, (2, 1, 64, 64))
        >>> out = loss(z_s, z_t, f_s, f_t, label)
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        lambda_logits: float = 1.0,
        lambda_km: float = 0.0,
        lambda_aa: float = 0.0,
        temperature: float = 4.0,
        student_channels: Sequence[int] = (),
        teacher_channels: Sequence[int] = (),
        aa_grid: int | Sequence[int] | None = None,
        pair_weights: str = "label",
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        num_classes: int = 2,
        seg_loss: nn.Module | None = None,
    ) -> None:
        """
        Args:
            lambda_logits: weight λ1 >= 0 of the logits term.
            lambda_km: weight λ2 >= 0 of the kernel matrix term.
            lambda_aa: weight λ3 >= 0 of the adaptive affinity term.
            temperature: temperature of the logits term.
            student_channels: channels of each student tap (needed when ``lambda_km > 0``).
            teacher_channels: channels of each teacher tap, same length (needed when ``lambda_km > 0``).
            aa_grid: ``grid`` of the affinity term (None: the smaller of the two sizes of each pair).
            pair_weights: ``"label"``, ``"teacher"`` or ``"uniform"`` pair weights of the affinity term.
            w_intra: weight of the intra-class mean of the affinity term.
            w_inter: weight of the inter-class mean of the affinity term.
            num_classes: number of label classes (affinity term, ``"label"`` pair weights).
            seg_loss: supervised loss ``seg_loss(student_logits, label)``; default
                ``DiceCELoss(to_onehot_y=True, softmax=True)``.

        Raises:
            ValueError: for a negative or non-finite λ, or channel lists that are missing or of different
                lengths while ``lambda_km > 0``; and the sub-losses' own argument errors.
        """
        super().__init__()
        for name, lam in (("lambda_logits", lambda_logits), ("lambda_km", lambda_km), ("lambda_aa", lambda_aa)):
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {lam!r}.")
        self.lambda_logits = float(lambda_logits)
        self.lambda_km = float(lambda_km)
        self.lambda_aa = float(lambda_aa)
        if seg_loss is not None and not callable(seg_loss):
            raise ValueError(f"seg_loss must be None or a callable module, got {type(seg_loss).__name__}.")
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True) if seg_loss is None else seg_loss
        self.logits_loss = LogitsDistillationLoss(temperature=temperature)
        self.aa_loss = AdaptiveAffinityLoss(
            grid=aa_grid, pair_weights=pair_weights, w_intra=w_intra, w_inter=w_inter, num_classes=num_classes
        )
        student_channels, teacher_channels = list(student_channels or ()), list(teacher_channels or ())
        self.student_channels, self.teacher_channels = tuple(student_channels), tuple(teacher_channels)
        self.km_losses = nn.ModuleList()
        if self.lambda_km > 0:
            if not student_channels or len(student_channels) != len(teacher_channels):
                raise ValueError(
                    "lambda_km > 0 needs student_channels and teacher_channels with one entry per feature pair "
                    f"and the same length, got student_channels={student_channels}, "
                    f"teacher_channels={teacher_channels}."
                )
            for c_s, c_t in zip(student_channels, teacher_channels):
                self.km_losses.append(KernelMatrixLoss(c_s, c_t))

    def _zero(self, ref: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=ref.device)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        student_features: Sequence[torch.Tensor],
        teacher_features: Sequence[torch.Tensor],
        label: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_logits: (B, K, *S).
            teacher_logits: (B, K, *S); may be None when no term uses it (e.g. every lambda 0, no teacher).
            student_features: student tap outputs, pair i = ``student_features[i]`` with ``teacher_features[i]``.
            teacher_features: teacher tap outputs, same length.
            label: (B, 1, *S) class indices.

        Returns:
            ``{"loss": total, "seg": L_seg, "logits": L_logits, "km": L_KM, "aa": L_AA}`` (scalar tensors).

        Raises:
            ValueError: when the feature lists have different lengths, or their length does not match the
                number of KM connectors, or is 0 while a feature term is on.
        """
        if teacher_logits is None:
            if self.lambda_logits > 0 or (self.lambda_aa > 0 and self.aa_loss.pair_weights == "teacher"):
                raise ValueError("teacher_logits is None but lambda_logits > 0 or the affinity uses teacher weights.")
        else:
            teacher_logits = teacher_logits.detach()
        student_features = list(student_features or ())
        teacher_features = [f.detach() for f in (teacher_features or ())]
        if (self.lambda_km > 0 or self.lambda_aa > 0) and (
            not student_features or len(student_features) != len(teacher_features)
        ):
            raise ValueError(
                "the feature terms need the same, non-zero number of student and teacher features, got "
                f"{len(student_features)} student and {len(teacher_features)} teacher features."
            )

        out: dict[str, torch.Tensor] = {"seg": self.seg_loss(student_logits, label)}
        out["logits"] = (
            self.logits_loss(student_logits, teacher_logits) if self.lambda_logits > 0 else self._zero(student_logits)
        )
        if self.lambda_km > 0:
            if len(student_features) != len(self.km_losses):
                raise ValueError(
                    f"got {len(student_features)} feature pairs but the loss was built with {len(self.km_losses)} "
                    "(student_channels/teacher_channels)."
                )
            out["km"] = torch.stack(
                [km(f_s, f_t) for km, f_s, f_t in zip(self.km_losses, student_features, teacher_features)]
            ).mean()
        else:
            out["km"] = self._zero(student_logits)
        if self.lambda_aa > 0:
            out["aa"] = torch.stack(
                [
                    self.aa_loss(f_s, f_t, label=label, teacher_logits=teacher_logits)
                    for f_s, f_t in zip(student_features, teacher_features)
                ]
            ).mean()
        else:
            out["aa"] = self._zero(student_logits)
        total = (
            out["seg"]
            + self.lambda_logits * out["logits"]
            + self.lambda_km * out["km"]
            + self.lambda_aa * out["aa"]
        )
        return {"loss": total, "seg": out["seg"], "logits": out["logits"], "km": out["km"], "aa": out["aa"]}
