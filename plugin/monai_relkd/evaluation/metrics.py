"""Per-case segmentation metrics in millimetres: Dice, HD95 and average symmetric surface distance.

All three numbers come from MONAI's metric classes (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``,
``SurfaceDistanceMetric(symmetric=True)``) with the voxel spacing passed per call; this module only binarises the
masks and decides, explicitly and before MONAI is called, what an empty prediction or an empty reference scores.
See :data:`EMPTY_POLICY`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.utils import convert_to_tensor

__all__ = ["METRICS", "EMPTY_POLICY", "evaluate_case", "binarize"]

MaskLike = Union[np.ndarray, torch.Tensor]

#: metric keys, in reporting order
METRICS: tuple[str, ...] = ("dice", "hd95", "asd")

#: What an empty mask scores. Written verbatim into ``summary.json`` under ``"policy"``.
EMPTY_POLICY: dict[str, Any] = {
    "foreground": "voxels > 0 in the reference (public labels 1 and 2 merged) and in the prediction",
    "both_empty": {
        "dice": 1.0,
        "hd95": 0.0,
        "asd": 0.0,
        "why": "prediction and reference agree exactly (nnU-Net reports NaN Dice and drops the case; "
        "we count it as a perfect case so that every case enters every mean)",
    },
    "reference_empty_prediction_not_empty": {"dice": 0.0, "hd95": None, "asd": None},
    "prediction_empty_reference_not_empty": {"dice": 0.0, "hd95": None, "asd": None},
    "undefined_distance": "null in per-case output and CSV (empty cell); excluded from the distance means and "
    "standard deviations and counted in 'n_undefined' of that metric; Dice is always defined",
    "hd95": "MONAI HausdorffDistanceMetric(percentile=95, symmetric): the larger of the two directed 95th "
    "percentiles of surface-voxel distances, in mm",
    "asd": "MONAI SurfaceDistanceMetric(symmetric=True): mean over the surface voxels of both masks of the "
    "distance to the other mask's surface, in mm",
    "surface": "MONAI surface voxels: mask XOR binary_erosion(mask); distances by Euclidean distance transform "
    "with the reference header's voxel spacing",
    "std": "population standard deviation (numpy ddof=0) over the defined values",
    "mean": "'mean' is over cases (all sites pooled); 'mean_of_site_means' averages the per-site means of the "
    "sites that have a defined value",
}


def binarize(mask: MaskLike, name: str = "mask") -> torch.Tensor:
    """
    Foreground (``> 0``) of a label map or a prediction mask as a CPU-or-same-device ``bool`` tensor.

    Args:
        mask: integer, boolean or float array/tensor of shape (H, W[, D]); float values must be integral
            (a probability map is an error, threshold it first).
        name: how the mask is called in error messages.

    Raises:
        TypeError: when ``mask`` is not an array or tensor.
        ValueError: when a float mask holds NaN or non-integral values.
    """
    if not isinstance(mask, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(mask).__name__}.")
    t = convert_to_tensor(mask, track_meta=False)
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point():
        if torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN values; expected a mask.")
        if (t != torch.round(t)).any():
            raise ValueError(
                f"{name} has non-integral values (min {float(t.min()):g}, max {float(t.max()):g}); "
                "expected a label mask, not probabilities: threshold or argmax it first."
            )
    return t > 0


def _validate_spacing(spacing: Sequence[float] | float | np.ndarray | torch.Tensor, ndim: int) -> list[float]:
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().numpy()
    sp = np.asarray(spacing, dtype=float).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise ValueError(f"spacing must have one value per spatial axis ({ndim}), got {list(sp)}.")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing values must be finite and positive, got {list(sp)}.")
    return [float(s) for s in sp]


def evaluate_case(pred: MaskLike, label: MaskLike, spacing: Sequence[float] | float) -> dict[str, float | None]:
    """
    Dice, HD95 (mm) and average symmetric surface distance (mm) of one prediction against its reference.

    Foreground is ``> 0`` in both masks (the public prostate labels use 1 and 2; they are merged). Empty masks
    follow :data:`EMPTY_POLICY`, decided before MONAI is called so no warning, NaN or inf ever comes back:

    - both empty: ``dice 1.0, hd95 0.0, asd 0.0`` (perfect agreement);
    - exactly one empty: ``dice 0.0, hd95 None, asd None`` (undefined; excluded from distance means and
      counted as ``n_undefined`` by :func:`monai_relkd.evaluation.summarize_cases`).

    Args:
        pred: predicted mask of shape (H, W, D) (or (H, W) for 2-D), numpy or torch, any dtype; ``> 0`` is
            foreground, float values must be integral.
        label: reference label map with the same shape as ``pred``.
        spacing: voxel size in mm along each array axis of ``pred``/``label`` (e.g. ``(0.5, 0.5, 3.0)``, in
            the same axis order as the array, as nibabel's ``header.get_zooms()``), or one number for isotropic.

    Returns:
        ``{"dice": float, "hd95": float | None, "asd": float | None}`` (plain Python floats).

    Example::

        >>> import numpy as np
        >>> gt = np.zeros((8, 8, 8), np.uint8); gt[2:4, 2:4, 2:4] = 1
        >>> pr = np.roll(gt, 1, axis=2)                 # shift one voxel along the 3 mm axis
        >>> evaluate_case(pr, gt, spacing=(0.5, 0.5, 3.0))
        {'dice': 0.5, 'hd95': 3.0, 'asd': 1.5}
    """
    p = binarize(pred, "prediction")
    g = binarize(label, "label")
    if p.shape != g.shape:
        raise ValueError(f"prediction and label shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}.")
    if p.ndim not in (2, 3):
        raise ValueError(f"expected 2-D or 3-D masks (H, W[, D]) without channel dim, got shape {tuple(p.shape)}.")
    sp = _validate_spacing(spacing, p.ndim)
    g = g.to(p.device)

    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        both = EMPTY_POLICY["both_empty"]
        return {"dice": both["dice"], "hd95": both["hd95"], "asd": both["asd"]}
    if not p_any or not g_any:
        return {"dice": 0.0, "hd95": None, "asd": None}

    # MONAI metrics want (B, C, *spatial) one-hot; a single foreground channel with include_background=True
    y_pred = p[None, None].float()
    y = g[None, None].float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
    with warnings.catch_warnings():
        # both masks are non-empty here, so MONAI's empty-mask warnings cannot apply; MONAI 1.6 also warns about
        # its own internal use of a deprecated get_mask_edges argument
        warnings.filterwarnings("ignore", message=".*is all 0, this may result in nan/inf distance.*")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            y_pred, y, spacing=sp
        )
        asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(y_pred, y, spacing=sp)
    out = {"dice": float(dice.reshape(-1)[0]), "hd95": float(hd95.reshape(-1)[0]), "asd": float(asd.reshape(-1)[0])}
    for k, v in out.items():
        if not math.isfinite(v):  # cannot happen for two non-empty masks; guard the mean anyway
            raise RuntimeError(f"MONAI returned a non-finite {k} ({v}) for two non-empty masks.")
    return out
