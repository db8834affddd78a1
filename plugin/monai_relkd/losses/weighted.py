# Licensed under the Apache License, Version 2.0 (the "License").
"""A distillation objective as a weighted sum of named terms: ``L = L_seg + Σ_k λ_k · L_k``.

Each term is a :class:`DistillationTerm`: a loss module, its weight λ_k and the names of its inputs (student or
teacher logits, a tap pair's features, the label), in the spirit of torchdistill's weighted-sum criterion. New
methods (e.g. the generalizable-distillation terms) plug in as further terms without a new total class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.losses import DiceCELoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._reduction import check_reduction, reduce_per_sample

__all__ = ["DistillationTerm", "WeightedDistillationLoss", "INPUT_NAMES"]

#: names a term may take its inputs from (the arguments of :meth:`WeightedDistillationLoss.forward`)
INPUT_NAMES = ("student_logits", "teacher_logits", "student_features", "teacher_features", "label")
_FEATURE_INPUTS = ("student_features", "teacher_features")
_RESERVED = ("loss", "seg")


def check_weight(name: str, weight: Any) -> float:
    """A finite number >= 0 as float; a clear error otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}.")
    return float(weight)


class DistillationTerm(nn.Module):
    """
    One named term ``λ · L`` of a :class:`WeightedDistillationLoss`: a loss, its weight and where its inputs come from.

    ``inputs`` names the positional arguments of the loss and ``keyword_inputs`` maps keyword arguments to input
    names, both from :data:`INPUT_NAMES`. A term that reads ``student_features``/``teacher_features`` is applied to
    each tap pair in ``pairs`` (default: every pair) and averaged over them; ``loss`` may then be one module per
    pair (e.g. kernel-matrix losses, whose connectors depend on the pair's channels) or one module for all.
    The term reads the teacher when one of its inputs starts with ``teacher_``.

    Shapes: as the loss's own; the term returns what the loss returns (a scalar, or (B,) per-sample values when
    the loss has ``reduction="none"``), averaged over the pairs for feature terms.

    Example::

        >>> from monai_relkd.losses import DistillationTerm, KernelMatrixLoss, LogitsDistillationLoss
        >>> kd = DistillationTerm(LogitsDistillationLoss(temperature=4.0), weight=0.1)
        >>> km = DistillationTerm([KernelMatrixLoss(128, 256), KernelMatrixLoss(64, 256)], weight=1.0,
        ...                       inputs=("student_features", "teacher_features"))
    """

    def __init__(
        self,
        loss: nn.Module | Sequence[nn.Module],
        weight: float = 1.0,
        inputs: Sequence[str] = ("student_logits", "teacher_logits"),
        keyword_inputs: Mapping[str, str] | None = None,
        pairs: Sequence[int] | None = None,
    ) -> None:
        """
        Args:
            loss: a callable module, or a sequence with one module per tap pair of ``pairs``.
            weight: λ >= 0; 0 switches the term off (it is not computed).
            inputs: input names passed positionally, in order.
            keyword_inputs: ``{argument name: input name}`` passed as keywords.
            pairs: tap-pair indices for feature terms (None: every pair given to the forward).

        Raises:
            ValueError: unknown input names, a negative weight, or a per-pair loss list whose length differs from
                ``pairs``.
        """
        super().__init__()
        self.weight = check_weight("weight", weight)
        self.inputs = tuple(inputs)
        self.keyword_inputs = dict(keyword_inputs or {})
        unknown = [n for n in (*self.inputs, *self.keyword_inputs.values()) if n not in INPUT_NAMES]
        if unknown:
            raise ValueError(f"unknown input name(s) {unknown}; choose from {INPUT_NAMES}.")
        self.uses_features = any(n in _FEATURE_INPUTS for n in (*self.inputs, *self.keyword_inputs.values()))
        self.pairs = None if pairs is None else [int(i) for i in pairs]
        if isinstance(loss, nn.Module) or not isinstance(loss, Sequence):
            if not callable(loss):
                raise ValueError(f"loss must be a callable module, got {type(loss).__name__}.")
            self.loss, self.per_pair = loss, False
        else:
            if not self.uses_features or self.pairs is None or len(loss) != len(self.pairs):
                raise ValueError(
                    "a list of losses needs feature inputs and `pairs` of the same length (one loss per pair), "
                    f"got {len(loss)} losses and pairs={self.pairs}."
                )
            self.loss, self.per_pair = nn.ModuleList(loss), True

    @property
    def needs_teacher(self) -> bool:
        """Whether the term reads the teacher's logits or features (positionally)."""
        return any(n.startswith("teacher_") for n in self.inputs)

    def num_pairs_needed(self) -> int:
        """The number of tap pairs the term reads (0 for terms without feature inputs)."""
        if not self.uses_features:
            return 0
        return 1 if self.pairs is None else max(self.pairs) + 1

    def _call(self, loss: Any, context: Mapping[str, Any]) -> torch.Tensor:
        args = [context[n] for n in self.inputs]
        kwargs = {k: context[n] for k, n in self.keyword_inputs.items()}
        return loss(*args, **kwargs)

    def forward(self, context: Mapping[str, Any]) -> torch.Tensor:
        """``context`` maps each input name to its value; feature names map to lists (one entry per tap pair)."""
        if not self.uses_features:
            return self._call(self.loss, context)
        n_pairs = len(context["student_features"])
        pairs = list(range(n_pairs)) if self.pairs is None else self.pairs
        if not pairs or max(pairs) >= n_pairs:
            raise ValueError(f"the term reads tap pair(s) {pairs} but {n_pairs} pair(s) were given.")
        values = []
        for k, i in enumerate(pairs):
            pair_context = dict(context)
            for name in _FEATURE_INPUTS:
                pair_context[name] = context[name][i]
            values.append(self._call(self.loss[k] if self.per_pair else self.loss, pair_context))
        return torch.stack(values).mean(dim=0)


