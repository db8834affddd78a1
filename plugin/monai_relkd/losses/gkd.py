# Licensed under the Apache License, Version 2.0 (the "License").
"""Generalizable distillation (Qi et al., JBHI 2024), our interpretation: ACT, DCGD and DICD on MSAN vectors.

The paper's equations are not public. The choices (InfoNCE with a temperature over L2-normalised vectors, as CRD and
CIRKD do; a KL match of row-softmax similarity graphs; mean-squared reconstruction of the style-free grid) are
documented in ``docs/method.md`` ("Generalizable distillation") and are constructor arguments. Each loss is a term
of :class:`monai_relkd.losses.WeightedDistillationLoss` reading a tap pair (``student_features``,
``teacher_features``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ..networks.alignment import AlignmentNetwork
from ._reduction import check_reduction, reduce_per_sample
from .weighted import check_weight

__all__ = [
    "AlignmentConsistencyLoss",
    "ContrastiveGraphDistillationLoss",
    "CrossDistillationLoss",
    "contrastive_graph_terms",
    "freeze_alignment_network",
]


def freeze_alignment_network(msan: AlignmentNetwork) -> AlignmentNetwork:
    """A pre-trained (teacher) MSAN as a fixed function: no gradients, eval mode."""
    for p in msan.parameters():
        p.requires_grad_(False)
    return msan.eval()


def _check_msan(name: str, msan: nn.Module) -> None:
    if not isinstance(msan, AlignmentNetwork):
        raise ValueError(f"{name} must be a monai_relkd.networks.AlignmentNetwork, got {type(msan).__name__}.")


def _teacher_vector(teacher_msan: AlignmentNetwork, teacher_features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher_msan.encode(teacher_features.detach())


def contrastive_graph_terms(
    student_vectors: torch.Tensor, teacher_vectors: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-sample intra- and inter-coupling terms of dual contrastive graph distillation on unit vectors.

    - intra (teacher–student, same image): InfoNCE of student vector i against the teacher vectors of the batch,
      ``−log softmax_j(s_i·t_j / τ)[i]``;
    - inter (across images): the row-softmax similarity graph of the other images, ``P^t_ij = softmax_{j≠i}(t_i·t_j
      / τ)``, and the student's ``P^s_ij``; ``KL(P^t_i ‖ P^s_i)``.

    Args:
        student_vectors: (B, d), unit norm.
        teacher_vectors: (B, d), unit norm (a fixed target).
        temperature: τ > 0.

    Returns:
        ``(intra, inter)``, each (B,); both 0 for B = 1 (no other image), inter 0 for B = 2 (one other image).
    """
    b = student_vectors.shape[0]
    s, t = student_vectors, teacher_vectors.detach()
    intra = F.cross_entropy(s @ t.T / temperature, torch.arange(b, device=s.device), reduction="none")
    if b < 3:
        return intra, torch.zeros_like(intra)
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    log_p_s = F.log_softmax((s @ s.T / temperature)[off].reshape(b, b - 1), dim=1)
    log_p_t = F.log_softmax((t @ t.T / temperature)[off].reshape(b, b - 1), dim=1)
    inter = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return intra, inter


