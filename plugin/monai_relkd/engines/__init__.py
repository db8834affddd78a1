"""Engines: feature taps (forward hooks by module name), the teacher loader, ``DistillationTrainer`` and the checkpoint,
resume and lock handlers."""

from . import checkpoint
from .cache import TeacherOutputCache
from .checkpoint import (
    AtomicSaver,
    BestModelCheckpoint,
    RandomStates,
    TrainingLock,
    TrainingLockedError,
    TrainingStateCheckpoint,
    read_model_record,
)
from .msan import TeacherAlignmentLoader, load_alignment_network, load_msan_weights, pretrain_teacher_msan
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
    *checkpoint.__all__,
    "pretrain_teacher_msan",
    "load_alignment_network",
    "load_msan_weights",
    "TeacherAlignmentLoader",
]
