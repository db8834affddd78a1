"""KernelMatrixLoss: value against a numpy reference, identity connector, gradients, shapes, autocast."""

from __future__ import annotations

import pytest
import torch
from test_losses_reference import km_reference

from monai_relkd.losses import KernelMatrixLoss


@pytest.mark.parametrize(
    "s_shape,t_shape", [((2, 3, 4, 4), (2, 5, 2, 3)), ((2, 2, 2, 3, 4), (2, 4, 3, 3, 3))]
)
def test_matches_reference(s_shape, t_shape) -> None:
    loss = KernelMatrixLoss(s_shape[1], t_shape[1]).double()
    with torch.no_grad():  # a non-trivial connector
        loss.connector_weight.normal_()
        loss.connector_bias.normal_()
    f_s = torch.randn(s_shape, dtype=torch.float64)
    f_t = torch.randn(t_shape, dtype=torch.float64)
    expected = km_reference(
        f_s.numpy(), f_t.numpy(), loss.connector_weight.detach().numpy(), loss.connector_bias.detach().numpy()
    )
    assert loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)


def test_identity_connector_gives_exact_zero() -> None:
    loss = KernelMatrixLoss(6, 6)
    assert torch.equal(loss.connector_weight, torch.eye(6)) and torch.equal(loss.connector_bias, torch.zeros(6))
    f = torch.randn(2, 6, 5, 7)
    assert loss(f, f.clone()).item() == 0.0
    # Gram matrices ignore the spatial layout: a permutation of the pixels gives zero too
    perm = f.flatten(2)[:, :, torch.randperm(35)].reshape(2, 6, 5, 7)
    assert loss(f, perm).item() == pytest.approx(0.0, abs=1e-10)


def test_parameters_and_gradients() -> None:
    loss = KernelMatrixLoss(3, 8)
    params = dict(loss.named_parameters())
    assert set(params) == {"connector_weight", "connector_bias"}
    assert params["connector_weight"].shape == (8, 3)
    f_s = torch.randn(2, 3, 8, 8, requires_grad=True)
    f_t = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss(f_s, f_t).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert loss.connector_weight.grad is not None and loss.connector_weight.grad.abs().sum() > 0
    assert loss.connector_bias.grad is not None
    assert f_t.grad is None


def test_autocast_bfloat16() -> None:
    conv_s, conv_t = torch.nn.Conv2d(2, 4, 1), torch.nn.Conv2d(2, 6, 1)
    x = torch.randn(2, 2, 8, 8)
    loss = KernelMatrixLoss(4, 6)
    ref = loss(conv_s(x), conv_t(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_s, f_t = conv_s(x), conv_t(x)
        assert f_s.dtype == torch.bfloat16
        value = loss(f_s, f_t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(ref.item(), rel=5e-2)


def test_validation() -> None:
    for bad in ((0, 4), (4, -1), (2.0, 4), (True, 4)):
        with pytest.raises(ValueError, match="channels"):
            KernelMatrixLoss(*bad)
    loss = KernelMatrixLoss(4, 8)
    with pytest.raises(ValueError, match="student_features: expected 4 channels, got 5"):
        loss(torch.randn(1, 5, 4, 4), torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="teacher_features: expected 8 channels, got 7"):
        loss(torch.randn(1, 4, 4, 4), torch.randn(1, 7, 4, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        loss(torch.randn(1, 4, 4, 4), torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="number of dims"):
        loss(torch.randn(1, 4, 4, 4), torch.randn(1, 8, 4, 4, 4))
