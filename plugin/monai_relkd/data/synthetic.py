"""A synthetic six-site prostate MRI collection in the public layout (``relkd synth``).

Each case is an axial T2-weighted-like pelvis phantom, built in millimetres and sampled on the site's grid:
body outline with subcutaneous and pelvic fat, gluteal / obturator / levator muscles, pubic bone and femoral
heads, bladder, rectum, seminal vesicles, and a prostate whose size, shape (low-order harmonic deformation,
apex taper, posterior flattening), tilt and position vary per case, split into a dark nodular central gland
and a bright peripheral zone behind a dark capsule.

Site effects (:data:`SITE_PROFILES`; values after the public sites, with per-case jitter):

* field strength - Rician noise, about 2.5x stronger at 1.5 T than at 3 T (UCL mixes 1.5 and 3 T per case);
* vendor - intensity curve ``scale * I**gamma + offset`` (Siemens ~ linear, Philips compressive with an
  offset, GE expansive) and a different overall scale;
* endorectal coil (BMC, BIDMC, HK) - a strong posterior receive-bias field decaying away from the coil, an
  inflated balloon in the rectum (air: dark, or fluid: bright, drawn per case) that flattens the posterior
  prostate; surface coils give a mild, smooth bias instead;
* in-plane spacing (through the field of view at a fixed matrix ``size``), slice thickness and slice count.

Labels: the segmentation marks the whole prostate. Like the public data (where the NCI-ISBI 2013 sites delineate
the zones) RUNMC and BMC use **1 = central gland, 2 = peripheral zone**; the other sites use **1** for the
whole gland. Everything > 0 is prostate.

Output: ``OUT/<SITE>/CaseNN.nii.gz`` (float32) and ``CaseNN_segmentation.nii.gz`` (uint8; HK and UCL use the
``_Segmentation`` capitalisation, as some public copies do), plus ``OUT/dataset.json`` and ``OUT/README.md``.
Affines are diagonal (voxel spacing, RAS+: i to the right, j anterior, k superior) with the origin such that
the patient's prostate lies near the world origin. Files are byte-reproducible for a seed (gzip ``mtime=0``)
and written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ._io import atomic_write_json, atomic_write_text, write_nifti

__all__ = ["SiteProfile", "SITE_PROFILES", "generate_case", "generate_six_site_dataset", "synth_command"]

logger = logging.getLogger(__name__)

_MARKER = "monai_relkd.data.synthetic"


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition parameters of one synthetic site."""

    name: str
    cases: int
    field_T: tuple[float, ...]  # field strengths drawn from per case
    vendor: str  # Siemens / Philips / GE: intensity curve
    endorectal: bool
    fov_mm: float  # in-plane field of view; spacing = fov / size
    slice_mm: float
    n_slices: int
    zones: bool  # True: label 1 central gland, 2 peripheral zone; False: label 1
    label_suffix: str = "segmentation"


#: The six sites, after the public collection (case counts, field, vendor, coil); FOV / thickness / slice
#: counts are plausible values reduced to keep volumes small.
SITE_PROFILES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile("RUNMC", 30, (3.0,), "Siemens", False, 200.0, 3.6, 20, True),
        SiteProfile("BMC", 30, (1.5,), "Philips", True, 150.0, 3.0, 22, True),
        SiteProfile("I2CVB", 19, (3.0,), "Siemens", False, 170.0, 1.25, 44, False),
        SiteProfile("UCL", 13, (1.5, 3.0), "Siemens", False, 180.0, 3.3, 20, False, "Segmentation"),
        SiteProfile("BIDMC", 12, (3.0,), "GE", True, 140.0, 2.6, 24, False),
        SiteProfile("HK", 12, (1.5,), "Siemens", True, 190.0, 3.6, 20, False, "Segmentation"),
    )
}

