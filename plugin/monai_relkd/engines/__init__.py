"""Engines: feature taps (forward hooks by module name), the teacher loader and ``DistillationTrainer``."""

from .cache import TeacherOutputCache
from .taps import FeatureTaps, unwrap_module
from .teacher import freeze, load_teacher, strip_wrappers, teacher_required
from .trainer import (
    LOSS_TERM_KEYS,
    DistillationLossAdapter,
    DistillationTrainer,
    distillation_parameters,
    loss_terms_from_engine,
)

__all__ = [
    "TeacherOutputCache",
    "FeatureTaps",
    "unwrap_module",
    "load_teacher",
    "freeze",
    "strip_wrappers",
    "teacher_required",
    "DistillationTrainer",
    "DistillationLossAdapter",
    "LOSS_TERM_KEYS",
    "loss_terms_from_engine",
    "distillation_parameters",
]
