"""Validation of a bundle's ``configs/metadata.json`` against the plugin's schema.

MONAI validates metadata against a schema it downloads (``monai.bundle.verify_metadata``); that is impossible
offline, so the plugin ships the subset of MONAI's meta schema that our bundles rely on, plus what they add
(``required_packages_version`` naming ``monai-relkd``; ``channel_def`` ``{"0": "background", "1": "prostate"}``).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["BundleMetadataError", "load_metadata_schema", "validate_bundle_metadata"]


class BundleMetadataError(ValueError):
    """A bundle's metadata does not follow the schema; the message names the file and the key."""


def load_metadata_schema() -> dict[str, Any]:
    """Return the JSON schema document for bundle metadata shipped with the plugin."""
    text = resources.files("monai_relkd").joinpath("schemas/bundle_metadata.schema.json").read_text()
    return json.loads(text)


def validate_bundle_metadata(metadata: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Check a bundle's metadata and return it.

    Args:
        metadata: the parsed ``metadata.json`` or its path, or the bundle folder.

    Raises:
        BundleMetadataError: listing every problem, each as ``<file>: <key path>: <message>``.
    """
    source = "metadata"
    if not isinstance(metadata, dict):
        path = Path(metadata)
        if path.is_dir():
            path = path / "configs" / "metadata.json"
        source = str(path)
        try:
            with open(path) as f:
                metadata = json.load(f)
        except FileNotFoundError as e:
            raise BundleMetadataError(f"{source}: file not found.") from e
        except json.JSONDecodeError as e:
            raise BundleMetadataError(f"{source}: not valid JSON ({e}).") from e
    validator = jsonschema.Draft7Validator(load_metadata_schema())
    errors = sorted(validator.iter_errors(metadata), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
        raise BundleMetadataError("bundle metadata is invalid:\n  " + "\n  ".join(lines))
    version = metadata["version"]
    if version not in metadata["changelog"]:
        raise BundleMetadataError(f"{source}: changelog: has no entry for the current version '{version}'.")
    return metadata
