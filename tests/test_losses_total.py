"""RelationalDistillationLoss: composition, λ = 0 skips work, gradients, validation, autocast."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from monai_relkd.losses import (
    AdaptiveAffinityLoss,
    DistillationTerm,
    KernelMatrixLoss,
    LogitsDistillationLoss,
    RelationalDistillationLoss,
    WeightedDistillationLoss,
)

KEYS = {"loss", "seg", "logits", "km", "aa"}


def _batch(dims: int = 2, requires_grad: bool = True):
    s = (16,) * dims if dims == 2 else (8,) * dims
    half = tuple(x // 2 for x in s)
    z_s = torch.randn((2, 2) + s, requires_grad=requires_grad)
    z_t = torch.randn((2, 2) + s, requires_grad=True)
    f_s = [torch.randn((2, 4) + half, requires_grad=True), torch.randn((2, 6) + s, requires_grad=True)]
    f_t = [torch.randn((2, 8) + half, requires_grad=True), torch.randn((2, 12) + half, requires_grad=True)]
    label = torch.randint(0, 2, (2, 1) + s)
    return z_s, z_t, f_s, f_t, label


@pytest.mark.parametrize("dims", [2, 3])
def test_total_is_the_weighted_sum_of_independent_terms(dims) -> None:
    z_s, z_t, f_s, f_t, label = _batch(dims)
    loss = RelationalDistillationLoss(
        lambda_logits=0.5, lambda_km=2.0, lambda_aa=3.0, temperature=2.0,
        student_channels=[4, 6], teacher_channels=[8, 12], aa_grid=4, w_inter=0.5,
    )
    out = loss(z_s, z_t, f_s, f_t, label)
    assert set(out) == KEYS and all(v.ndim == 0 for v in out.values())
    seg = DiceCELoss(to_onehot_y=True, softmax=True)(z_s, label)
    kd = LogitsDistillationLoss(2.0)(z_s, z_t)
    km = sum(loss.km_losses[i](f_s[i], f_t[i]) for i in range(2)) / 2
    aa_fn = AdaptiveAffinityLoss(grid=4, w_inter=0.5)
    aa = sum(aa_fn(f_s[i], f_t[i], label=label) for i in range(2)) / 2
    for key, ref in (("seg", seg), ("logits", kd), ("km", km), ("aa", aa)):
        assert out[key].item() == pytest.approx(ref.item(), rel=1e-6), key
    assert out["loss"].item() == pytest.approx((seg + 0.5 * kd + 2.0 * km + 3.0 * aa).item(), rel=1e-6)


def test_gradients_reach_student_and_connectors_never_teacher() -> None:
    z_s, z_t, f_s, f_t, label = _batch()
    loss = RelationalDistillationLoss(1.0, 1.0, 1.0, student_channels=[4, 6], teacher_channels=[8, 12])
    assert len(list(loss.parameters())) == 4  # weight + bias of two connectors
    loss(z_s, z_t, f_s, f_t, label)["loss"].backward()
    for t in [z_s] + f_s:
        assert t.grad is not None and t.grad.abs().sum() > 0
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for t in [z_t] + f_t:
        assert t.grad is None


def _forbid(monkeypatch, module: torch.nn.Module) -> None:
    def boom(*args, **kwargs):
        raise AssertionError(f"{type(module).__name__} was called although its lambda is 0")

    monkeypatch.setattr(module, "forward", boom)


def test_zero_lambda_skips_computation(monkeypatch) -> None:
    z_s, z_t, f_s, f_t, label = _batch()
    monkeypatch.setattr(KernelMatrixLoss, "forward", lambda *a, **k: pytest.fail("KM computed with lambda_km=0"))
    loss = RelationalDistillationLoss(lambda_logits=0.0, lambda_km=0.0, lambda_aa=0.0)
    assert len(loss.km_losses) == 0 and list(loss.parameters()) == []
    _forbid(monkeypatch, loss.logits_loss)
    _forbid(monkeypatch, loss.aa_loss)
    out = loss(z_s, z_t, [], [], label)  # no features needed when both feature terms are off
    for key in ("logits", "km", "aa"):
        assert out[key].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["seg"].item())
    out["loss"].backward()
    # Hinton KD only: the logits term is computed, the feature terms are not
    loss = RelationalDistillationLoss(lambda_logits=1.0, student_channels=[4, 6], teacher_channels=[8, 12])
    assert list(loss.parameters()) == []
    _forbid(monkeypatch, loss.aa_loss)
    out = loss(z_s, z_t, f_s, f_t, label)
    assert out["logits"].item() > 0 and out["km"].item() == 0.0 and out["aa"].item() == 0.0


def test_structured_kd_baseline_configuration() -> None:
    # uniform weights on a 2x2 grid: the affinity term is the mean squared difference of 4x4 cosine similarities
    z_s, z_t, f_s, f_t, label = _batch()
    loss = RelationalDistillationLoss(lambda_logits=1.0, lambda_aa=1.0, aa_grid=2, pair_weights="uniform")
    out = loss(z_s, z_t, f_s[:1], f_t[:1], label)
    a = torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(f_s[0], 2), dim=1).flatten(2)
    b = torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(f_t[0], 2), dim=1).flatten(2)
    ref = ((a.transpose(1, 2) @ a - b.transpose(1, 2) @ b) ** 2).mean()
    assert out["aa"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_custom_seg_loss_and_float_label() -> None:
    z_s, z_t, f_s, f_t, label = _batch()
    seg = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0)
    loss = RelationalDistillationLoss(lambda_aa=1.0, seg_loss=seg, pair_weights="teacher")
    out = loss(z_s, z_t, f_s, f_t, label.float())
    assert out["seg"].item() == pytest.approx(seg(z_s, label).item())
    assert all(torch.isfinite(v) for v in out.values())


def test_validation() -> None:
    for key in ("lambda_logits", "lambda_km", "lambda_aa"):
        with pytest.raises(ValueError, match=key):
            RelationalDistillationLoss(**{key: -0.1})
    with pytest.raises(ValueError, match="student_channels"):
        RelationalDistillationLoss(lambda_km=1.0)
    with pytest.raises(ValueError, match="student_channels"):
        RelationalDistillationLoss(lambda_km=1.0, student_channels=[4], teacher_channels=[8, 12])
    with pytest.raises(ValueError, match="pair_weights"):
        RelationalDistillationLoss(pair_weights="nope")
    with pytest.raises(ValueError, match="temperature"):
        RelationalDistillationLoss(temperature=0)
    z_s, z_t, f_s, f_t, label = _batch()
    loss = RelationalDistillationLoss(lambda_km=1.0, student_channels=[4, 6], teacher_channels=[8, 12])
    with pytest.raises(ValueError, match="as many student as teacher features"):
        loss(z_s, z_t, f_s, f_t[:1], label)
    with pytest.raises(ValueError, match="built with 2"):
        loss(z_s, z_t, f_s[:1], f_t[:1], label)
    with pytest.raises(ValueError, match="expected 4 channels, got 6"):
        loss(z_s, z_t, f_s[::-1], f_t[::-1], label)


def test_autocast_bfloat16_close_to_float32() -> None:
    torch.manual_seed(1)
    conv_s = torch.nn.Conv2d(3, 6, 3, padding=1)
    conv_t = torch.nn.Conv2d(3, 12, 3, padding=1)
    head_s, head_t = torch.nn.Conv2d(6, 2, 1), torch.nn.Conv2d(12, 2, 1)
    x, label = torch.randn(2, 3, 16, 16), torch.randint(0, 2, (2, 1, 16, 16))
    loss = RelationalDistillationLoss(1.0, 1.0, 1.0, student_channels=[6], teacher_channels=[12], aa_grid=8)

    def run():
        f_s, f_t = conv_s(x), conv_t(x)
        return loss(head_s(f_s), head_t(f_t), [f_s], [f_t], label)

    ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run()
    out["loss"].backward()
    for key in KEYS:
        assert torch.isfinite(out[key]), key
        assert out[key].item() == pytest.approx(ref[key].item(), rel=5e-2, abs=1e-4), key
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_autocast_and_paths_agree() -> None:
    dev = torch.device("cuda")
    z_s, z_t, f_s, f_t, label = (x.to(dev) if torch.is_tensor(x) else [f.to(dev) for f in x] for x in _batch(3))
    loss = RelationalDistillationLoss(1.0, 1.0, 1.0, student_channels=[4, 6], teacher_channels=[8, 12]).to(dev)
    ref = loss(z_s, z_t, f_s, f_t, label)
    with torch.autocast("cuda", dtype=torch.float16):
        out = loss(z_s.half(), z_t.half(), [f.half() for f in f_s], [f.half() for f in f_t], label)
    for key in KEYS:
        assert out[key].device.type == "cuda" and torch.isfinite(out[key])
        assert out[key].item() == pytest.approx(ref[key].item(), rel=5e-2, abs=1e-4), key
    a, b = f_s[1].double(), f_t[1].double()
    fast = AdaptiveAffinityLoss(naive=False)(a, b, label=label)
    naive = AdaptiveAffinityLoss(naive=True)(a, b, label=label)
    assert fast.item() == pytest.approx(naive.item(), rel=1e-6)


def test_no_teacher_outputs_needed_when_every_lambda_is_zero():
    from monai_relkd.losses import RelationalDistillationLoss

    loss = RelationalDistillationLoss(lambda_logits=0.0, lambda_km=0.0, lambda_aa=0.0)
    z_s = torch.randn(2, 2, 8, 8, requires_grad=True)
    label = torch.randint(0, 2, (2, 1, 8, 8)).float()
    out = loss(z_s, None, [], [], label)
    assert out["logits"] == 0 and out["km"] == 0 and out["aa"] == 0
    torch.testing.assert_close(out["loss"], out["seg"])
    with pytest.raises(ValueError, match="teacher_logits is None"):
        RelationalDistillationLoss(lambda_logits=1.0)(z_s, None, [], [], label)


@pytest.mark.parametrize("dims", [2, 3])
def test_reduction_none_gives_per_sample_values_whose_mean_is_the_mean(dims) -> None:
    z_s, z_t, f_s, f_t, label = _batch(dims, requires_grad=False)
    kwargs = dict(lambda_logits=0.5, lambda_km=2.0, lambda_aa=3.0, student_channels=[4, 6],
                  teacher_channels=[8, 12], aa_grid=4)
    torch.manual_seed(3)
    per_sample = RelationalDistillationLoss(reduction="none", **kwargs)
    torch.manual_seed(3)
    mean = RelationalDistillationLoss(**kwargs)
    torch.manual_seed(3)
    summed = RelationalDistillationLoss(reduction="sum", **kwargs)
    values = per_sample(z_s, z_t, f_s, f_t, label)
    ref, tot = mean(z_s, z_t, f_s, f_t, label), summed(z_s, z_t, f_s, f_t, label)
    for key in KEYS:
        assert values[key].shape == (2,), key
        assert values[key].mean().item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-7), key
        assert values[key].sum().item() == pytest.approx(tot[key].item(), rel=1e-5, abs=1e-7), key
    # sample 1 alone gives its own per-sample value
    one = mean(z_s[1:], z_t[1:], [f[1:] for f in f_s], [f[1:] for f in f_t], label[1:])
    assert values["loss"][1].item() == pytest.approx(one["loss"].item(), rel=1e-5)


def test_weighted_sum_of_named_terms_and_weights() -> None:
    z_s, z_t, f_s, f_t, label = _batch()
    aa = AdaptiveAffinityLoss(grid=2, pool="max", pair_weights="uniform")
    loss = WeightedDistillationLoss(
        {
            "kd": DistillationTerm(LogitsDistillationLoss(2.0), weight=0.5),
            "skd": DistillationTerm(aa, weight=2.0, inputs=("student_features", "teacher_features"), pairs=[1]),
            "off": DistillationTerm(LogitsDistillationLoss(1.0), weight=0.0),
        }
    )
    assert loss.term_weights == {"seg": 1.0, "kd": 0.5, "skd": 2.0, "off": 0.0}
    assert loss.teacher_required and loss.num_feature_pairs == 2
    out = loss(z_s, z_t, f_s, f_t, label)
    assert out["skd"].item() == pytest.approx(aa(f_s[1], f_t[1]).item(), rel=1e-6)
    assert out["off"].item() == 0.0
    expected = out["seg"] + 0.5 * out["kd"] + 2.0 * out["skd"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    seg_only = WeightedDistillationLoss({"off": DistillationTerm(LogitsDistillationLoss(), weight=0.0)})
    assert not seg_only.teacher_required and seg_only.num_feature_pairs == 0


def test_term_validation() -> None:
    kd = DistillationTerm(LogitsDistillationLoss())
    for bad in ("loss", "seg", "not an id", ""):
        with pytest.raises(ValueError, match="term name"):
            WeightedDistillationLoss({bad: kd})
    with pytest.raises(ValueError, match="DistillationTerm"):
        WeightedDistillationLoss({"kd": LogitsDistillationLoss()})
    with pytest.raises(ValueError, match="unknown input"):
        DistillationTerm(LogitsDistillationLoss(), inputs=("student_logits", "teacher_probs"))
    with pytest.raises(ValueError, match="weight"):
        DistillationTerm(LogitsDistillationLoss(), weight=-1.0)
    with pytest.raises(ValueError, match="one loss per pair"):
        DistillationTerm([KernelMatrixLoss(2, 2)], inputs=("student_features", "teacher_features"), pairs=[0, 1])
    scalar = WeightedDistillationLoss({"kd": kd}, reduction="none")
    z_s, z_t, f_s, f_t, label = _batch()
    with pytest.raises(ValueError, match='reduction="none"'):
        scalar(z_s, z_t, f_s, f_t, label)
    far = WeightedDistillationLoss(
        {"aa": DistillationTerm(AdaptiveAffinityLoss(), inputs=("student_features", "teacher_features"), pairs=[3])}
    )
    with pytest.raises(ValueError, match="need 4 pair"):
        far(z_s, z_t, f_s, f_t, label)
