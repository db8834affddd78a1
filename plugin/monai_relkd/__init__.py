"""monai-relkd: relation-based knowledge distillation for medical image segmentation.

Importing the package registers its components (losses, networks, engines) in ``sys.modules`` under names
starting with ``monai``, so MONAI's bundle ``ComponentLocator`` also resolves their short names. Bundle configs
still reference them by full dotted path, e.g. ``"_target_": "monai_relkd.losses.AdaptiveAffinityLoss"``.
"""

__version__ = "0.1.0"

from . import bundle_support, config, data, engines, evaluation, inference, losses, metadata, networks  # noqa: E402,F401  (registers the components)
