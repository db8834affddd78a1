"""Inference input checks: each file is checked before the network sees it, a bad file is reported by name and
skipped, the rest of the folder is still segmented, and the run ends non-zero listing what failed.

The bundles' ``inference.json`` wires it as::

    "datalist": "$monai_relkd.inference.inference_datalist(@input_path, @output_postfix)",
    "dataset": {"_target_": "monai_relkd.inference.CheckedDataset", "data": "@datalist",
                "transform": "@preprocessing", "max_image_gib": "@max_image_gib"},
    preprocessing: LoadImaged, EnsureChannelFirstd,
                   {"_target_": "monai_relkd.inference.FiniteIntensityd", "keys": "image", "mode": "@nonfinite"}, ...
    "evaluator": {..., "iteration_update": "$monai_relkd.inference.skip_failed_iteration"},
    "initialize": ["$monai_relkd.inference.check_weights(@ckpt_path)", ...],
    "run": ["$@evaluator.run()", "$@dataset.raise_failures()"]

Checks, in order (before any voxel is read, then on the loaded volume):

1. the header reads as NIfTI; the image is 3-D (trailing singleton dimensions allowed): a 4-D series or a
   multi-channel image is refused with its shape;
2. the size the header declares, as float32 in memory, is at most ``max_image_gib`` (default 2 GiB; a
   512 x 512 x 200 volume is 0.2 GiB), so a corrupt header cannot make nibabel allocate tens of GiB;
3. the file is large enough to hold what the header declares (exactly for ``.nii``; for ``.nii.gz`` within
   deflate's largest compression ratio, 1032:1);
4. after loading, NaN/Inf voxels are an error naming the file and the count (``nonfinite="error"``, the default: a
   single NaN spreads through intensity normalisation and turns the whole prediction into background) or are
   replaced by the smallest finite intensity with a warning (``nonfinite="replace"``).

Files whose name ends with the bundle's output postfix (``*_seg.nii.gz``) are never taken as inputs, so an output
folder equal to the input folder is safe to run twice.

This module imports neither ignite nor the training engines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai.config import KeysCollection
from monai.data import Dataset
from monai.transforms import MapTransform

from .bundle_support import _strip_nifti

__all__ = [
    "InferenceFailed",
    "InputCheckError",
    "check_image_header",
    "inference_datalist",
    "CheckedDataset",
    "FiniteIntensityd",
    "skip_failed_iteration",
    "check_weights",
    "load_checked_weights",
    "WeightsError",
    "FAILED_KEY",
    "DEFAULT_MAX_IMAGE_GIB",
    "OnnxRuntimeNetwork",
    "check_onnx_model",
    "ChannelArgmaxd",
]

logger = logging.getLogger(__name__)

#: batch key of an item that failed its checks (its value: ``"<file>: <cause>"``).
FAILED_KEY = "relkd_failed"
#: default limit on the in-memory (float32) size an image header may declare.
DEFAULT_MAX_IMAGE_GIB = 2.0
#: deflate never compresses better than about 1032:1.
_MAX_DEFLATE_RATIO = 1032


class InputCheckError(ValueError):
    """One input file fails a check; the message starts with the file's path."""