# vendor intensity curves: (scale, gamma, offset)
_VENDOR_CURVE = {"Siemens": (1000.0, 1.0, 0.0), "Philips": (2500.0, 0.7, 60.0), "GE": (1600.0, 1.35, 0.0)}
_NOISE_SIGMA = {1.5: 0.055, 3.0: 0.022}  # Rician sigma relative to the fat signal (~0.8)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """A smooth zero-mean, unit-std random field of ``shape``, upsampled (cubic) from a ``coarse`` grid."""
    small = rng.standard_normal(coarse).astype(np.float32)
    f = ndimage.zoom(small, [s / c for s, c in zip(shape, coarse)], order=3, mode="reflect", grid_mode=True)
    f = f[tuple(slice(0, s) for s in shape)]
    if f.shape != tuple(shape):  # zoom may round one short
        f = np.pad(f, [(0, s - fs) for s, fs in zip(shape, f.shape)], mode="edge")
    f -= f.mean()
    return f / (f.std() + 1e-6)


def _ellipse(x, y, cx, cy, a, b) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


@dataclass
class _Grid:
    """World coordinates (mm) of every voxel, broadcast to the volume's shape, and the acquisition."""

    X: np.ndarray
    Y: np.ndarray
    Z: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    dx: float
    dz: float
    field_T: float


@dataclass
class _Body:
    """Outer body ellipse (semi-axes ``a``, ``b``, centre ``cy``) and its mask."""

    a: float
    b: float
    cy: float
    mask: np.ndarray


@dataclass
class _Gland:
    """The prostate in its own frame (``xp, yp, zp``, normalised radius ``rr``, semi-axes ``a, b, c``) and masks."""

    xp: np.ndarray
    yp: np.ndarray
    zp: np.ndarray
    rr: np.ndarray
    a: float
    b: float
    c: float
    prostate: np.ndarray | None = None
    cg: np.ndarray | None = None
    pz: np.ndarray | None = None
    capsule: np.ndarray | None = None


@dataclass
class _Rectum:
    """Rectum centre ``(x, y)``, radius ``r``, normalised distance ``rd`` and the endorectal balloon (or None)."""

    x: float
    y: float
    r: float
    rd: np.ndarray
    balloon: np.ndarray | None


def _acquisition_grid(profile: SiteProfile, size: int, rng: np.random.Generator) -> _Grid:
    """Field of view, slice thickness and count, field strength and position of one case; the voxel grid in mm."""
    u = rng.uniform
    fov = profile.fov_mm * u(0.93, 1.07)
    dx = fov / size
    dz = round(profile.slice_mm * u(0.95, 1.05), 2)
    nz = max(8, profile.n_slices + int(rng.integers(-2, 3)))
    field_T = float(profile.field_T[int(rng.integers(len(profile.field_T)))])
    centre = np.array([u(-12, 12), u(-10, 14), u(-6, 6)])  # world coords (mm) of the volume centre
    shape = (size, size, nz)
    origin = centre - (np.array(shape) - 1) / 2 * np.array([dx, dx, dz])
    affine = np.diag([dx, dx, dz, 1.0])
    affine[:3, 3] = origin
    x = (origin[0] + dx * np.arange(size, dtype=np.float32))[:, None, None].astype(np.float32)
    y = (origin[1] + dx * np.arange(size, dtype=np.float32))[None, :, None].astype(np.float32)
    z = (origin[2] + dz * np.arange(nz, dtype=np.float32))[None, None, :].astype(np.float32)
    full = np.zeros(shape, np.float32)
    return _Grid(x + full, y + full, z + full, shape, affine, dx, dz, field_T)


