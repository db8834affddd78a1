"""KernelMatrixLoss: value against a numpy reference, scale and resolution invariance, bounds, identity connector,
gradients, reductions, shapes, autocast."""

from __future__ import annotations

import pytest
import torch
from test_losses_reference import km_reference

from monai_relkd.losses import KernelMatrixLoss


@pytest.mark.parametrize("normalize", ["frobenius", "row", "none"])
@pytest.mark.parametrize(
    "s_shape,t_shape", [((2, 3, 4, 4), (2, 5, 2, 3)), ((2, 2, 2, 3, 4), (2, 4, 3, 3, 3))]
)
@pytest.mark.parametrize("factored", [False, True])
def test_matches_reference(s_shape, t_shape, normalize, factored) -> None:
    loss = KernelMatrixLoss(s_shape[1], t_shape[1], normalize=normalize, factored=factored).double()
    with torch.no_grad():  # a non-trivial connector
        loss.connector_weight.normal_()
        loss.connector_bias.normal_()
    f_s = torch.randn(s_shape, dtype=torch.float64)
    f_t = torch.randn(t_shape, dtype=torch.float64)
    expected = km_reference(
        f_s.numpy(), f_t.numpy(), loss.connector_weight.detach().numpy(), loss.connector_bias.detach().numpy(),
        normalize,
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


def _nearest_up2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling ×2 of every spatial dim of (B, C, *S)."""
    for dim in range(2, x.ndim):
        x = x.repeat_interleave(2, dim=dim)
    return x


@pytest.mark.parametrize("normalize", ["frobenius", "row"])
@pytest.mark.parametrize("dims", [2, 3])
def test_invariant_to_feature_scale_and_resolution(normalize, dims) -> None:
    loss = KernelMatrixLoss(3, 5, normalize=normalize).double()
    f_s = torch.randn((2, 3) + (4,) * dims, dtype=torch.float64)
    f_t = torch.randn((2, 5) + (3,) * dims, dtype=torch.float64)
    ref = loss(f_s, f_t).item()
    assert ref > 1e-3  # a non-trivial value, so the comparisons below could fail
    for factor in (10.0, 0.01):
        assert loss(f_s, f_t * factor).item() == pytest.approx(ref, rel=1e-5)
    assert loss(_nearest_up2(f_s), _nearest_up2(f_t)).item() == pytest.approx(ref, rel=1e-5)
    # the student's scale passes the connector y = W x + b: invariant when b = 0 (a learnt b is an offset)
    with torch.no_grad():
        loss.connector_bias.zero_()
    ref = loss(f_s, f_t).item()
    for factor in (10.0, 0.01):
        assert loss(f_s * factor, f_t).item() == pytest.approx(ref, rel=1e-5)


def test_unnormalised_form_grows_with_the_fourth_power_of_the_scale() -> None:
    loss = KernelMatrixLoss(4, 4, normalize="none").double()
    f_s, f_t = torch.zeros(1, 4, 3, 3, dtype=torch.float64), torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert loss(f_s, 10 * f_t).item() == pytest.approx(1e4 * loss(f_s, f_t).item(), rel=1e-9)


@pytest.mark.parametrize("normalize", ["frobenius", "row"])
def test_bounded_in_zero_four(normalize) -> None:
    loss = KernelMatrixLoss(4, 4, normalize=normalize, reduction="none").double()
    f = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    # identical features: 0; random features: in [0, 4]; a Gram matrix and its negation attain the bound 4
    assert torch.all(loss(f, f) == 0)
    values = loss(torch.randn(8, 4, 5, 5, dtype=torch.float64), f)
    assert torch.all((values >= 0) & (values <= 4))
    with torch.no_grad():
        loss.connector_weight.copy_(torch.tensor([[0.0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    g = torch.zeros(1, 4, 1, 2, dtype=torch.float64)
    g[0, 0, 0, 0] = g[0, 1, 0, 0] = 1.0  # both channels on at one pixel
    h = g.clone()
    h[0, 1, 0, 0] = -1.0  # anti-correlated: the off-diagonal flips sign
    assert 0 < loss(g, h).item() <= 4


@pytest.mark.parametrize("normalize", ["frobenius", "row", "none"])
def test_reduction_none_sum_mean(normalize) -> None:
    f_s, f_t = torch.randn(3, 4, 6, 6), torch.randn(3, 8, 3, 3)
    per_sample = KernelMatrixLoss(4, 8, normalize=normalize, reduction="none")
    values = per_sample(f_s, f_t)
    assert values.shape == (3,)
    for reduction, expected in (("mean", values.mean()), ("sum", values.sum())):
        other = KernelMatrixLoss(4, 8, normalize=normalize, reduction=reduction)
        other.load_state_dict(per_sample.state_dict())
        assert other(f_s, f_t).item() == pytest.approx(expected.item(), rel=1e-6)
    # per-sample value b is the loss of sample b alone
    assert values[1].item() == pytest.approx(per_sample(f_s[1:2], f_t[1:2]).item(), rel=1e-6)


def test_batchnorm_connector_trains_and_keeps_its_dtype() -> None:
    loss = KernelMatrixLoss(4, 6, connector_norm="batch")
    assert {"connector_bn.weight", "connector_bn.bias"} <= set(dict(loss.named_parameters()))
    f_s = torch.randn(2, 4, 5, 5, requires_grad=True)
    value = loss(f_s, torch.randn(2, 6, 5, 5))
    value.backward()
    assert loss.connector_bn.weight.grad is not None and f_s.grad.abs().sum() > 0
    assert loss.connector_bn.num_batches_tracked.item() == 1
    # float64 inputs use float64 copies of the BN parameters; the module stays float32
    loss(f_s.detach().double(), torch.randn(2, 6, 5, 5, dtype=torch.float64))
    assert loss.connector_bn.weight.dtype == torch.float32 and loss.connector_bn.num_batches_tracked.item() == 2


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="normalize"):
        KernelMatrixLoss(2, 2, normalize="l2")
    with pytest.raises(ValueError, match="connector_norm"):
        KernelMatrixLoss(2, 2, connector_norm="layer")
    with pytest.raises(ValueError, match="reduction"):
        KernelMatrixLoss(2, 2, reduction="max")
    with pytest.raises(ValueError, match="eps"):
        KernelMatrixLoss(2, 2, eps=0)


def test_factored_gram_gives_the_same_loss_and_gradients() -> None:
    f_t = torch.randn(3, 32, 6, 6, dtype=torch.float64)
    grads = []
    for factored in (False, True):
        torch.manual_seed(0)
        loss = KernelMatrixLoss(8, 32, factored=factored).double()
        f_s = torch.randn(3, 8, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                          requires_grad=True)
        value = loss(f_s, f_t)
        value.backward()
        grads.append((value.item(), f_s.grad, loss.connector_weight.grad, loss.connector_bias.grad))
    (v0, *g0), (v1, *g1) = grads
    assert v1 == pytest.approx(v0, rel=1e-12)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_default_gram_form_is_the_cheaper_one() -> None:
    # the ENet student's taps at 48×48: the decoder's 12×12 map of 64 channels is cheaper through X Xᵀ, the
    # encoder's 6×6 map of 128 channels through the connector's output
    assert KernelMatrixLoss(64, 256).uses_factored(144)
    assert not KernelMatrixLoss(128, 256).uses_factored(36)
    assert not KernelMatrixLoss(64, 256, factored=False).uses_factored(144)
    assert KernelMatrixLoss(128, 256, factored=True).uses_factored(36)
    assert not KernelMatrixLoss(64, 256, connector_norm="batch").uses_factored(144)  # the BatchNorm needs the map
    with pytest.raises(ValueError, match="factored=True needs connector_norm"):
        KernelMatrixLoss(64, 256, connector_norm="batch", factored=True)
    with pytest.raises(ValueError, match="factored must be"):
        KernelMatrixLoss(64, 256, factored="yes")
