"""An inferer that runs the network under :func:`torch.autocast` (mixed precision on any device, CPU included)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.inferers import SimpleInferer

__all__ = ["AutocastInferer"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class AutocastInferer(SimpleInferer):
    """:class:`monai.inferers.SimpleInferer` with the network's forward under ``torch.autocast`` on the input's device.

    MONAI's trainers autocast only on CUDA (``amp=True``); this gives the same mixed precision on a CPU, where
    ``bfloat16`` runs on the matrix units of recent Intel Xeons (AMX, AVX-512 BF16). The output is cast back to
    float32, so the loss and everything after the forward run in full precision.

    Args:
        dtype: ``"bfloat16"`` or ``"float16"``, the autocast dtype.
        enabled: ``False`` runs the plain forward (as ``SimpleInferer``).

    Shapes: ``inputs`` (B, C, H, W[, D]) in, the network's output (B, K, H, W[, D]) out, float32 if it was floating.

    Example::

        >>> inferer = AutocastInferer("bfloat16")
        >>> out = inferer(torch.rand(2, 1, 8, 8), torch.nn.Conv2d(1, 2, 3, padding=1))
        >>> out.dtype, tuple(out.shape)
        (torch.float32, (2, 2, 8, 8))
    """

    def __init__(self, dtype: str = "bfloat16", enabled: bool = True) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        super().__init__()
        self.dtype, self.enabled = _DTYPES[dtype], bool(enabled)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(inputs.device.type, dtype=self.dtype, enabled=self.enabled):
            out = network(inputs, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        return out
