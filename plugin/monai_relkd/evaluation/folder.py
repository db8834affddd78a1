"""Evaluate a folder of predicted NIfTI masks against the references of a MONAI-style datalist.

Predictions are matched by the image's file name: for image ``.../RUNMC/Case01.nii.gz`` and ``pred_postfix="_seg"``
the prediction is ``Case01_seg.nii.gz`` (``.nii`` also accepted) in any of::

    PRED_DIR/Case01_seg.nii.gz                 flat
    PRED_DIR/Case01/Case01_seg.nii.gz          SaveImaged(separate_folder=True)
    PRED_DIR/RUNMC/Case01_seg.nii.gz           one folder per site (e.g. SaveImaged(data_root_dir=...))
    PRED_DIR/RUNMC/Case01/Case01_seg.nii.gz

A postfix without a leading ``_``/``-``/``.`` is also tried with ``_`` (MONAI's ``output_postfix="seg"`` writes
``Case01_seg``). With ``pred_postfix=None`` any ``Case01.nii[.gz]`` or ``Case01_*.nii[.gz]`` matches, provided exactly
one file does. If the datalist entry has a ``"case"`` id different from the image stem, it is tried as a stem too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from .metrics import binarize, evaluate_case
from .summary import format_site_table, summarize_cases, write_summary

__all__ = ["load_datalist_split", "find_prediction", "load_mask", "evaluate_folder", "evaluate_command"]

PathLike = Union[str, "os.PathLike[str]"]
_EXTS = (".nii.gz", ".nii")


def _stem(path: PathLike) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) and v else v


def load_datalist_split(
    datalist: PathLike | Mapping[str, Any], split: str = "test", base_dir: PathLike | None = None
) -> list[dict[str, Any]]:
    """
    Entries of one split of a MONAI-style datalist, with ``image``/``label`` resolved to absolute paths.

    Args:
        datalist: path to a JSON file, or the loaded dict, mapping split names to lists of
            ``{"image", "label", "site", "case"}`` entries (``site`` and ``case`` optional; ``image`` may be a list,
            its first element names the case).
        split: key of the list to evaluate, e.g. ``"test"``, ``"validation"``.
        base_dir: folder that relative paths are relative to; default the JSON file's folder (MONAI's
            ``load_decathlon_datalist`` convention), or the current folder for a dict.

    Returns:
        list of dicts ``{"image": Path, "label": Path, "site": str, "case": str}``; ``site`` defaults to
        ``"unknown"``, ``case`` to the image's stem.

    Raises:
        KeyError: unknown split (the message lists the available ones).
        ValueError: an entry without ``image`` or ``label``.
    """
    if isinstance(datalist, Mapping):
        data, root = datalist, Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {path} does not exist.")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, Mapping):
            raise ValueError(f"datalist {path} must hold a JSON object of split lists, got {type(data).__name__}.")
        root = Path(base_dir) if base_dir is not None else path.parent
    if split not in data or not isinstance(data[split], list):
        avail = sorted(k for k, v in data.items() if isinstance(v, list))
        raise KeyError(f"datalist has no split '{split}'; splits available: {avail}.")
    out = []
    for i, e in enumerate(data[split]):
        if not isinstance(e, Mapping) or "image" not in e or "label" not in e:
            raise ValueError(f"datalist['{split}'][{i}] needs 'image' and 'label' to be evaluated, got {e!r}.")
        image, label = Path(_first(e["image"])), Path(_first(e["label"]))
        image = image if image.is_absolute() else root / image
        label = label if label.is_absolute() else root / label
        out.append(
            {
                "image": image,
                "label": label,
                "site": str(e.get("site") or "unknown"),
                "case": str(e.get("case") or _stem(image)),
            }
        )
    return out


def find_prediction(
    pred_dir: PathLike,
    image: PathLike,
    pred_postfix: str | None = None,
    site: str | None = None,
    case: str | None = None,
    exclude: Sequence[PathLike] = (),
) -> Path:
    """
    The prediction file for ``image`` in ``pred_dir`` (see the module docstring for the layouts searched).

    Args:
        pred_dir: folder of predictions.
        image: the datalist's image path (only its file name is used).
        pred_postfix: text between the image stem and ``.nii.gz`` (e.g. ``"_seg"``); ``None``: the stem alone or
            ``_<anything>``, when exactly one file matches.
        site: site name, to also look in ``pred_dir/site``.
        case: case id, tried as a stem when it differs from the image's.
        exclude: files never taken as predictions (the reference itself when predictions sit beside labels).

    Raises:
        FileNotFoundError: nothing matches; the message names the case and the expected file(s).
        ValueError: with ``pred_postfix=None``, several files match.
    """
    root = Path(pred_dir)
    stems = [_stem(image)]
    if case and case not in stems:
        stems.append(case)
    if site:  # monai_relkd.bundle_support.site_name_formatter: "<site>_<stem>", one flat folder for many sites
        stems.append(f"{site}_{stems[0]}")
    excluded = {Path(p).resolve() for p in exclude}
    folders = []
    for stem in stems:
        folders += [root, root / stem] + ([root / site, root / site / stem] if site else [])
    expected: list[Path] = []
    found: list[Path] = []
    for stem in stems:
        for folder in dict.fromkeys(folders):
            if pred_postfix is not None:
                posts = [pred_postfix]
                if pred_postfix and not pred_postfix.startswith(("_", "-", ".")):
                    posts.append("_" + pred_postfix)
                for post in posts:
                    for ext in _EXTS:
                        expected.append(folder / f"{stem}{post}{ext}")
                        if expected[-1].is_file():
                            found.append(expected[-1])
            else:
                expected += [folder / f"{stem}{_EXTS[0]}", folder / f"{stem}_*{_EXTS[0]}"]
                if folder.is_dir():
                    for f in sorted(folder.iterdir()):
                        n = f.name
                        if f.is_file() and any(n.endswith(x) for x in _EXTS):
                            s = _stem(n)
                            if s == stem or s.startswith(stem + "_"):
                                found.append(f)
    found = [f for f in dict.fromkeys(found) if f.resolve() not in excluded]
    if not found:
        shown = "\n  ".join(str(p) for p in dict.fromkeys(expected) if str(p).endswith(".nii.gz"))
        raise FileNotFoundError(
            f"no prediction for case '{case or stems[0]}' (site {site}, image {image}); expected one of:\n  {shown}"
        )
    if len(found) > 1:
        if pred_postfix is None:
            raise ValueError(
                f"several predictions match case '{case or stems[0]}' (image {image}): "
                f"{[str(f) for f in found]}; pass pred_postfix to choose."
            )
        # the same name in several layouts: refuse rather than guess which run wrote which
        raise ValueError(
            f"prediction for case '{case or stems[0]}' found in several places: {[str(f) for f in found]}."
        )
    return found[0]


def load_mask(path: PathLike) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """
    Read a NIfTI mask with nibabel: ``(array (H, W, D), affine (4, 4), spacing in mm per array axis)``.

    Trailing singleton axes beyond the third (e.g. (H, W, D, 1)) are dropped; the spacing is the header's zooms.
    """
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D or 3-D mask, got shape {arr.shape}.")
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return arr, np.asarray(img.affine, dtype=np.float64), zooms


def _evaluate_entry(e: Mapping[str, Any], pred_path: Path, affine_atol: float) -> dict[str, Any]:
    """Metrics of one datalist entry against its prediction, after checking that both share shape and affine;
    returns the case record of :func:`summarize_cases`."""
    label, l_aff, spacing = load_mask(e["label"])
    pred, p_aff, _ = load_mask(pred_path)
    if pred.shape != label.shape:
        raise ValueError(
            f"case '{e['case']}': prediction {pred_path} has shape {pred.shape} but label {e['label']} has "
            f"{label.shape}; predictions must be written in the label's geometry (invert spatial transforms)."
        )
    if not np.allclose(p_aff, l_aff, rtol=0.0, atol=affine_atol):
        raise ValueError(
            f"case '{e['case']}': affine of prediction {pred_path} differs from label {e['label']} "
            f"(max abs diff {np.abs(p_aff - l_aff).max():.4g} > {affine_atol}):\n{p_aff}\nvs\n{l_aff}"
        )
    try:
        metrics = evaluate_case(pred, label, spacing)
    except ValueError as err:
        raise ValueError(f"case '{e['case']}' ({pred_path} vs {e['label']}): {err}") from err
    return {
        "case": e["case"],
        "site": e["site"],
        "prediction": str(pred_path),
        "reference": str(e["label"]),
        "spacing": list(spacing),
        "empty_prediction": not bool(binarize(pred).any()),
        "empty_reference": not bool(binarize(label).any()),
        "metrics": metrics,
    }


def evaluate_folder(
    pred_dir: PathLike,
    datalist: PathLike | Mapping[str, Any],
    split: str = "test",
    pred_postfix: str | None = None,
    base_dir: PathLike | None = None,
    affine_atol: float = 1e-3,
) -> dict[str, Any]:
    """
    Evaluate every entry of ``datalist[split]`` against its prediction in ``pred_dir``.

    Args:
        pred_dir: folder of predicted NIfTI masks (``> 0`` is foreground), named after the images (module docstring).
        datalist: datalist JSON path or dict (see :func:`load_datalist_split`).
        split: which list to evaluate.
        pred_postfix: see :func:`find_prediction`.
        base_dir: root of relative datalist paths (default: the datalist file's folder).
        affine_atol: largest absolute difference (mm) allowed between prediction and label affines.

    Returns:
        the summary dict of :func:`summarize_cases` (``metric_per_case``, ``per_site``, ``overall``, ``mean``,
        ``mean_of_site_means``, ``n_cases``, ``policy``) plus ``"config"`` (pred_dir, datalist, split, pred_postfix).
        Spacing comes from the label's header.

    Raises:
        FileNotFoundError: a label or a prediction is missing (names the case and the expected file).
        ValueError: shape or affine of a prediction differs from its label (names both files), two entries
            resolve to the same prediction file, or the split is empty.

    Example::

        summary = evaluate_folder("runs/enet/pred", "datalist_loso_HK.json", split="test", pred_postfix="_seg")
        write_summary(summary, "runs/enet/pred"); print(format_site_table(summary))
    """
    pred_root = Path(pred_dir)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_root} does not exist.")
    if affine_atol < 0:
        raise ValueError(f"affine_atol must be >= 0, got {affine_atol}.")
    entries = load_datalist_split(datalist, split=split, base_dir=base_dir)
    if not entries:
        raise ValueError(f"datalist split '{split}' is empty: nothing to evaluate.")

    used: dict[Path, str] = {}
    cases = []
    for e in entries:
        if not e["label"].is_file():
            raise FileNotFoundError(f"reference label of case '{e['case']}' (site {e['site']}) missing: {e['label']}")
        pred_path = find_prediction(
            pred_root, e["image"], pred_postfix, site=e["site"], case=e["case"], exclude=[e["label"], e["image"]]
        )
        key = pred_path.resolve()
        if key in used:
            raise ValueError(
                f"cases '{used[key]}' and '{e['site']}/{e['case']}' both resolve to prediction {pred_path}; "
                "save predictions per site or per case folder (SaveImaged separate_folder/data_root_dir)."
            )
        used[key] = f"{e['site']}/{e['case']}"
        cases.append(_evaluate_entry(e, pred_path, affine_atol))
    summary = summarize_cases(cases)
    summary["config"] = {
        "pred_dir": str(pred_root),
        "datalist": "<dict>" if isinstance(datalist, Mapping) else str(datalist),
        "split": split,
        "pred_postfix": pred_postfix,
    }
    return summary


def evaluate_command(
    pred: str,
    datalist: str,
    split: str = "test",
    out: str | None = None,
    pred_postfix: str | None = None,
) -> None:
    """
    ``relkd evaluate --pred DIR --datalist F [--split test] [--out DIR] [--pred_postfix _seg]``: print the per-site
    Markdown table and write ``summary.json`` and ``metric_per_case.csv`` to ``out`` (default: ``pred``).
    """
    summary = evaluate_folder(pred, datalist, split=split, pred_postfix=pred_postfix)
    json_path, csv_path = write_summary(summary, out if out is not None else pred)
    print(format_site_table(summary))
    print(f"\nwrote {json_path}\nwrote {csv_path}")
