"""The six-site prostate MRI layout: reader, validation, leave-one-site-out datalists and the ``relkd datalist``
command.

Layout (the public collection of Liu, Dou and Heng, MICCAI 2020, and what :mod:`monai_relkd.data.synthetic`
writes)::

    ROOT/
      BIDMC/ Case00.nii.gz  Case00_segmentation.nii.gz  Case01.nii.gz ...
      BMC/   Case00.nii.gz  Case00_Segmentation.nii.gz  ...
      HK/  I2CVB/  RUNMC/  UCL/
      MYSITE/ ...            any other folder holding ``CaseNN`` files is a site too

A case is ``CaseNN.nii.gz`` (or ``.nii``) plus ``CaseNN_segmentation.nii.gz`` or ``CaseNN_Segmentation.nii.gz``.
Label values greater than 0 are prostate; some public volumes mark the central gland 1 and the peripheral zone 2.
The reader *reports* the label values of each case and keeps the files as they are: the 1/2 → foreground
mapping belongs to the loading transforms (threshold ``label > 0``, e.g. ``AsDiscreted(keys="label",
threshold=0.5)`` or ``Lambdad(keys="label", func=lambda x: x > 0)``), never to the files on disk.

Every case is checked (readable files, matching shape and affine, 3-D, finite intensities, non-empty label,
known label values). A bad case is reported in one line naming its file and the problem and left out, and a site
left with no usable case is reported and left out too; with ``strict=True`` any problem is an error listing all of
them. Conditions that make training meaningless (root missing, no site, no usable case at all, unknown held-out
site, a held-out site or all training sites without a usable case) always raise :class:`DataError`. The data
folder is only ever opened for reading.

Library API::

    scan = scan_sites("/data/prostate")                 # ScanResult: .cases, .problems, .sites
    dl = make_datalist(scan, test_site="UCL", val_fraction=0.2, seed=0)
    write_datalist(dl, "datalist_UCL.json")

Datalist format (MONAI ``load_decathlon_datalist`` reads every split)::

    {"training":   [{"image": "/abs/RUNMC/Case00.nii.gz", "label": "/abs/RUNMC/Case00_segmentation.nii.gz",
                     "site": "RUNMC", "case": "Case00"}, ...],
     "validation": [...],   # drawn per training site
     "test":       [...],   # every usable case of the held-out site
     "meta": {"test_site": "UCL", "training_sites": [...], "val_fraction": 0.2, "seed": 0, "root": "/abs"}}

Paths are absolute, so the file can live anywhere. (Do not pass the data root as ``base_dir`` to
``load_decathlon_datalist``: MONAI turns any value that names an existing path under ``base_dir`` - such as
``"site": "UCL"`` - into a path.)
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_json

__all__ = [
    "SITES",
    "SITE_INFO",
    "DataError",
    "CaseRecord",
    "CaseProblem",
    "ScanResult",
    "find_site_dirs",
    "scan_sites",
    "make_datalist",
    "make_all_folds",
    "write_datalist",
    "datalist_command",
]

logger = logging.getLogger(__name__)

#: The six public sites, in the order used by tables.
SITES: tuple[str, ...] = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")

#: What the literature reports for each public site (Liu, Dou, Heng, MICCAI 2020).
SITE_INFO: dict[str, dict[str, Any]] = {
    "RUNMC": {"cases": 30, "field_T": "3", "vendor": "Siemens", "coil": "surface"},
    "BMC": {"cases": 30, "field_T": "1.5", "vendor": "Philips", "coil": "endorectal"},
    "I2CVB": {"cases": 19, "field_T": "3", "vendor": "Siemens", "coil": "surface"},
    "UCL": {"cases": 13, "field_T": "1.5/3", "vendor": "Siemens", "coil": "surface"},
    "BIDMC": {"cases": 12, "field_T": "3", "vendor": "GE", "coil": "endorectal"},
    "HK": {"cases": 12, "field_T": "1.5", "vendor": "Siemens", "coil": "endorectal"},
}

_NII = r"\.nii(?:\.gz)?"
_IMAGE_RE = re.compile(rf"^([Cc]ase\d+){_NII}$")
_LABEL_RE = re.compile(rf"^([Cc]ase\d+)_([Ss]egmentation){_NII}$")


class DataError(ValueError):
    """A data problem that stops the run before any training (missing root, no site, unusable site, ...)."""


@dataclass(frozen=True)
class CaseProblem:
    """One reason why a case (or a stray file) was left out."""

    site: str
    case: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.site}/{self.case}: {self.path}: {self.problem}"


@dataclass(frozen=True)
class CaseRecord:
    """A usable case: where its files are and what they hold.

    ``shape`` and ``spacing`` (mm) come from the image header; ``label_values`` are the distinct values found in
    the segmentation (all of them in ``allowed_labels``; any value > 0 is prostate).
    """

    site: str
    case: str
    image: str
    label: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    label_values: tuple[int, ...]
    foreground_voxels: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the record."""
        return asdict(self)

    def datalist_item(self) -> dict[str, str]:
        """The MONAI datalist entry ``{"image", "label", "site", "case"}`` of this case."""
        return {"image": self.image, "label": self.label, "site": self.site, "case": self.case}