def _paint_pelvis(img: np.ndarray, g: _Grid, rng: np.random.Generator) -> _Body:
    """Body outline, fat, muscles, pubic bone, femoral heads and bladder (mm; x right, y anterior, z superior)."""
    u, X, Y, Z = rng.uniform, g.X, g.Y, g.Z
    body_a, body_b, body_cy = u(135, 165), u(95, 115), u(12, 22)
    body = _ellipse(X, Y, 0, body_cy, body_a, body_b) <= 1
    img[body] = 0.74  # pelvic fat
    sub_t = u(12, 25)
    subcut = body & (_ellipse(X, Y, 0, body_cy, body_a - sub_t, body_b - sub_t) > 1)
    img[subcut] = 0.86
    muscle = np.zeros(g.shape, bool)
    for side in (-1, 1):
        # gluteus maximus (posterolateral), obturator internus (lateral wall), levator ani (sling around the rectum)
        muscle |= _ellipse(X, Y, side * u(60, 75), body_cy - body_b + sub_t + u(22, 30), u(40, 52), u(22, 30)) <= 1
        muscle |= _ellipse(X, Y, side * u(44, 52), u(-5, 10), u(8, 12), u(28, 36)) <= 1
        muscle |= _ellipse(X, Y, side * u(18, 24), u(-30, -22), u(5, 8), u(12, 16)) <= 1
    muscle &= body & ~subcut
    img[muscle] = 0.27
    # anterior abdominal wall muscles
    img[(np.abs(X) < u(30, 45)) & (np.abs(Y - (body_cy + body_b - sub_t - 7)) < 6) & body] = 0.27
    # pubic symphysis (anterior to the prostate, inferior half) and femoral heads (superior slices)
    pub_y = u(38, 48)
    for side in (-1, 1):
        b_in = _ellipse(X, Y, side * u(9, 13), pub_y, u(9, 12), u(6, 8)) + ((Z + 8) / 22) ** 2
        img[b_in <= 1.35] = 0.05  # cortex
        img[b_in <= 1.0] = 0.5  # marrow
        fem = _ellipse(X, Y, side * u(78, 88), u(5, 15), 22, 22) + ((Z - u(25, 35)) / 28) ** 2
        img[fem <= 1.2] = 0.05
        img[fem <= 1.0] = 0.52
    # bladder (anterior-superior)
    bl = _ellipse(X, Y, u(-5, 5), u(22, 32), u(30, 45), u(18, 28)) + ((Z - u(30, 40)) / u(16, 24)) ** 2
    img[bl <= 1.25] = 0.25
    img[bl <= 1.0] = 1.0
    return _Body(body_a, body_b, body_cy, body)


def _gland_shape(g: _Grid, rng: np.random.Generator) -> _Gland:
    """Prostate semi-axes, rotation, harmonic deformation, apex taper and flat posterior surface."""
    u = rng.uniform
    a, b, c = u(19, 29), u(13, 20), u(15, 22)
    rot = u(-0.25, 0.25)
    cr, sr = math.cos(rot), math.sin(rot)
    xp, yp, zp = cr * g.X + sr * g.Y, -sr * g.X + cr * g.Y, g.Z - u(-4, 4)
    taper = 1.0 - u(0.15, 0.35) * np.clip(-zp / c, 0, 1)  # narrower towards the apex (inferior)
    bpost = np.where(yp < 0, u(0.75, 0.9), 1.0)  # flatter posterior surface
    phi = np.arctan2(yp, xp)
    bump = 1.0
    for k in (2, 3, 4):
        bump = bump + u(0.0, 0.07) * np.cos(k * phi + u(0, 2 * np.pi))
    r2 = (xp / (a * taper)) ** 2 + (yp / (b * taper * bpost)) ** 2 + (zp / c) ** 2
    return _Gland(xp, yp, zp, np.sqrt(r2) / bump, a, b, c)


def _rectum_and_zones(gl: _Gland, g: _Grid, endorectal: bool, rng: np.random.Generator) -> _Rectum:
    """Rectum (and endorectal balloon) right behind the prostate; fills the gland's prostate / zone / capsule
    masks, which the balloon flattens."""
    u = rng.uniform
    rect_r = u(20, 26) if endorectal else u(10, 14)
    rect_y = -(gl.b * u(0.75, 0.9) + rect_r + u(3, 6))
    rect_x = u(-4, 4)
    rd = np.sqrt(_ellipse(g.X, g.Y, rect_x, rect_y, rect_r, rect_r * (0.8 if endorectal else 0.9)))
    prostate = gl.rr <= 1.0
    balloon = None
    if endorectal:
        # the balloon flattens the posterior gland: nothing of the prostate within the balloon + wall
        prostate &= rd > 1.0 + 3.0 / rect_r
        balloon = rd <= 1.0 - 2.5 / rect_r
    a, b, c = gl.a, gl.b, gl.c
    cg = prostate & (
        (gl.xp / (a * u(0.55, 0.72))) ** 2 + ((gl.yp - b * u(0.15, 0.3)) / (b * u(0.5, 0.68))) ** 2
        + ((gl.zp - c * u(0.1, 0.25)) / (c * u(0.6, 0.8))) ** 2 <= 1.0
    )
    capsule = (gl.rr <= 1.0 + 2.0 / a) & ~prostate
    if endorectal:
        capsule &= rd > 1.0 + 3.0 / rect_r
    gl.prostate, gl.cg, gl.pz, gl.capsule = prostate, cg, prostate & ~cg, capsule
    return _Rectum(rect_x, rect_y, rect_r, rd, balloon)


