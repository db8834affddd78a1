"""Teacher-side MSAN pre-training (generalizable distillation): alignment consistency training on two views.

The teacher is frozen; its tapped features of two intensity-augmented views of each training slice (a simulated
scanner change: bias field, contrast, noise) train the teacher's :class:`~monai_relkd.networks.AlignmentNetwork`
with :class:`~monai_relkd.losses.AlignmentConsistencyLoss`. The result is saved atomically with what is needed to
rebuild it (:func:`load_alignment_network`).

Bundle use (the ENet student bundle's ``configs/gkd.json``)::

    python -m monai.bundle run pretrain_msan --config_file "['.../train.json', '.../gkd.json']"
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data._io import atomic_torch_save
from ..losses.gkd import AlignmentConsistencyLoss, freeze_alignment_network
from ..networks.alignment import AlignmentNetwork
from .taps import FeatureTaps
from .teacher import freeze

__all__ = [
    "pretrain_teacher_msan",
    "load_alignment_network",
    "load_msan_weights",
    "scanner_view",
    "TeacherAlignmentLoader",
]

logger = logging.getLogger(__name__)

_HOWTO = ("pre-train it first: python -m monai.bundle run pretrain_msan --config_file "
          "\"['<student bundle>/configs/train.json','<student bundle>/configs/gkd.json']\" --bundle_root <student bundle>")


def scanner_view() -> Callable[[torch.Tensor], torch.Tensor]:
    """A random simulated scanner change of a (C, *S) image: bias field, contrast (gamma) and Gaussian noise."""
    from monai.transforms import Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise

    return Compose([RandBiasField(prob=1.0, coeff_range=(0.1, 0.3)), RandAdjustContrast(prob=1.0, gamma=(0.6, 1.6)),
                    RandGaussianNoise(prob=0.5, std=0.05)])


def _two_views(images: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Two independent random views of each (C, *S) image of a (B, C, *S) batch."""
    first = torch.stack([torch.as_tensor(view(x)) for x in images])
    second = torch.stack([torch.as_tensor(view(x)) for x in images])
    return first.float(), second.float()


