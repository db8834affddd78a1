"""Distillation losses (MONAI ``_Loss`` components): logits KD, kernel (Gram) matrix, adaptive affinity, and the
total as a weighted sum of named terms; the generalizable-distillation terms (ACT, DCGD, DICD).

Bundle configs reference them by full dotted path, e.g. ``"_target_": "monai_relkd.losses.AdaptiveAffinityLoss"``;
after ``import monai_relkd`` MONAI's component locator also resolves the short names.
"""

from .affinity import AdaptiveAffinityLoss
from .gkd import AlignmentConsistencyLoss, ContrastiveGraphDistillationLoss, CrossDistillationLoss
from .kernel import KernelMatrixLoss
from .logits import LogitsDistillationLoss
from .total import RelationalDistillationLoss, build_distillation_loss
from .weighted import DistillationTerm, WeightedDistillationLoss

__all__ = [
    "LogitsDistillationLoss",
    "KernelMatrixLoss",
    "AdaptiveAffinityLoss",
    "DistillationTerm",
    "WeightedDistillationLoss",
    "RelationalDistillationLoss",
    "build_distillation_loss",
    "AlignmentConsistencyLoss",
    "ContrastiveGraphDistillationLoss",
    "CrossDistillationLoss",
]
