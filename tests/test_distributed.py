"""``multi_gpu_train.json`` for real: ``torchrun --standalone --nproc_per_node=2 -m monai.bundle run training`` on two
CPU processes (gloo), distilling the ENet student from a teacher trained for one epoch in a temporary folder.

A third config file, merged after ``train.json`` and ``multi_gpu_train.json``, replaces ``finalize``: before the
process group is destroyed each rank saves what it ended with (student and connector state dicts, the teacher's
flags and a checksum of its state dict, iteration count, sampler shard, pid, backend) to ``rank<r>.pt``.

``num_steps == val_every_steps == 2``: the only validation runs after the last iteration, so the ``model.pt`` that
rank 0's ``BestModelCheckpoint`` writes (the best validation model) is the final model, comparable with rank 1's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, subprocess_env
from monai_relkd.demo import run_bundle

TEACHER = BUNDLES / "prostate_mri_teacher"
STUDENT = BUNDLES / "prostate_mri_student_enet"
IMAGE_SIZE = 32
STEPS = 2

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None or not torch.distributed.is_available(), reason="needs torch.distributed"
)

# replaces multi_gpu_train.json's finalize: record each rank's end state, then destroy the process group
PROBE = {
    "finalize": [
        "$torch.save({"
        "'rank': dist.get_rank(), 'world_size': dist.get_world_size(), 'backend': dist.get_backend(),"
        " 'pid': os.getpid(),"
        " 'iterations': @train#trainer.state.iteration, 'epochs': @train#trainer.state.epoch,"
        " 'shard': list(iter(@train#sampler)), 'dataset_len': len(@train#dataset),"
        " 'network_is_ddp': isinstance(@network, torch.nn.parallel.DistributedDataParallel),"
        " 'student': {k: v.detach().cpu().clone() for k, v in @network.module.state_dict().items()},"
        " 'connectors': {k: v.detach().cpu().clone() for k, v in @loss.state_dict().items()},"
        " 'teacher_is_ddp': isinstance(@train#trainer.teacher, torch.nn.parallel.DistributedDataParallel),"
        " 'teacher_training': @train#trainer.teacher.training"
        " or any(m.training for m in @train#trainer.teacher.modules()),"
        " 'teacher_requires_grad': any(p.requires_grad for p in @train#trainer.teacher.parameters()),"
        " 'teacher_checksum': [float(sum(v.double().sum() for v in @train#trainer.teacher.state_dict().values()"
        " if v.is_floating_point())), float(sum((v.double() ** 2).sum()"
        " for v in @train#trainer.teacher.state_dict().values() if v.is_floating_point()))],"
        "}, os.path.join(@probe_dir, f'rank{dist.get_rank()}.pt'))",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ],
}


def _checksum(state: dict) -> list[float]:
    """Sum and sum of squares (float64) of every floating tensor of a state dict, buffers (BN statistics) included."""
    tensors = [v.double() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    return [float(sum(t.sum() for t in tensors)), float(sum((t * t).sum() for t in tensors))]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Synthetic six-site set and a teacher trained for one epoch through the teacher bundle."""
    from monai_relkd.data.synthetic import generate_six_site_dataset

    root = tmp_path_factory.mktemp("ddp")
    generate_six_site_dataset(root / "data", scale=0.05, size=IMAGE_SIZE, seed=0)
    run_bundle(TEACHER, ["train.json"], run_id="training", dataset_dir=str(root / "data"), test_site="HK",
               image_size=IMAGE_SIZE, num_steps=2, val_every_steps=2, num_samples=2, batch_size=4,
               ckpt_dir=str(root / "teacher" / "models"), output_dir=str(root / "teacher" / "eval"),
               log_dir=str(root / "teacher" / "runs"))
    assert (root / "teacher" / "models" / "model.pt").is_file()
    return root


