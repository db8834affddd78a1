# Licensed under the Apache License, Version 2.0 (the "License").
"""The relation-based distillation objective L = L_seg + λ1·L_logits + λ2·L_KM + λ3·L_AA, and its builder from a
bundle's ``distillation`` section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.utils import LossReduction

from .affinity import AdaptiveAffinityLoss
from .kernel import KernelMatrixLoss
from .logits import LogitsDistillationLoss
from .weighted import DistillationTerm, WeightedDistillationLoss, check_weight

__all__ = ["RelationalDistillationLoss", "build_distillation_loss"]

#: the terms of the paper's combination, always reported (0 when their λ is 0)
RELATIONAL_TERMS = ("logits", "km", "aa")
_FEATURES = ("student_features", "teacher_features")


class RelationalDistillationLoss(WeightedDistillationLoss):
    """
    Total loss of relation-based distillation, the ready-made combination of the paper as a
    :class:`WeightedDistillationLoss`:

    .. math::

        L = L_{seg} + \\lambda_1 L_{logits} + \\lambda_2 L_{KM} + \\lambda_3 L_{AA} + \\sum_k \\lambda_k L_k

    - ``L_seg``: ``seg_loss(student_logits, label)``, by default MONAI ``DiceCELoss(to_onehot_y=True,
      softmax=True)``;
    - ``L_logits``: :class:`LogitsDistillationLoss` with ``temperature``;
    - ``L_KM``: mean over feature pairs of :class:`KernelMatrixLoss` (``km_normalize``, ``km_connector_norm``),
      one per pair (its connector parameters are parameters of this module: give ``loss.parameters()`` to the
      optimizer with the student's);
    - ``L_AA``: mean over feature pairs of :class:`AdaptiveAffinityLoss` (``aa_grid``, ``aa_node_size``,
      ``aa_pool``, ``pair_weights``, ``w_intra``, ``w_inter``, ``num_classes``);
    - ``extra_terms``: further named :class:`DistillationTerm` s (e.g. the generalizable-distillation losses).

    Feature pair i is student tap i with teacher tap i. A λ of 0 switches its term off: the term is not
    computed (it is reported as 0) and, for ``lambda_km == 0``, no connector is built. With
    ``lambda_km = lambda_aa = 0`` this is plain Hinton KD; with ``pair_weights="uniform"``, ``aa_grid=2`` and
    ``aa_pool="max"`` the affinity term is the pair-wise loss of structured KD. Teacher logits and features are
    detached. Every term is invariant to the scale of either network's features (``km_normalize="none"`` is not).

    The forward returns a dict with the keys ``"loss"`` (the weighted total, to back-propagate) and ``"seg"``,
    ``"logits"``, ``"km"``, ``"aa"`` (and each extra term's name): the unweighted terms, for logging.

    Shapes:
        - ``student_logits``, ``teacher_logits``: (B, K, *S), S = (H, W) or (D, H, W).
        - ``student_features[i]``: (B, student_channels[i], *S_i); ``teacher_features[i]``:
          (B, teacher_channels[i], *S'_i).
        - ``label``: (B, 1, *S) class indices (int or float dtype).
        - outputs: scalars for ``reduction="mean"``/``"sum"``, (B,) per-sample values for ``"none"``.

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

    reported_terms = RELATIONAL_TERMS

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
        km_normalize: str = "frobenius",
        km_connector_norm: str | None = None,
        aa_node_size: int | Sequence[int] | None = None,
        aa_pool: str = "avg",
        extra_terms: Mapping[str, DistillationTerm] | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            lambda_logits: weight λ1 >= 0 of the logits term.
            lambda_km: weight λ2 >= 0 of the kernel matrix term.
            lambda_aa: weight λ3 >= 0 of the adaptive affinity term.
            temperature: temperature of the logits term.
            student_channels: channels of each student tap (needed when ``lambda_km > 0``).
            teacher_channels: channels of each teacher tap, same length (needed when ``lambda_km > 0``).
            aa_grid: ``grid`` (nodes per spatial dim) of the affinity term.
            pair_weights: ``"label"``, ``"teacher"`` or ``"uniform"`` pair weights of the affinity term.
            w_intra: weight of the intra-class mean of the affinity term.
            w_inter: weight of the inter-class mean of the affinity term.
            num_classes: number of label classes (affinity term, ``"label"`` pair weights).
            seg_loss: supervised loss ``seg_loss(student_logits, label)``; default
                ``DiceCELoss(to_onehot_y=True, softmax=True)``.
            km_normalize: ``normalize`` of the kernel matrix term: ``"frobenius"``, ``"row"`` or ``"none"``.
            km_connector_norm: ``connector_norm`` of the kernel matrix term: None or ``"batch"``.
            aa_node_size: ``node_size`` (pixels per node) of the affinity term; exclusive with ``aa_grid``.
            aa_pool: ``pool`` of the affinity term: ``"avg"`` or ``"max"``.
            extra_terms: ``{name: DistillationTerm}`` added to the sum.
            reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample values), for every term.

        Raises:
            ValueError: for a negative or non-finite λ, or channel lists that are missing or of different
                lengths while ``lambda_km > 0``; and the sub-losses' own argument errors.
        """
        super().__init__(seg_loss=seg_loss, reduction=reduction)
        self.lambda_logits = check_weight("lambda_logits", lambda_logits)
        self.lambda_km = check_weight("lambda_km", lambda_km)
        self.lambda_aa = check_weight("lambda_aa", lambda_aa)
        self.student_channels, self.teacher_channels = tuple(student_channels or ()), tuple(teacher_channels or ())
        # built whatever the λ: their arguments are validated, and they hold no parameters
        self.logits_loss = LogitsDistillationLoss(temperature=temperature, reduction=reduction)
        self.aa_loss = AdaptiveAffinityLoss(
            grid=aa_grid, node_size=aa_node_size, pool=aa_pool, pair_weights=pair_weights, w_intra=w_intra,
            w_inter=w_inter, num_classes=num_classes, reduction=reduction,
        )
        if self.lambda_logits > 0:
            self.add_term("logits", DistillationTerm(self.logits_loss, self.lambda_logits))
        if self.lambda_km > 0:
            self.add_term("km", self._km_term(km_normalize, km_connector_norm, reduction))
        if self.lambda_aa > 0:
            aa_inputs = {"label": "label", "teacher_logits": "teacher_logits"}
            self.add_term("aa", DistillationTerm(self.aa_loss, self.lambda_aa, _FEATURES, keyword_inputs=aa_inputs))
        for name, term in (extra_terms or {}).items():
            self.add_term(name, term)

    def _km_term(self, normalize: str, connector_norm: str | None, reduction: Any) -> DistillationTerm:
        """One kernel-matrix loss (with its connector) per tap pair."""
        c_s, c_t = self.student_channels, self.teacher_channels
        if not c_s or len(c_s) != len(c_t):
            raise ValueError(
                "lambda_km > 0 needs student_channels and teacher_channels with one entry per feature pair "
                f"and the same length, got student_channels={list(c_s)}, teacher_channels={list(c_t)}."
            )
        losses = [KernelMatrixLoss(s, t, normalize, connector_norm, reduction=reduction) for s, t in zip(c_s, c_t)]
        return DistillationTerm(losses, self.lambda_km, _FEATURES, pairs=range(len(losses)))

    @property
    def km_losses(self) -> nn.ModuleList:
        """The kernel-matrix losses, one per tap pair (empty when ``lambda_km == 0``)."""
        return self.terms["km"].loss if "km" in self.terms else nn.ModuleList()

    def check_features(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> None:
        """Also: the number of feature pairs must equal the number of KM connectors while ``lambda_km > 0``."""
        if self.lambda_km > 0 and len(student_features) != len(self.km_losses):
            raise ValueError(
                f"got {len(student_features)} feature pairs but the loss was built with {len(self.km_losses)} "
                "(student_channels/teacher_channels)."
            )
        super().check_features(student_features, teacher_features)


def build_distillation_loss(
    distillation: Mapping[str, Any],
    num_classes: int = 2,
    seg_loss: nn.Module | None = None,
    reduction: LossReduction | str = LossReduction.MEAN,
) -> RelationalDistillationLoss:
    """
    The loss of a student bundle, built from its ``distillation`` section so that every λ is written once::

        "loss": {"_target_": "monai_relkd.losses.build_distillation_loss", "distillation": "@distillation",
                 "num_classes": 2}

    Keys read (defaults in brackets): ``lambda_logits``, ``lambda_km``, ``lambda_aa`` [0], ``temperature`` [4],
    ``taps`` (``student_channels``/``teacher_channels`` of each pair), ``km_normalize`` ["frobenius"],
    ``km_connector_norm`` [None], ``aa_grid`` [None], ``aa_node_size`` [None], ``aa_pool`` ["avg"],
    ``pair_weights`` ["label"], ``w_intra``, ``w_inter`` [1], and ``terms``: ``{name: DistillationTerm}`` of
    further terms (instantiated by the config parser from ``_target_`` definitions).

    Args:
        distillation: the section (resolved: plain values, and ``DistillationTerm`` objects under ``terms``).
        num_classes: number of label classes.
        seg_loss: the supervised loss (default ``DiceCELoss(to_onehot_y=True, softmax=True)``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    taps = list(distillation.get("taps") or ())
    return RelationalDistillationLoss(
        lambda_logits=distillation.get("lambda_logits", 0.0),
        lambda_km=distillation.get("lambda_km", 0.0),
        lambda_aa=distillation.get("lambda_aa", 0.0),
        temperature=distillation.get("temperature", 4.0),
        student_channels=[int(t["student_channels"]) for t in taps if "student_channels" in t],
        teacher_channels=[int(t["teacher_channels"]) for t in taps if "teacher_channels" in t],
        aa_grid=distillation.get("aa_grid"),
        pair_weights=distillation.get("pair_weights", "label"),
        w_intra=distillation.get("w_intra", 1.0),
        w_inter=distillation.get("w_inter", 1.0),
        num_classes=num_classes,
        seg_loss=seg_loss,
        km_normalize=distillation.get("km_normalize", "frobenius"),
        km_connector_norm=distillation.get("km_connector_norm"),
        aa_node_size=distillation.get("aa_node_size"),
        aa_pool=distillation.get("aa_pool", "avg"),
        extra_terms=dict(distillation.get("terms") or {}),
        reduction=reduction,
    )
