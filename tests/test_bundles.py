"""Every bundle, run for real at toy size: train through ``monai.bundle`` (the ``training`` run ID), evaluate,
infer a NIfTI volume, ``verify_net_in_out`` and ``ckpt_export`` through the CLI, and the distillation specifics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLES, assert_mask_like
from monai_relkd.demo import run_bundle

TEACHER = BUNDLES / "prostate_mri_teacher"
STUDENTS = sorted(p for p in BUNDLES.glob("prostate_mri_student_*") if p.is_dir())
ALL = [TEACHER] + STUDENTS
IMAGE_SIZE = 32
TEST_SITE = "HK"


def _override(run: Path, name: str, **extra) -> dict:
    return {
        "dataset_dir": str(run / "data"),
        "test_site": TEST_SITE,
        "image_size": IMAGE_SIZE,
        "num_steps": 3,
        "val_every_steps": 3,
        "num_samples": 2,
        "batch_size": 4,
        "ckpt_dir": str(run / name / "models"),
        "output_dir": str(run / name / "eval"),
        "log_dir": str(run / name / "runs"),
        **extra,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Synthetic six-site set and a teacher trained for one epoch through the teacher bundle."""
    from monai_relkd.data.synthetic import generate_six_site_dataset

    run = tmp_path_factory.mktemp("bundles")
    generate_six_site_dataset(run / "data", scale=0.15, size=IMAGE_SIZE, seed=0)
    run_bundle(TEACHER, ["train.json"], run_id="training", **_override(run, TEACHER.name))
    assert (run / TEACHER.name / "models" / "model.pt").is_file()
    return run


def _train(run: Path, bundle: Path, **extra) -> Path:
    if bundle != TEACHER:
        extra.setdefault("teacher_ckpt", str(run / TEACHER.name / "models" / "model.pt"))
        run_bundle(bundle, ["train.json"], run_id="training", **_override(run, bundle.name, **extra))
    return run / bundle.name / "models" / "model.pt"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("bundle", ALL, ids=[b.name for b in ALL])
def test_train_evaluate_infer(run_dir, bundle, tmp_path):
    ckpt = _train(run_dir, bundle)
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()), "model.pt must be a flat state dict"

    # evaluate.json merged over train.json, on the held-out site
    run_bundle(bundle, ["train.json", "evaluate.json"], **_override(run_dir, bundle.name))
    summary = json.loads((run_dir / bundle.name / "eval" / "summary.json").read_text())
    assert set(summary["per_site"]) == {TEST_SITE}
    assert summary["model"] == bundle.name
    assert 0.0 <= summary["mean"]["dice"] <= 1.0

    # inference.json alone, device given as a string; the mask has the input's geometry and a new name
    image = sorted((run_dir / "data" / TEST_SITE).glob("Case*[0-9].nii.gz"))[0]
    before = image.read_bytes()
    out = tmp_path / "pred"
    run_bundle(bundle, ["inference.json"], input_path=str(image), image_size=IMAGE_SIZE, ckpt_path=str(ckpt),
               output_dir=str(out), device="cpu")
    assert_mask_like(image, out)
    assert image.read_bytes() == before


@pytest.mark.parametrize("bundle", ALL, ids=[b.name for b in ALL])
def test_verify_net_in_out_and_torchscript_export(run_dir, bundle, tmp_path):
    configs = bundle / "configs"
    _cli("verify_net_in_out", "network_def", "--meta_file", str(configs / "metadata.json"),
         "--config_file", str(configs / "inference.json"), "--device", "cpu", "--n", "4", cwd=tmp_path)

    ckpt = _train(run_dir, bundle)
    ts = tmp_path / "model.ts"
    _cli("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt),
         "--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json"),
         "--bundle_root", str(bundle), cwd=tmp_path)
    exported = torch.jit.load(str(ts), map_location="cpu").eval()

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    net = parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    net.eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), rtol=1e-5, atol=1e-5)


def test_missing_teacher_checkpoint_fails_at_start_with_the_way_out(run_dir):
    with pytest.raises(Exception) as err:
        _train(run_dir, STUDENTS[0], teacher_ckpt=str(run_dir / "no_teacher.pt"))
    text = repr(err.value) + repr(err.value.__cause__)
    assert "no_teacher.pt" in text and "prostate_mri_teacher" in text


def test_missing_user_dataset_dir_is_an_error(run_dir, tmp_path):
    with pytest.raises(Exception) as err:
        run_bundle(TEACHER, ["train.json"], run_id="training",
                   **_override(run_dir, "x", dataset_dir=str(tmp_path / "not_there")))
    assert "not_there" in repr(err.value) + repr(err.value.__cause__)


