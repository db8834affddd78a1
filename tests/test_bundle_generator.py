"""``relkd new-student`` and the templates: the shipped students and the teacher's configs are exactly what the
generator writes, the default taps, and the errors a user sees."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from monai_relkd.bundle_generator import TemplateError, new_student, parse_taps, probe_taps, render_json
from monai_relkd.bundle_generator.probe import default_taps
from monai_relkd.metadata import validate_bundle_metadata

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
TEACHER = BUNDLES / "prostate_mri_teacher"
NOT_GENERATED = {"models", "eval", "runs"}  # weights and outputs, never in git
TEACHER_HAND_WRITTEN = {"docs/README.md"}  # the teacher's model card shares nothing with the students'


def _make_script():
    spec = importlib.util.spec_from_file_location("make_student_bundles", REPO / "tools" / "make_student_bundles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bundle_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in NOT_GENERATED}


def test_shipped_student_bundles_are_byte_for_byte_what_the_generator_writes(tmp_path):
    script = _make_script()
    script.make_student_bundles(out=str(tmp_path), teacher_bundle=str(TEACHER), quiet=True)
    assert set(script.STUDENTS) == {p.name for p in BUNDLES.glob("prostate_mri_student_*")}
    for name in script.STUDENTS:
        shipped, generated = BUNDLES / name, tmp_path / name
        assert _bundle_files(shipped) == _bundle_files(generated), f"{name}: files not produced by the generator"
        for rel in sorted(_bundle_files(generated)):
            assert (shipped / rel).read_bytes() == (generated / rel).read_bytes(), (
                f"bundles/{name}/{rel} differs from the template: edit plugin/monai_relkd/bundle_templates and run "
                "`python tools/make_student_bundles.py`")
    teacher = tmp_path / script.TEACHER
    assert _bundle_files(TEACHER) - _bundle_files(teacher) == TEACHER_HAND_WRITTEN
    assert {"configs/train.json", "configs/inference.json", "configs/metadata.json"} <= _bundle_files(teacher)
    for rel in sorted(_bundle_files(teacher)):
        assert (TEACHER / rel).read_bytes() == (teacher / rel).read_bytes(), (
            f"bundles/{script.TEACHER}/{rel} differs from the template: edit plugin/monai_relkd/bundle_templates "
            "(common/ or teacher/_values.json) and run `python tools/make_student_bundles.py`")


def test_teacher_and_students_share_their_common_configs_from_one_template():
    from monai_relkd.bundle_generator import teacher_files

    teacher = json.loads(teacher_files("t")["configs/train.json"])
    student = json.loads((BUNDLES / "prostate_mri_student_enet" / "configs" / "train.json").read_text())
    assert list(teacher) == [k for k in student if k in teacher]  # one key order
    shared = [k for k in teacher if teacher[k] == student[k]]
    assert {"datalist", "validate", "lr_scheduler", "training", "run"} <= set(shared) and len(shared) >= 30
    assert teacher["train"]["trainer"]["_target_"] == "SupervisedTrainer"
    assert "distillation" not in teacher and "teacher" not in teacher["train"]["trainer"]


def test_students_keep_the_tuned_distillation_defaults():
    for bundle in BUNDLES.glob("prostate_mri_student_*"):
        d = json.loads((bundle / "configs" / "train.json").read_text())["distillation"]
        assert (d["lambda_logits"], d["lambda_km"], d["lambda_aa"], d["temperature"]) == (0.1, 1.0, 1.0, 4.0)


@pytest.fixture(scope="module")
def teacher_candidates():
    from monai_relkd.networks import DeepLabV3Plus

    return probe_taps(DeepLabV3Plus(1, 2, backbone="resnet50", output_stride=16), (1, 1, 64, 64))[0]


@pytest.mark.parametrize("net,expected", [
    ("ENet", [("encoder.stage3", "aspp"), ("decoder.stage4", "decoder")]),
    ("ESPNet", [("encoder.stage2", "aspp"), ("encoder.stage1", "decoder")]),
    ("ERFNet", [("encoder", "aspp"), ("decoder.stage1", "decoder")]),  # "encoder" returns encoder.stage2's tensor
])
def test_default_taps_pair_the_deepest_and_the_decoder_features_like_the_shipped_bundles(net, expected,
                                                                                         teacher_candidates):
    import monai_relkd.networks as nets

    t_cands = teacher_candidates
    s_cands, out, _ = probe_taps(getattr(nets, net)(1, 2), (1, 1, 64, 64))
    assert out == (1, 2, 64, 64)
    assert [(s.name, t.name) for s, t in default_taps(s_cands, t_cands, 2)] == expected


def test_probe_lists_one_name_per_tensor_and_leaves_out_class_maps():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), nn.Conv2d(4, 2, 1))
    cands, out, shapes = probe_taps(net, (1, 1, 8, 8))
    assert [c.name for c in cands] == ["0"] and cands[0].shape == (1, 4, 8, 8)  # "0.1" returns "0"'s tensor
    assert shapes["1"] == (1, 2, 8, 8) and out == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="pass --taps"):  # only class maps: nothing to distil
        default_taps(cands, cands, num_classes=4)


def test_parse_taps():
    assert parse_taps("a.b=aspp, c=decoder") == [("a.b", "aspp"), ("c", "decoder")]
    assert parse_taps({"a": "b"}) == [("a", "b")] and parse_taps(None) == []
    with pytest.raises(ValueError, match="student_module=teacher_module"):
        parse_taps("a.b")


def test_json_templates_splice_lists_and_substitute_inside_strings():
    text = json.dumps({"x": "{{obj}}", "refs": ["a", "{{more}}", "b"], "s": "net {{name}}!"})
    assert json.loads(render_json(text, {"obj": {"k": [1]}, "more": [], "name": "UNet"})) == {
        "x": {"k": [1]}, "refs": ["a", "b"], "s": "net UNet!"}
    with pytest.raises(KeyError, match="missing"):
        render_json(json.dumps({"x": "{{missing}}"}), {})
    spliced = {"a": 1, "{{more}}": None, "z": ["{{none}}"]}
    assert list(json.loads(render_json(json.dumps(spliced), {"more": {"b": 2, "c": 3}, "none": []}))) == ["a", "b",
                                                                                                      "c", "z"]
    assert json.loads(render_json(json.dumps(spliced), {"more": {}, "none": []})) == {"a": 1, "z": []}
    with pytest.raises(TemplateError, match="repeats keys"):
        render_json(json.dumps(spliced), {"more": {"a": 2}, "none": []})
    with pytest.raises(TemplateError, match="must be null"):
        render_json(json.dumps({"{{more}}": 1}), {"more": {"b": 2}})


UNET = "monai.networks.nets.UNet"
UNET_ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]}


def test_new_student_writes_a_valid_bundle_with_the_real_in_out_spec(tmp_path):
    result = new_student(UNET, TEACHER, tmp_path / "my_unet", network_args=json.dumps(UNET_ARGS),
                         taps="model.1.submodule=aspp")
    root = tmp_path / "my_unet"
    meta = validate_bundle_metadata(root)
    assert meta["name"] == "my_unet"
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == ["4*n", "4*n"]  # two stride-2 levels
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    train = json.loads((root / "configs" / "train.json").read_text())
    assert train["network_def"] == {"_target_": UNET, **UNET_ARGS}
    assert json.loads((root / "configs" / "inference.json").read_text())["network_def"] == train["network_def"]
    tap = train["distillation"]["taps"][0]
    assert (tap["student"], tap["teacher"], tap["teacher_channels"]) == ("model.1.submodule", "aspp", 256)
    assert result.taps == train["distillation"]["taps"]
    readme = (root / "docs" / "README.md").read_text()
    assert "# my_unet — model card" in readme and "`model.1.submodule` ↔ `aspp`" in readme and "{{" not in readme
    assert not (root / "configs" / "gkd.json").exists()
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    assert net(torch.zeros(1, 1, 12, 12)).shape == (1, 2, 12, 12)


def test_a_card_warning_follows_the_tuning_sentence_and_an_unknown_card_key_is_refused(tmp_path):
    new_student(UNET, TEACHER, tmp_path / "warned", network_args=json.dumps(UNET_ARGS), taps="model.1.submodule=aspp",
                card={"tuning_warning": "  They do not suit UNet. "})
    readme = (tmp_path / "warned" / "docs" / "README.md").read_text()
    assert "carried over to UNet untuned. They do not suit UNet. One seed" in " ".join(readme.split())
    with pytest.raises(ValueError, match=r"unknown keys \['tuning_warnings'\]"):
        new_student(UNET, TEACHER, tmp_path / "typo", network_args=json.dumps(UNET_ARGS), taps="model.1.submodule=aspp",
                    card={"tuning_warnings": "x"})


def test_new_student_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="cannot be imported"):
        new_student("monai.networks.nets.NoSuchNet", TEACHER, tmp_path / "a")
    with pytest.raises(ValueError, match="close matches.*model.1.submodule"):
        new_student(UNET, TEACHER, tmp_path / "a", network_args=UNET_ARGS, taps="model.1.submodul=aspp")
    with pytest.raises(ValueError, match=r"must return \(B, 2, H, W\)"):
        new_student(UNET, TEACHER, tmp_path / "a", network_args={**UNET_ARGS, "out_channels": 3})
    with pytest.raises(FileNotFoundError, match="not found"):
        new_student(UNET, tmp_path / "no_teacher", tmp_path / "a", network_args=UNET_ARGS)
    assert not (tmp_path / "a").exists()
    new_student(UNET, TEACHER, tmp_path / "a", network_args=UNET_ARGS)
    (tmp_path / "a" / "models").mkdir()
    (tmp_path / "a" / "models" / "model.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="--overwrite True"):
        new_student(UNET, TEACHER, tmp_path / "a", network_args=UNET_ARGS)
    new_student(UNET, TEACHER, tmp_path / "a", network_args=UNET_ARGS, overwrite=True)
    assert (tmp_path / "a" / "models" / "model.pt").read_bytes() == b"weights"
