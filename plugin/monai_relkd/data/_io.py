"""Small file-writing helpers shared by the data modules: atomic writes and byte-reproducible NIfTI."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "nifti_bytes", "write_nifti"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    Readers never see a half-written file, and an interrupted write leaves the previous file (if any) intact.
    The parent folder is created when missing. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path`` (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (trailing newline) to ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool = True, compresslevel: int = 6) -> bytes:
    """Encode ``array`` as a NIfTI-1 file (``.nii.gz`` when ``compress``) with ``affine`` as qform and sform.

    The gzip stream is written with ``mtime=0`` and no file name, so the same array and affine always give the
    same bytes. The header's spatial unit is millimetres and its data type that of ``array``.
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_data_dtype(np.asarray(array).dtype)
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    if not compress:
        return raw
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0)


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write a reproducible NIfTI file; gzip-compressed when ``path`` ends with ``.gz``."""
    return atomic_write_bytes(path, nifti_bytes(array, affine, compress=str(path).endswith(".gz")))
