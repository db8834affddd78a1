"""TeacherOutputCache: teacher outputs per distinct slice, computed once; DistillationTrainer with a cache and a
separate teacher input."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.data import DataLoader

from conftest import TOY_STUDENT_TAPS, TOY_TEACHER_TAPS, toy_student, toy_teacher
from monai_relkd.engines import DistillationTrainer, FeatureTaps, TeacherOutputCache, distillation_parameters
from monai_relkd.losses import RelationalDistillationLoss

TEACHER_TAPS, STUDENT_TAPS = TOY_TEACHER_TAPS, TOY_STUDENT_TAPS


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return toy_teacher().eval()


class _Counting:
    """teacher_fn that counts the slices it is given."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.teacher, self.taps, self.seen = teacher, FeatureTaps(teacher, TEACHER_TAPS, detach=True), []

    def __call__(self, x: torch.Tensor):
        self.seen.append(x.shape[0])
        self.taps.clear()
        return self.teacher(x), self.taps.features()


def test_cache_runs_the_teacher_once_per_distinct_slice_and_returns_its_outputs():
    fn = _Counting(_teacher())
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        ref_logits, ref_feats = fn(x)
    fn.seen.clear()
    cache = TeacherOutputCache()
    logits, feats = cache(fn, x)
    assert fn.seen == [4] and (cache.hits, cache.misses) == (0, 4)
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=2e-3)  # float16 storage
    assert [f.shape for f in feats] == [f.shape for f in ref_feats]
    for f, r in zip(feats, ref_feats):
        torch.testing.assert_close(f, r, atol=2e-3, rtol=2e-3)
    assert logits.dtype == torch.float32

    # the same slices in another order, one repeated, plus one new and one flipped: only the two unseen run
    new = torch.rand(1, 1, 32, 32)
    batch = torch.cat([x[[2, 0, 0]], new, x[1:2].flip(-2)])
    logits2, _ = cache(fn, batch)
    assert fn.seen == [4, 2] and cache.misses == 6 and cache.hits == 3 and len(cache) == 6
    torch.testing.assert_close(logits2[:3], logits[[2, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(logits2[3:4], fn.teacher(new), atol=2e-3, rtol=2e-3)

    # a slice that differs in one value is a different key
    y = x[:1].clone()
    y[0, 0, 5, 5] += 1e-3
    assert y[0] not in cache and x[0] in cache


def test_cache_saves_and_loads_atomically_and_rejects_other_files(tmp_path):
    fn = _Counting(_teacher())
    x = torch.rand(3, 1, 32, 32)
    cache = TeacherOutputCache(path=tmp_path / "cache.pt")
    logits, _ = cache(fn, x)
    cache.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]  # no temporary file left
    again = TeacherOutputCache(path=tmp_path / "cache.pt")
    assert len(again) == 3
    logits2, _ = again(fn, x)
    assert fn.seen == [3] and again.hits == 3
    torch.testing.assert_close(logits2, logits)

    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt.*not a TeacherOutputCache"):
        TeacherOutputCache(path=bad)
    with pytest.raises(ValueError, match="floating"):
        TeacherOutputCache(dtype=torch.int8)


def test_shared_cache_is_one_instance_per_name():
    a = TeacherOutputCache.shared("/fold/HK/teacher.pt")
    try:
        assert TeacherOutputCache.shared("/fold/HK/teacher.pt") is a
        assert TeacherOutputCache.shared("/fold/UCL/teacher.pt") is not a
    finally:
        TeacherOutputCache.release()
    assert TeacherOutputCache.shared("/fold/HK/teacher.pt") is not a
    TeacherOutputCache.release()


def _data(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        image = torch.rand(1, 32, 32, generator=g)
        out.append({"image": image * 1.3, "teacher_image": image, "label": (image > 0.6).float()})
    return out


def _train(cache: TeacherOutputCache | None, key: str | None, epochs: int = 2) -> tuple[DistillationTrainer, list]:
    torch.manual_seed(0)
    student = toy_student()
    loss = RelationalDistillationLoss(lambda_logits=1.0, lambda_km=1.0, lambda_aa=1.0, student_channels=[4, 8],
                                      teacher_channels=[16, 32], aa_grid=4)
    trainer = DistillationTrainer(
        device="cpu", max_epochs=epochs, train_data_loader=DataLoader(_data(), batch_size=2, shuffle=False),
        network=student, optimizer=torch.optim.SGD(distillation_parameters(student, loss), lr=0.0),
        loss_function=loss, teacher=copy.deepcopy(_teacher()), student_taps=STUDENT_TAPS,
        teacher_taps=TEACHER_TAPS, teacher_cache=cache, teacher_input_key=key)
    losses: list = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(
        {k: float(e.state.output[0][k]) for k in ("loss", "loss_logits", "loss_km", "loss_aa")}))
    trainer.run()
    return trainer, losses


def test_trainer_with_cache_matches_the_live_teacher_on_the_teacher_input_and_hits_after_one_pass():
    cache = TeacherOutputCache()
    _, cached = _train(cache, "teacher_image")
    assert (cache.misses, cache.hits, len(cache)) == (4, 4, 4)  # epoch 1 fills, epoch 2 reads back
    _, live = _train(None, "teacher_image")
    for c, lv in zip(cached, live):  # lr 0: the student never changes, so every step is comparable
        for k in c:
            assert c[k] == pytest.approx(lv[k], rel=2e-3, abs=1e-4), k
    # the teacher input matters: on the student's (scaled) input the logits term differs
    _, student_input = _train(None, None)
    assert any(abs(a["loss_logits"] - b["loss_logits"]) > 1e-4 for a, b in zip(live, student_input))


def test_missing_teacher_input_key_is_a_clear_error():
    with pytest.raises(KeyError, match="'absent_key' is not in the training batch.*CopyItemsd"):
        _train(None, "absent_key", epochs=1)