def _paint_gland(img: np.ndarray, gl: _Gland, g: _Grid, size: int, rng: np.random.Generator) -> None:
    """Neurovascular bundles, seminal vesicles, capsule, nodular central gland, peripheral zone and urethra."""
    u, X, Y = rng.uniform, g.X, g.Y
    a, b, c, prostate = gl.a, gl.b, gl.c, gl.prostate
    # periprostatic venous plexus (bright dots) and neurovascular bundles, posterolateral
    for side in (-1, 1):
        nvb = _ellipse(X, Y, side * (a * 0.8), -b * 0.6, 3.5, 3.5) <= 1
        img[nvb & ~prostate] = 0.9
    # seminal vesicles (superior-posterior, bright with septa)
    sv = np.zeros(g.shape, bool)
    for side in (-1, 1):
        sv |= (_ellipse(X, Y, side * u(12, 18), -b * u(0.3, 0.6), u(10, 15), u(4, 7))
               + ((g.Z - c * u(0.9, 1.2)) / u(6, 10)) ** 2) <= 1
    sv &= ~prostate
    img[sv] = 0.82 + 0.12 * np.sin(X[sv] * 1.3) * np.sin(Y[sv] * 1.1)
    img[gl.capsule] = 0.22
    nod = _smooth_field(rng, g.shape, (max(3, size // 10), max(3, size // 10), 5))
    img[gl.cg] = 0.38 + 0.07 * nod[gl.cg]  # nodular central gland (BPH)
    img[gl.pz] = 0.78 + 0.04 * nod[gl.pz]
    urethra = (_ellipse(X, Y, 0, b * u(0.1, 0.25), 1.8, 1.8) <= 1) & prostate
    img[urethra] = 0.6


def _paint_rectum(img: np.ndarray, rc: _Rectum, g: _Grid, body: np.ndarray, tex: np.ndarray,
                  rng: np.random.Generator) -> str:
    """Rectal wall and lumen (gas from the texture field), or the balloon (air or fluid) and coil; returns the
    balloon's fill: ``"air"``, ``"fluid"`` or ``"none"``."""
    wall = (rc.rd <= 1.0) & (rc.rd > 1.0 - 3.0 / rc.r) & body
    if rc.balloon is None:
        img[(rc.rd <= 1.0) & body] = 0.3
    img[wall] = 0.25
    if rc.balloon is not None:
        fill = "air" if rng.random() < 0.6 else "fluid"
        img[rc.balloon & body] = 0.02 if fill == "air" else 0.95
        coil = _ellipse(g.X, g.Y, rc.x, rc.y - rc.r * 0.15, 3.0, 2.0) <= 1
        img[coil] = 0.0
        return fill
    lumen = rc.rd <= 0.55
    gas = lumen & (tex > 0.3)
    img[lumen] = 0.35
    img[gas] = 0.04
    return "none"


def _receive_bias(g: _Grid, body: _Body, rc: _Rectum, endorectal: bool, rng: np.random.Generator) -> np.ndarray:
    """Smooth receive-bias field: strong and posterior for an endorectal coil, brighter near the surface for a
    phased array."""
    u = rng.uniform
    bias = 1.0 + 0.1 * _smooth_field(rng, g.shape, (3, 3, 2))
    if endorectal:
        dcoil = np.sqrt((g.X - rc.x) ** 2 + (g.Y - rc.y) ** 2 + (0.5 * g.Z) ** 2)
        amp, length = u(2.5, 5.0), u(14, 24)
        return bias * (u(0.45, 0.65) + amp * np.exp(-dcoil / length))
    rad = np.sqrt(_ellipse(g.X, g.Y, 0, body.cy, body.a, body.b))
    return bias * (0.8 + 0.3 * np.clip(rad, 0, 1.2) ** 2)  # phased array: brighter near the surface


def _noise_and_vendor(img: np.ndarray, profile: SiteProfile, field_T: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise at the field strength's level, then the vendor's intensity curve; float32."""
    u = rng.uniform
    sigma = _NOISE_SIGMA[field_T] * u(0.85, 1.15) * 0.8
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)
    scale, gamma, offset = _VENDOR_CURVE[profile.vendor]
    img = scale * u(0.85, 1.15) * np.power(img, gamma * u(0.95, 1.05)) + offset * u(0.8, 1.2)
    return img.astype(np.float32)


def generate_case(profile: SiteProfile, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray, dict]:
    """Render one case of ``profile``: returns ``(image float32 (X,Y,Z), label uint8, affine 4x4, info)``.

    The steps draw from ``rng`` in a fixed order, so a seed always gives the same case.
    """
    g = _acquisition_grid(profile, size, rng)
    img = np.zeros(g.shape, np.float32)
    tex = _smooth_field(rng, g.shape, (6, 6, 3))
    body = _paint_pelvis(img, g, rng)
    gland = _gland_shape(g, rng)
    rectum = _rectum_and_zones(gland, g, profile.endorectal, rng)
    _paint_gland(img, gland, g, size, rng)
    fill = _paint_rectum(img, rectum, g, body.mask, tex, rng)
    # tissue texture (multiplicative, low frequency) and partial volume in-plane
    img *= 1.0 + 0.06 * tex
    img = ndimage.gaussian_filter(img, sigma=(0.6, 0.6, 0.0)).astype(np.float32)
    img = img * _receive_bias(g, body, rectum, profile.endorectal, rng)
    image = _noise_and_vendor(img, profile, g.field_T, rng)

    label = np.zeros(g.shape, np.uint8)
    if profile.zones:
        label[gland.cg] = 1
        label[gland.pz] = 2
    else:
        label[gland.prostate] = 1
    info = {
        "spacing": [round(g.dx, 4), round(g.dx, 4), g.dz],
        "shape": list(g.shape),
        "field_T": g.field_T,
        "balloon": fill,
        "prostate_ml": round(float(gland.prostate.sum()) * g.dx * g.dx * g.dz / 1000.0, 2),
    }
    return image, label, g.affine, info


def _case_counts(scale: float) -> dict[str, int]:
    return {name: max(1, int(round(p.cases * scale))) for name, p in SITE_PROFILES.items()}


def _prepare_out_dir(out: Path) -> None:
    """Refuse to write into a folder holding site data that ``relkd synth`` did not make."""
    marker = out / "dataset.json"
    ours = False
    if marker.is_file():
        try:
            ours = json.loads(marker.read_text()).get("generator") == _MARKER
        except (OSError, ValueError):
            ours = False
    if ours:
        return
    for name in SITE_PROFILES:
        d = out / name
        if d.is_dir() and any(f.name.lower().startswith("case") for f in d.iterdir()):
            raise FileExistsError(
                f"{str(d)!r} already holds cases not written by relkd synth (no {marker.name} marker); "
                "choose an empty --out folder"
            )


def generate_six_site_dataset(
    out_dir: str | os.PathLike, scale: float = 1.0, size: int = 128, seed: int = 0
) -> dict[str, Any]:
    """Write the synthetic six-site collection under ``out_dir`` in the public layout.

    Args:
        out_dir: output folder (created). Re-running over an earlier ``relkd synth`` output replaces it (stale
            cases of the six sites are removed); a folder holding other site data is refused.
        scale: multiplies the public case counts (RUNMC 30, BMC 30, I2CVB 19, UCL 13, BIDMC 12, HK 12); every
            site keeps at least one case.
        size: in-plane matrix (``size x size``); slice counts are per site (about 20, 44 for I2CVB).
        seed: the same seed gives byte-identical files. Each case has its own stream
            (``seed, site index, case index``), so changing ``scale`` keeps the common cases unchanged.

    Returns:
        A summary dict (also written to ``out_dir/dataset.json``): sites, their profiles and cases, timing.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if int(size) < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    size = int(size)
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out_dir(out)
    counts = _case_counts(scale)
    sites: dict[str, Any] = {}
    for si, (name, prof) in enumerate(SITE_PROFILES.items()):
        site_dir = out / name
        site_dir.mkdir(exist_ok=True)
        keep = set()
        cases = []
        for ci in range(counts[name]):
            rng = np.random.default_rng([int(seed), si, ci])
            image, label, affine, info = generate_case(prof, size, rng)
            case = f"Case{ci:02d}"
            img_name, lab_name = f"{case}.nii.gz", f"{case}_{prof.label_suffix}.nii.gz"
            write_nifti(site_dir / img_name, image, affine)
            write_nifti(site_dir / lab_name, label, affine)
            keep.update((img_name, lab_name))
            cases.append({"case": case, "image": f"{name}/{img_name}", "label": f"{name}/{lab_name}", **info})
        for f in site_dir.iterdir():  # stale cases from an earlier, larger run
            if f.is_file() and f.name.lower().startswith("case") and f.name not in keep:
                f.unlink()
        p = asdict(prof)
        p.pop("cases")
        sites[name] = {"n_cases": len(cases), **p, "labels": "1=central gland, 2=peripheral zone" if prof.zones
                       else "1=prostate", "cases": cases}
    elapsed = time.perf_counter() - t0
    summary = {
        "generator": _MARKER,
        "name": "relkd synthetic six-site prostate MRI",
        "description": "Synthetic axial T2-weighted-like pelvis phantoms in the public six-site layout; "
        "label > 0 is prostate.",
        "seed": int(seed),
        "scale": float(scale),
        "size": size,
        "n_cases": sum(s["n_cases"] for s in sites.values()),
        "sites": sites,
    }
    atomic_write_json(out / "dataset.json", summary)
    atomic_write_text(out / "README.md", _readme(summary))
    summary = dict(summary, out_dir=str(out), elapsed_s=round(elapsed, 2))
    return summary


def _readme(summary: dict[str, Any]) -> str:
    rows = [
        "| site | cases | field (T) | vendor | coil | FOV mm | slice mm | slices | labels | segmentation file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["sites"].items():
        rows.append(
            f"| {name} | {s['n_cases']} | {'/'.join(map(str, s['field_T']))} | {s['vendor']} | "
            f"{'endorectal' if s['endorectal'] else 'surface'} | {s['fov_mm']:g} | {s['slice_mm']:g} | "
            f"~{s['n_slices']} | {s['labels']} | CaseNN_{s['label_suffix']}.nii.gz |"
        )
    return (
        f"# {summary['name']}\n\n"
        f"Written by `relkd synth` (seed {summary['seed']}, scale {summary['scale']:g}, in-plane matrix "
        f"{summary['size']}x{summary['size']}). Not real patient data.\n\n"
        "Each `SITE/CaseNN.nii.gz` is a float32 axial T2-weighted-like phantom, `CaseNN_[Ss]egmentation.nii.gz` "
        "its uint8 prostate mask (values > 0 are prostate; RUNMC and BMC mark the central gland 1 and the "
        "peripheral zone 2, like the NCI-ISBI 2013 delineations). Site effects: field strength (noise), vendor "
        "intensity curve, endorectal coil (posterior bias field and rectal balloon), spacing, slice thickness, "
        "field of view; all with per-case jitter. Details per case are in `dataset.json`.\n\n"
        + "\n".join(rows)
        + "\n"
    )


def synth_command(out: str, scale: float = 1.0, size: int = 128, seed: int = 0) -> str:
    """Write the synthetic six-site prostate collection (``relkd synth``) and print a per-site summary.

    Example::

        relkd synth --out /tmp/prostate --scale 0.2 --size 96

    Returns the output folder.
    """
    s = generate_six_site_dataset(out, scale=scale, size=size, seed=seed)
    print(f"{'site':<8}{'cases':>6}  {'field':>6}  {'vendor':<8}{'coil':<11}{'in-plane mm':>12}{'slice mm':>10}")
    for name, site in s["sites"].items():
        sp = np.array([c["spacing"] for c in site["cases"]])
        print(f"{name:<8}{site['n_cases']:>6}  {'/'.join(map(str, site['field_T'])):>6}  {site['vendor']:<8}"
              f"{'endorectal' if site['endorectal'] else 'surface':<11}{sp[:, 0].mean():>12.2f}"
              f"{sp[:, 2].mean():>10.2f}")
    print(f"wrote {s['n_cases']} cases to {s['out_dir']} in {s['elapsed_s']:.1f} s")
    return s["out_dir"]
