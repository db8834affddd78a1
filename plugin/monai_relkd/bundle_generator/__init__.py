"""Student and teacher bundles generated from one set of templates (``relkd new-student``); see :mod:`.student`
and :mod:`.teacher`."""

from .probe import TapCandidate, default_taps, format_candidates, probe_taps
from .student import StudentBundle, new_student, new_student_command, parse_taps
from .teacher import teacher_files, write_teacher
from .templates import TemplateError, render_bundle, render_json, render_text, template_files

__all__ = ["TapCandidate", "default_taps", "format_candidates", "probe_taps", "StudentBundle", "new_student",
           "new_student_command", "parse_taps", "teacher_files", "write_teacher", "TemplateError", "render_bundle",
           "render_json", "render_text", "template_files"]
