"""Checkpoints, resume and the training lock: atomic writes under SIGKILL, the best model never replaced by a worse
one, the full state restored, and - the end-to-end case - a real bundle training killed again and again (mid-run and
while a checkpoint is being written) that resumes to the same step count as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from conftest import BUNDLES, subprocess_env as _env
from monai_relkd.data._io import SLOW_WRITE_ENV, atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from monai_relkd.engines import BestModelCheckpoint, TrainingLock, TrainingLockedError, TrainingStateCheckpoint

STUDENT = BUNDLES / "prostate_mri_student_enet"


# --- the atomic writer --------------------------------------------------------------------------------------------


def test_sigkill_during_an_atomic_write_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "model.pt"
    atomic_write_bytes(target, b"old" * 1000)
    code = ("import sys; from monai_relkd.data._io import atomic_write_bytes; "
            "atomic_write_bytes(sys.argv[1], b'new' * 100000)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=_env(**{SLOW_WRITE_ENV: "30"}))
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".model.pt.*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, "the write never started"
            time.sleep(0.02)
        time.sleep(0.2)  # half of the data is in the temporary file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert target.read_bytes() == b"old" * 1000
    leftovers = list(tmp_path.glob(".model.pt.*.tmp"))
    assert leftovers and leftovers[0].stat().st_size > 0
    assert remove_stale_temporaries(tmp_path, ["model.pt"]) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_write_json_takes_json_options_and_writes_nothing_on_a_bad_value(tmp_path):
    """The one JSON writer (summary, fsd, demo, profiling): json.dumps options pass through; a value JSON cannot
    hold fails before any file (or temporary) exists."""
    path = atomic_write_json(tmp_path / "new" / "x.json", {"p": Path("/data"), "b": 1}, default=str, sort_keys=True)
    assert path.read_text() == '{\n  "b": 1,\n  "p": "/data"\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "y.json", {"p": Path("/data")})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "x.json"]


# --- the best model -----------------------------------------------------------------------------------------------


def _evaluate(best: BestModelCheckpoint, net: nn.Module, dice: float, epoch: int) -> None:
    """One evaluator run that scored ``dice``: the weights are set to ``dice`` so each save is recognisable."""
    with torch.no_grad():
        net.weight.fill_(dice)
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_mean_dice": dice}
    engine.state.key_metric_name = "val_mean_dice"
    engine.state.epoch = epoch
    best.checkpoint(engine)


def _saved_dice(path: Path) -> float:
    state = torch.load(path, weights_only=True)
    assert set(state) == {"weight", "bias"}, "model.pt must stay a flat state dict"
    return float(state["weight"].flatten()[0])


def test_model_pt_is_only_ever_replaced_by_a_better_model_across_runs(tmp_path):
    net = nn.Linear(2, 2)
    best = BestModelCheckpoint(tmp_path, net)
    for epoch, dice in enumerate([0.5, 0.3, 0.7, 0.6], start=1):
        _evaluate(best, net, dice, epoch)
    assert _saved_dice(tmp_path / "model.pt") == pytest.approx(0.7)
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["metric"] == pytest.approx(0.7) and record["epoch"] == 3 and record["validated"]

    again = BestModelCheckpoint(tmp_path, net)  # a repeated run reads the record: the bar is 0.7, not -inf
    assert again.best_metric == pytest.approx(0.7)
    _evaluate(again, net, 0.65, 1)
    assert _saved_dice(tmp_path / "model.pt") == pytest.approx(0.7)
    _evaluate(again, net, 0.8, 2)
    assert _saved_dice(tmp_path / "model.pt") == pytest.approx(0.8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]


def test_interrupted_between_record_and_model_the_bar_stays_high(tmp_path):
    """The record is written first: a kill between the two leaves a bar at least as high as model.pt's score."""
    net = nn.Linear(2, 2)
    best = BestModelCheckpoint(tmp_path, net)
    _evaluate(best, net, 0.6, 1)
    old = (tmp_path / "model.pt").read_bytes()
    record = json.loads((tmp_path / "model.json").read_text())
    record.update(metric=0.9, sha256="0" * 64)  # as if 0.9's record was written and the kill hit before model.pt
    (tmp_path / "model.json").write_text(json.dumps(record))
    again = BestModelCheckpoint(tmp_path, net)
    assert again.best_metric == pytest.approx(0.9)
    _evaluate(again, net, 0.8, 1)
    assert (tmp_path / "model.pt").read_bytes() == old


def test_an_unscored_model_pt_is_kept_aside_before_it_is_replaced(tmp_path):
    net = nn.Linear(2, 2)
    torch.save({k: torch.full_like(v, 0.42) for k, v in net.state_dict().items()}, tmp_path / "model.pt")
    best = BestModelCheckpoint(tmp_path, net)
    assert best.best_metric is None
    _evaluate(best, net, 0.1, 1)
    assert _saved_dice(tmp_path / "model_unscored.pt") == pytest.approx(0.42)
    assert _saved_dice(tmp_path / "model.pt") == pytest.approx(0.1)


# --- the full state -----------------------------------------------------------------------------------------------


