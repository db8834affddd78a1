"""The one file-writing helper of the package: atomic writes (data sets, datalists, checkpoints) and byte-reproducible
NIfTI."""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_torch_save", "remove_stale_temporaries", "SLOW_WRITE_ENV",
           "atomic_write_text", "atomic_write_json", "nifti_bytes", "write_nifti"]


#: Fault injection for tests and ``tools/reliability_check``: ``"<seconds>[:<glob>]"`` makes every atomic write (of
#: files whose name matches ``glob``, default all) pause that long after writing half of the data to the temporary
#: file, so that a kill can be aimed at a write in progress. Never set it outside tests.
SLOW_WRITE_ENV = "MONAI_RELKD_FAULT_SLOW_WRITE"


def _fault_pause(path: Path) -> None:
    spec = os.environ.get(SLOW_WRITE_ENV)
    if not spec:
        return
    seconds, _, pattern = spec.partition(":")
    if not pattern or fnmatch.fnmatch(path.name, pattern):
        time.sleep(float(seconds))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, fsync it, then ``os.replace`` it onto ``path``.

    Readers never see a half-written file, and an interrupted write (exception, kill, power loss) leaves the
    previous file (if any) intact: the old file is never deleted before its successor is complete. A kill can leave
    a ``.<name>.*.tmp`` file beside ``path`` (see :func:`remove_stale_temporaries`). The parent folder is created
    when missing and fsynced after the rename. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / file system
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`). Returns the path written."""
    path = Path(path)

    def write(f: BinaryIO) -> None:
        half = len(data) // 2
        f.write(data[:half])
        _fault_pause(path)
        f.write(data[half:])

    return atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> bytes:
    """``torch.save(obj)`` to ``path`` atomically; returns the bytes written (e.g. to hash them)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return data


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that an interrupted :func:`atomic_write` of ``folder/<name>`` left behind.

    Only call it while no other process writes to ``folder`` (e.g. under a training lock). Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path`` (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Atomically write ``obj`` as JSON (trailing newline) to ``path``; ``dumps_kwargs`` go to ``json.dumps``
    (default ``indent=2``)."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


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