def test_all_lambdas_zero_trains_without_any_teacher(run_dir):
    """The baseline: every lambda 0 needs no teacher checkpoint and logs zero KD terms."""
    lambdas = {f"distillation#lambda_{k}": 0.0 for k in ("logits", "km", "aa")}
    ckpt = _train(run_dir, STUDENTS[0], teacher_ckpt=str(run_dir / "absent.pt"), **lambdas)
    assert ckpt.is_file()


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_distillation_terms_are_logged_non_zero_and_fall(run_dir):
    bundle = next(b for b in STUDENTS if b.name.endswith("enet"))
    chunks, steps = 4, 12  # 12 optimizer steps of 16 slices, compared in chunks of 3
    _train(run_dir, bundle, num_steps=steps, val_every_steps=steps, num_samples=4, batch_size=16,
           log_dir=str(run_dir / "kd_runs"), ckpt_dir=str(run_dir / "kd_models"))
    scalars = _scalars(run_dir / "kd_runs")
    for term in ("loss_logits", "loss_km", "loss_aa", "loss_seg", "loss"):
        assert term in scalars, f"{term} not logged to TensorBoard: {sorted(scalars)}"
    assert len(scalars["loss"]) == steps
    per_epoch = steps // chunks
    for term in ("loss_logits", "loss_km", "loss_aa"):
        values = np.asarray(scalars[term])
        assert np.all(values > 0), f"{term} has zero entries: {values}"
        first, last = values[:per_epoch].mean(), values[-per_epoch:].mean()
        assert last < first, f"{term} did not fall: first steps {first:.4f}, last steps {last:.4f}"


@pytest.mark.parametrize("variant", [["gkd.json"], ["gkd.json", "gkd_only.json"]], ids=["gkd+relational", "gkd-only"])
def test_gkd_bundle_pretrains_the_teacher_msan_then_trains_two_steps(run_dir, variant, tmp_path):
    """Generalizable distillation from the ENet bundle: teacher MSAN pre-training, then the student objective."""
    bundle = next(b for b in STUDENTS if b.name.endswith("enet"))
    msan = tmp_path / "msan_teacher.pt"
    extra = {"teacher_ckpt": str(run_dir / TEACHER.name / "models" / "model.pt"), "gkd#teacher_msan_ckpt": str(msan)}
    override = _override(run_dir, "gkd", **extra, log_dir=str(tmp_path / "runs"), ckpt_dir=str(tmp_path / "models"),
                         num_steps=2, val_every_steps=2)
    with pytest.raises(Exception) as err:  # training before pre-training says what to run
        run_bundle(bundle, ["train.json", *variant], run_id="training", **override)
    causes, cause = [], err.value
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    assert any(isinstance(c, FileNotFoundError) and "run pretrain_msan" in str(c) for c in causes), causes
    run_bundle(bundle, ["train.json", *variant], run_id="pretrain_msan", **override, **{"gkd#pretrain_steps": 2})
    assert msan.is_file()
    run_bundle(bundle, ["train.json", *variant], run_id="training", **override)
    assert (tmp_path / "models" / "model.pt").is_file()
    scalars = _scalars(tmp_path / "runs")
    for term in ("loss_act", "loss_dcgd", "loss_dicd", "share_dcgd"):
        assert term in scalars and len(scalars[term]) == 2 and all(v > 0 for v in scalars[term]), (term, scalars)
    relational = [v for term in ("loss_logits", "loss_aa") for v in scalars[term]]
    assert all(v > 0 for v in relational) if len(variant) == 1 else all(v == 0 for v in relational)


@pytest.mark.parametrize("bundle", ALL, ids=[b.name for b in ALL])
def test_bundle_layout(bundle):
    for rel in ("configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE",
                "large_files.yml"):
        assert (bundle / rel).is_file(), f"{bundle.name} lacks {rel}"
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert "training" in train and train["run"] == "%training"


def test_schedule_is_in_optimizer_steps_with_poly_lr_and_validation_every_interval(run_dir):
    """``num_steps`` rounded up to whole ``val_every_steps`` intervals; one validation per interval, logged at its
    optimizer step; the learning rate decays every step to 0 at the last one; each step sees ``batch_size`` slices."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    bundle = next(b for b in STUDENTS if b.name.endswith("enet"))
    override = _override(run_dir, "schedule", num_steps=5, val_every_steps=2, num_samples=2, batch_size=4,
                         **{f"distillation#lambda_{k}": 0.0 for k in ("logits", "km", "aa")})
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), logging_file=False,
                              meta_file=str(bundle / "configs" / "metadata.json"), run_id="training",
                              workflow_type=None, bundle_root=str(bundle), **override)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen: list[tuple[int, float, int]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        (e.state.iteration, e.optimizer.param_groups[0]["lr"], e.state.output["pred"].shape[0])))
    workflow.run()
    workflow.finalize()
    assert [s[0] for s in seen] == list(range(1, 7))  # 5 steps rounded up to 3 intervals of 2
    # 4 slices (2 volumes x 2 slices) per step, in the batch as the network saw it (the trainer does not decollate)
    assert all(n == 4 for _, _, n in seen), seen
    lrs = [lr for _, lr, _ in seen]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == 0.0, lrs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(override["log_dir"])
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_mean_dice")] == [2, 4, 6]
