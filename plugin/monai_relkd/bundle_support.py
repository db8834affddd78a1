"""Helpers that the bundle configs call: where the bundle lives, which data it uses, and its datalist.

Bundles hold configuration only; the little logic a config needs lives here so that every bundle shares it::

    "bundle_root": ".",
    "dataset_dir": "$monai_relkd.bundle_support.default_dataset_dir()",
    "datalist": "$monai_relkd.bundle_support.bundle_datalist(@dataset_dir, @test_site, @val_fraction, @seed)",
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["check_bundle_root", "default_dataset_dir", "bundle_datalist", "list_images", "split_cases",
           "site_name_formatter", "volumes_per_batch", "DATA_DIR_ENV"]

logger = logging.getLogger(__name__)

#: Environment variable that moves the cache of the embedded synthetic data set.
DATA_DIR_ENV = "MONAI_RELKD_DATA_DIR"


def check_bundle_root(path: str | os.PathLike) -> str:
    """Return ``path`` if it is a bundle folder (it holds ``configs/metadata.json``), else stop with how to pass it.

    The bundle configs follow MONAI's convention, ``"bundle_root": "."``: the bundle is the current folder unless
    ``--bundle_root`` (``ConfigWorkflow(..., bundle_root=...)``, ``parser["bundle_root"] = ...``) says otherwise.
    Every config runs this check first in ``initialize``, so a run started from another folder stops before it
    writes ``models/``, ``eval/`` or ``runs/`` anywhere::

        "bundle_root": ".",
        "initialize": ["$monai_relkd.bundle_support.check_bundle_root(@bundle_root)", ...]

    Raises:
        FileNotFoundError: ``path`` has no ``configs/metadata.json``; the message gives the command line to use.
    """
    root = Path(path)
    if (root / "configs" / "metadata.json").is_file():
        return str(path)
    raise FileNotFoundError(
        f"bundle_root '{path}' (resolved to '{root.resolve()}') is not a bundle folder: it has no "
        "configs/metadata.json. "
        "MONAI resolves bundle_root against the current folder; run from inside the bundle folder or pass it, e.g. "
        "`python -m monai.bundle run training --config_file <bundle>/configs/train.json --bundle_root <bundle>` "
        "(in Python: ConfigWorkflow(..., bundle_root=<bundle>) or parser['bundle_root'] = <bundle>)."
    )


def inference_parser(bundle_dir: str | os.PathLike, **override: Any) -> Any:
    """A ``monai.bundle.ConfigParser`` holding ``bundle_dir/configs/inference.json`` with ``bundle_root`` set to
    ``bundle_dir`` and each keyword of ``override`` set on it (e.g. ``image_size=64``); nothing is parsed yet.

    Raises:
        FileNotFoundError: the folder has no ``configs/inference.json`` (the message names both).
    """
    from monai.bundle import ConfigParser

    config = Path(bundle_dir) / "configs" / "inference.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {bundle_dir} is not a bundle with an inference config.")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in override.items():
        parser[key] = value
    return parser


def default_dataset_dir(scale: float = 0.5, size: int = 128, seed: int = 0) -> str:
    """Return the embedded synthetic six-site data set, generating it on first use.

    The set lives in ``$MONAI_RELKD_DATA_DIR`` or ``~/.cache/monai_relkd/synthetic``, one folder per
    ``(scale, size, seed)``. Generation writes to a temporary folder beside it and renames it into place, so an
    interrupted run never leaves a half-written set behind.

    Args:
        scale: fraction of the public case counts per site (at least one case per site).
        size: in-plane matrix of the generated volumes.
        seed: generator seed; the same seed gives the same bytes.
    """
    from monai_relkd.data.synthetic import generate_six_site_dataset

    base = Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "monai_relkd" / "synthetic")
    target = base / f"scale{scale:g}_size{int(size)}_seed{int(seed)}"
    if target.is_dir():
        return str(target)
    base.mkdir(parents=True, exist_ok=True)
    logger.info(f"monai_relkd: no dataset_dir given; generating the synthetic six-site set at {target} (first use).")
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=base))
    try:
        generate_six_site_dataset(staging, scale=scale, size=size, seed=seed)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: use its copy
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def bundle_datalist(
    dataset_dir: str | os.PathLike,
    test_site: str = "UCL",
    val_fraction: float = 0.2,
    seed: int = 0,
    datalist_file: str | os.PathLike | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Return the leave-one-site-out datalist a bundle trains, validates and tests on.

    Args:
        dataset_dir: root holding one folder per site. A folder that does not exist is an error: a user-supplied
            path never falls back silently to the synthetic set.
        test_site: the held-out site (its cases form the ``test`` list).
        val_fraction: fraction of each training site drawn for validation.
        seed: seed of that draw.
        datalist_file: a datalist JSON written by ``relkd datalist``; when given, it is used as is.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` of ``{"image", "label", "site", "case"}``.
    """
    import json

    from monai_relkd.data.sites import make_datalist, scan_sites

    if datalist_file:
        path = Path(datalist_file)
        if not path.is_file():
            raise FileNotFoundError(f"datalist_file '{path}' does not exist.")
        with open(path) as f:
            return json.load(f)
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset_dir '{root}' does not exist. Give the folder that holds the site folders "
            "(BIDMC BMC HK I2CVB RUNMC UCL), or leave dataset_dir unset to use the embedded synthetic set."
        )
    scan = scan_sites(root)
    return make_datalist(scan.cases, test_site=test_site, val_fraction=val_fraction, seed=seed)