class WeightedDistillationLoss(_Loss):
    """
    Distillation objective ``L = L_seg + Σ_k λ_k · L_k`` over named :class:`DistillationTerm` s.

    ``L_seg = seg_loss(student_logits, label)`` (default MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``).
    A term whose weight is 0 is not computed and is reported as 0. Teacher logits and features are detached.
    The forward returns a dict: ``"loss"`` (the weighted total, to back-propagate), ``"seg"`` and one entry per
    term name (the unweighted values, for logging); :attr:`term_weights` gives each entry's weight, so a
    trainer can log each term's share ``λ_k·L_k / L``.

    ``reduction``: ``"mean"`` (default) and ``"sum"`` give scalars; ``"none"`` gives (B,) per-sample values of
    every entry (the seg loss is then evaluated per sample). A term may return per-sample values (B,), which are
    reduced here, or a scalar, taken as already reduced: build each term's loss with the total's reduction or
    with ``"none"`` (a scalar term under ``"none"`` is an error).

    Shapes:
        - ``student_logits``, ``teacher_logits``: (B, K, *S), S = (H, W) or (D, H, W).
        - ``student_features[i]``, ``teacher_features[i]``: (B, C_i, *S_i) and (B, C'_i, *S'_i), tap pair i.
        - ``label``: (B, 1, *S) class indices.
        - outputs: scalars, or (B,) for ``reduction="none"``.

    Example::

        >>> import torch
        >>> from monai_relkd.losses import DistillationTerm, LogitsDistillationLoss, WeightedDistillationLoss
        >>> loss = WeightedDistillationLoss({"logits": DistillationTerm(LogitsDistillationLoss(4.0), weight=0.5)})
        >>> z_s, z_t = torch.randn(2, 2, 32, 32, requires_grad=True), torch.randn(2, 2, 32, 32)
        >>> out = loss(z_s, z_t, [], [], torch.randint(0, 2, (2, 1, 32, 32)))
        >>> out["loss"].backward()  # out["seg"], out["logits"]: the unweighted terms
    """

    #: term names always present in the forward's dict (0 when absent or off), for steady logs
    reported_terms: tuple[str, ...] = ()

    def __init__(
        self,
        terms: Mapping[str, DistillationTerm] | None = None,
        seg_loss: nn.Module | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            terms: ``{name: DistillationTerm}``; names are identifiers other than ``"loss"`` and ``"seg"``.
            seg_loss: supervised loss ``seg_loss(student_logits, label)``; default
                ``DiceCELoss(to_onehot_y=True, softmax=True)``.
            reduction: ``"mean"``, ``"sum"`` or ``"none"`` (see above).

        Raises:
            ValueError: a reserved or non-identifier name, a term that is not a ``DistillationTerm``, a seg loss
                that is not callable, an unknown reduction.
        """
        super().__init__(reduction=check_reduction(reduction))
        if seg_loss is not None and not callable(seg_loss):
            raise ValueError(f"seg_loss must be None or a callable module, got {type(seg_loss).__name__}.")
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True) if seg_loss is None else seg_loss
        self.terms = nn.ModuleDict()
        for name, term in (terms or {}).items():
            self.add_term(name, term)

    def add_term(self, name: str, term: DistillationTerm) -> None:
        """Add a named term (a name may be used once)."""
        if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED or name in self.terms:
            raise ValueError(
                f"term name {name!r} must be a new identifier other than {_RESERVED}; have {list(self.terms)}."
            )
        if not isinstance(term, DistillationTerm):
            raise ValueError(f"term {name!r} must be a monai_relkd.losses.DistillationTerm, got {type(term).__name__}.")
        self.terms[name] = term

    @property
    def term_weights(self) -> dict[str, float]:
        """``{"seg": 1.0, name: λ, ...}``: the weight of each entry of the forward's dict (besides ``"loss"``)."""
        weights = {"seg": 1.0, **{name: 0.0 for name in self.reported_terms}}
        weights.update({name: term.weight for name, term in self.terms.items()})
        return weights

    def check_features(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> None:
        """Raise ``ValueError`` when the feature lists cannot serve the active terms (subclasses add checks)."""
        needed = self.num_feature_pairs
        if needed and (len(student_features) != len(teacher_features) or len(student_features) < needed):
            raise ValueError(
                f"the feature terms need {needed} pair(s) and as many student as teacher features, got "
                f"{len(student_features)} student and {len(teacher_features)} teacher features."
            )

    @property
    def teacher_required(self) -> bool:
        """Whether any term with a weight above 0 reads the teacher."""
        return any(t.weight > 0 and t.needs_teacher for t in self.terms.values())

    @property
    def num_feature_pairs(self) -> int:
        """The number of tap pairs the active terms read (0: no feature term is on)."""
        return max([t.num_pairs_needed() for t in self.terms.values() if t.weight > 0] or [0])

    def _seg(self, student_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.reduction == LossReduction.MEAN.value:
            return self.seg_loss(student_logits, label)
        per_sample = [self.seg_loss(student_logits[b : b + 1], label[b : b + 1]) for b in range(label.shape[0])]
        return reduce_per_sample(torch.stack([v.reshape(()) for v in per_sample]), self.reduction)

    def _reduce(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if value.ndim == 0:  # the term's loss reduced the batch itself (with the total's reduction)
            if self.reduction == LossReduction.NONE.value:
                raise ValueError(
                    f'term {name!r} returned a scalar but reduction="none" needs per-sample values: '
                    'build its loss with reduction="none".'
                )
            return value
        return reduce_per_sample(value.reshape(value.shape[0], -1).mean(dim=1), self.reduction)

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
            teacher_logits: (B, K, *S); may be None when no active term reads it.
            student_features: student tap outputs; pair i is ``student_features[i]`` with ``teacher_features[i]``.
            teacher_features: teacher tap outputs, same length.
            label: (B, 1, *S) class indices.

        Returns:
            ``{"loss": total, "seg": L_seg, <term name>: L_k, ...}``.

        Raises:
            ValueError: when the feature lists differ in length or hold fewer pairs than the active terms read, or
                teacher logits are missing while an active term reads them.
        """
        student_features = list(student_features or ())
        teacher_features = [f.detach() for f in (teacher_features or ())]
        self.check_features(student_features, teacher_features)
        context = {
            "student_logits": student_logits,
            "teacher_logits": None if teacher_logits is None else teacher_logits.detach(),
            "student_features": student_features,
            "teacher_features": teacher_features,
            "label": label,
        }
        out: dict[str, torch.Tensor] = {"seg": self._seg(student_logits, label)}
        total = out["seg"]
        for name, term in self.terms.items():
            if term.weight == 0:
                out[name] = torch.zeros_like(out["seg"])
                continue
            if "teacher_logits" in term.inputs and teacher_logits is None:
                raise ValueError(f"term {name!r} reads teacher_logits, but teacher_logits is None.")
            out[name] = self._reduce(name, term(context))
            total = total + term.weight * out[name]
        for name in self.reported_terms:
            out.setdefault(name, torch.zeros_like(out["seg"]))
        return {"loss": total, **out}
