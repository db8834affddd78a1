"""The losses build from bundle-style configs, by full dotted path and by short name."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from monai.bundle import ComponentLocator, ConfigParser

import monai_relkd  # noqa: F401  (registers the short names)
from monai_relkd import losses

NAMES = (
    "LogitsDistillationLoss",
    "KernelMatrixLoss",
    "AdaptiveAffinityLoss",
    "RelationalDistillationLoss",
    "WeightedDistillationLoss",
    "DistillationTerm",
)


@pytest.mark.parametrize("prefix", ["monai_relkd.losses.", ""])
def test_config_parser_builds_losses(prefix) -> None:
    config = {
        "aa": {"_target_": prefix + "AdaptiveAffinityLoss", "grid": [4, 4], "pair_weights": "uniform"},
        "km": {"_target_": prefix + "KernelMatrixLoss", "student_channels": 4, "teacher_channels": 8},
        "kd": {"_target_": prefix + "LogitsDistillationLoss", "temperature": 2.0},
        "total": {
            "_target_": prefix + "RelationalDistillationLoss",
            "lambda_km": 0.5,
            "lambda_aa": 1.0,
            "student_channels": [4],
            "teacher_channels": [8],
            "aa_grid": 4,
        },
    }
    parser = ConfigParser(config)  # a fresh parser has a fresh ComponentLocator (its table is built on first use)
    aa = parser.get_parsed_content("aa")
    assert isinstance(aa, losses.AdaptiveAffinityLoss) and aa.grid == (4, 4) and aa.pair_weights == "uniform"
    assert isinstance(parser.get_parsed_content("km"), losses.KernelMatrixLoss)
    assert parser.get_parsed_content("kd").temperature == 2.0
    total = parser.get_parsed_content("total")
    assert isinstance(total, losses.RelationalDistillationLoss) and len(total.km_losses) == 1
    value = aa(torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8))
    assert torch.isfinite(value)


def test_component_locator_resolves_short_names_uniquely() -> None:
    locator = ComponentLocator()
    for name in NAMES:
        module = locator.get_component_module_name(name)
        assert isinstance(module, str) and module.startswith("monai_relkd.losses."), (name, module)


def test_short_name_in_a_fresh_process_with_config_imports() -> None:
    # a bundle run has not imported the plugin: the config's "imports" section must make the short name work
    code = textwrap.dedent(
        """
        import sys
        from monai.bundle import ConfigParser
        assert "monai_relkd" not in sys.modules
        parser = ConfigParser({"imports": ["$import monai_relkd"],
                               "loss": {"_target_": "AdaptiveAffinityLoss", "grid": 2}})
        print(type(parser.get_parsed_content("loss")).__module__)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "monai_relkd.losses.affinity"


def test_loss_built_from_the_distillation_section_with_an_extra_term() -> None:
    # every λ is written once, in `distillation`; a further named term plugs in from the config alone
    config = {
        "distillation": {
            "taps": [{"student": "a", "teacher": "b", "student_channels": 4, "teacher_channels": 8}],
            "lambda_logits": 0.5,
            "lambda_km": 2.0,
            "lambda_aa": 0.0,
            "temperature": 3.0,
            "km_normalize": "row",
            "aa_pool": "max",
            "aa_grid": 2,
            "terms": {
                "kd_hot": {
                    "_target_": "monai_relkd.losses.DistillationTerm",
                    "loss": {"_target_": "monai_relkd.losses.LogitsDistillationLoss", "temperature": 1.0},
                    "weight": 0.25,
                }
            },
        },
        "loss": {"_target_": "monai_relkd.losses.build_distillation_loss", "distillation": "@distillation",
                 "num_classes": 2},
    }
    loss = ConfigParser(config).get_parsed_content("loss")
    assert isinstance(loss, losses.RelationalDistillationLoss)
    assert loss.term_weights == {"seg": 1.0, "logits": 0.5, "km": 2.0, "aa": 0.0, "kd_hot": 0.25}
    assert loss.km_losses[0].normalize == "row" and loss.aa_loss.pool == "max" and loss.logits_loss.temperature == 3.0
    z_s, z_t = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    label = torch.randint(0, 2, (2, 1, 8, 8))
    out = loss(z_s, z_t, [torch.randn(2, 4, 4, 4)], [torch.randn(2, 8, 2, 2)], label)
    assert set(out) == {"loss", "seg", "logits", "km", "aa", "kd_hot"}
    hot = losses.LogitsDistillationLoss(1.0)(z_s, z_t)
    assert out["kd_hot"].item() == pytest.approx(hot.item(), rel=1e-6)
    expected = out["seg"] + 0.5 * out["logits"] + 2.0 * out["km"] + 0.25 * out["kd_hot"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
