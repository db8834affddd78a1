"""``TeacherOutputCache``: the frozen teacher's logits and tapped features per distinct input slice, computed once.

The teacher is frozen and in eval mode, so its output for one slice never changes and does not depend on the other
slices of the batch. A 2-D training pipeline draws the same few thousand slices (and their flips) over and over:
at 64×64 the teacher's forward (DeepLabV3+, 40 M parameters) costs more than the student's whole step. The cache
keys each input slice by its bytes (a BLAKE2 digest of shape, dtype and values), runs the teacher only on the
slices it has not seen, and stores logits and features in ``float16`` on the CPU.

Keys are exact: a slice hits only if it is bit-identical to one seen before. Random intensity augmentation
applied to the teacher's input therefore defeats the cache; give the teacher the slice *before* intensity
augmentation (the student bundles copy it to ``teacher_image`` after the flip, before ``RandScaleIntensityd``,
and ``teacher_input_key`` selects it). That changes what the teacher sees: with the cache the teacher's
targets are those of the unscaled slice while the student sees the scaled one (see ``docs/results.md``).

One cache belongs to one teacher (checkpoint) and one set of taps: :meth:`TeacherOutputCache.shared` hands out one
instance per name within a process, so students trained one after another on the same fold reuse it; ``save`` /
``load`` keep it on disk (atomically) across processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["TeacherOutputCache"]

logger = logging.getLogger(__name__)

TeacherFn = Callable[[torch.Tensor], "tuple[torch.Tensor, Sequence[torch.Tensor]]"]


class TeacherOutputCache:
    """
    Teacher outputs per input slice, computed on first sight and then read back.

    Example::

        cache = TeacherOutputCache()
        logits, feats = cache(teacher_fn, images)   # teacher_fn(x) -> (logits (b, K, H, W), [features])
        logits, feats = cache(teacher_fn, images)   # the same slices again: no teacher forward at all
        cache.hits, cache.misses                    # (B, B)

    Args:
        dtype: storage type of the cached tensors (``torch.float16`` by default, half the memory of float32; the
            read-back tensors are cast to the input's dtype).
        path: a ``.pt`` file to :meth:`load` from when it exists (and to :meth:`save` to).

    Raises:
        ValueError: ``dtype`` is not a floating type.
    """

    _shared: ClassVar[dict[str, TeacherOutputCache]] = {}

    def __init__(self, dtype: torch.dtype = torch.float16, path: str | os.PathLike | None = None) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}.")
        self.dtype = dtype
        self.path = Path(path) if path is not None else None
        self._store: dict[bytes, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.is_file():
            self.load(self.path)

    @classmethod
    def shared(cls, name: str | os.PathLike, **kwargs: Any) -> TeacherOutputCache:
        """The process-wide cache registered under ``name`` (e.g. the teacher checkpoint's path), created on first use.

        Bundle config (students of one fold trained one after another in one process share it)::

            "teacher_cache": "$monai_relkd.engines.TeacherOutputCache.shared(@teacher_ckpt)"
        """
        key = os.fspath(name)
        if key not in cls._shared:
            cls._shared[key] = cls(**kwargs)
        return cls._shared[key]

    @classmethod
    def release(cls, name: str | os.PathLike | None = None) -> None:
        """Forget the shared cache ``name`` (all of them when None), freeing its memory."""
        if name is None:
            cls._shared.clear()
        else:
            cls._shared.pop(os.fspath(name), None)

    @staticmethod
    def key(item: torch.Tensor) -> bytes:
        """Digest of one input slice (C, *S): its shape, dtype and exact values."""
        t = item.detach().to("cpu").contiguous()
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        return h.digest()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, item: torch.Tensor) -> bool:
        return self.key(item) in self._store

    def __call__(self, teacher_fn: TeacherFn, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        The teacher's ``(logits, features)`` for ``images`` (B, C, *S), running ``teacher_fn`` on unseen slices only.

        Args:
            teacher_fn: ``x (b, C, *S) -> (logits (b, K, *S'), [feature (b, C_i, *S_i), ...])`` under ``no_grad``.
            images: the teacher's input batch.

        Returns:
            logits (B, K, *S') and the list of features (B, C_i, *S_i), on ``images.device`` in ``images.dtype``.

        Raises:
            ValueError: ``teacher_fn`` returned a different number of features than the cache holds, or a
                batch size that is not the number of slices it was given.
        """
        keys = [self.key(images[i]) for i in range(images.shape[0])]
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        if missing:
            first = {k: keys.index(k) for k in missing}
            idx = torch.as_tensor([first[k] for k in missing], device=images.device)
            with torch.no_grad():
                logits, feats = teacher_fn(images.index_select(0, idx))
            feats = list(feats)
            if logits.shape[0] != len(missing) or any(f.shape[0] != len(missing) for f in feats):
                raise ValueError(
                    f"teacher_fn returned a batch of {logits.shape[0]} for {len(missing)} slices; it must return "
                    "one output per input slice."
                )
            n_feats = self._n_features()
            if n_feats is not None and n_feats != len(feats):
                raise ValueError(
                    f"teacher_fn returned {len(feats)} feature maps, the cache holds {n_feats}: one cache serves one "
                    "teacher and one set of taps."
                )
            logits_c = logits.detach().to("cpu", self.dtype)
            feats_c = [f.detach().to("cpu", self.dtype) for f in feats]
            for j, k in enumerate(missing):
                self._store[k] = (logits_c[j].clone(), tuple(f[j].clone() for f in feats_c))
        self.misses += len(missing)  # slices the teacher ran on
        self.hits += len(keys) - len(missing)
        entries = [self._store[k] for k in keys]
        out_logits = torch.stack([e[0] for e in entries]).to(images.device, images.dtype)
        n = len(entries[0][1])
        out_feats = [torch.stack([e[1][i] for e in entries]).to(images.device, images.dtype) for i in range(n)]
        return out_logits, out_feats

    def _n_features(self) -> int | None:
        for entry in self._store.values():
            return len(entry[1])
        return None

    def nbytes(self) -> int:
        """Memory held by the cached tensors, in bytes."""
        return sum(e[0].numel() * e[0].element_size() + sum(f.numel() * f.element_size() for f in e[1])
                   for e in self._store.values())

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the cache to ``path`` (default: the constructor's ``path``) atomically; returns the path."""
        from monai_relkd.data._io import atomic_torch_save

        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("TeacherOutputCache.save: no path given and none set at construction.")
        atomic_torch_save({"dtype": str(self.dtype), "entries": {k.hex(): v for k, v in self._store.items()}}, target)
        return target

    def load(self, path: str | os.PathLike) -> TeacherOutputCache:
        """Add the entries of a file written by :meth:`save`.

        Raises:
            ValueError: the file is not a teacher-output cache (the message names the file).
        """
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
            entries = state["entries"]
            loaded = {bytes.fromhex(k): (v[0].to(self.dtype), tuple(f.to(self.dtype) for f in v[1]))
                      for k, v in entries.items()}
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{os.fspath(path)!r} is not a TeacherOutputCache file ({err}).") from err
        self._store.update(loaded)
        logger.info("TeacherOutputCache: %d entries loaded from %s", len(loaded), path)
        return self

    def __repr__(self) -> str:
        return (f"TeacherOutputCache(entries={len(self)}, hits={self.hits}, misses={self.misses}, "
                f"{self.nbytes() / 2**20:.1f} MiB {self.dtype})")