class AlignmentConsistencyLoss(_Loss):
    """
    Alignment consistency training (ACT) of one MSAN: the vector must reconstruct its model's style-free feature
    grid, and two views of one image (e.g. two intensity augmentations, a simulated scanner change) must give the
    same vector:

    .. math::

        L = w_{rec} \\cdot \\mathrm{mean}(D(E(F)) - \\mathrm{grid}(F))^2 + w_{cons} \\cdot \\| E(F) - E(F') \\|^2

    (the reconstruction averaged over both views when ``F'`` is given; ``‖·‖²`` of unit vectors lies in [0, 4]).
    Used to pre-train the teacher's MSAN (two views) and, as a term of the student objective, to keep the
    student's MSAN informative (one view: reconstruction only).

    Shapes:
        - ``features``, ``features_view``: (B, C, *S).
        - output: scalar for ``reduction="mean"``/``"sum"``, (B,) for ``"none"``.

    Example::

        >>> from monai_relkd.networks import AlignmentNetwork
        >>> loss = AlignmentConsistencyLoss(AlignmentNetwork(64))
        >>> value = loss(torch.randn(4, 64, 16, 16), torch.randn(4, 64, 16, 16))
    """

    def __init__(
        self,
        msan: AlignmentNetwork,
        w_reconstruction: float = 1.0,
        w_consistency: float = 1.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            msan: the alignment network it trains (its parameters belong to this loss).
            w_reconstruction: weight (>= 0) of the reconstruction term.
            w_consistency: weight (>= 0) of the two-view consistency term.
            reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        """
        super().__init__(reduction=check_reduction(reduction))
        _check_msan("msan", msan)
        self.msan = msan
        self.w_reconstruction = check_weight("w_reconstruction", w_reconstruction)
        self.w_consistency = check_weight("w_consistency", w_consistency)

    def _reconstruction(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vector, rec = self.msan(features)
        err = (rec - self.msan.target(features.detach()).to(rec.dtype)).pow(2).flatten(1).mean(dim=1)
        return vector, err

    def forward(self, features: torch.Tensor, features_view: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            features: (B, C, *S) features of the model the MSAN belongs to.
            features_view: the same model's features of a second view of the same images, or None.
        """
        vector, rec = self._reconstruction(features)
        per_sample = self.w_reconstruction * rec
        if features_view is not None:
            if features_view.shape != features.shape:
                raise ValueError(f"the two views differ in shape: {tuple(features.shape)} and "
                                 f"{tuple(features_view.shape)}.")
            vector_view, rec_view = self._reconstruction(features_view)
            per_sample = self.w_reconstruction * (rec + rec_view) / 2
            per_sample = per_sample + self.w_consistency * (vector - vector_view).pow(2).sum(dim=1)
        return reduce_per_sample(per_sample, self.reduction)


class _MSANPairLoss(_Loss):
    """A loss on the vectors of a student MSAN (trained) and a teacher MSAN (frozen) of one tap pair."""

    def __init__(
        self, student_msan: AlignmentNetwork, teacher_msan: AlignmentNetwork, reduction: LossReduction | str
    ) -> None:
        """
        Args (shared by the subclasses):
            student_msan: the student's alignment network (trained with the student).
            teacher_msan: the teacher's pre-trained alignment network (frozen here).
            reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample values).
        """
        super().__init__(reduction=check_reduction(reduction))
        _check_msan("student_msan", student_msan)
        _check_msan("teacher_msan", teacher_msan)
        if student_msan.vector_dim != teacher_msan.vector_dim:
            raise ValueError(f"the MSAN vectors differ in size: student {student_msan.vector_dim}, "
                             f"teacher {teacher_msan.vector_dim}.")
        self.student_msan = student_msan
        self.teacher_msan = freeze_alignment_network(teacher_msan)

    def vectors(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(s, t)``: the student's vectors (with gradient) and the teacher's (fixed), each (B, vector_dim)."""
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(f"batch sizes differ: student {student_features.shape[0]}, "
                             f"teacher {teacher_features.shape[0]}.")
        self.teacher_msan.eval()
        s = self.student_msan.encode(student_features)
        return s, _teacher_vector(self.teacher_msan, teacher_features).to(s.dtype)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_features: (B, C_s, *S_s).
            teacher_features: (B, C_t, *S_t); fixed (no gradient flows into them).

        Returns:
            the loss of each sample (:meth:`_per_sample`), reduced by ``reduction``.
        """
        teacher_features = teacher_features.detach()
        s, t = self.vectors(student_features, teacher_features)
        return reduce_per_sample(self._per_sample(s, t, student_features, teacher_features), self.reduction)

    def _per_sample(self, s: torch.Tensor, t: torch.Tensor, student_features: torch.Tensor,
                    teacher_features: torch.Tensor) -> torch.Tensor:
        """(B,) loss of each sample from the vectors ``s`` (student's, with gradient) and ``t`` (teacher's, fixed),
        each (B, vector_dim), and the features they came from."""
        raise NotImplementedError


class ContrastiveGraphDistillationLoss(_MSANPairLoss):
    """
    Dual contrastive graph distillation (DCGD): two contrastive graphs over the batch's MSAN vectors, the student's
    matched to the teacher's (see :func:`contrastive_graph_terms`):

    .. math::

        L_i = w_{intra} \\cdot \\Big(-\\log \\frac{e^{s_i \\cdot t_i/\\tau}}{\\sum_j e^{s_i \\cdot t_j/\\tau}}\\Big)
            + w_{inter} \\cdot \\mathrm{KL}\\big(P^t_{i\\cdot} \\,\\|\\, P^s_{i\\cdot}\\big)

    with ``s = E_s(F_s)``, ``t = E_t(F_t)`` the unit vectors of the student's and the (frozen) teacher's MSAN. The
    gradient reaches the student's features and its MSAN, never the teacher or its MSAN. Needs B >= 2 (intra) and
    B >= 3 (inter); smaller batches give 0 for the missing graph.

    Shapes:
        - ``student_features``: (B, C_s, *S_s); ``teacher_features``: (B, C_t, *S_t).
        - output: scalar for ``reduction="mean"``/``"sum"``, (B,) for ``"none"``.

    Example::

        >>> from monai_relkd.networks import AlignmentNetwork
        >>> loss = ContrastiveGraphDistillationLoss(AlignmentNetwork(16), AlignmentNetwork(64), temperature=0.1)
        >>> value = loss(torch.randn(8, 16, 32, 32), torch.randn(8, 64, 16, 16))
    """

    def __init__(self, student_msan: AlignmentNetwork, teacher_msan: AlignmentNetwork, temperature: float = 0.1,
                 w_intra: float = 1.0, w_inter: float = 1.0,
                 reduction: LossReduction | str = LossReduction.MEAN) -> None:
        """
        ``student_msan``, ``teacher_msan`` and ``reduction`` as in :class:`_MSANPairLoss`; besides:

        Args:
            temperature: τ > 0 of both graphs.
            w_intra: weight (>= 0) of the intra-coupling (teacher–student InfoNCE) term.
            w_inter: weight (>= 0) of the inter-coupling (graph KL) term.
        """
        super().__init__(student_msan, teacher_msan, reduction)
        if not check_weight("temperature", temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        self.temperature = float(temperature)
        self.w_intra = check_weight("w_intra", w_intra)
        self.w_inter = check_weight("w_inter", w_inter)

    def _per_sample(self, s: torch.Tensor, t: torch.Tensor, student_features: torch.Tensor,
                    teacher_features: torch.Tensor) -> torch.Tensor:
        intra, inter = contrastive_graph_terms(s, t, self.temperature)
        return self.w_intra * intra + self.w_inter * inter


class CrossDistillationLoss(_MSANPairLoss):
    """
    Domain-invariant cross distillation (DICD): teacher and student exchange MSAN decoder heads. The teacher's
    (frozen) decoder must rebuild the teacher's style-free grid from the *student's* vector, and the student's
    decoder must rebuild the student's grid from the *teacher's* vector:

    .. math::

        L = w_t \\cdot \\mathrm{mean}(D_t(E_s(F_s)) - \\mathrm{grid}_t(F_t))^2
          + w_s \\cdot \\mathrm{mean}(D_s(E_t(F_t)) - \\mathrm{grid}_s(F_s))^2

    The first term supervises the student's encoder side (its features and MSAN encoder), the second its MSAN
    decoder; the targets and the teacher's vector are fixed (detached). It is 0 when the student's vector equals
    the teacher's and each decoder reconstructs its own grid exactly.

    Shapes:
        - ``student_features``: (B, C_s, *S_s); ``teacher_features``: (B, C_t, *S_t).
        - output: scalar for ``reduction="mean"``/``"sum"``, (B,) for ``"none"``.

    Example::

        >>> from monai_relkd.networks import AlignmentNetwork
        >>> loss = CrossDistillationLoss(AlignmentNetwork(16), AlignmentNetwork(64))
        >>> value = loss(torch.randn(8, 16, 32, 32), torch.randn(8, 64, 16, 16))
    """

    def __init__(self, student_msan: AlignmentNetwork, teacher_msan: AlignmentNetwork,
                 w_teacher_decoder: float = 1.0, w_student_decoder: float = 1.0,
                 reduction: LossReduction | str = LossReduction.MEAN) -> None:
        """
        ``student_msan``, ``teacher_msan`` and ``reduction`` as in :class:`_MSANPairLoss`; besides:

        Args:
            w_teacher_decoder: weight (>= 0) of the teacher-decoder term (supervises the student's encoder).
            w_student_decoder: weight (>= 0) of the student-decoder term (supervises the student's decoder).
        """
        super().__init__(student_msan, teacher_msan, reduction)
        self.w_teacher_decoder = check_weight("w_teacher_decoder", w_teacher_decoder)
        self.w_student_decoder = check_weight("w_student_decoder", w_student_decoder)

    def _per_sample(self, s: torch.Tensor, t: torch.Tensor, student_features: torch.Tensor,
                    teacher_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_t = self.teacher_msan.target(teacher_features)
            target_s = self.student_msan.target(student_features.detach())
        rec_t = self.teacher_msan.decode(s)  # frozen decoder; the gradient flows into s
        rec_s = self.student_msan.decode(t)
        err_t = (rec_t - target_t.to(rec_t.dtype)).pow(2).flatten(1).mean(dim=1)
        err_s = (rec_s - target_s.to(rec_s.dtype)).pow(2).flatten(1).mean(dim=1)
        return self.w_teacher_decoder * err_t + self.w_student_decoder * err_s
