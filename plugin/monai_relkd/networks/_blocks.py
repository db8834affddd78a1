"""Small pieces shared by the networks: padding to a multiple of the output stride, and the tap descriptor."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "feature_taps_method", "check_channels"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, int, int]:
    """Zero-pad the last two dims of ``x`` (B, C, H, W) at the bottom/right up to a multiple of ``multiple``.

    Returns the padded tensor and the original ``H`` and ``W`` so the caller can crop back with
    ``y[:, :, :h, :w]``. Nothing is copied when the size is already a multiple.
    """
    h, w = x.shape[-2], x.shape[-1]
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    if torch.jit.is_tracing() or ph > 0 or pw > 0:  # always record the pad when tracing
        x = F.pad(x, [0, pw, 0, ph])
    return x, h, w


def check_channels(in_channels: int, out_channels: int) -> None:
    """Validate the channel arguments shared by every network."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")


class feature_taps_method:  # noqa: N801  (used as a decorator, like classmethod)
    """Descriptor making ``feature_taps`` callable on the class *and* on an instance.

    - ``Net.feature_taps(**kwargs)`` returns the taps of a network built with ``kwargs`` (constructor defaults
      fill the rest);
    - ``net.feature_taps()`` returns the taps of that instance (its constructor arguments are kept in
      ``net.config``).

    The wrapped function has the signature ``f(cls, **constructor_kwargs) -> dict[str, tuple[int, int]]``.
    """

    def __init__(self, func: Callable[..., Dict[str, Tuple[int, int]]]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: Any, cls: type) -> Callable[..., Dict[str, Tuple[int, int]]]:
        if obj is None:
            return functools.partial(self.func, cls)
        config: Dict[str, Any] = dict(getattr(obj, "config", {}))

        def bound(**overrides: Any) -> Dict[str, Tuple[int, int]]:
            return self.func(cls, **{**config, **overrides})

        return bound

