"""Every bundle's metadata follows the plugin's schema; bad metadata gets a message naming the file and key."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import BUNDLES as BUNDLES_DIR
from monai_relkd.metadata import BundleMetadataError, validate_bundle_metadata

BUNDLES = sorted(p for p in BUNDLES_DIR.iterdir() if p.is_dir())


def test_there_is_a_teacher_and_students():
    names = {b.name for b in BUNDLES}
    assert "prostate_mri_teacher" in names


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_bundle_metadata_is_valid(bundle):
    meta = validate_bundle_metadata(bundle)
    assert meta["name"] == bundle.name
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "prostate"}
    assert "monai-relkd" in meta["required_packages_version"]


@pytest.fixture
def teacher_meta() -> dict:
    return json.loads((BUNDLES[0].parent / "prostate_mri_teacher" / "configs" / "metadata.json").read_text())


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda m: m.pop("task"), "'task' is a required property"),
        (lambda m: m.update(version="one"), "version"),
        (lambda m: m["required_packages_version"].pop("monai-relkd"), "required_packages_version"),
        (lambda m: m["network_data_format"]["outputs"]["pred"]["channel_def"].update({"1": "tumour"}),
         "network_data_format.outputs.pred.channel_def.1"),
        (lambda m: m.update(references="a string"), "references"),
    ],
)
def test_bad_metadata_names_the_key(teacher_meta, mutate, key):
    meta = copy.deepcopy(teacher_meta)
    mutate(meta)
    with pytest.raises(BundleMetadataError) as err:
        validate_bundle_metadata(meta)
    assert key in str(err.value)


def test_changelog_must_cover_the_version(teacher_meta):
    meta = copy.deepcopy(teacher_meta)
    meta["version"] = "9.9.9"
    with pytest.raises(BundleMetadataError, match="9.9.9"):
        validate_bundle_metadata(meta)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(BundleMetadataError, match="file not found"):
        validate_bundle_metadata(tmp_path / "metadata.json")
    bad = tmp_path / "metadata.json"
    bad.write_text("{not json")
    with pytest.raises(BundleMetadataError, match=str(bad)):
        validate_bundle_metadata(bad)
