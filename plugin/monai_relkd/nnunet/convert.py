"""The six-site layout (public collection or ``relkd synth`` output) as an nnU-Net v2 raw dataset.

Holding out one site gives the same leave-one-site-out split as ``relkd datalist``: the training sites' cases go
to ``imagesTr``/``labelsTr`` and the held-out site's to ``imagesTs``/``labelsTs``; ``splits_final.json`` (which
``nnUNetv2_plan_and_preprocess`` copies to the preprocessed folder) makes fold 0 the datalist's
training/validation split, so nnU-Net's fold 0 validates on the same cases as the bundles. Labels are binarised
(values > 0 are prostate) and written with the image's geometry. The dataset is written to a temporary folder
beside the target and renamed into place when complete; an existing dataset is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from monai_relkd.data._io import atomic_write_json, write_nifti
from monai_relkd.data.sites import DataError, make_datalist, scan_sites

__all__ = ["convert_to_nnunet", "to_nnunet_command"]


def _case_id(item: dict[str, str]) -> str:
    return f"{item['site']}_{item['case']}"


def _write_case(item: dict[str, str], images: Path, labels: Path | None) -> None:
    """Image as float32 ``<id>_0000.nii.gz``, label as uint8 0/1 ``<id>.nii.gz`` on the image's affine."""
    import nibabel as nib

    img = nib.load(item["image"])
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim != 3:
        raise ValueError(f"image has {data.ndim} dimensions, expected 3")
    write_nifti(images / f"{_case_id(item)}_0000.nii.gz", data, img.affine)
    if labels is not None:
        lab = np.asarray(nib.load(item["label"]).dataobj)
        if lab.shape != data.shape:
            raise ValueError(f"label shape {lab.shape} differs from image shape {data.shape}")
        write_nifti(labels / f"{_case_id(item)}.nii.gz", (lab > 0).astype(np.uint8), img.affine)


def _existing_dataset(out: Path, dataset_id: int) -> list[Path]:
    return sorted(out.glob(f"Dataset{dataset_id:03d}_*")) if out.is_dir() else []


def _write_cases(staging: Path, train_items: list[dict], test_items: list[dict]) -> None:
    """Write every case into ``staging``'s ``imagesTr/labelsTr`` (training) and ``imagesTs/labelsTs`` (test);
    tries them all, then raises one :class:`DataError` naming each case that failed."""
    folders = {k: staging / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for f in folders.values():
        f.mkdir()
    errors = []
    for items, img_dir, lab_dir in (
        (train_items, folders["imagesTr"], folders["labelsTr"]),
        (test_items, folders["imagesTs"], folders["labelsTs"]),
    ):
        for item in items:
            try:
                _write_case(item, img_dir, lab_dir)
            except Exception as e:  # every case is tried; all failures are reported together
                errors.append(f"  {item['site']}/{item['case']}: {item['image']}: {type(e).__name__}: {e}")
    if errors:
        raise DataError(f"{len(errors)} case(s) could not be converted (nothing written):\n" + "\n".join(errors))


def _dataset_json(dataset_name: str, num_training: int, root: Path, datalist: dict, val_fraction: float,
                  seed: int) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json``, with the split's settings under ``"relkd"``."""
    site = datalist["meta"]["test_site"]
    return {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "prostate": 1},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": dataset_name,
        "description": f"six-site prostate MRI from {root}, {site} held out (imagesTs/labelsTs)",
        "relkd": {
            "test_site": site,
            "training_sites": datalist["meta"]["training_sites"],
            "val_fraction": float(val_fraction),
            "seed": int(seed),
        },
    }