def volumes_per_batch(batch_size: int, num_samples: int) -> int:
    """Volumes per training batch so that one optimizer step sees ``batch_size`` slices.

    The training pipeline draws ``num_samples`` slices from each volume (``RandCropByPosNegLabeld``) and MONAI's
    collate flattens them, so a ``DataLoader`` batch of ``V`` volumes holds ``V * num_samples`` slices. Bundle
    config::

        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset",
                       "batch_size": "$monai_relkd.bundle_support.volumes_per_batch(@batch_size, @num_samples)"}

    Args:
        batch_size: slices per optimizer step (e.g. 16).
        num_samples: slices drawn per volume (e.g. 4).

    Raises:
        ValueError: a value below 1, or ``batch_size`` not a multiple of ``num_samples``.
    """
    batch_size, num_samples = int(batch_size), int(num_samples)
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be >= 1, got batch_size={batch_size}, "
                         f"num_samples={num_samples}.")
    if batch_size % num_samples:
        raise ValueError(f"batch_size ({batch_size} slices per step) must be a multiple of num_samples "
                         f"({num_samples} slices per volume).")
    return batch_size // num_samples


_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LABEL_SUFFIXES = ("_segmentation", "_Segmentation")


def list_images(path: str | os.PathLike) -> list[str]:
    """Return the image volumes an inference run reads from ``path``.

    Args:
        path: a NIfTI file, a folder (its ``*.nii.gz`` / ``*.nii`` files, leaving out ``*_segmentation`` labels),
            or a glob pattern.

    Raises:
        FileNotFoundError: when ``path`` names nothing, or a folder or pattern holds no image.
    """
    import glob

    text = str(path)
    target = Path(text)
    if target.is_file():
        return [str(target)]
    if target.is_dir():
        candidates = sorted(str(p) for p in target.iterdir() if p.name.endswith(_NIFTI_SUFFIXES))
    elif any(ch in text for ch in "*?["):
        candidates = sorted(glob.glob(text))
    else:
        raise FileNotFoundError(f"input_path '{text}' does not exist.")
    images = [c for c in candidates if not _strip_nifti(Path(c).name).endswith(_LABEL_SUFFIXES)]
    if not images:
        raise FileNotFoundError(f"input_path '{text}' holds no NIfTI image (*.nii.gz or *.nii).")
    return images


def _strip_nifti(name: str) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_cases(datalist: dict[str, list[dict[str, Any]]], splits: str | list[str]) -> list[dict[str, Any]]:
    """Concatenate the cases of one or more datalist splits (``"training"``, ``"validation"``, ``"test"``).

    Raises:
        KeyError: a split the datalist does not have, naming the splits it has.
    """
    names = [splits] if isinstance(splits, str) else list(splits)
    missing = [n for n in names if n not in datalist]
    if missing:
        raise KeyError(f"datalist has no split {missing}; it has {sorted(datalist)}.")
    return [case for name in names for case in datalist[name]]


def site_name_formatter(metadict: dict, saver: Any) -> dict:
    """``SaveImaged(output_name_formatter=...)`` that prefixes the site folder: ``<site>_<case>``.

    Public site folders reuse case names (every site has a ``Case00``), so predictions of several sites written to
    one folder would overwrite each other under MONAI's default name. The site is the name of the image's parent
    folder. ``monai_relkd.evaluation.find_prediction`` finds predictions under that name.
    """
    from monai.data.folder_layout import default_name_formatter

    kwargs = default_name_formatter(metadict, saver)
    source = Path(str(kwargs["subject"]))
    kwargs["subject"] = f"{source.parent.name}_{source.name}" if source.parent.name else source.name
    return kwargs