class InferenceFailed(SystemExit):
    """The run cannot (fully) succeed. A ``SystemExit``: ``python -m monai.bundle run`` prints the message alone -
    the cause and the files first, not MONAI's ``ConfigExpression`` traceback - and exits with status 1. In-process
    callers catch it like any exception; ``.failures`` lists ``(file, cause)``."""

    def __init__(self, message: str, failures: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.failures = list(failures)

    def __str__(self) -> str:
        return self.message


def check_image_header(path: str | os.PathLike, max_image_gib: float = DEFAULT_MAX_IMAGE_GIB) -> tuple[int, ...]:
    """Check one image file from its header only (nothing is allocated); return its 3-D shape.

    Raises:
        InputCheckError: unreadable header, not 3-D (4-D or multi-channel), declared size above ``max_image_gib``,
            or a file too small for what its header declares. The message starts with the file's path.
    """
    import nibabel as nib

    path = str(path)
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        header = img.header
    except Exception as e:  # nibabel raises several types for corrupt / non-NIfTI files
        raise InputCheckError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    spatial = list(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) != 3:
        kind = "a 4-D series or multi-channel image" if len(spatial) > 3 else f"{len(spatial)}-D"
        raise InputCheckError(
            f"{path}: image of shape {shape} is {kind}; the bundle segments one 3-D MRI volume (one channel) per "
            "file: split it into one 3-D file per volume or channel."
        )
    if any(s <= 0 for s in spatial):
        raise InputCheckError(f"{path}: header declares an empty image (shape {shape}).")
    voxels = int(np.prod(np.asarray(shape, dtype=np.float64)))
    in_memory = voxels * 4  # loaded as float32
    limit = float(max_image_gib) * 2**30
    if in_memory > limit:
        raise InputCheckError(
            f"{path}: header declares shape {shape} = {in_memory / 2**30:.1f} GiB in memory, above the limit of "
            f"{max_image_gib:g} GiB (raise max_image_gib if the image is really that large)."
        )
    try:
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        # single-file NIfTI: the data start at vox_offset, at least after the 348-byte header and 4 extension bytes
        offset = max(int(header["vox_offset"]), int(getattr(header, "single_vox_offset", 0)))
    except Exception:
        itemsize, offset = 1, 0
    expected = offset + voxels * itemsize
    size = os.path.getsize(path)
    if path.endswith(".gz"):
        if expected > size * _MAX_DEFLATE_RATIO:
            raise InputCheckError(
                f"{path}: header declares shape {shape} ({expected / 2**20:.0f} MiB of data) but the compressed "
                f"file has only {size} bytes: the header or the file is corrupt."
            )
    elif size < expected:
        raise InputCheckError(
            f"{path}: header declares shape {shape} ({expected} bytes with the header) but the file has {size} "
            "bytes: it is truncated or its header is corrupt."
        )
    return tuple(spatial)


def inference_datalist(input_path: str | os.PathLike, output_postfix: str = "seg") -> list[dict[str, str]]:
    """The ``[{"image": path}]`` list an inference run reads from ``input_path`` (a file, folder or glob).

    Files named ``*_<output_postfix>.nii[.gz]`` - this bundle's outputs - and ``*_segmentation`` labels are left
    out, with a log line, so outputs are never segmented again.

    Raises:
        InferenceFailed: nothing to segment (the message names ``input_path``).
    """
    from monai_relkd.bundle_support import list_images

    try:
        images = list_images(input_path)
    except FileNotFoundError as e:
        raise InferenceFailed(f"inference: {e}") from None
    skip = f"_{output_postfix}" if output_postfix else None
    kept = [p for p in images if not (skip and _strip_nifti(Path(p).name).endswith(skip))]
    if len(kept) < len(images):
        logger.info("inference: left out %d file(s) named *%s.nii[.gz] (outputs of this bundle) in %s.",
                    len(images) - len(kept), skip, input_path)
    if not kept:
        raise InferenceFailed(
            f"inference: input_path '{input_path}' holds only outputs of this bundle (*{skip}.nii[.gz]); "
            "nothing to segment."
        )
    return [{"image": p} for p in kept]


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception behind MONAI's wrappers (``applying transform ...``), or our own check's error."""
    seen = set()
    while not isinstance(error, InputCheckError) and id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    return error


class CheckedDataset(Dataset):
    """MONAI ``Dataset`` whose items are checked first; an item that fails is returned as ``{FAILED_KEY: message}``.

    The header of ``item[image_key]`` is checked (:func:`check_image_header`) before the transform runs; any
    exception of the transform (e.g. :class:`FiniteIntensityd`, a corrupt gzip stream) is caught too. Each failure is
    logged at once and kept in :attr:`failures`; the evaluator's ``iteration_update``
    (:func:`skip_failed_iteration`) skips the item without running the network. After the run,
    :meth:`raise_failures` ends it non-zero listing them.

    Args:
        data: the datalist.
        transform: the preprocessing.
        image_key: key of the image path.
        max_image_gib: see :func:`check_image_header`.
    """

    def __init__(self, data: Sequence, transform: Any = None, image_key: str = "image",
                 max_image_gib: float = DEFAULT_MAX_IMAGE_GIB) -> None:
        super().__init__(data=data, transform=transform)
        self.image_key = image_key
        self.max_image_gib = float(max_image_gib)
        self.failures: dict[str, str] = {}

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        path = str(item.get(self.image_key, f"item {index}")) if isinstance(item, Mapping) else f"item {index}"
        try:
            if isinstance(item, Mapping) and isinstance(item.get(self.image_key), (str, os.PathLike)):
                check_image_header(item[self.image_key], self.max_image_gib)
            return super()._transform(index)
        except Exception as e:
            cause = _root_cause(e)
            text = str(cause)
            message = text if text.startswith(path) else f"{path}: {type(cause).__name__}: {text}"
            self.failures[path] = message[len(path) + 2 :] if message.startswith(path + ": ") else message
            logger.error("inference: skipped %s", message)
            return {FAILED_KEY: message}

    def raise_failures(self) -> None:
        """Raise :class:`InferenceFailed` listing every failed file; nothing when all succeeded."""
        if not self.failures:
            return
        n, total = len(self.failures), len(self.data)
        lines = [f"inference: {n} of {total} file(s) could not be segmented ({total - n} segmented):"]
        lines += [f"  {path}: {cause}" for path, cause in self.failures.items()]
        raise InferenceFailed("\n".join(lines), list(self.failures.items()))


class FiniteIntensityd(MapTransform):
    """Refuse (``mode="error"``) or replace (``mode="replace"``) NaN/Inf voxels, naming the file.

    Place it right after loading, before intensity normalisation (which spreads one NaN to every voxel). Replacement
    uses the smallest finite intensity of the image (background-like) and logs a warning with the count.
    """

    def __init__(self, keys: KeysCollection, mode: str = "error", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in ("error", "replace"):
            raise ValueError(f"mode must be 'error' or 'replace', got {mode!r}.")
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            finite = torch.isfinite(img) if isinstance(img, torch.Tensor) else np.isfinite(img)
            bad = int((~finite).sum())
            if not bad:
                continue
            meta = getattr(img, "meta", {}) or {}
            name = str(meta.get("filename_or_obj", key))
            total = int(np.prod(img.shape))
            if self.mode == "error" or bad == total:
                raise InputCheckError(
                    f"{name}: {bad} of {total} voxels are NaN or Inf; the prediction would be "
                    "all background. Fix the file, or set nonfinite to 'replace' to replace them."
                )
            fill = img[finite].min()
            img = torch.where(finite, img, fill) if isinstance(img, torch.Tensor) else np.where(finite, img, fill)
            logger.warning("inference: %s: replaced %d NaN/Inf voxel(s) by the smallest finite intensity.", name, bad)
            d[key] = img
        return d


class ChannelArgmaxd(MapTransform):
    """``AsDiscreted(argmax=True)`` - the index of the largest channel, ``(C, *spatial) -> (1, *spatial)``, same dtype
    and metadata - computed as ``C - 1`` elementwise comparisons instead of ``torch.argmax(dim=0)``.

    torch 2.13's CPU argmax over a short leading dimension is slow: 0.66 s for the ``(2, 384, 384, 24)``
    probabilities of one prostate volume, against about 5 ms for one comparison (1 thread, measured). Ties go to
    the lowest index, as with ``torch.argmax``.

    Example::

        >>> ChannelArgmaxd("pred")({"pred": torch.tensor([[[0.2, 0.7]], [[0.8, 0.3]]])})["pred"]
        tensor([[[1., 0.]]])
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.utils import convert_to_dst_type

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            values = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
            best, index = values[:1], torch.zeros_like(values[:1])
            for c in range(1, values.shape[0]):
                index = torch.where(values[c : c + 1] > best, float(c), index)
                best = torch.maximum(best, values[c : c + 1])
            d[key] = convert_to_dst_type(index, img)[0]
        return d


def skip_failed_iteration(engine: Any, batchdata: Mapping) -> Any:
    """``SupervisedEvaluator(iteration_update=...)``: skip an item :class:`CheckedDataset` marked as failed (no
    network call, no output written); run MONAI's own iteration otherwise."""
    if isinstance(batchdata, Mapping) and FAILED_KEY in batchdata:
        return []
    return engine._iteration(engine, batchdata)


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, truncated, not a state dict, or not for the bundle's network."""


def load_checked_weights(path: str | os.PathLike, network: Any = None) -> dict:
    """Load a bundle's weights with ``torch.load(weights_only=True)``; check them against ``network`` if given.

    Returns:
        the state dict (the ``"model"`` entry of a MONAI ``CheckpointSaver`` dict is taken).

    Raises:
        WeightsError: the file is missing, unreadable or truncated, not a flat state dict, or does not match
            ``network`` (missing/unexpected keys, shapes). The message starts with the file's path.
    """
    import torch

    path = str(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: weights not found. Train the bundle (its train.json writes models/model.pt) "
                           "or pass --ckpt_path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        cause = _root_cause(e)
        first = (str(cause).splitlines() or [""])[0].split(". ")[0]
        raise WeightsError(
            f"{path}: cannot load the weights ({type(cause).__name__}: {first}); "
            "the file is truncated or corrupt (re-train, or restore it from a release)."
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict (a flat mapping of tensors).")
    if network is not None:
        while hasattr(network, "module") and isinstance(network.module, torch.nn.Module):
            network = network.module
        expected = network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
            if shapes:
                k = shapes[0]
                parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {k}: {tuple(state[k].shape)} vs "
                             f"{tuple(expected[k].shape)})")
            raise WeightsError(f"{path}: the weights do not match the bundle's network "
                               f"{type(network).__name__}: " + "; ".join(parts) + ".")
    return dict(state)


def check_weights(path: str | os.PathLike, network: Any = None) -> dict:
    """:func:`load_checked_weights` for a bundle's ``initialize`` list: a problem ends the run with
    :class:`InferenceFailed` (its message, naming the file, is the first line the user sees)."""
    try:
        return load_checked_weights(path, network)
    except WeightsError as e:
        raise InferenceFailed(str(e)) from None


_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def check_onnx_model(path: str | os.PathLike) -> str:
    """For ``configs/inference_onnx.json``'s ``initialize``: end the run with :class:`InferenceFailed` naming the file
    and the export command when the ONNX model is missing; return the path otherwise."""
    path = str(path)
    if not os.path.isfile(path):
        raise InferenceFailed(
            f"{path}: ONNX model not found. Export it from the bundle's weights first: "
            "relkd export --bundle <bundle folder> --format onnx (writes models/model.onnx), or pass --onnx_path."
        )
    return path


class OnnxRuntimeNetwork(torch.nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, called like the eager network: ``(B, C, H, W)`` tensor in,
    ``(B, K, H, W)`` float tensor of logits out (on the input's device).

    It has no parameters; ``.to()``, ``.eval()`` and ``.train()`` are accepted and change nothing, so MONAI's
    ``SupervisedEvaluator`` and inferers (e.g. ``SliceInferer``) use it in place of the ``torch.nn.Module``.

    Args:
        path: the ``.onnx`` file (``relkd export --format onnx`` writes it with a dynamic batch and spatial size).
        num_threads: ONNX Runtime's intra-op threads; 0 lets it choose (one per physical core).
        graph_optimization_level: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"`` (default; constant
            folding, Conv+BatchNorm fusion, layout optimisations).
        providers: execution providers; default ``["CPUExecutionProvider"]``.

    Example::

        >>> net = OnnxRuntimeNetwork("models/model.onnx")           # doctest: +SKIP
        >>> net(torch.zeros(4, 1, 128, 128)).shape                   # doctest: +SKIP
        torch.Size([4, 2, 128, 128])
    """

    def __init__(self, path: str | os.PathLike, num_threads: int = 0, graph_optimization_level: str = "all",
                 providers: Sequence[str] | None = None) -> None:
        super().__init__()
        if graph_optimization_level not in _ORT_LEVELS:
            raise ValueError(f"graph_optimization_level must be one of {sorted(_ORT_LEVELS)}, "
                             f"got {graph_optimization_level!r}.")
        if int(num_threads) < 0:
            raise ValueError(f"num_threads must be >= 0 (0: ONNX Runtime's default), got {num_threads}.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: ONNX model not found (relkd export --format onnx writes it).")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("OnnxRuntimeNetwork needs onnxruntime: pip install 'monai-relkd[onnx]'.") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads)
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[graph_optimization_level])
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, sess_options=options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)
