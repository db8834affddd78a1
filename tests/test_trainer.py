"""DistillationTrainer: frozen teacher, taps, loss terms in the output and the logs, connectors in the optimizer;
load_teacher."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import StatsHandler
from torch import nn

from conftest import TOY_STUDENT_TAPS, TOY_TEACHER_TAPS, toy_student, toy_teacher
from monai_relkd.engines import (
    LOSS_TERM_KEYS,
    DistillationTrainer,
    distillation_parameters,
    load_teacher,
    loss_terms_from_engine,
)
from monai_relkd.losses import RelationalDistillationLoss

STUDENT_TAPS, TEACHER_TAPS = TOY_STUDENT_TAPS, TOY_TEACHER_TAPS
_student, _teacher = toy_student, toy_teacher


def _loader(n: int = 2, batch_size: int = 2) -> DataLoader:
    data = [
        {"image": torch.rand(1, 32, 32), "label": (torch.rand(1, 32, 32) > 0.6).float()} for _ in range(n)
    ]
    return DataLoader(data, batch_size=batch_size)


def _loss(**kw) -> RelationalDistillationLoss:
    args = dict(lambda_logits=1.0, lambda_km=1.0, lambda_aa=1.0, temperature=4.0,
                student_channels=[4, 8], teacher_channels=[16, 32], aa_grid=4)
    args.update(kw)
    return RelationalDistillationLoss(**args)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_two_iterations_full_loss(caplog) -> None:
    student, teacher, loss = _student(), _teacher(), _loss()
    teacher.train()  # the trainer must freeze it and switch to eval
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    connectors_before = [p.detach().clone() for p in loss.parameters()]
    assert connectors_before, "lambda_km > 0 must build connectors"
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)  # connectors deliberately missing

    stats = StatsHandler(name="relkd_test_stats", output_transform=loss_terms_from_engine, epoch_log=False)
    records = _ListHandler()
    logging.getLogger("relkd_test_stats").addHandler(records)
    with caplog.at_level(logging.INFO, logger="monai_relkd.engines.trainer"):
        trainer = DistillationTrainer(
            device="cpu", max_epochs=2, train_data_loader=_loader(), network=student, optimizer=optimizer,
            loss_function=loss, teacher=teacher, student_taps=STUDENT_TAPS, teacher_taps=TEACHER_TAPS,
            train_handlers=[stats],
        )
    assert any(f"added {len(connectors_before)} trainable loss parameter" in r.getMessage() for r in caplog.records)
    opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for p in loss.parameters())
    assert not any(id(p) in opt_ids for p in teacher.parameters())

    # something switching every module to train mode each iteration must not reach the teacher's forward
    modes: list[bool] = []
    teacher.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: e.teacher.train())
    outputs: list = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()

    assert trainer.state.iteration == 2 and modes == [False, False]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(connectors_before, loss.parameters()))

    assert len(outputs) == 2 and isinstance(outputs[0], list) and len(outputs[0]) == 2  # decollated, batch of 2
    for out in outputs:
        terms = loss_terms_from_engine(out)
        shares = {f"share_{t}" for t in ("seg", "logits", "km", "aa")}
        assert set(terms) == set(LOSS_TERM_KEYS) | shares
        assert all(isinstance(v, float) and v == v for v in terms.values())
        assert terms["loss_km"] > 0 and terms["loss_aa"] > 0 and terms["loss_logits"] > 0
        expected = terms["loss_seg"] + terms["loss_logits"] + terms["loss_km"] + terms["loss_aa"]
        assert terms["loss"] == pytest.approx(expected, rel=1e-5)
        # every weight is 1 here: each share is the term over the total, and the shares add up to 1
        assert terms["share_km"] == pytest.approx(terms["loss_km"] / terms["loss"], rel=1e-5)
        assert sum(terms[k] for k in shares) == pytest.approx(1.0, rel=1e-5)

    iteration_lines = [m for m in records.messages if "Iter:" in m]
    assert len(iteration_lines) == 2
    for key in LOSS_TERM_KEYS + ("share_km",):
        assert all(f"{key}: " in line for line in iteration_lines), (key, iteration_lines)


def test_plain_kd_without_taps_and_no_decollate() -> None:
    student, teacher = _student(), _teacher()
    loss = _loss(lambda_km=0.0, lambda_aa=0.0, student_channels=(), teacher_channels=())
    assert not list(loss.parameters())
    trainer = DistillationTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(4), network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1), loss_function=loss, teacher=teacher,
        decollate=False,
    )
    trainer.run()
    out = trainer.state.output
    assert isinstance(out, dict) and isinstance(out["loss_km"], torch.Tensor)
    terms = loss_terms_from_engine(out)
    assert terms["loss_km"] == 0.0 and terms["loss_aa"] == 0.0 and terms["loss_logits"] > 0
    assert loss_terms_from_engine([]) is None


def test_no_teacher_when_every_lambda_is_zero() -> None:
    """The no-distillation baseline: no teacher is given or run, and the student still trains on L_seg."""
    student = _student()
    before = [p.detach().clone() for p in student.parameters()]
    loss = _loss(lambda_logits=0.0, lambda_km=0.0, lambda_aa=0.0)
    trainer = DistillationTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(4), network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1), loss_function=loss, teacher=None,
        student_taps=["model.1.submodule.0"], teacher_taps=["model.1.submodule.1"],
    )
    trainer.run()
    terms = loss_terms_from_engine(trainer.state.output)
    assert terms["loss_logits"] == terms["loss_km"] == terms["loss_aa"] == 0.0
    assert terms["loss"] == pytest.approx(terms["loss_seg"])
    assert any(not torch.equal(b, a) for b, a in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="every lambda to 0"):
        DistillationTrainer(
            device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(2), network=_student(),
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1), loss_function=_loss(), teacher=None,
        )


def test_wrapped_teacher_and_prebuilt_optimizer(caplog) -> None:
    student, teacher, loss = _student(), _teacher(), _loss()
    optimizer = torch.optim.Adam(distillation_parameters(student, loss), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="monai_relkd.engines.trainer"):
        trainer = DistillationTrainer(
            device="cpu", max_epochs=1, train_data_loader=_loader(), network=student, optimizer=optimizer,
            loss_function=loss, teacher=nn.DataParallel(teacher), student_taps=STUDENT_TAPS,
            teacher_taps=TEACHER_TAPS,
        )
    assert trainer.teacher is teacher  # unwrapped, never DDP/DataParallel
    assert len(optimizer.param_groups) == 1 and not caplog.records  # nothing to add
    trainer.run()


def test_construction_errors() -> None:
    student, teacher = _student(), _teacher()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    common = dict(device="cpu", max_epochs=1, train_data_loader=_loader(), network=student, teacher=teacher)
    with pytest.raises(ValueError, match=r"'model\.1\.submodul\.0' \(closest: 'model\.1\.submodule\.0'"):
        DistillationTrainer(**common, optimizer=opt, loss_function=_loss(),
                            student_taps=["model.0", "model.1.submodul.0"], teacher_taps=TEACHER_TAPS)
    with pytest.raises(ValueError, match="same length"):
        DistillationTrainer(**common, optimizer=opt, loss_function=_loss(), student_taps=STUDENT_TAPS,
                            teacher_taps=TEACHER_TAPS[:1])
    with pytest.raises(ValueError, match="no feature taps"):
        DistillationTrainer(**common, optimizer=opt, loss_function=_loss())
    with pytest.raises(ValueError, match="built for 2 feature pair"):
        DistillationTrainer(**common, optimizer=opt, loss_function=_loss(), student_taps=STUDENT_TAPS[:1],
                            teacher_taps=TEACHER_TAPS[:1])
    both = torch.optim.SGD(list(student.parameters()) + list(teacher.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="teacher parameters"):
        DistillationTrainer(**common, optimizer=both, loss_function=_loss(), student_taps=STUDENT_TAPS,
                            teacher_taps=TEACHER_TAPS)
    with pytest.raises(TypeError):
        DistillationTrainer(**{**common, "teacher": "teacher.pt"}, optimizer=opt, loss_function=_loss())


@pytest.mark.parametrize("wrap", [None, "model", "state_dict", "ddp-prefix"])
def test_load_teacher(tmp_path, wrap) -> None:
    source = _teacher()
    state = source.state_dict()
    if wrap == "ddp-prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap is not None:
        state = {wrap: state, "epoch": 3}
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    net = load_teacher(_teacher().train(), str(path))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


def test_load_teacher_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_teacher(_teacher(), tmp_path / "missing.pt")
    msg = str(err.value)
    assert "missing.pt" in msg and "bundles/prostate_mri_teacher/configs/train.json" in msg
    assert "--teacher_ckpt" in msg
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_teacher(_teacher(), tmp_path / "bad.pt")


def test_a_dominant_term_is_warned_about_once(caplog) -> None:
    """A weighted term far above L_seg at the first iteration is named in one warning, not at every iteration."""
    student, teacher = _student(), _teacher()
    loss = _loss(lambda_logits=1e4, lambda_km=0.0, lambda_aa=0.0, student_channels=(), teacher_channels=())
    trainer = DistillationTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=_loader(4), network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=1e-6), loss_function=loss, teacher=teacher,
    )
    with caplog.at_level(logging.WARNING, logger="monai_relkd.engines.trainer"):
        trainer.run()
    warnings = [r.getMessage() for r in caplog.records if "drown the segmentation loss" in r.getMessage()]
    assert len(warnings) == 1 and "logits" in warnings[0], warnings
    assert trainer.state.output[0]["share_logits"] > 0.9


def test_no_warning_for_a_balanced_loss(caplog) -> None:
    loss = _loss(lambda_logits=0.1, lambda_km=0.0, lambda_aa=0.0, student_channels=(), teacher_channels=())
    trainer = DistillationTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(4), network=_student(),
        optimizer=torch.optim.SGD(_student().parameters(), lr=1e-6), loss_function=loss, teacher=_teacher(),
    )
    with caplog.at_level(logging.WARNING, logger="monai_relkd.engines.trainer"):
        trainer.run()
    assert not [r for r in caplog.records if "drown" in r.getMessage()]
