"""Fréchet semantic distance (FSD): how far a network's features of an unseen site lie from its training sites'.

Qi et al., "Exploring Generalizable Distillation for Efficient Medical Image Segmentation" (arXiv:2207.12995,
IEEE JBHI 2024) measure the domain invariance of a segmentation network's features by the Fréchet distance between
Gaussian fits of the features of two domains. Here:

1. **features**: the output of one module ("tap", a name of ``named_modules()``, captured by
   :class:`monai_relkd.engines.FeatureTaps`) is globally average-pooled over its spatial dims, one C-vector per
   2-D slice (:func:`pooled_features`);
2. **slices**: by default only the slices whose reference label holds prostate (``slices="prostate"``), so the
   statistic describes the organ and not the count of empty slices a site happens to have; ``slices="all"`` takes
   every slice. At most ``max_slices`` per domain are drawn (uniformly at random, fixed seed);
3. **domains**: the training sites (the datalist's ``training`` and ``validation`` lists) against the held-out
   site (its ``test`` list);
4. **distance**: a Gaussian (mean ``mu``, covariance ``cov`` with ``ddof=1``) is fitted to each feature set and
   ``FSD = ‖mu1 − mu2‖² + Tr(cov1 + cov2 − 2 (cov1 cov2)^{1/2})`` (:func:`frechet_distance`). As for FID, this is
   the *squared* Fréchet distance (no square root is taken). Lower means more domain-invariant features.

The covariance of C channels is only well estimated from clearly more than C slices: with fewer, the fit is rank
deficient and the FSD is biased (a warning is logged). Compare FSDs only at the same tap, the same number of
slices and the same preprocessing.

Example::

    >>> from monai_relkd.evaluation import fsd_for_bundle
    >>> r = fsd_for_bundle("bundles/prostate_mri_student_enet", "run/datalist.json", tap="encoder.stage3",
    ...                    ckpt="run/student_kd/models/model.pt", image_size=64)  # doctest: +SKIP
    >>> r["fsd"], r["n_train"], r["n_test"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

__all__ = ["frechet_distance", "gaussian_fit", "pooled_features", "fsd_for_bundle", "fsd_command"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_SLICE_MODES = ("prostate", "all")


def _as_float64(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or inf.")
    return arr


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (negative eigenvalues,
    rounding noise of a PSD matrix, are clipped to 0)."""
    w, v = np.linalg.eigh(mat)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """
    Squared Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, cov1) and N(mu2, cov2):

    ``‖mu1 − mu2‖² + Tr(cov1) + Tr(cov2) − 2 Tr((cov1 cov2)^{1/2})``.

    Numerics: ``cov1 cov2`` is not symmetric, and ``scipy.linalg.sqrtm`` of it can return complex values or fail
    for singular covariances (the usual FID code then adds ``eps·I`` and drops imaginary parts). Here the trace
    term is computed from the similar, symmetric PSD matrix ``M = cov1^{1/2} cov2 cov1^{1/2}`` (same eigenvalues
    as ``cov1 cov2``): ``Tr((cov1 cov2)^{1/2}) = Σ sqrt(max(eig(M), 0))``, with ``cov1^{1/2}`` and the eigenvalues
    from ``numpy.linalg.eigh`` in float64. This is real, needs no offset, and handles rank-deficient covariances
    (fewer samples than channels). Inputs are symmetrised (``(C + Cᵀ)/2``); the result is clamped at 0, so
    identical Gaussians give 0 up to rounding (~1e-12 relative to the trace).

    Args:
        mu1, mu2: means, shape (C,) (numpy arrays, tensors or sequences).
        cov1, cov2: covariances, shape (C, C), symmetric positive semi-definite.

    Returns:
        the squared distance as a Python float (>= 0).

    Raises:
        ValueError: shapes that do not match (C,) / (C, C), or non-finite values.

    Example::

        >>> import numpy as np
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))  # |d|^2 = 2, traces 2 + 8 - 2 * 4
        4.0
    """
    m1, m2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    c1, c2 = _as_float64(cov1, "cov1"), _as_float64(cov2, "cov2")
    if m1.ndim != 1 or m2.shape != m1.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got shapes {m1.shape} and {m2.shape}.")
    n = m1.shape[0]
    if c1.shape != (n, n) or c2.shape != (n, n):
        raise ValueError(f"cov1 and cov2 must be ({n}, {n}) to match the means, got {c1.shape} and {c2.shape}.")
    c1, c2 = (c1 + c1.T) / 2.0, (c2 + c2.T) / 2.0
    s1 = _sqrt_psd(c1)
    m = s1 @ c2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def gaussian_fit(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """
    Mean and covariance (``ddof=1``) of a feature set.

    Args:
        features: (N, C) array or tensor, N >= 2 samples of C features.

    Returns:
        ``(mu (C,), cov (C, C))`` in float64.
    """
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, C) with N >= 2 samples, got shape {f.shape}.")
    if f.shape[0] <= f.shape[1]:
        logger.warning(
            "Gaussian fit of %d samples of %d features: the covariance is rank deficient and the Fréchet distance "
            "biased; use more slices than channels.", f.shape[0], f.shape[1]
        )
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False, ddof=1))