def pretrain_teacher_msan(
    teacher: nn.Module,
    tap: str,
    msan: AlignmentNetwork,
    data_loader: Iterable,
    output_path: str | os.PathLike,
    num_steps: int = 300,
    learning_rate: float = 1e-3,
    w_consistency: float = 1.0,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    image_key: str = "image",
) -> AlignmentNetwork:
    """
    Train the teacher's MSAN with alignment consistency on two views, the teacher frozen, and save it.

    Args:
        teacher: the trained teacher (frozen here).
        tap: the teacher module whose output the MSAN aligns (a name of ``teacher.named_modules()``).
        msan: the alignment network to train (``in_channels`` = the tap's channels).
        data_loader: batches of dicts with ``image_key`` (B, C, *S), cycled until ``num_steps``.
        output_path: where the MSAN is saved (atomically): ``{"state_dict", "config", "tap", "steps", "loss"}``.
        num_steps: optimizer steps.
        learning_rate: Adam learning rate.
        w_consistency: weight of the two-view consistency term (reconstruction has weight 1).
        device: where the teacher and the MSAN run.
        log_every: log the loss every this many steps.
        image_key: the key of the image in a batch.

    Returns:
        the trained MSAN, frozen (eval mode, no gradients).
    """
    device = torch.device(device)
    teacher = freeze(teacher.to(device))
    msan = msan.to(device).train().requires_grad_(True)  # the losses that use it froze it
    loss_fn = AlignmentConsistencyLoss(msan, w_consistency=w_consistency)
    optimizer = torch.optim.Adam(msan.parameters(), lr=learning_rate)
    view = scanner_view()
    taps = FeatureTaps(teacher, [tap], detach=True)
    start, value = time.perf_counter(), float("nan")
    try:
        batches = itertools.cycle(data_loader)
        for step in range(1, num_steps + 1):
            first, second = _two_views(next(batches)[image_key], view)
            with torch.no_grad():
                taps.clear()
                teacher(first.to(device))
                (f1,) = taps.features()
                taps.clear()
                teacher(second.to(device))
                (f2,) = taps.features()
            loss = loss_fn(f1, f2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if step % log_every == 0 or step == num_steps:
                logger.info("MSAN pre-training (teacher tap %s): step %d/%d, ACT loss %.4f, %.0f s", tap, step,
                            num_steps, value, time.perf_counter() - start)
    finally:
        taps.remove()
    _save(msan, output_path, tap=tap, steps=num_steps, loss=value)
    return freeze_alignment_network(msan)


def _save(msan: AlignmentNetwork, path: str | os.PathLike, **info: Any) -> None:
    config = {"in_channels": msan.in_channels, "vector_dim": msan.vector_dim, "grid": msan.grid,
              "hidden_channels": msan.encoder[0].out_features, "spatial_dims": msan.spatial_dims}
    state = {k: v.detach().cpu() for k, v in msan.state_dict().items()}
    atomic_torch_save({"state_dict": state, "config": config, **info}, path)
    logger.info("MSAN saved to %s (%s)", path, info)


def _read(path: str | os.PathLike) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher MSAN checkpoint {path} does not exist: {_HOWTO}.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or not a torch file
        raise ValueError(f"teacher MSAN checkpoint {path} cannot be read ({err}); {_HOWTO}.") from err
    if not isinstance(saved, dict) or "state_dict" not in saved or "config" not in saved:
        raise ValueError(f"{path} is not an MSAN checkpoint (no 'state_dict'/'config'); {_HOWTO}.")
    return saved


def load_alignment_network(path: str | os.PathLike) -> AlignmentNetwork:
    """Rebuild a saved MSAN (its architecture is in the file), frozen."""
    saved = _read(path)
    msan = AlignmentNetwork(**saved["config"])
    msan.load_state_dict(saved["state_dict"])
    return freeze_alignment_network(msan)


def load_msan_weights(msan: AlignmentNetwork, path: str | os.PathLike) -> AlignmentNetwork:
    """Load saved MSAN weights into an existing (frozen) ``msan`` in place; a mismatch names both shapes."""
    saved = _read(path)
    expected = {"in_channels": msan.in_channels, "vector_dim": msan.vector_dim, "grid": msan.grid,
                "spatial_dims": msan.spatial_dims}
    got = {k: saved["config"].get(k) for k in expected}
    if got != expected:
        raise ValueError(f"teacher MSAN checkpoint {path} was saved for {got}, but the config builds {expected}.")
    msan.load_state_dict(saved["state_dict"])
    logger.info("teacher MSAN loaded from %s (tap %s, %s steps)", path, saved.get("tap"), saved.get("steps"))
    return msan


class TeacherAlignmentLoader:
    """
    Trainer handler that loads the pre-trained teacher MSAN's weights into the (frozen) module the GKD losses hold,
    when training starts. The checkpoint is checked when the handler is attached, so a missing or unreadable file
    stops the run before its first iteration and says how to make it. Bundle config (``configs/gkd.json``)::

        "+train#handlers": [{"_target_": "monai_relkd.engines.TeacherAlignmentLoader",
                             "msan": "@gkd#teacher_msan", "path": "@gkd#teacher_msan_ckpt"}]

    Args:
        msan: the teacher's alignment network as built by the config.
        path: the checkpoint written by :func:`pretrain_teacher_msan`.
    """

    def __init__(self, msan: AlignmentNetwork, path: str | os.PathLike) -> None:
        self.msan = msan
        self.path = path

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        _read(self.path)  # fail now, with the way out, rather than at the first iteration
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        device = next(self.msan.parameters()).device
        load_msan_weights(self.msan, self.path).to(device)