def test_torchrun_two_cpu_processes_distil_the_student(run: Path):
    configs = STUDENT / "configs"
    probe_dir, out = run / "probe", run / "student"
    probe_dir.mkdir()
    probe_cfg = run / "probe.json"
    probe_cfg.write_text(json.dumps({"probe_dir": str(probe_dir), **PROBE}))
    config_files = [str(configs / "train.json"), str(configs / "multi_gpu_train.json"), str(probe_cfg)]
    overrides = {
        "bundle_root": str(STUDENT), "dataset_dir": str(run / "data"), "test_site": "HK",
        "image_size": IMAGE_SIZE, "num_steps": STEPS, "val_every_steps": STEPS, "num_samples": 2, "batch_size": 2,
        "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"), "log_dir": str(out / "runs"),
        "teacher_ckpt": str(run / "teacher" / "models" / "model.pt"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(run / "torchrun_logs"), "--redirects", "3",
           "-m", "monai.bundle", "run", "training", "--config_file", repr(config_files),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = subprocess_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=240)
    logs = {p.relative_to(run / "torchrun_logs").as_posix(): p.read_text()
            for p in (run / "torchrun_logs").rglob("*.log")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\n".join(
        f"--- {k}\n{v[-3000:]}" for k, v in logs.items())

    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    teacher_state = torch.load(run / "teacher" / "models" / "model.pt", map_location="cpu", weights_only=True)
    expected_checksum = _checksum(teacher_state)
    for r, rank in enumerate(ranks):
        assert rank["rank"] == r and rank["world_size"] == 2
        assert rank["backend"] == "gloo", "gloo must be chosen on CPU"
        # both ranks ran every optimizer step (one "epoch" of val_every_steps), each on its own shard
        assert rank["epochs"] == 1 and rank["iterations"] == STEPS
        assert rank["network_is_ddp"]
        # the teacher: unwrapped, frozen, eval mode, weights and BN statistics unchanged
        assert not rank["teacher_is_ddp"]
        assert not rank["teacher_requires_grad"]
        assert not rank["teacher_training"]
        assert rank["teacher_checksum"] == pytest.approx(expected_checksum, rel=1e-9, abs=1e-6)
    assert ranks[0]["iterations"] == ranks[1]["iterations"]
    shard0, shard1 = set(ranks[0]["shard"]), set(ranks[1]["shard"])
    assert shard0 | shard1 == set(range(ranks[0]["dataset_len"]))
    assert len(ranks[0]["shard"]) == len(ranks[1]["shard"])  # even_divisible
    if ranks[0]["dataset_len"] % 2 == 0:
        assert not shard0 & shard1

    # DDP keeps the students equal; the trainer all-reduces the connector gradients, so the connectors too
    for key, value in ranks[0]["student"].items():
        torch.testing.assert_close(ranks[1]["student"][key], value, rtol=0, atol=0, msg=f"student {key} differs")
    assert ranks[0]["connectors"], "the KM connectors are missing from the loss state dict"
    for key, value in ranks[0]["connectors"].items():
        torch.testing.assert_close(ranks[1]["connectors"][key], value, rtol=0, atol=0, msg=f"connector {key} differs")

    # rank 0's BestModelCheckpoint wrote the (final, see the docstring) student: a flat state dict loading into ENet
    from monai_relkd.networks import ENet

    saved = sorted(p.name for p in (out / "models").iterdir())
    assert saved == ["checkpoint_last.pt", "model.json", "model.pt"], saved  # the lock is released at the end
    last = torch.load(out / "models" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert last["run"]["completed"] and last["trainer"]["iteration"] == ranks[0]["iterations"]
    for key, value in ranks[0]["connectors"].items():  # the KM connectors travel with the full state
        torch.testing.assert_close(last["loss"][key], value, rtol=0, atol=0)
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    ENet(in_channels=1, out_channels=2).load_state_dict(state)
    for key, value in ranks[1]["student"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"model.pt {key} differs from rank 1")
    assert any(not torch.equal(state[k], v) for k, v in ENet(1, 2).state_dict().items() if v.is_floating_point())

    # only rank 0 wrote TensorBoard logs and INFO logs
    events = sorted((out / "runs").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    writers = {p.name.split(".")[-2] for p in events}  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert writers == {str(ranks[0]["pid"])}, f"event files of pids {writers}, rank 0 is {ranks[0]['pid']}"
    stdout = {r: "".join(v for k, v in logs.items() if f"/{r}/stdout" in f"/{k}") for r in (0, 1)}
    assert "Epoch[" in stdout[0] or "Engine run finished" in stdout[0], stdout[0][-2000:]
    assert " - INFO - " not in stdout[1].split("---")[-1], stdout[1][-2000:]
