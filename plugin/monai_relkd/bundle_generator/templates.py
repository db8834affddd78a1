"""The bundle templates (package data under ``monai_relkd/bundle_templates``) and their placeholders.

A template is a bundle file in which ``{{key}}`` marks what differs between bundles. In a JSON file a string that is
exactly ``"{{key}}"`` becomes the value itself (an object, a list, a number); inside a list, a list value is spliced
in (so an empty list removes the entry); inside an object, an entry whose key is exactly ``"{{key}}"`` (its value
``null``) is replaced by the entries of a mapping value, in order (so an empty mapping removes it); a placeholder
inside a longer string is replaced by the value's text. JSON files are written as ``json.dumps(indent=4)`` plus a
newline, as the shipped bundles are. Every other file is text.

One source for every bundle (teacher and students): ``bundle_templates/common/`` holds the files and keys that all
bundles share; ``bundle_templates/<role>/`` (``student``, ``teacher``) holds the files only that role has (e.g. the
student model card) and ``_values.json``, the role's values of the placeholders of ``common`` (itself a JSON
template, rendered with the generator's values first). ``bundle_templates/<option>/`` holds the files an option
adds (e.g. ``gkd``). Files whose name starts with ``_`` are not copied (``_README_section.md`` is an option's
section of the model card).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

__all__ = ["TemplateError", "template_files", "option_section", "role_values", "render_json", "render_text",
           "render_file", "render_bundle"]

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class TemplateError(KeyError):
    """A template names a placeholder that has no value (a bug in the template or the generator)."""


def _root():
    return resources.files("monai_relkd").joinpath("bundle_templates")


def _walk(folder, prefix: str = "") -> Iterator[tuple[str, str]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        rel = f"{prefix}{entry.name}"
        if entry.is_dir():
            yield from _walk(entry, rel + "/")
        elif not entry.name.startswith(("_", ".")):
            yield rel, entry.read_text(encoding="utf-8")


def template_files(option: str = "common") -> dict[str, str]:
    """``{relative path: template text}`` of one template folder (``common``, a role or an option such as ``gkd``)."""
    folder = _root().joinpath(option)
    if not folder.is_dir():
        raise FileNotFoundError(f"no bundle template '{option}' in monai_relkd/bundle_templates.")
    return dict(_walk(folder))


def option_section(option: str) -> str:
    """The model-card section that an option adds (``bundle_templates/<option>/_README_section.md``), or ``""``."""
    entry = _root().joinpath(option, "_README_section.md")
    return entry.read_text(encoding="utf-8") if entry.is_file() else ""


def _lookup(key: str, values: Mapping[str, Any]) -> Any:
    if key not in values:
        raise TemplateError(f"template placeholder '{{{{{key}}}}}' has no value; known: {sorted(values)}")
    return values[key]


def render_text(text: str, values: Mapping[str, Any]) -> str:
    """Replace every ``{{key}}`` in ``text`` by ``str(values[key])``."""
    return _PLACEHOLDER.sub(lambda m: str(_lookup(m.group(1), values)), text)


def _render(node: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        return _lookup(whole.group(1), values) if whole else render_text(node, values)
    if isinstance(node, dict):
        return _render_object(node, values)
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            value = _render(item, values)
            spliced = isinstance(item, str) and _PLACEHOLDER.fullmatch(item) and isinstance(value, list)
            out.extend(value) if spliced else out.append(value)
        return out
    return node


def _render_object(node: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in node.items():
        whole = _PLACEHOLDER.fullmatch(key)
        entries = _lookup(whole.group(1), values) if whole else {render_text(key, values): _render(item, values)}
        if whole and (item is not None or not isinstance(entries, Mapping)):
            raise TemplateError(f"template entry '{key}' splices a mapping: its value must be null and its "
                                f"placeholder value an object, got {item!r} and {type(entries).__name__}")
        clash = set(entries) & set(out)
        if clash:
            raise TemplateError(f"template entry '{key}' repeats keys {sorted(clash)}")
        out.update(entries)
    return out


def render_json(text: str, values: Mapping[str, Any]) -> str:
    """Render a JSON template (see the module docstring) and return the file's text."""
    return json.dumps(_render(json.loads(text), values), indent=4, ensure_ascii=False) + "\n"


def render_file(path: str, text: str, values: Mapping[str, Any]) -> str:
    """Render one template file by its kind (``.json`` or text)."""
    return render_json(text, values) if path.endswith(".json") else render_text(text, values)


def role_values(role: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The placeholder values of a role (``bundle_templates/<role>/_values.json``, rendered with ``values``).

    Raises:
        TemplateError: the role sets a value the generator already gives (each value has one source).
    """
    entry = _root().joinpath(role, "_values.json")
    if not entry.is_file():
        raise FileNotFoundError(f"no bundle role '{role}' (monai_relkd/bundle_templates/{role}/_values.json).")
    own = _render(json.loads(entry.read_text(encoding="utf-8")), values)
    both = set(own) & set(values)
    if both:
        raise TemplateError(f"bundle_templates/{role}/_values.json sets {sorted(both)}, which the generator gives.")
    return own


def render_bundle(role: str, values: Mapping[str, Any], options: Sequence[str] = ()) -> dict[str, str]:
    """``{relative path: text}`` of a whole bundle: ``common`` with the role's files and values, then the options'
    files (a role or option file replaces a ``common`` one of the same path)."""
    files = template_files("common")
    for folder in (role, *options):
        files.update(template_files(folder))
    values = {**values, **role_values(role, values)}
    return {path: render_file(path, text, values) for path, text in files.items()}