def _batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
        return
    for item in images:
        if isinstance(item, Mapping):
            if "image" not in item:
                raise ValueError(f"a batch given as a mapping needs an 'image' key, got keys {sorted(item)}.")
            item = item["image"]
        elif isinstance(item, (list, tuple)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"batches must be tensors or mappings with an 'image' tensor, got {type(item).__name__}.")
        yield torch.as_tensor(item)


def pooled_features(
    network: nn.Module,
    images: torch.Tensor | Iterable[Any],
    tap: str,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """
    Globally average-pooled features of ``network`` at module ``tap``, one vector per input sample.

    The network runs in eval mode under ``torch.inference_mode()``; its training mode is restored afterwards.

    Args:
        network: any ``nn.Module`` (DDP / ``torch.compile`` wrappers are looked through by ``FeatureTaps``).
        images: a tensor (N, C_in, H, W) (or (N, C_in, D, H, W) for a 3-D network), cut into ``batch_size``
            batches; or an iterable (e.g. a ``DataLoader``) of batches: tensors, ``(image, ...)`` tuples or
            mappings with an ``"image"`` tensor.
        tap: module name as in ``named_modules()``; ``""`` is the network's output.
        batch_size: batch size when ``images`` is a tensor.
        device: where to run (default: the device of the network's first parameter).

    Returns:
        float32 CPU tensor (N, C_tap): the tap output averaged over its spatial dims.

    Raises:
        ValueError: unknown tap (the message lists close names), empty input, or a tap output without spatial dims.

    Example::

        >>> import torch, monai
        >>> net = monai.networks.nets.UNet(2, 1, 2, (8, 16, 32), (2, 2))
        >>> pooled_features(net, torch.rand(5, 1, 32, 32), "model.1.submodule.0").shape
        torch.Size([5, 16])
    """
    from monai_relkd.engines import FeatureTaps

    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}.")
    if not isinstance(tap, str):
        raise TypeError(f"tap must be a module name (str), got {tap!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if device is None:
        param = next(iter(network.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    out: list[torch.Tensor] = []
    was_training = network.training
    network.eval()
    try:
        with FeatureTaps(network, [tap], detach=True) as taps, torch.inference_mode():
            for batch in _batches(images, batch_size):
                if batch.ndim < 3:
                    raise ValueError(f"input batches must be (B, C, *spatial), got shape {tuple(batch.shape)}.")
                taps.clear()
                network(batch.to(device=device, dtype=torch.float32))
                (feat,) = taps.features()
                if feat.ndim < 3:
                    raise ValueError(f"tap {tap!r} output has shape {tuple(feat.shape)}: no spatial dims to pool.")
                out.append(feat.float().mean(dim=tuple(range(2, feat.ndim))).cpu())
    finally:
        network.train(was_training)
    if not out:
        raise ValueError("no images given: nothing to pool.")
    return torch.cat(out, dim=0)


def _load_weights(network: nn.Module, ckpt: Path) -> None:
    try:
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report which file could not be read
        raise ValueError(f"cannot read checkpoint {ckpt}: {err}") from err
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # CheckpointSaver with several objects: {"model": state_dict, ...}
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {ckpt} holds a {type(state).__name__}, not a state dict.")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {ckpt} does not fit the bundle's network_def: {err}") from err


def _bundle_parts(bundle_dir: Path, image_size: int,
                  overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, Any]:
    from monai_relkd.bundle_support import inference_parser

    config = bundle_dir / "configs" / "inference.json"
    parser = inference_parser(bundle_dir, image_size=int(image_size), **dict(overrides or {}))
    for key in ("network_def", "preprocessing"):
        if key not in parser:
            raise ValueError(f"{config} defines no '{key}'.")
    network = parser.get_parsed_content("network_def", instantiate=True)
    preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    if not isinstance(network, nn.Module):
        raise TypeError(f"'network_def' of {config} is a {type(network).__name__}, not an nn.Module.")
    return network, preprocessing


def _case_slices(
    cases: Sequence[Mapping[str, Any]], preprocessing: Any, slices: str
) -> tuple[list[torch.Tensor], list[str]]:
    """Preprocessed 2-D slices (C, H, W) of the cases' images, and the site of each slice."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Resize

    label_tf = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])
    out: list[torch.Tensor] = []
    sites: list[str] = []
    for case in cases:
        image = torch.as_tensor(preprocessing({"image": str(case["image"])})["image"])
        if image.ndim != 4:
            raise ValueError(
                f"preprocessed image of {case['image']} has shape {tuple(image.shape)}, expected (C, H, W, D)."
            )
        if slices == "prostate":
            label = label_tf(str(case["label"]))
            label = Resize(spatial_size=image.shape[1:], mode="nearest")(label)
            keep = torch.nonzero((torch.as_tensor(label) > 0).flatten(0, -2).any(dim=0)).flatten().tolist()
        else:
            keep = list(range(image.shape[-1]))
        for k in keep:
            out.append(image[..., k].float().as_subclass(torch.Tensor))
            sites.append(str(case.get("site", "unknown")))
    return out, sites


def _sample(items: list[torch.Tensor], max_slices: int | None, seed: int) -> list[torch.Tensor]:
    if max_slices is None or len(items) <= max_slices:
        return items
    idx = np.sort(np.random.default_rng(seed).choice(len(items), size=max_slices, replace=False))
    return [items[i] for i in idx]


def fsd_for_bundle(
    bundle_dir: PathLike,
    datalist: PathLike | Mapping[str, Any],
    tap: str,
    ckpt: PathLike | None = None,
    image_size: int = 128,
    max_slices: int | None = 512,
    slices: str = "prostate",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    network_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    FSD of a bundle's network between the training sites and the held-out site of a leave-one-site-out datalist.

    The network is the bundle's ``network_def`` and the preprocessing its ``preprocessing`` (both from
    ``configs/inference.json`` with ``bundle_root`` and ``image_size`` overridden): load, channel first, RAS,
    intensity normalisation, in-plane resize to ``image_size``. Slices are cut along the last (through-plane) axis.

    Args:
        bundle_dir: the bundle folder.
        datalist: datalist JSON path or dict; ``training`` + ``validation`` cases are the training domain,
            ``test`` cases the held-out domain (relative paths are relative to the JSON file's folder).
        tap: module name of the network's tap (e.g. ``"encoder.stage3"`` for ENet, ``"aspp"`` for the teacher).
        ckpt: weights (default ``bundle_dir/models/model.pt``); a state dict or ``{"model": state dict}``.
        image_size: in-plane size the network sees.
        max_slices: at most this many slices per domain, drawn at random with ``seed`` (None: all).
        slices: ``"prostate"`` (slices whose label holds prostate) or ``"all"``.
        batch_size: slices per forward pass.
        device: where the network runs.
        seed: seed of the slice draw.
        network_overrides: config overrides for the inference config (e.g. ``{"network_def#output_stride": 8}``)
            when the weights were trained with other network arguments than the bundle's.

    Returns:
        ``{"fsd", "tap", "channels", "n_train", "n_test", "train_sites", "test_sites", "slices", "image_size",
        "bundle", "ckpt"}``.

    Raises:
        FileNotFoundError: missing bundle config or checkpoint (the message says how to get one).
        ValueError: unknown tap (close names listed), unknown ``slices`` mode, or a domain without slices.
    """
    from .folder import load_datalist_split

    if slices not in _SLICE_MODES:
        raise ValueError(f"slices must be one of {_SLICE_MODES}, got {slices!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    if max_slices is not None and (isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 2):
        raise ValueError(f"max_slices must be None or an int >= 2, got {max_slices!r}.")
    bundle = Path(bundle_dir).resolve()
    network, preprocessing = _bundle_parts(bundle, image_size, network_overrides)
    from monai_relkd.engines import FeatureTaps

    FeatureTaps.validate_names(network, [tap])  # unknown tap: clear error before any data is read
    ckpt_path = Path(ckpt) if ckpt is not None else bundle / "models" / "model.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt_path} not found: train the bundle first (its train.json writes models/model.pt) "
            "or pass ckpt=PATH (e.g. a run folder's <model>/models/model.pt)."
        )
    _load_weights(network, ckpt_path)
    network.to(device)

    train_cases = load_datalist_split(datalist, "training")
    try:
        train_cases += load_datalist_split(datalist, "validation")
    except KeyError:
        pass
    test_cases = load_datalist_split(datalist, "test")
    domains = {}
    for name, cases in (("train", train_cases), ("test", test_cases)):
        if not cases:
            raise ValueError(f"the datalist's {name} domain has no case.")
        imgs, sites = _case_slices(cases, preprocessing, slices)
        imgs = _sample(imgs, max_slices, seed)
        if len(imgs) < 2:
            raise ValueError(f"the {name} domain has {len(imgs)} slice(s) (slices={slices!r}); at least 2 are needed.")
        feats = pooled_features(network, torch.stack(imgs), tap, batch_size=batch_size, device=device)
        domains[name] = (feats, sorted(set(sites)))
    (f_train, train_sites), (f_test, test_sites) = domains["train"], domains["test"]
    mu1, cov1 = gaussian_fit(f_train)
    mu2, cov2 = gaussian_fit(f_test)
    return {
        "fsd": frechet_distance(mu1, cov1, mu2, cov2),
        "tap": tap,
        "channels": int(f_train.shape[1]),
        "n_train": int(f_train.shape[0]),
        "n_test": int(f_test.shape[0]),
        "train_sites": train_sites,
        "test_sites": test_sites,
        "slices": slices,
        "image_size": image_size,
        "bundle": str(bundle),
        "ckpt": str(ckpt_path.resolve()),
    }


def fsd_command(
    bundle: str,
    datalist: str,
    tap: str,
    ckpt: str | None = None,
    image_size: int = 128,
    max_slices: int | None = 512,
    slices: str = "prostate",
    out: str | None = None,
) -> None:
    """
    ``relkd fsd --bundle B --datalist F --tap NAME [--ckpt P] [--image_size 128] [--max_slices 512]
    [--slices prostate|all] [--out result.json]``: print the Fréchet semantic distance between the training sites
    and the held-out site (see :func:`fsd_for_bundle`), optionally write it as JSON.
    """
    result = fsd_for_bundle(bundle, datalist, tap, ckpt=ckpt, image_size=image_size, max_slices=max_slices,
                            slices=slices)
    print(
        f"FSD {result['fsd']:.4f} at tap '{tap}' ({result['channels']} channels): "
        f"{result['n_train']} slices of {', '.join(result['train_sites'])} vs {result['n_test']} slices of "
        f"{', '.join(result['test_sites'])} ({slices} slices, image size {image_size})"
    )
    if out:
        from ..data._io import atomic_write_json

        path = atomic_write_json(out, result)
        print(f"wrote {path}")
