"""The teacher bundle's generated files, from the templates the student bundles are generated from.

``bundle_templates/common`` holds what the teacher shares with every student (data, transforms, handlers,
evaluation, inference, metadata); ``bundle_templates/teacher/_values.json`` holds what is the teacher's own (its
network, image size, supervised loss and trainer, metadata text). The model card ``docs/README.md`` is not generated:
it is written by hand in the bundle, as nothing in it is shared. ``tools/make_student_bundles.py`` regenerates the
shipped teacher; ``tests/test_bundle_generator.py`` keeps it byte-for-byte equal.
"""

from __future__ import annotations

import os
from pathlib import Path

from .student import _write
from .templates import render_bundle

__all__ = ["teacher_files", "write_teacher"]


def teacher_files(name: str) -> dict[str, str]:
    """``{relative path: text}`` of the generated files of a teacher bundle called ``name``."""
    return render_bundle("teacher", {"name": name})


def write_teacher(out: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> list[str]:
    """Write the generated files of the teacher bundle into ``out``; return their paths relative to ``out``.

    Args:
        out: the bundle folder.
        name: the bundle's name (default: ``out``'s folder name).
        overwrite: replace generated files that exist (never any other file of ``out``, e.g. ``docs/README.md``,
            ``models/``).

    Raises:
        FileExistsError: ``out`` holds generated files and ``overwrite`` is off.
    """
    out = Path(out)
    return _write(out, teacher_files(name or out.resolve().name), overwrite)
