"""The plugin's class and function names never collide with MONAI's: MONAI's short-name lookup would warn and
pick one of two candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ComponentLocator, ConfigParser

from conftest import BUNDLES
import monai_relkd  # noqa: F401  (registers the components)



def _table() -> dict:
    locator = ComponentLocator()
    locator.get_component_module_name("ENet")  # builds the table
    return locator._components_table


def test_no_plugin_name_is_also_a_monai_name() -> None:
    clashes = {
        name: mods
        for name, mods in _table().items()
        if isinstance(mods, list)
        and any(m.startswith("monai_relkd") for m in mods)
        and any(not m.startswith("monai_relkd") for m in mods)
    }
    assert not clashes, f"names defined twice (rename the plugin's): {clashes}"


@pytest.mark.parametrize("config", sorted(BUNDLES.glob("*/configs/*.json")), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_bundle_target_resolves_to_one_component(config: Path) -> None:
    """A dotted ``_target_`` is imported as is; a short one must name exactly one component (MONAI would warn
    "more than 1 component" and take the first)."""
    locator = ConfigParser({}).locator
    for target in _targets(json.loads(config.read_text())):
        if "." in target or target.startswith(("$", "@", "%")):
            continue
        found = locator.get_component_module_name(target)
        assert isinstance(found, str), f"{config.name}: _target_ {target!r} resolves to {found!r}"


def _targets(node) -> list[str]:
    """Every ``_target_`` string of a config, depth-first."""
    if isinstance(node, dict):
        found = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []
