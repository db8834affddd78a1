"""Validation of the ``distillation`` section of a student bundle config against
``monai_relkd/schemas/distillation.schema.json``.

In a bundle, validate the *resolved* section from the ``initialize`` list, so the error comes before any
training starts and references/expressions (including command-line overrides) are checked as the values
they evaluate to::

    "initialize": [
        "$monai_relkd.config.validate_distillation_config(@distillation)",
        "$monai.utils.set_determinism(seed=0)"
    ]

Why ``@distillation``: a ``%distillation`` macro is only expanded when it is a whole config value, never inside
an expression string (``"$f(%distillation)"`` is a Python syntax error), and a value ``"%distillation"`` is a
copy that the parser resolves like the original anyway. ``@distillation`` resolves the section once (the
teacher's ``network_def`` is instantiated, and cached: later ``@distillation#teacher#network_def`` references
get the same instance), expressions are evaluated, and the validator then sees plain values; an instantiated
``nn.Module`` is accepted for ``network_def``.

The raw JSON (before resolution) also validates against the schema: reference/expression strings
(``"@..."``, ``"$..."``, ``"%..."``) are accepted wherever a number, list or object is expected.
"""

from __future__ import annotations

import difflib
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = [
    "DistillationConfigError",
    "validate_distillation_config",
    "load_distillation_schema",
    "DISTILLATION_SCHEMA",
]

#: package-relative path of the schema document
DISTILLATION_SCHEMA = "schemas/distillation.schema.json"


class DistillationConfigError(ValueError):
    """An invalid ``distillation`` config section; ``errors`` holds one ``"key.path: message"`` line per problem."""

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


@lru_cache(maxsize=None)
def load_distillation_schema() -> dict:
    """The JSON Schema (draft-07) document of the ``distillation`` section, as a dict."""
    text = resources.files("monai_relkd").joinpath(DISTILLATION_SCHEMA).read_text(encoding="utf-8")
    return json.loads(text)


def _to_plain(value: Any) -> Any:
    """Resolved config values -> JSON-like values: modules become ``{"_target_": <class path>}``, tuples lists,
    numpy/torch scalars Python numbers, path-likes strings; anything else is left for the schema to reject."""
    try:
        import torch

        if isinstance(value, torch.nn.Module):
            cls = type(value)
            return {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.ndim == 0:
            return value.item()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def _key_path(source: str, path: Sequence[Any]) -> str:
    out = source
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _leaf_errors(error: Any) -> list[Any]:
    """For ``anyOf``/``oneOf`` failures, the errors of the alternatives whose type matched (recursively);
    the error itself when no alternative matched the type (then its schema ``description`` is reported)."""
    if error.validator in ("anyOf", "oneOf") and error.context:
        # drop the alternatives that failed on the value's own type/pattern/enum (wrong branch); keep errors
        # deeper inside a branch whose type matched (e.g. ``taps[0].student`` not a string)
        relevant = [e for e in error.context if len(e.path) > 0 or e.validator not in ("type", "pattern", "enum")]
        if relevant:
            leaves: list[Any] = []
            for e in relevant:
                leaves.extend(_leaf_errors(e))
            return leaves
    return [error]


def _message(error: Any) -> str:
    if error.validator in ("anyOf", "oneOf"):
        description = error.schema.get("description")
        if description:
            return f"{error.instance!r} is not valid: expected {description}"
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in known and not str(k).startswith("_")]
        hints = []
        for key in extra:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"unknown key(s) {', '.join(hints)}; allowed: {', '.join(known)}"
    message = error.message
    if "then" in error.absolute_schema_path:
        message += " (at least one tap pair is required when lambda_km > 0 or lambda_aa > 0)"
    return message


def validate_distillation_config(section: Any, source: str = "distillation") -> None:
    """
    Validate a ``distillation`` config section against ``schemas/distillation.schema.json``.

    Accepts the raw JSON section (reference/expression strings ``"@..."``, ``"$..."``, ``"%..."`` pass where a
    value is expected) and the section resolved by MONAI's ``ConfigParser`` (``network_def`` may then be an
    instantiated ``nn.Module``; tuples, numpy/torch scalars and path-likes are accepted).

    Example (bundle ``initialize`` list)::

        "$monai_relkd.config.validate_distillation_config(@distillation)"

    Args:
        section: the section: ``{"teacher": {"network_def": {...}, "checkpoint": str}, "taps": [{"student": str,
            "teacher": str, "student_channels": int, "teacher_channels": int}, ...], "lambda_logits": >= 0,
            "lambda_km": >= 0, "lambda_aa": >= 0, "temperature": > 0, optional "km_normalize" ("frobenius" | "row" |
            "none"), "km_connector_norm" (null | "batch"), "aa_grid", "aa_node_size", "aa_pool" ("avg" | "max"),
            "pair_weights" ("label" | "teacher" | "uniform"), "w_intra", "w_inter" (>= 0), "terms" ({name:
            DistillationTerm definition})}``; keys starting with ``_`` are ignored.
        source: prefix of the key paths in messages (the section's id in the config).

    Raises:
        DistillationConfigError: (a ``ValueError``) one message naming every offending key path, e.g.
            ``distillation.lambda_km: -1 is less than the minimum of 0`` or
            ``distillation.teacher: 'checkpoint' is a required property``.
    """
    from jsonschema import Draft7Validator

    validator = Draft7Validator(load_distillation_schema())
    instance = _to_plain(section)
    lines: list[str] = []
    paths: set[str] = set()
    errors = sorted(validator.iter_errors(instance), key=lambda e: ("then" in e.schema_path, list(map(str, e.path))))
    for error in errors:  # conditional ("then") errors last, skipped where the key already has an error
        for leaf in _leaf_errors(error):
            path = _key_path(source, leaf.absolute_path)
            if "then" in error.schema_path and path in paths:
                continue
            line = f"{path}: {_message(leaf)}"
            if line not in lines:
                lines.append(line)
                paths.add(path)
    if not lines:
        return
    if len(lines) == 1:
        message = f"{lines[0]} (schema: monai_relkd/{DISTILLATION_SCHEMA})"
    else:
        header = f"{len(lines)} problems in the {source!r} config section (schema: monai_relkd/{DISTILLATION_SCHEMA}):"
        message = "\n".join([header] + [f"  {line}" for line in lines])
    raise DistillationConfigError(message, lines)