def _toy_training(folder: Path, max_epochs: int, resume="auto", kill_at: int | None = None):
    """A linear model trained by an ignite engine with a MONAI LR schedule handler and the state checkpoint."""
    from monai.handlers import LrScheduleHandler

    torch.manual_seed(0)
    net, loss = nn.Linear(3, 1), nn.Linear(1, 1)  # ``loss`` stands for the loss module with trainable connectors
    opt = torch.optim.SGD(list(net.parameters()) + list(loss.parameters()), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = [torch.randn(4, 3) for _ in range(3)]

    def step(engine, x):
        opt.zero_grad()
        out = loss(net(x)).pow(2).mean() + torch.rand(()) * 0  # torch RNG is drawn every step
        out.backward()
        opt.step()
        if kill_at is not None and engine.state.iteration == kill_at:
            raise KeyboardInterrupt  # an interruption between two checkpoints
        return out.item()

    trainer = Engine(step)
    LrScheduleHandler(sched, print_lr=False).attach(trainer)
    handler = TrainingStateCheckpoint(folder, {"network": net, "loss": loss, "optimizer": opt}, interval=1,
                                      resume=resume)
    handler.attach(trainer)
    try:
        trainer.run(data, max_epochs=max_epochs)
    except KeyboardInterrupt:
        pass
    return trainer, net, loss, opt, sched, handler


def test_full_state_round_trip_and_lr_scheduler_found_on_the_trainer(tmp_path):
    ref = _toy_training(tmp_path / "ref", max_epochs=4)
    state = torch.load(tmp_path / "ref" / "checkpoint_last.pt", weights_only=True)
    assert {"network", "loss", "optimizer", "lr_scheduler", "trainer", "random_states", "run"} <= set(state)
    assert state["trainer"]["iteration"] == 12 and state["run"]["completed"]

    _toy_training(tmp_path / "cut", max_epochs=4, kill_at=8)  # killed in epoch 3, last state saved after epoch 2
    assert torch.load(tmp_path / "cut" / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"] == 6
    trainer, net, loss, opt, sched, handler = _toy_training(tmp_path / "cut", max_epochs=4)
    assert handler.resumed_from == 6 and trainer.state.iteration == 12
    assert sched.last_epoch == ref[4].last_epoch == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(ref[3].param_groups[0]["lr"])
    for a, b in zip(list(net.parameters()) + list(loss.parameters()), list(ref[1].parameters()) + list(ref[2].parameters())):
        torch.testing.assert_close(a, b)  # same data order, same RNG: the resumed run is the uninterrupted one

    # a state written by another configuration: a clear error naming the file and the way out
    torch.save({"run": {"completed": False}, "network": {}}, tmp_path / "cut" / "checkpoint_last.pt")
    other = Engine(lambda e, b: None)
    TrainingStateCheckpoint(tmp_path / "cut", {"network": nn.Linear(5, 5)}).attach(other)
    with pytest.raises(RuntimeError, match="(?s)cut/checkpoint_last.pt: cannot resume.*--resume false"):
        other.run([0], max_epochs=1)


# --- the lock -----------------------------------------------------------------------------------------------------

_HOLD = "import sys, time; from monai_relkd.engines import TrainingLock; TrainingLock(sys.argv[1]).acquire(); " \
        "print('held', flush=True); time.sleep(120)"


def test_a_second_training_fails_at_once_and_a_dead_owner_is_taken_over(tmp_path, caplog):
    lock_path = tmp_path / "models" / "training.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock_path)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingLockedError, match=f"PID {holder.pid}.*training.lock"):
            TrainingLock(lock_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads(lock_path.read_text())["pid"] == holder.pid  # a SIGKILL leaves the lock behind
    (lock_path.parent / ".model.pt.abc.tmp").write_bytes(b"half")
    with caplog.at_level("WARNING"):
        lock = TrainingLock(lock_path).acquire()
    assert f"stale training lock {lock_path} of PID {holder.pid}" in caplog.text
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not (lock_path.parent / ".model.pt.abc.tmp").exists()
    lock.release()
    assert not lock_path.exists()


# --- the real bundle, killed ----------------------------------------------------------------------------------------

EPOCHS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from monai_relkd.data.synthetic import generate_six_site_dataset

    root = tmp_path_factory.mktemp("kill") / "data"
    generate_six_site_dataset(root, scale=0.05, size=32, seed=0)
    return root


def _training(data: Path, out: Path, **extra) -> list[str]:
    """``python -m monai.bundle run training`` of the ENet student without a teacher (every lambda 0), at toy size."""
    configs = STUDENT / "configs"
    overrides = {
        "bundle_root": str(STUDENT), "dataset_dir": str(data), "test_site": "HK", "image_size": 32,
        "num_steps": 2 * EPOCHS, "val_every_steps": 2, "num_samples": 2, "batch_size": 4,
        "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"), "log_dir": str(out / "runs"),
        "teacher_ckpt": str(out / "no_teacher.pt"), "distillation#lambda_logits": 0, "distillation#lambda_km": 0,
        "distillation#lambda_aa": 0, **extra,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(configs / "train.json"),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _state(models: Path) -> dict:
    return torch.load(models / "checkpoint_last.pt", weights_only=True)


def _check_model(models: Path, history: list[float]) -> None:
    """model.pt loads into ENet and matches its record; the recorded best never went down."""
    from monai_relkd.networks import ENet

    if not (models / "model.pt").exists():
        return
    ENet(in_channels=1, out_channels=2).load_state_dict(torch.load(models / "model.pt", weights_only=True))
    record = json.loads((models / "model.json").read_text())
    if history:
        assert record["metric"] >= history[-1], f"model.pt went from {history[-1]} to {record['metric']}"
    history.append(record["metric"])


def _wait_for(condition, proc: subprocess.Popen, when: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended before the kill ({when}); see {log}"
        assert time.monotonic() < deadline, f"no moment to kill ({when}); see {log}"
        time.sleep(0.01)


def test_sigkill_mid_run_and_mid_save_then_resume_to_the_same_step(data_dir, tmp_path):
    """Kill 1 lands in the first write of model.pt, kill 2 in a write of checkpoint_last.pt (while a second training
    on the same bundle is refused), kill 3 at a random moment; a fourth run resumes to the end."""
    import random

    def run(out, **kw):
        return subprocess.run(_training(data_dir, out, **kw), env=_env(), capture_output=True, text=True, timeout=300)

    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_steps = _state(tmp_path / "ref" / "models")["trainer"]["iteration"]
    assert ref_steps >= EPOCHS

    models = tmp_path / "cut" / "models"
    last, model = models / "checkpoint_last.pt", models / "model.pt"
    log_path = tmp_path / "cut.log"
    history: list[float] = []

    def start(slow: str) -> subprocess.Popen:
        with open(log_path, "a") as log:
            return subprocess.Popen(_training(data_dir, tmp_path / "cut"), env=_env(**{SLOW_WRITE_ENV: slow}),
                                    stdout=log, stderr=subprocess.STDOUT)

    def kill(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _check_model(models, history)
        if last.exists():
            assert not _state(models)["run"]["completed"]

    # 1: SIGKILL in the middle of the first write of model.pt: no truncated model.pt, ever
    proc = start("5:model.pt")
    try:
        _wait_for(lambda: list(models.glob(".model.pt.*.tmp")), proc, "first model.pt write", log_path)
    finally:
        kill(proc)
    assert not model.exists()

    # 2: SIGKILL in a write of checkpoint_last.pt while an earlier one exists; a second training is refused meanwhile.
    # Each state write takes 30 s, so the run cannot finish while the second one starts, however loaded the machine
    proc = start("30:checkpoint_last.pt")
    try:
        _wait_for(lambda: last.exists() and model.exists(), proc, "first full state", log_path)
        second = run(tmp_path / "cut")
        assert second.returncode != 0
        text = second.stdout + second.stderr
        assert "is being trained by another process" in text and f"PID {proc.pid}" in text, text[-3000:]
        _wait_for(lambda: list(models.glob(".checkpoint_last.pt.*.tmp")), proc, "checkpoint_last.pt write", log_path)
        before = _state(models)["trainer"]["iteration"]
    finally:
        kill(proc)
    assert _state(models)["trainer"]["iteration"] == before, "the interrupted write must leave the previous state"

    # 3: SIGKILL at a random moment after this run saved its first state. Each later state write is slowed by 1 s,
    # so a kill within 0.9 s of a new state always lands before the run can finish, however fast the machine is
    proc = start("1:checkpoint_last.pt")
    try:
        stamp = last.stat().st_mtime_ns
        _wait_for(lambda: last.stat().st_mtime_ns != stamp, proc, "a new full state", log_path)
        time.sleep(random.uniform(0.0, 0.9))
        assert proc.poll() is None, f"training ended before the random kill; see {log_path}"
    finally:
        kill(proc)

    final = run(tmp_path / "cut")
    assert final.returncode == 0, final.stderr[-3000:]
    text = final.stdout + final.stderr
    assert "resumed from" in text and "taking over the stale training lock" in text, text[-3000:]
    state = _state(models)
    assert state["run"]["completed"]
    assert state["trainer"]["iteration"] == ref_steps, "the resumed run must end at the uninterrupted run's step"
    _check_model(models, history)
    record = json.loads((models / "model.json").read_text())
    import hashlib

    assert record["validated"] and record["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_last.pt", "model.json", "model.pt"]


def test_training_shorter_than_val_interval_still_writes_a_model(data_dir, tmp_path):
    # the step schedule validates after every val_every_steps; a validation interval longer than the run (handler 0
    # is the ValidationHandler) is the way a run can still end before its first validation
    short = {"num_steps": 2, "val_every_steps": 2, "train#handlers#0#interval": 5}
    proc = subprocess.run(_training(data_dir, tmp_path, **short), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before its first validation" in proc.stderr + proc.stdout
    record = json.loads((tmp_path / "models" / "model.json").read_text())
    assert record["validated"] is False and record["metric"] is None
    from monai_relkd.networks import ENet

    ENet(1, 2).load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    assert _state(tmp_path / "models")["trainer"]["iteration"] >= 1