@dataclass
class ScanResult:
    """What :func:`scan_sites` found under ``root``: usable ``cases``, the ``problems`` of the others, ``sites``."""

    root: str
    sites: list[str]
    cases: list[CaseRecord] = field(default_factory=list)
    problems: list[CaseProblem] = field(default_factory=list)

    def by_site(self) -> dict[str, list[CaseRecord]]:
        """Usable cases grouped by site, in :attr:`sites` order."""
        out: dict[str, list[CaseRecord]] = {s: [] for s in self.sites}
        for c in self.cases:
            out.setdefault(c.site, []).append(c)
        return out

    def empty_sites(self) -> list[str]:
        """Sites found with no usable case: reported and left out of every datalist."""
        return [s for s, cs in self.by_site().items() if not cs]

    def summary(self) -> str:
        """A per-site table: usable cases, cases left out, label values, in-plane spacing, slice thickness."""
        left_out: dict[str, set[str]] = {s: set() for s in self.sites}
        for p in self.problems:
            left_out.setdefault(p.site, set()).add(p.case)
        rows = [f"{'site':<10}{'cases':>6}{'left out':>10}  {'labels':<8}{'in-plane mm':>14}{'slice mm':>12}"]
        for site, cases in self.by_site().items():
            labels = sorted({v for c in cases for v in c.label_values if v > 0})
            if cases:
                sp = np.array([c.spacing[:3] for c in cases], dtype=float)
                inplane = f"{sp[:, :2].min():.2f}-{sp[:, :2].max():.2f}"
                thick = f"{sp[:, 2].min():.2f}-{sp[:, 2].max():.2f}"
            else:
                inplane = thick = "-"
            rows.append(
                f"{site:<10}{len(cases):>6}{len(left_out.get(site, ())):>10}  "
                f"{','.join(map(str, labels)) or '-':<8}{inplane:>14}{thick:>12}"
            )
        rows.append(f"{'total':<10}{len(self.cases):>6}{sum(len(v) for v in left_out.values()):>10}")
        return "\n".join(rows)


