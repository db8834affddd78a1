"""nnU-Net v2 trainers that train our small students, with or without relational distillation.

nnU-Net finds them by class name through the ``nnUNet_extTrainer`` folder printed by ``relkd nnunet-path``::

    export nnUNet_extTrainer=$(relkd nnunet-path)
    nnUNetv2_train 501 2d 0 -tr nnUNetTrainerRelKD_ENet      # distilled ENet (teacher: RELKD_TEACHER)
    nnUNetv2_train 501 2d 0 -tr nnUNetTrainerStudent_ENet    # the same ENet without distillation
    nnUNetv2_predict -i IN -o OUT -d 501 -c 2d -f 0 -tr nnUNetTrainerRelKD_ENet

Everything else (plans, preprocessing, augmentation, Dice+CE, poly LR, grad scaler, clipping, validation,
checkpoints) is nnU-Net's. The student network is built by ``build_network_architecture`` (so inference
builds it too); the KD terms are added to nnU-Net's loss in ``train_step``; the KM connectors join the optimizer
as a second parameter group and are saved in the checkpoint under ``"relkd"`` (inference never reads them).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from monai_relkd.data._io import atomic_torch_save, atomic_write_json
from monai_relkd.engines.taps import FeatureTaps
from monai_relkd.losses import RelationalDistillationLoss
from monai_relkd.networks import ENet, ERFNet, ESPNet

from .config import KD_KEYS, resolve_schedule, resolve_settings
from .teacher import Teacher, load_any_teacher, tap_channels

__all__ = [
    "nnUNetTrainerRelKDTeacher",
    "nnUNetTrainerStudent",
    "nnUNetTrainerRelKD",
    "nnUNetTrainerStudent_ENet",
    "nnUNetTrainerStudent_ESPNet",
    "nnUNetTrainerStudent_ERFNet",
    "nnUNetTrainerRelKD_ENet",
    "nnUNetTrainerRelKD_ESPNet",
    "nnUNetTrainerRelKD_ERFNet",
]

#: The KD terms logged each epoch (nnU-Net logger keys ``train_kd_<term>``) and printed to the training log.
KD_TERMS = ("logits", "km", "aa")

_DEFAULT_DEVICE = torch.device("cuda")


class _NoSegmentation(nn.Module):
    """Stands in for ``L_seg`` in :class:`RelationalDistillationLoss`: nnU-Net's own Dice+CE is the supervised
    term, so the distillation loss contributes its λ-weighted KD terms only. Returns a scalar 0."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros(())


def _apply_schedule(trainer: nnUNetTrainer) -> None:
    """Set ``num_epochs`` / ``num_iterations_per_epoch`` / ``num_val_iterations_per_epoch`` from the
    ``RELKD_NNUNET_*`` variables (short runs: tests, small-budget measurements)."""
    for key, value in resolve_schedule().items():
        setattr(trainer, key, value)


