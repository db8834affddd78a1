"""Distillation losses (MONAI ``_Loss`` components): logits KD, kernel (Gram) matrix, adaptive affinity, total.

Bundle configs reference them by full dotted path, e.g. ``"_target_": "monai_relkd.losses.AdaptiveAffinityLoss"``;
after ``import monai_relkd`` MONAI's component locator also resolves the short names.
"""

from .affinity import AdaptiveAffinityLoss
from .kernel import KernelMatrixLoss
from .logits import LogitsDistillationLoss
from .total import RelationalDistillationLoss

__all__ = ["LogitsDistillationLoss", "KernelMatrixLoss", "AdaptiveAffinityLoss", "RelationalDistillationLoss"]