def convert_to_nnunet(
    root: str | os.PathLike,
    out: str | os.PathLike,
    dataset_id: int,
    test_site: str,
    name: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """
    Write ``<out>/Dataset<ID>_<name>`` (nnU-Net v2 raw format) holding out ``test_site``.

    Args:
        root: the six-site folder (read only).
        out: the nnU-Net raw folder (``$nnUNet_raw``).
        dataset_id: nnU-Net dataset id, 1..999, not used yet in ``out``.
        test_site: the held-out site.
        name: dataset name (default ``ProstateLOSO<SITE>``).
        val_fraction: fraction of each training site used for validation (fold 0 of ``splits_final.json``).
        seed: seed of the validation draw (as in ``relkd datalist``).
        strict: fail on any bad case found by the scan instead of leaving it out.

    Returns:
        ``{"dataset_dir", "dataset_name", "num_training", "num_test", "left_out": [...]}``.

    Raises:
        DataError: bad id or name, an existing dataset with this id, or cases that could not be converted (each
            named with its file and the problem; nothing is left behind).
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise DataError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    root_path, out_path = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    if root_path.exists() and (out_path == root_path or root_path in out_path.parents):
        raise DataError(f"refusing to write {str(out_path)!r} inside the data folder {str(root_path)!r}")
    scan = scan_sites(root_path, strict=strict)
    datalist = make_datalist(scan, test_site, val_fraction=val_fraction, seed=seed)
    site = datalist["meta"]["test_site"]
    name = name or f"ProstateLOSO{site}"
    if not name.replace("_", "").isalnum():
        raise DataError(f"dataset name must hold letters, digits and underscores only, got {name!r}")
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    existing = _existing_dataset(out_path, dataset_id)
    if existing:
        raise DataError(
            f"dataset id {dataset_id} is already used in {str(out_path)!r}: {[p.name for p in existing]} "
            "(pick another --dataset-id or remove it yourself)"
        )
    out_path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_path, prefix=f".{dataset_name}.", suffix=".partial"))
    try:
        train_items = datalist["training"] + datalist["validation"]
        _write_cases(staging, train_items, datalist["test"])
        atomic_write_json(staging / "dataset.json",
                          _dataset_json(dataset_name, len(train_items), root_path, datalist, val_fraction, seed))
        split = {
            "train": sorted(_case_id(i) for i in datalist["training"]),
            "val": sorted(_case_id(i) for i in datalist["validation"]),
        }
        atomic_write_json(staging / "splits_final.json", [split])
        final = out_path / dataset_name
        if final.exists() or _existing_dataset(out_path, dataset_id):
            raise DataError(f"{str(final)!r} appeared while converting; left untouched")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "dataset_dir": str(final),
        "dataset_name": dataset_name,
        "num_training": len(train_items),
        "num_validation": len(split["val"]),
        "num_test": len(datalist["test"]),
        "left_out": [str(p) for p in scan.problems],
    }


def to_nnunet_command(
    root: str,
    dataset_id: int,
    test_site: str,
    out: str | None = None,
    name: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
) -> str:
    """Convert the six-site layout under ``root`` to an nnU-Net raw dataset holding out ``test_site``
    (``relkd to-nnunet``).

    Example::

        relkd to-nnunet --root /data/prostate --dataset-id 501 --test-site HK      # into $nnUNet_raw

    Args:
        root: the six-site folder (public collection or ``relkd synth`` output); read only.
        dataset_id: nnU-Net dataset id (1..999).
        test_site: the held-out site (its cases go to imagesTs/labelsTs).
        out: the nnU-Net raw folder (default ``$nnUNet_raw``).
        name: dataset name (default ``ProstateLOSO<SITE>``).
        val_fraction: fraction of each training site in fold 0's validation split.
        seed: seed of the validation draw.
        strict: fail on any bad case instead of leaving it out.

    Returns:
        the dataset folder written.
    """
    out = out or os.environ.get("nnUNet_raw")
    if not out:
        raise DataError("no output folder: pass --out or set nnUNet_raw")
    r = convert_to_nnunet(root, out, int(dataset_id), test_site, name, val_fraction, seed, strict)
    for p in r["left_out"]:
        print(f"left out {p}")
    print(
        f"{r['dataset_name']}: {r['num_training']} training cases (fold 0: {r['num_validation']} validation), "
        f"{r['num_test']} held-out test cases -> {r['dataset_dir']}"
    )
    return r["dataset_dir"]