class nnUNetTrainerRelKDTeacher(nnUNetTrainer):
    """nnU-Net's default trainer (the teacher) whose schedule follows ``RELKD_NNUNET_EPOCHS`` /
    ``RELKD_NNUNET_ITERS`` / ``RELKD_NNUNET_VAL_ITERS`` when set; otherwise identical to ``nnUNetTrainer``."""

    def __init__(
        self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = _DEFAULT_DEVICE
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_schedule(self)


class nnUNetTrainerStudent(nnUNetTrainer):
    """
    A small 2-D student (``student_class``) trained by nnU-Net's pipeline, without distillation: the baseline.

    The students return one full-resolution output, so deep supervision is off. They pad their input to a
    multiple of ``student_class.size_divisible`` (8) internally, so any 2-D patch size works; a patch size that is
    a multiple of 8 (nnU-Net's 2-D plans normally are) avoids the padding. 3-D configurations are refused.
    """

    student_class: type[nn.Module] = ENet

    def __init__(
        self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = _DEFAULT_DEVICE
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        _apply_schedule(self)
        patch = tuple(self.configuration_manager.patch_size)
        if len(patch) != 2:
            raise ValueError(
                f"{type(self).__name__} trains a 2-D student; configuration {configuration!r} has patch size {patch}. "
                "Use the 2d configuration (nnUNetv2_train DATASET 2d FOLD -tr ...)."
            )
        divisible = getattr(self.student_class, "size_divisible", 1)
        if any(p % divisible for p in patch):
            self.print_to_log_file(
                f"note: patch size {patch} is not a multiple of {divisible}; {self.student_class.__name__} pads "
                "each patch internally."
            )

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """The student, ``student_class(in_channels, out_channels)``; plans only give the channel counts."""
        return cls.student_class(in_channels=num_input_channels, out_channels=num_output_channels)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The students have a single output: nothing to switch."""


class nnUNetTrainerRelKD(nnUNetTrainerStudent):
    """
    The student distilled from a frozen teacher: nnU-Net's Dice+CE plus
    ``λ1·L_logits + λ2·L_KM + λ3·L_AA`` (:class:`monai_relkd.losses.RelationalDistillationLoss`).

    Settings are the class attributes below, overridden by the JSON file ``RELKD_NNUNET_CONFIG`` and then by
    ``RELKD_<KEY>`` variables (see :mod:`monai_relkd.nnunet.config`). ``teacher`` is a trained nnU-Net model
    folder (the default kind; fold ``teacher_fold``, default the student's fold) or a teacher bundle checkpoint.
    The resolved settings are printed to the training log and written to ``relkd_kd.json`` in the output folder
    and into every checkpoint. Each epoch the mean of each raw KD term is logged as ``train_kd_logits``,
    ``train_kd_km`` and ``train_kd_aa`` in nnU-Net's logger (and so in the checkpoint) and printed to the log.
    """

    student_taps: tuple[str, ...] = ("encoder.stage3", "decoder.stage4")
    teacher: str = ""
    teacher_fold: str = ""
    teacher_checkpoint: str = "checkpoint_final.pth"
    teacher_taps: tuple[str, ...] = ()  # () = default_taps of the teacher
    lambda_logits: float = 0.1
    lambda_km: float = 1.0
    lambda_aa: float = 1.0
    temperature: float = 4.0
    pair_weights: str = "label"
    aa_grid: int | None = None

    def __init__(
        self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = _DEFAULT_DEVICE
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__} supports label (softmax) datasets, not region-based training.")
        self.kd_settings = resolve_settings({k: getattr(self, k) for k in KD_KEYS})
        self.distillation: RelationalDistillationLoss | None = None
        self.kd_teacher: Teacher | None = None
        self._teacher_taps: FeatureTaps | None = None
        self._student_taps: FeatureTaps | None = None
        for term in KD_TERMS:  # nnU-Net's local logger accepts only keys it knows
            self.logger.local_logger.my_fantastic_logging.setdefault(f"train_kd_{term}", [])

    def _do_i_compile(self) -> bool:
        """No ``torch.compile``: the distillation reads features through forward hooks."""
        return False

    def initialize(self) -> None:
        """Load the teacher and build the distillation loss (its KM connectors must exist before nnU-Net's
        ``initialize`` calls :meth:`configure_optimizers`), then nnU-Net's ``initialize``."""
        if not self.was_initialized:
            self._build_distillation()
        super().initialize()
        self._student_taps = FeatureTaps(self.network, self.kd_settings["student_taps"])

    def _build_distillation(self) -> None:
        s = self.kd_settings
        in_ch = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        out_ch = self.label_manager.num_segmentation_heads
        fold = s["teacher_fold"] or self.fold
        self.kd_teacher = load_any_teacher(s["teacher"], fold, s["teacher_checkpoint"], in_ch, out_ch, self.device)
        spacing = tuple(float(v) for v in self.configuration_manager.spacing)
        if self.kd_teacher.spacing is not None and not np.allclose(self.kd_teacher.spacing, spacing, rtol=1e-3):
            self.print_to_log_file(
                f"WARNING: teacher trained at spacing {self.kd_teacher.spacing}, student configuration at {spacing}."
            )
        t_taps = s["teacher_taps"] or self.kd_teacher.default_taps
        if len(t_taps) != len(s["student_taps"]):
            raise ValueError(f"{len(s['student_taps'])} student taps {s['student_taps']} but {len(t_taps)} teacher taps {t_taps}.")
        s["teacher_taps"] = list(t_taps)
        patch = tuple(self.configuration_manager.patch_size)
        t_channels = tap_channels(self.kd_teacher.network, t_taps, in_ch, patch, self.device)
        probe = self.student_class(in_channels=in_ch, out_channels=out_ch).to(self.device)
        s_channels = tap_channels(probe, s["student_taps"], in_ch, patch, self.device)
        self.distillation = RelationalDistillationLoss(
            lambda_logits=s["lambda_logits"],
            lambda_km=s["lambda_km"],
            lambda_aa=s["lambda_aa"],
            temperature=s["temperature"],
            student_channels=s_channels,
            teacher_channels=t_channels,
            aa_grid=s["aa_grid"],
            pair_weights=s["pair_weights"],
            num_classes=out_ch,
            seg_loss=_NoSegmentation(),
        ).to(self.device)
        self._teacher_taps = FeatureTaps(self.kd_teacher.network, t_taps, detach=True)
        self.print_to_log_file(
            f"relational KD: teacher {self.kd_teacher.kind} {self.kd_teacher.source}; taps "
            f"{list(zip(s['student_taps'], t_taps))} (channels {s_channels} -> {t_channels}); settings "
            + json.dumps({k: s[k] for k in KD_KEYS if k not in ('teacher', 'teacher_taps', 'student_taps')})
        )
        if self.local_rank == 0:
            atomic_write_json(os.path.join(self.output_folder, "relkd_kd.json"), {**s, "teacher_kind": self.kd_teacher.kind})

    def configure_optimizers(self):
        """nnU-Net's optimizer and poly LR, with the KM connectors as a second parameter group (same LR)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        connectors = [p for p in self.distillation.parameters() if p.requires_grad]
        if connectors:
            optimizer.add_param_group({"params": connectors})
        return optimizer, lr_scheduler

    def _kd_terms(self, data: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.kd_teacher.network(data)
        return self.distillation(
            output, teacher_logits, self._student_taps.features(), self._teacher_taps.features(), target
        )

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step (autocast on CUDA, grad scaler, clipping at 12 over student and connectors) on
        ``Dice+CE + KD``. Returns the total loss and each raw KD term."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        amp = autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()
        with amp:
            output = self.network(data)
            kd = self._kd_terms(data, output, target)
            loss = self.loss(output, target) + kd["loss"]
        params = list(itertools.chain(self.network.parameters(), self.distillation.parameters()))
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()
        self._student_taps.clear()
        self._teacher_taps.clear()
        return {"loss": loss.detach().cpu().numpy(), **{f"kd_{t}": kd[t].detach().float().cpu().numpy() for t in KD_TERMS}}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        """nnU-Net's epoch end, then the epoch mean of each raw KD term logged and printed."""
        super().on_train_epoch_end(train_outputs)
        for term in KD_TERMS:
            value = float(np.mean([o[f"kd_{term}"] for o in train_outputs]))
            if self.is_ddp:
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, value)
                value = float(np.mean(gathered))
            self.logger.log(f"train_kd_{term}", value, self.current_epoch)
            self.print_to_log_file(f"train_kd_{term} {value:.5f} (x lambda {self.kd_settings['lambda_' + term]})")

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; the student's hooks also fire there, so their captures are dropped."""
        out = super().validation_step(batch)
        self._student_taps.clear()
        return out

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``"relkd"``: connector weights and settings. Written atomically."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        staging = f"{filename}.{os.getpid()}.partial"
        super().save_checkpoint(staging)
        try:
            checkpoint = torch.load(staging, map_location="cpu", weights_only=False)
            checkpoint["relkd"] = {"connectors": self.distillation.state_dict(), "settings": dict(self.kd_settings)}
            atomic_torch_save(checkpoint, filename)
        finally:
            if os.path.exists(staging):
                os.remove(staging)

    def load_checkpoint(self, filename_or_checkpoint: Any) -> None:
        """nnU-Net's loading (student, optimizer with the connector group, logger), then the connectors."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = (
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
            if isinstance(filename_or_checkpoint, str)
            else filename_or_checkpoint
        )
        if "relkd" not in checkpoint:
            raise KeyError(f"{filename_or_checkpoint!r} holds no 'relkd' entry: not written by {type(self).__name__}.")
        self.distillation.load_state_dict(checkpoint["relkd"]["connectors"])


class nnUNetTrainerStudent_ENet(nnUNetTrainerStudent):
    """ENet (0.35 M parameters) trained by nnU-Net, no distillation."""

    student_class = ENet


class nnUNetTrainerStudent_ESPNet(nnUNetTrainerStudent):
    """ESPNet trained by nnU-Net, no distillation."""

    student_class = ESPNet


class nnUNetTrainerStudent_ERFNet(nnUNetTrainerStudent):
    """ERFNet trained by nnU-Net, no distillation."""

    student_class = ERFNet


class nnUNetTrainerRelKD_ENet(nnUNetTrainerRelKD):
    """ENet distilled from the teacher; taps as in the ENet student bundle."""

    student_class = ENet
    student_taps = ("encoder.stage3", "decoder.stage4")


class nnUNetTrainerRelKD_ESPNet(nnUNetTrainerRelKD):
    """ESPNet distilled from the teacher; taps as in the ESPNet student bundle."""

    student_class = ESPNet
    student_taps = ("encoder.stage2", "encoder.stage1")


class nnUNetTrainerRelKD_ERFNet(nnUNetTrainerRelKD):
    """ERFNet distilled from the teacher; taps as in the ERFNet student bundle."""

    student_class = ERFNet
    student_taps = ("encoder.stage2", "decoder.stage1")
