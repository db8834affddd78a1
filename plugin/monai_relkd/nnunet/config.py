"""Distillation settings of the nnU-Net trainers: class attributes, overridden by a JSON file, then by env variables.

No nnU-Net import here, so the settings can be read and documented without ``nnunetv2`` installed.

Precedence, lowest first:

1. the trainer's class attributes (``lambda_logits``, ``lambda_km``, ``lambda_aa``, ``temperature``, ...);
2. a JSON file named by ``RELKD_NNUNET_CONFIG`` holding any of the keys of :data:`KD_KEYS`;
3. one environment variable per key, ``RELKD_<KEY>`` upper-case (``RELKD_TEACHER``, ``RELKD_LAMBDA_KM``, ...).

Schedule overrides for short runs (tests, small-budget measurements) follow the same rule with the keys of
:data:`SCHEDULE_KEYS` (``RELKD_NNUNET_EPOCHS``, ``RELKD_NNUNET_ITERS``, ``RELKD_NNUNET_VAL_ITERS``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["KD_KEYS", "SCHEDULE_KEYS", "CONFIG_ENV", "resolve_settings", "resolve_schedule"]

#: Path of an optional JSON file with distillation settings.
CONFIG_ENV = "RELKD_NNUNET_CONFIG"

#: Distillation settings and how to parse an environment variable's text for each.
KD_KEYS: dict[str, type] = {
    "teacher": str,  # nnU-Net model folder (default kind) or a teacher bundle checkpoint file
    "teacher_fold": str,  # fold of an nnU-Net teacher ("" = the student's fold; "all" allowed)
    "teacher_checkpoint": str,  # checkpoint file name inside the teacher's fold folder
    "teacher_taps": list,  # teacher module names, pair i with student tap i ([] = the default for the teacher)
    "student_taps": list,
    "lambda_logits": float,
    "lambda_km": float,
    "lambda_aa": float,
    "temperature": float,
    "pair_weights": str,
    "aa_grid": int,
}

#: Schedule settings (nnU-Net trainer attributes) and their environment variables.
SCHEDULE_KEYS: dict[str, str] = {
    "num_epochs": "RELKD_NNUNET_EPOCHS",
    "num_iterations_per_epoch": "RELKD_NNUNET_ITERS",
    "num_val_iterations_per_epoch": "RELKD_NNUNET_VAL_ITERS",
}


def _parse(key: str, text: str) -> Any:
    kind = KD_KEYS[key]
    if kind is list:
        text = text.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [t.strip() for t in text.split(",") if t.strip()]
        return value
    if kind is float:
        return float(text)
    if kind is int:
        return None if text.strip().lower() in ("", "none", "null") else int(text)
    return text


def _load_json(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV}={path!r}: no such file.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_ENV}={path!r} is not valid JSON: {e}") from e
    if not isinstance(data, Mapping):
        raise ValueError(f"{CONFIG_ENV}={path!r} must hold a JSON object, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(KD_KEYS) - set(SCHEDULE_KEYS))
    if unknown:
        raise ValueError(f"{CONFIG_ENV}={path!r}: unknown key(s) {unknown}; known: {sorted(KD_KEYS) + sorted(SCHEDULE_KEYS)}.")
    return dict(data)


def _validate(settings: dict[str, Any]) -> dict[str, Any]:
    for key in ("lambda_logits", "lambda_km", "lambda_aa"):
        lam = settings[key]
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {lam!r}.")
        settings[key] = float(lam)
    if not float(settings["temperature"]) > 0:
        raise ValueError(f"temperature must be > 0, got {settings['temperature']!r}.")
    for key in ("teacher_taps", "student_taps"):
        taps = settings[key]
        if not isinstance(taps, (list, tuple)) or not all(isinstance(t, str) for t in taps):
            raise ValueError(f"{key} must be a list of module names, got {taps!r}.")
        settings[key] = list(taps)
    return settings


def resolve_settings(defaults: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """
    The distillation settings of one run: ``defaults`` (the trainer's class attributes), then the JSON file named
    by ``RELKD_NNUNET_CONFIG``, then ``RELKD_<KEY>`` environment variables.

    Args:
        defaults: a value for every key of :data:`KD_KEYS`.
        environ: the environment (default ``os.environ``).

    Returns:
        a dict with every key of :data:`KD_KEYS`, validated.

    Raises:
        FileNotFoundError / ValueError: a missing or malformed JSON file, an unparsable variable, a bad value.
    """
    env = os.environ if environ is None else environ
    settings = {k: defaults[k] for k in KD_KEYS}
    if env.get(CONFIG_ENV):
        settings.update({k: v for k, v in _load_json(env[CONFIG_ENV]).items() if k in KD_KEYS})
    for key in KD_KEYS:
        var = f"RELKD_{key.upper()}"
        if var in env:
            try:
                settings[key] = _parse(key, env[var])
            except ValueError as e:
                raise ValueError(f"{var}={env[var]!r} is not a valid {KD_KEYS[key].__name__}: {e}") from e
    return _validate(settings)


def resolve_schedule(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """
    Schedule overrides (``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``) from the
    JSON file and the ``RELKD_NNUNET_*`` variables; keys that are not set are absent.

    Raises:
        ValueError: a value that is not a positive integer.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    if env.get(CONFIG_ENV):
        out.update({k: v for k, v in _load_json(env[CONFIG_ENV]).items() if k in SCHEDULE_KEYS})
    for key, var in SCHEDULE_KEYS.items():
        if var in env:
            out[key] = env[var]
    for key, value in out.items():
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1 or str(number) != str(value).strip():
            raise ValueError(f"{key} ({SCHEDULE_KEYS[key]}) must be a positive integer, got {value!r}.")
        out[key] = number
    return out