def find_site_dirs(root: str | os.PathLike) -> list[Path]:
    """Site folders directly under ``root``: the six public names plus any folder holding ``CaseNN`` NIfTI files.

    Hidden folders (``.name``) and ``__pycache__``-like folders are skipped. Public sites come first in
    :data:`SITES` order, then other sites alphabetically.

    Raises:
        DataError: ``root`` is missing or not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} is not a folder")
    found = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith((".", "_")):
            continue
        if d.name in SITES or any(_IMAGE_RE.match(f.name) or _LABEL_RE.match(f.name) for f in d.iterdir()):
            found.append(d)
    order = {s: i for i, s in enumerate(SITES)}
    return sorted(found, key=lambda d: (order.get(d.name, len(SITES)), d.name))


def _pair_files(site_dir: Path) -> tuple[dict[str, tuple[Path, Path | None]], list[CaseProblem]]:
    """Pair ``CaseNN`` images with their segmentation; report orphans and ambiguous pairs."""
    site = site_dir.name
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    for f in sorted(site_dir.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        m = _LABEL_RE.match(f.name)
        if m:
            labels.setdefault(m.group(1), []).append(f)
            continue
        m = _IMAGE_RE.match(f.name)
        if m:
            images.setdefault(m.group(1), []).append(f)
        else:
            logger.debug("%s: ignoring %s (not CaseNN[_segmentation].nii[.gz])", site, f.name)
    pairs: dict[str, tuple[Path, Path | None]] = {}
    problems: list[CaseProblem] = []
    for case in sorted(set(images) | set(labels), key=_case_sort_key):
        imgs, labs = images.get(case, []), labels.get(case, [])
        if not imgs:
            problems.append(CaseProblem(site, case, str(labs[0]), "segmentation without image"))
            continue
        if len(imgs) > 1:
            names = ", ".join(p.name for p in imgs)
            problems.append(CaseProblem(site, case, str(imgs[0]), f"more than one image for the case ({names})"))
            continue
        if len(labs) > 1:
            names = ", ".join(p.name for p in labs)
            problems.append(CaseProblem(site, case, str(labs[0]), f"more than one segmentation ({names})"))
            continue
        pairs[case] = (imgs[0], labs[0] if labs else None)
    return pairs, problems


def _case_sort_key(case: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", case)
    return (int(digits) if digits else -1, case)


def _header_problem(
    image_path: Path, label_path: Path, shape: tuple, lab_shape: tuple, affine: np.ndarray, lab_affine: np.ndarray,
    spacing: tuple, affine_atol: float,
) -> tuple[Path, str] | None:
    """The first problem, as ``(file, message)``, of the dimensions, shapes, affines and spacing of an image/label
    pair, or None."""
    if len(shape) != 3:
        return image_path, f"image is not 3-D (shape {shape})"
    if len(lab_shape) != 3:
        return label_path, f"segmentation is not 3-D (shape {lab_shape})"
    if shape != lab_shape:
        return label_path, f"segmentation shape {lab_shape} differs from image shape {shape}"
    if not np.allclose(affine, lab_affine, rtol=0.0, atol=affine_atol):
        diff = float(np.abs(affine - lab_affine).max())
        return label_path, (f"segmentation affine differs from the image affine (max |diff| {diff:.4g} > "
                            f"tolerance {affine_atol:g})")
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        return image_path, f"non-positive or non-finite voxel spacing {spacing}"
    return None


def _intensity_problem(image_path: Path, img: Any) -> tuple[Path, str] | None:
    """``(file, message)`` when a float (or scaled) image holds NaN/Inf voxels, else None."""
    try:
        if np.issubdtype(img.get_data_dtype(), np.floating) or img.dataobj.slope not in (None, 1.0):
            data = np.asanyarray(img.dataobj)
            finite = np.isfinite(data)
            if not finite.all():
                n_nan = int(np.isnan(data).sum())
                n_inf = int(data.size - finite.sum()) - n_nan
                return image_path, f"non-finite intensities ({n_nan} NaN, {n_inf} Inf voxels)"
    except Exception as e:
        return image_path, f"unreadable image data ({type(e).__name__}: {e})"
    return None


def _label_problem(
    label_path: Path, ldata: np.ndarray, values: np.ndarray, allowed_labels: frozenset
) -> tuple[Path, str] | None:
    """The first problem, as ``(file, message)``, of a segmentation's values (NaN/Inf, unknown labels, no
    foreground), or None."""
    if np.issubdtype(ldata.dtype, np.floating) and not np.isfinite(ldata).all():
        return label_path, "segmentation holds NaN/Inf values"
    unknown = [v for v in values.tolist() if v not in allowed_labels]
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        allowed = ",".join(f"{v:g}" for v in sorted(allowed_labels))
        return label_path, f"unknown label value(s) {shown} (allowed: {allowed})"
    if not np.count_nonzero(ldata > 0):
        return label_path, "empty segmentation (no voxel > 0)"
    return None


def _check_case(
    site: str,
    case: str,
    image_path: Path,
    label_path: Path | None,
    allowed_labels: frozenset,
    affine_atol: float,
    check_intensities: bool,
) -> tuple[CaseRecord | None, list[CaseProblem]]:
    """Validate one image/label pair; return the record (``None`` when the case must be left out) and problems."""
    import nibabel as nib

    def bad(path: Path, msg: str) -> tuple[None, list[CaseProblem]]:
        return None, [CaseProblem(site, case, str(path), msg)]

    if label_path is None:
        return bad(image_path, f"missing segmentation (expected {case}_segmentation.nii.gz or "
                               f"{case}_Segmentation.nii.gz beside it)")
    try:
        img = nib.load(str(image_path))
        shape, affine = tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as e:  # nibabel raises several types for corrupt / non-NIfTI files
        return bad(image_path, f"unreadable image ({type(e).__name__}: {e})")
    try:
        lab = nib.load(str(label_path))
        lab_shape, lab_affine = tuple(int(s) for s in lab.shape), np.asarray(lab.affine, dtype=float)
    except Exception as e:
        return bad(label_path, f"unreadable segmentation ({type(e).__name__}: {e})")
    problem = _header_problem(image_path, label_path, shape, lab_shape, affine, lab_affine, spacing, affine_atol)
    if problem is None and check_intensities:
        problem = _intensity_problem(image_path, img)
    if problem is not None:
        return bad(*problem)
    try:
        ldata = np.asanyarray(lab.dataobj)
    except Exception as e:
        return bad(label_path, f"unreadable segmentation data ({type(e).__name__}: {e})")
    values = np.unique(ldata)
    problem = _label_problem(label_path, ldata, values, allowed_labels)
    if problem is not None:
        return bad(*problem)
    record = CaseRecord(
        site=site,
        case=case,
        image=str(image_path),
        label=str(label_path),
        shape=shape,
        spacing=spacing,
        label_values=tuple(int(v) if float(v).is_integer() else v for v in values.tolist()),
        foreground_voxels=int(np.count_nonzero(ldata > 0)),
    )
    return record, []


def scan_sites(
    root: str | os.PathLike,
    strict: bool = False,
    allowed_labels: Iterable[float] = (0, 1, 2),
    sites: Sequence[str] | None = None,
    affine_atol: float = 1e-3,
    check_intensities: bool = True,
    log_problems: bool = True,
) -> ScanResult:
    """Find, pair and validate every case under ``root``.

    Args:
        root: folder holding one sub-folder per site.
        strict: any problem raises :class:`DataError` listing all of them (default: report and leave out).
        allowed_labels: label values a segmentation may hold; anything else is a problem. Values > 0 are prostate.
        sites: only read these site folders (default: every site found, see :func:`find_site_dirs`).
        affine_atol: largest element-wise difference (mm) tolerated between image and label affines.
        check_intensities: read float image data to reject NaN/Inf intensities (headers only when ``False``).
        log_problems: log each problem and each site left out as a warning (``relkd datalist`` prints them itself).

    Returns:
        :class:`ScanResult` with ``cases`` (sorted by site order, then case number) and ``problems``.

    Raises:
        DataError: root missing, no site found, a requested site missing, no usable case at all, or (``strict``)
            any problem. A site with no usable case is only reported (:meth:`ScanResult.empty_sites`) and left out.
    """
    root_path = Path(root).expanduser().resolve()
    site_dirs = find_site_dirs(root_path)
    if sites is not None:
        wanted = list(sites)
        names = {d.name: d for d in site_dirs}
        missing = [s for s in wanted if s not in names]
        if missing:
            raise DataError(f"site(s) {missing} not found under {str(root_path)!r} (found: {sorted(names)})")
        site_dirs = [names[s] for s in wanted]
    if not site_dirs:
        raise DataError(
            f"no site folder under {str(root_path)!r}: expected sub-folders such as {', '.join(SITES)} holding "
            "CaseNN.nii.gz and CaseNN_segmentation.nii.gz"
        )
    allowed = frozenset(float(v) for v in allowed_labels)
    result = ScanResult(root=str(root_path), sites=[d.name for d in site_dirs])
    for d in site_dirs:
        pairs, problems = _pair_files(d)
        result.problems.extend(problems)
        for case, (img, lab) in pairs.items():
            rec, probs = _check_case(d.name, case, img, lab, allowed, affine_atol, check_intensities)
            result.problems.extend(probs)
            if rec is not None:
                result.cases.append(rec)
    for p in result.problems if log_problems and not strict else ():
        logger.warning("left out %s", p)
    if strict and result.problems:
        raise DataError(
            f"{len(result.problems)} problem(s) under {str(root_path)!r} (strict mode):\n"
            + "\n".join(f"  {p}" for p in result.problems)
        )
    for site in result.empty_sites() if log_problems and not strict else ():
        reasons = sum(p.site == site for p in result.problems)
        logger.warning("site %s under %r has no usable case (%s) and is left out.", site, str(root_path),
                       f"{reasons} case(s) with problems, listed above" if reasons else "no CaseNN.nii.gz files")
    if not result.cases:
        raise DataError(f"no usable case under {str(root_path)!r}" + (
            ":\n" + "\n".join(f"  {p}" for p in result.problems) if result.problems else ""))
    return result


def _resolve_site(name: str, sites: Sequence[str]) -> str:
    if name in sites:
        return name
    folded = [s for s in sites if s.lower() == str(name).lower()]
    if len(folded) == 1:
        return folded[0]
    raise DataError(f"held-out site {name!r} is not one of the sites found: {', '.join(sites)}")


def _as_cases(cases: ScanResult | Iterable[CaseRecord]) -> tuple[list[CaseRecord], list[str], str | None]:
    if isinstance(cases, ScanResult):
        return list(cases.cases), list(cases.sites), cases.root
    recs = list(cases)
    sites: list[str] = []
    for c in recs:
        if c.site not in sites:
            sites.append(c.site)
    return recs, sites, None


def make_datalist(
    cases: ScanResult | Iterable[CaseRecord],
    test_site: str,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Leave-one-site-out datalist: ``test`` is the held-out site, ``training``/``validation`` the other sites.

    Validation is drawn per training site: ``round(val_fraction * n)`` cases, at least one when the site has two
    or more cases and ``val_fraction > 0``, never all of them. The draw depends only on ``seed``, the site name
    and its case list, so a site's validation cases are the same in every fold. Entries are
    ``{"image", "label", "site", "case"}`` with absolute paths, sorted by site then case.

    Args:
        cases: a :class:`ScanResult` or the usable :class:`CaseRecord` s.
        test_site: the held-out site (exact name, or a case-insensitive unique match).
        val_fraction: fraction of each training site kept for validation, in ``[0, 1)``.
        seed: seed of the validation draw.

    Raises:
        DataError: unknown held-out site, no case, or no training case left.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    recs, sites, root = _as_cases(cases)
    if not recs:
        raise DataError("no usable case to build a datalist from")
    test_site = _resolve_site(test_site, sites)
    by_site: dict[str, list[CaseRecord]] = {s: [] for s in sites}
    for c in recs:
        by_site[c.site].append(c)
    training: list[dict] = []
    validation: list[dict] = []
    for site in sites:
        if site == test_site:
            continue
        site_cases = sorted(by_site[site], key=lambda c: _case_sort_key(c.case))
        n = len(site_cases)
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        else:
            n_val = 0
        rng = random.Random(f"relkd-val:{seed}:{site}:{n}")
        val_idx = set(rng.sample(range(n), n_val))
        for i, c in enumerate(site_cases):
            (validation if i in val_idx else training).append(c.datalist_item())
    test = [c.datalist_item() for c in sorted(by_site[test_site], key=lambda c: _case_sort_key(c.case))]
    if not test:
        reasons = [p for p in cases.problems if p.site == test_site] if isinstance(cases, ScanResult) else []
        raise DataError(f"held-out site {test_site!r} has no usable case" + (
            ":\n" + "\n".join(f"  {p}" for p in reasons) if reasons else ""))
    if not training:
        raise DataError(f"no training case left when holding out {test_site!r} (sites: {', '.join(sites)})")
    return {
        "training": training,
        "validation": validation,
        "test": test,
        "meta": {
            "test_site": test_site,
            "training_sites": [s for s in sites if s != test_site and by_site[s]],
            "val_fraction": float(val_fraction),
            "seed": int(seed),
            "root": root,
            "label_note": "label values > 0 are prostate (1 central gland / 2 peripheral zone on some sites); "
            "threshold label > 0 when loading",
        },
    }


def make_all_folds(
    cases: ScanResult | Iterable[CaseRecord], val_fraction: float = 0.2, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """One :func:`make_datalist` per site held out, keyed by the held-out site."""
    recs, sites, root = _as_cases(cases)
    scan = ScanResult(root=root or "", sites=sites, cases=recs)
    return {s: make_datalist(scan, s, val_fraction=val_fraction, seed=seed) for s in sites if s not in scan.empty_sites()}


def write_datalist(datalist: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write ``datalist`` as JSON to ``path`` (parent folders created). Returns the path."""
    return atomic_write_json(path, datalist)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def datalist_command(
    root: str,
    test_site: str | None = None,
    out: str = "datalist.json",
    val_fraction: float = 0.2,
    seed: int = 0,
    all_folds: bool = False,
    strict: bool = False,
    allowed_labels: Sequence[float] = (0, 1, 2),
) -> str | list[str]:
    """Write leave-one-site-out datalist(s) for the six-site layout under ``root`` (``relkd datalist``).

    Examples::

        relkd datalist --root /data/prostate --test-site UCL --out datalist.json
        relkd datalist --root /data/prostate --all-folds --out datalists/   # datalists/datalist_<SITE>.json

    Args:
        root: data folder (read only; nothing is ever written there).
        test_site: the held-out site (required unless ``all_folds``).
        out: output JSON file, or the output folder with ``all_folds``.
        val_fraction: fraction of each training site used for validation.
        seed: seed of the validation draw.
        all_folds: write one datalist per held-out site, ``datalist_<SITE>.json`` in ``out`` (sites with no usable
            case are left out).
        strict: fail on any bad case (or site without a usable case) instead of leaving it out.
        allowed_labels: label values a segmentation may hold.

    Returns:
        The path written, or the list of paths with ``all_folds``.
    """
    if all_folds and test_site is not None:
        raise DataError("give either --test-site or --all-folds, not both")
    if not all_folds and test_site is None:
        raise DataError("--test-site is required (or --all-folds to write one datalist per held-out site)")
    if isinstance(allowed_labels, (int, float)):
        allowed_labels = (allowed_labels,)
    root_path = Path(root).expanduser().resolve()
    out_path = Path(out).expanduser().resolve()
    if root_path.exists() and _is_within(out_path, root_path):
        raise DataError(f"refusing to write {str(out_path)!r} inside the data folder {str(root_path)!r}")
    scan = scan_sites(root_path, strict=strict, allowed_labels=allowed_labels, log_problems=False)
    print(f"data root: {scan.root}")
    print(scan.summary())
    if scan.problems:
        print(f"{len(scan.problems)} case(s) left out:")
        for p in scan.problems:
            print(f"  {p}")
    for site in scan.empty_sites():
        print(f"site {site} left out: no usable case (use --strict to stop instead)")
    if all_folds:
        if out_path.exists() and not out_path.is_dir():
            raise DataError(f"--all-folds needs --out to be a folder, {str(out_path)!r} is a file")
        written = []
        for site, dl in make_all_folds(scan, val_fraction=val_fraction, seed=seed).items():
            p = write_datalist(dl, out_path / f"datalist_{site}.json")
            print(f"held out {site:<6}: {len(dl['training'])} training, {len(dl['validation'])} validation, "
                  f"{len(dl['test'])} test -> {p}")
            written.append(str(p))
        return written
    dl = make_datalist(scan, str(test_site), val_fraction=val_fraction, seed=seed)
    p = write_datalist(dl, out_path)
    print(f"held out {dl['meta']['test_site']}: {len(dl['training'])} training, {len(dl['validation'])} "
          f"validation, {len(dl['test'])} test -> {p}")
    return str(p)
