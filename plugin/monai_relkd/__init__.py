"""monai-relkd: relation-based knowledge distillation for medical image segmentation.

``import monai_relkd`` loads what serving a student needs — ``networks``, ``losses``, ``config``, ``data``,
``metadata``, ``bundle_support``, ``inference`` — and registers them in ``sys.modules`` under names starting with ``monai``, so
MONAI's bundle ``ComponentLocator`` also resolves their short names. The training and tooling subpackages
(``engines``, which needs pytorch-ignite; ``evaluation``, ``reports``, ``profiling``, ``release``, ``demo``,
``cli``) are imported on first use (``monai_relkd.engines`` in a config expression imports it), so inference and
MONAI Label need neither ignite nor tensorboard. Bundle configs reference components by full dotted path, e.g.
``"_target_": "monai_relkd.losses.AdaptiveAffinityLoss"``, which imports what it names.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from . import bundle_support, config, data, inference, losses, metadata, networks  # noqa: E402,F401  (registers the components)

#: subpackages imported on first attribute access (they pull ignite, tensorboard, matplotlib, ...)
LAZY_SUBMODULES = ("engines", "evaluation", "reports", "profiling", "release", "demo", "cli", "nnunet")


def __getattr__(name: str) -> Any:
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(LAZY_SUBMODULES))
