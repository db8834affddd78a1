"""LogitsDistillationLoss: value against a per-pixel numpy reference, zero at equality, gradients, autocast."""

from __future__ import annotations

import pytest
import torch
from test_losses_reference import kd_reference

from monai_relkd.losses import LogitsDistillationLoss


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 2, 3, 4, 2)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_reference(shape, temperature) -> None:
    z_s = torch.randn(shape, dtype=torch.float64) * 3
    z_t = torch.randn(shape, dtype=torch.float64) * 3
    value = LogitsDistillationLoss(temperature)(z_s, z_t)
    assert value.ndim == 0
    assert value.item() == pytest.approx(kd_reference(z_s.numpy(), z_t.numpy(), temperature), rel=1e-10)


def test_mean_does_not_grow_with_image_size() -> None:
    z_s, z_t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    loss = LogitsDistillationLoss()
    tiled = loss(z_s.repeat(1, 1, 3, 3), z_t.repeat(1, 1, 3, 3))
    assert tiled.item() == pytest.approx(loss(z_s, z_t).item(), rel=1e-5)


def test_zero_when_equal_and_gradients() -> None:
    z_t = torch.randn(2, 3, 6, 6, requires_grad=True)
    z_s = z_t.detach().clone().requires_grad_(True)
    loss = LogitsDistillationLoss()
    assert loss(z_s, z_t).abs().item() < 1e-6
    (loss(z_s * 2.0, z_t)).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None


def test_autocast_bfloat16() -> None:
    conv = torch.nn.Conv2d(4, 3, 1)
    x_s, x_t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    loss = LogitsDistillationLoss()
    ref = loss(conv(x_s), conv(x_t) * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_s, z_t = conv(x_s), conv(x_t) * 2
        assert z_s.dtype == torch.bfloat16
        value = loss(z_s, z_t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(ref.item(), rel=5e-2)


def test_validation() -> None:
    for bad in (0, -1.0, float("inf"), "4", True):
        with pytest.raises(ValueError, match="temperature"):
            LogitsDistillationLoss(bad)
    with pytest.raises(ValueError, match="same shape"):
        LogitsDistillationLoss()(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="at least 3 dims"):
        LogitsDistillationLoss()(torch.randn(2, 4), torch.randn(2, 4))


def test_reduction_none_sum_mean() -> None:
    z_s, z_t = torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6)
    values = LogitsDistillationLoss(2.0, reduction="none")(z_s, z_t)
    assert values.shape == (3,)
    assert LogitsDistillationLoss(2.0)(z_s, z_t).item() == pytest.approx(values.mean().item(), rel=1e-6)
    assert LogitsDistillationLoss(2.0, reduction="sum")(z_s, z_t).item() == pytest.approx(values.sum().item(), rel=1e-6)
    assert values[0].item() == pytest.approx(LogitsDistillationLoss(2.0)(z_s[:1], z_t[:1]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        LogitsDistillationLoss(reduction="batch")
