"""``UntrackedCompose``: training preprocessing whose random transforms run without MONAI's metadata tracking."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import Compose, RandomizableTrait, Transform

__all__ = ["UntrackedCompose"]


def _untracked(data: Any) -> Any:
    """``data`` with every ``MetaTensor`` (at the top level or as a mapping's value) as its plain tensor."""
    if isinstance(data, MetaTensor):
        return data.as_tensor()
    if isinstance(data, Mapping):
        return {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in data.items()}
    return data


class UntrackedCompose(Compose):
    """
    ``Compose`` whose transforms from the first random one on run on plain tensors with MONAI's metadata tracking off
    (``monai.data.set_track_meta(False)``, restored afterwards); the transforms before it (the ones a
    ``CacheDataset`` caches: loading, orientation, normalisation, resizing) track metadata as usual.

    For the training preprocessing, whose augmented slices only feed a forward and backward pass: nothing reads their
    affine or transform trace, and keeping them is most of the cost of the augmentation at small slice sizes (a crop
    of (C, H, W, 1) from a (C, H, W, D) volume, a flip and an intensity scale of 16 slices at 48×48: about 0.06 s per
    batch tracked, 0.012 s untracked, on one CPU thread). The values and the random draws are those of the same
    ``Compose`` (the transforms are seeded alike). The augmented data cannot be inverted (``Invertd``) and carries no
    affine: do not use it where an output is saved or resampled back (evaluation, inference).

    Bundle config::

        "preprocessing": {"_target_": "monai_relkd.data.UntrackedCompose",
                          "transforms": "$@train#deterministic_transforms + @train#random_transforms"}

    Args: as ``monai.transforms.Compose``.
    """

    def first_random(self) -> int:
        """Index of the first transform that is random (or not a MONAI ``Transform``), as ``CacheDataset`` finds it;
        the number of transforms when there is none."""
        index = self.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        return len(self.transforms) if index is None else index

    def __call__(self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False,
                 lazy: bool | None = None) -> Any:
        end = len(self.transforms) if end is None else end
        split = min(max(start, self.first_random()), end)
        if start < split:  # the deterministic part, tracked (when not read from a cache)
            input_ = super().__call__(input_, start, split, threading, lazy)
        if split >= end:
            return input_
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(_untracked(input_), split, end, threading, lazy)
        finally:
            set_track_meta(previous)
