"""Validation of the ``distillation`` config section: schema, messages, and the bundle (ConfigWorkflow) path."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from jsonschema import Draft7Validator
from monai.bundle import ConfigParser, ConfigWorkflow

from monai_relkd.config import DistillationConfigError, load_distillation_schema, validate_distillation_config

UNET_T = {
    "_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
    "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
}
UNET_S = {**UNET_T, "channels": [4, 8, 16], "num_res_units": 0}

VALID = {
    "teacher": {"network_def": UNET_T, "checkpoint": "$@bundle_root + '/models/teacher.pt'"},
    "taps": [
        {"student": "model.0", "teacher": "model.0", "student_channels": 4, "teacher_channels": 8},
        {"student": "model.1.submodule.0", "teacher": "model.1.submodule.0", "student_channels": 8,
         "teacher_channels": 16},
    ],
    "lambda_logits": 1.0, "lambda_km": 0.5, "lambda_aa": "@lambda_aa", "temperature": 4.0,
    "aa_grid": 4, "pair_weights": "label", "w_intra": 1.0, "w_inter": 1.0,
}


def _check(mutate) -> DistillationConfigError:
    section = copy.deepcopy(VALID)
    mutate(section)
    with pytest.raises(DistillationConfigError) as err:
        validate_distillation_config(section)
    assert isinstance(err.value, ValueError)
    return err.value


def test_schema_is_draft7_and_valid_passes() -> None:
    Draft7Validator.check_schema(load_distillation_schema())
    validate_distillation_config(VALID)
    minimal = {k: VALID[k] for k in ("teacher", "lambda_logits", "lambda_km", "lambda_aa", "temperature")}
    validate_distillation_config({**minimal, "taps": [], "lambda_km": 0, "lambda_aa": 0.0})  # plain KD
    for grid in (None, [4, 4], [2, 4, 4], "$@grid"):
        validate_distillation_config({**VALID, "aa_grid": grid, "_comment": "keys with _ are ignored"})


def test_resolved_section_passes() -> None:
    """What ``@distillation`` evaluates to: instantiated network, evaluated expressions, tuples, tensors."""
    resolved = copy.deepcopy(VALID)
    resolved["teacher"]["network_def"] = torch.nn.Conv2d(1, 2, 1)
    resolved["teacher"]["checkpoint"] = "/tmp/models/teacher.pt"
    resolved.update(lambda_aa=torch.tensor(0.25), aa_grid=(4, 4))
    validate_distillation_config(resolved)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(lambda_km=-1), "distillation.lambda_km: -1 is less than the minimum of 0"),
        (lambda d: d.update(lambda_logits="high"),
         "distillation.lambda_logits: 'high' is not valid: expected a number >= 0 or a config reference"),
        (lambda d: d.update(temperature=0), "distillation.temperature: 0 is less than or equal to the minimum of 0"),
        (lambda d: d["teacher"].pop("checkpoint"), "distillation.teacher: 'checkpoint' is a required property"),
        (lambda d: d.pop("lambda_aa"), "distillation: 'lambda_aa' is a required property"),
        (lambda d: d["teacher"]["network_def"].pop("_target_"),
         "distillation.teacher.network_def: '_target_' is a required property"),
        (lambda d: d["taps"][1].update(teacher_channels=2.5),
         "distillation.taps[1].teacher_channels: 2.5 is not valid: expected an integer >= 1"),
        (lambda d: d["taps"][0].update(student=3), "distillation.taps[0].student: 3 is not of type 'string'"),
        (lambda d: d.update(taps=[]), "distillation.taps: [] should be non-empty (at least one tap pair"),
        (lambda d: d.update(pair_weights="balanced"), "distillation.pair_weights: 'balanced' is not valid"),
        (lambda d: d.update(lamda_km=1.0), "distillation: unknown key(s) 'lamda_km' (did you mean 'lambda_km'?)"),
        (lambda d: d.update(km_normalize="l2"), "distillation.km_normalize: 'l2' is not valid: expected one of"),
        (lambda d: d.update(aa_pool="min"), "distillation.aa_pool: 'min' is not valid: expected 'avg' or 'max'"),
        (lambda d: d.update(aa_node_size=0), "distillation.aa_node_size: 0 is less than the minimum of 1"),
        (lambda d: d.update(terms={"gkd": {"weight": 1.0}}), "distillation.terms.gkd: '_target_' is a required"),
    ],
    ids=["negative", "type", "temperature", "missing-nested", "missing-top", "target", "int", "tap-name",
         "taps-empty", "enum", "typo", "km-normalize", "aa-pool", "node-size", "term-target"],
)
def test_one_clear_message(mutate, expected) -> None:
    err = _check(mutate)
    assert len(err.errors) == 1, err.errors
    assert str(err).startswith(expected), str(err)


def test_several_problems_in_one_error() -> None:
    err = _check(lambda d: d.update(lambda_km=-1, temperature="hot"))
    assert len(err.errors) == 2 and "2 problems" in str(err)
    assert "distillation.lambda_km" in str(err) and "distillation.temperature" in str(err)
    with pytest.raises(DistillationConfigError, match=r"^train#distillation: 3 is not of type 'object'"):
        validate_distillation_config(3, source="train#distillation")


def _bundle(tmp_path, distillation: dict) -> str:
    """A minimal student training config in MONAI bundle style, validating ``@distillation`` in ``initialize``."""
    config = {
        "imports": ["$import monai_relkd"],
        "bundle_root": str(tmp_path),
        "device": "$torch.device('cpu')",
        "lambda_aa": 0.5,
        "distillation": distillation,
        "network_def": UNET_S,
        "network": "$@network_def.to(@device)",
        "teacher": "$monai_relkd.engines.load_teacher(@distillation#teacher#network_def, "
                   "@distillation#teacher#checkpoint)",
        "loss": {
            "_target_": "monai_relkd.losses.RelationalDistillationLoss",
            "lambda_logits": "@distillation#lambda_logits", "lambda_km": "@distillation#lambda_km",
            "lambda_aa": "@distillation#lambda_aa", "temperature": "@distillation#temperature",
            "aa_grid": "@distillation#aa_grid",
            "student_channels": "$[t['student_channels'] for t in @distillation#taps]",
            "teacher_channels": "$[t['teacher_channels'] for t in @distillation#taps]",
        },
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3,
                      "params": "$monai_relkd.engines.distillation_parameters(@network, @loss)"},
        "train_data": "$[{'image': torch.rand(1, 32, 32), 'label': (torch.rand(1, 32, 32) > 0.5).float()} "
                      "for _ in range(2)]",
        "train_loader": {"_target_": "DataLoader", "dataset": "@train_data", "batch_size": 1},
        "trainer": {
            "_target_": "monai_relkd.engines.DistillationTrainer",
            "device": "@device", "max_epochs": 1, "train_data_loader": "@train_loader", "network": "@network",
            "optimizer": "@optimizer", "loss_function": "@loss", "teacher": "@teacher",
            "student_taps": "$[t['student'] for t in @distillation#taps]",
            "teacher_taps": "$[t['teacher'] for t in @distillation#taps]",
            "train_handlers": [{"_target_": "StatsHandler", "name": "relkd_test_bundle", "tag_name": "train_loss",
                                "output_transform": "$monai_relkd.engines.loss_terms_from_engine"}],
        },
        "initialize": ["$monai_relkd.config.validate_distillation_config(@distillation)",
                       "$monai.utils.set_determinism(seed=0)"],
        "run": ["$@trainer.run()"],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    (tmp_path / "models").mkdir(exist_ok=True)
    torch.save(ConfigParser(UNET_T).get_parsed_content().state_dict(), tmp_path / "models" / "teacher.pt")
    return str(path)


def test_bundle_workflow_runs_and_fails_early(tmp_path) -> None:
    # valid: initialize validates the resolved section, run trains one epoch and logs every term
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("relkd_test_bundle").addHandler(handler)
    workflow = ConfigWorkflow(config_file=_bundle(tmp_path, copy.deepcopy(VALID)), workflow_type=None)
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("trainer")
    assert trainer.state.iteration == 2
    teacher = workflow.parser.get_parsed_content("distillation#teacher#network_def")
    assert trainer.teacher is teacher  # @distillation in initialize and the trainer share one instance
    assert any("loss_km:" in m and "loss_aa:" in m and "loss_seg:" in m for m in messages), messages

    # invalid: the clear error comes from initialize, before the trainer (or the teacher checkpoint) is touched
    bad = copy.deepcopy(VALID)
    bad["lambda_km"] = -1
    del bad["teacher"]["checkpoint"]
    workflow = ConfigWorkflow(config_file=_bundle(tmp_path, bad), workflow_type=None)
    with pytest.raises(Exception) as err:
        workflow.initialize()
    cause = err.value if isinstance(err.value, DistillationConfigError) else err.value.__cause__
    assert isinstance(cause, DistillationConfigError), repr(err.value)
    assert "distillation.lambda_km: -1 is less than the minimum of 0" in str(cause)
    assert "distillation.teacher: 'checkpoint' is a required property" in str(cause)
    assert "trainer" not in workflow.parser.ref_resolver.resolved_content


def test_macro_inside_expression_is_not_supported() -> None:
    """Documents why bundles pass ``@distillation``: ``%`` macros are not expanded inside expressions."""
    parser = ConfigParser({"imports": ["$import monai_relkd"], "distillation": {"lambda_km": 1},
                           "check": "$monai_relkd.config.validate_distillation_config(%distillation)"})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("check")
    assert isinstance(err.value.__cause__ or err.value, SyntaxError)


def test_new_loss_keys_and_resolved_terms_pass() -> None:
    from monai_relkd.losses import DistillationTerm, LogitsDistillationLoss

    section = copy.deepcopy(VALID)
    section.update(km_normalize="row", km_connector_norm="batch", aa_grid=None, aa_node_size=[2, 2], aa_pool="max")
    section["terms"] = {"hot": {"_target_": "monai_relkd.losses.DistillationTerm", "loss": {}, "weight": 0.5}}
    validate_distillation_config(section)  # raw
    section["terms"] = {"hot": DistillationTerm(LogitsDistillationLoss(), weight=0.5)}
    validate_distillation_config(section)  # resolved: the term is an instantiated module
