"""AdaptiveAffinityLoss: explicit pair-loop reference, linear == naive path, invariances, gradients, autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_losses_reference import aa_reference, one_hot, softmax

from monai_relkd.losses import AdaptiveAffinityLoss
from monai_relkd.losses.affinity import _adaptive_pool

MODES = ("uniform", "label", "teacher")


def _inputs(s_shape, t_shape, label_size, k=3, dtype=torch.float64):
    b = s_shape[0]
    f_s = torch.randn(s_shape, dtype=dtype)
    f_t = torch.randn(t_shape, dtype=dtype)
    label = torch.randint(0, k, (b, 1) + tuple(label_size))
    z_t = torch.randn((b, k) + tuple(label_size), dtype=dtype) * 2
    return f_s, f_t, label, z_t


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "s_shape,t_shape,label_size,grid,size",
    [
        ((2, 3, 4, 8), (2, 5, 2, 4), (8, 8), None, (2, 4)),  # smaller of the two sizes
        ((2, 3, 4, 4), (2, 4, 8, 8), (4, 4), 2, (2, 2)),  # int grid
        ((1, 2, 4, 2, 4), (1, 3, 2, 2, 2), (4, 4, 4), (2, 2, 2), (2, 2, 2)),  # 3-D, sequence grid
    ],
)
def test_matches_pair_loop_reference(mode, s_shape, t_shape, label_size, grid, size) -> None:
    f_s, f_t, label, z_t = _inputs(s_shape, t_shape, label_size)
    memberships = {"uniform": None, "label": one_hot(label.numpy(), 3), "teacher": softmax(z_t.numpy())}[mode]
    expected = aa_reference(f_s.numpy(), f_t.numpy(), size, memberships, w_intra=0.7, w_inter=1.9)
    for naive in (False, True):
        loss = AdaptiveAffinityLoss(grid=grid, pair_weights=mode, w_intra=0.7, w_inter=1.9, num_classes=3, naive=naive)
        value = loss(f_s, f_t, label=label, teacher_logits=z_t)
        assert value.item() == pytest.approx(expected, rel=1e-10), f"naive={naive}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "s_shape,t_shape,label_size,grid",
    [
        ((2, 16, 13, 11), (2, 24, 9, 10), (27, 31), None),  # adaptive pooling with uneven windows
        ((2, 8, 20, 20), (2, 12, 20, 20), (20, 20), (7, 9)),
        ((2, 6, 7, 9, 8), (2, 10, 5, 6, 7), (10, 12, 11), None),  # 3-D
        ((1, 4, 6, 6, 6), (1, 4, 6, 6, 6), (6, 6, 6), 4),
    ],
)
def test_linear_equals_naive_float64(mode, s_shape, t_shape, label_size, grid) -> None:
    f_s, f_t, label, z_t = _inputs(s_shape, t_shape, label_size)
    label[0] = 0  # one sample with a single class: its inter-class term is dropped in both paths
    kwargs = dict(grid=grid, pair_weights=mode, w_intra=1.3, w_inter=0.6, num_classes=3)
    fast = AdaptiveAffinityLoss(naive=False, **kwargs)(f_s, f_t, label=label, teacher_logits=z_t)
    naive = AdaptiveAffinityLoss(naive=True, **kwargs)(f_s, f_t, label=label, teacher_logits=z_t)
    assert fast.item() > 0
    assert fast.item() == pytest.approx(naive.item(), rel=1e-6)


def test_linear_gradients_equal_naive() -> None:
    f_s = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 7, 6, 6, dtype=torch.float64)
    label = torch.randint(0, 2, (2, 1, 6, 6))
    grads = []
    for naive in (False, True):
        (g,) = torch.autograd.grad(AdaptiveAffinityLoss(naive=naive)(f_s, f_t, label=label), f_s)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-12)


def test_single_class_label_equals_uniform() -> None:
    f_s, f_t = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 6, 6, 6, dtype=torch.float64)
    label = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    uniform = AdaptiveAffinityLoss(pair_weights="uniform")(f_s, f_t)
    single = AdaptiveAffinityLoss(pair_weights="label", w_inter=5.0)(f_s, f_t, label=label)
    assert single.item() == pytest.approx(uniform.item(), rel=1e-10)


def test_class_balance_is_not_drowned_by_background() -> None:
    # the student differs from the teacher only in the affinities of foreground-to-background pairs; with one
    # foreground pixel of 64 the uniform mean hardly sees it, the inter-class mean does.
    f_t = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    f_s = f_t.clone()
    f_s[0, :, 3, 3] = -f_t[0, :, 3, 3]
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    label[0, 0, 3, 3] = 1
    uniform = AdaptiveAffinityLoss(pair_weights="uniform")(f_s, f_t).item()
    inter = AdaptiveAffinityLoss(pair_weights="label", w_intra=0.0, w_inter=1.0)(f_s, f_t, label=label).item()
    intra = AdaptiveAffinityLoss(pair_weights="label", w_intra=1.0, w_inter=0.0)(f_s, f_t, label=label).item()
    assert intra == pytest.approx(0.0, abs=1e-12)
    assert inter == pytest.approx(uniform * 64 * 64 / (2 * 63), rel=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_zero_for_equal_and_rotated_features(mode) -> None:
    f = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    label = torch.randint(0, 2, (2, 1, 8, 8))
    z_t = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    loss = AdaptiveAffinityLoss(pair_weights=mode)
    assert loss(f, f.clone(), label=label, teacher_logits=z_t).item() == pytest.approx(0.0, abs=1e-12)
    # affinities are invariant to an orthogonal map of the channels into a wider teacher space
    q, _ = torch.linalg.qr(torch.randn(10, 6, dtype=torch.float64))
    rotated = torch.einsum("oc,bchw->bohw", q, f)
    assert loss(f, rotated, label=label, teacher_logits=z_t).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(f, torch.randn_like(rotated), label=label, teacher_logits=z_t).item() > 1e-3


def test_float32_linear_close_to_float64() -> None:
    f_s, f_t = torch.randn(2, 32, 32, 32, dtype=torch.float64), torch.randn(2, 48, 32, 32, dtype=torch.float64)
    label = torch.randint(0, 2, (2, 1, 32, 32))
    ref = AdaptiveAffinityLoss(naive=True)(f_s, f_t, label=label)
    value = AdaptiveAffinityLoss(naive=False)(f_s.float(), f_t.float(), label=label)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ref.item(), rel=1e-4)


def test_gradients_reach_student_not_teacher() -> None:
    f_s = torch.randn(2, 4, 8, 8, requires_grad=True)
    f_t = torch.randn(2, 6, 4, 4, requires_grad=True)
    z_t = torch.randn(2, 2, 8, 8, requires_grad=True)
    AdaptiveAffinityLoss(pair_weights="teacher")(f_s, f_t, teacher_logits=z_t).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None and z_t.grad is None


def test_float_label_and_autocast_bfloat16() -> None:
    conv_s, conv_t = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 16, 1)
    x, noise = torch.randn(2, 3, 16, 16), 0.5 * torch.randn(2, 3, 16, 16)
    label = torch.randint(0, 2, (2, 1, 16, 16))
    loss = AdaptiveAffinityLoss(grid=8)
    ref = loss(conv_s(x), conv_t(x + noise), label=label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_s, f_t = conv_s(x), conv_t(x + noise)
        assert f_s.dtype == torch.bfloat16
        value = loss(f_s, f_t, label=label.float())
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(ref.item(), rel=5e-2)


def test_argument_validation() -> None:
    for kwargs, match in [
        (dict(grid=0), "grid"),
        (dict(grid=(4, -1)), "grid"),
        (dict(grid=2.5), "grid"),
        (dict(pair_weights="labels"), "pair_weights"),
        (dict(w_intra=-1.0), "w_intra"),
        (dict(w_inter=float("nan")), "w_inter"),
        (dict(num_classes=0), "num_classes"),
    ]:
        with pytest.raises(ValueError, match=match):
            AdaptiveAffinityLoss(**kwargs)


def test_forward_validation() -> None:
    f_s, f_t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match='"label" needs `label`'):
        AdaptiveAffinityLoss(pair_weights="label")(f_s, f_t)
    with pytest.raises(ValueError, match='"teacher" needs `teacher_logits`'):
        AdaptiveAffinityLoss(pair_weights="teacher")(f_s, f_t, label=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"label values must be class indices in \[0, 1\]"):
        AdaptiveAffinityLoss(num_classes=2)(f_s, f_t, label=torch.full((2, 1, 8, 8), 2))
    with pytest.raises(ValueError, match="label must be"):
        AdaptiveAffinityLoss()(f_s, f_t, label=torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="batch sizes"):
        AdaptiveAffinityLoss(pair_weights="uniform")(f_s, f_t[:1])
    with pytest.raises(ValueError, match="same number"):
        AdaptiveAffinityLoss(pair_weights="uniform")(f_s, torch.randn(2, 6, 8, 8, 8))
    with pytest.raises(ValueError, match="spatial dims"):
        AdaptiveAffinityLoss(grid=(2, 2, 2), pair_weights="uniform")(f_s, f_t)


def test_memberships_are_pooled_one_hot() -> None:
    # a 2x2 grid over a 4x4 label whose top-left block is 1/4 foreground
    label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    label[0, 0, 0, 0] = 1
    p = AdaptiveAffinityLoss(grid=2)._memberships(label, None, 1, (2, 2), torch.float64)
    np.testing.assert_allclose(p[0].numpy(), [[0.75, 0.25], [1, 0], [1, 0], [1, 0]])


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "s_shape,t_shape,label_size,options,size",
    [
        ((2, 3, 8, 8), (2, 5, 4, 4), (8, 8), {"node_size": 2}, (2, 2)),  # CIRKD-style: 2x2-pixel nodes
        ((2, 3, 8, 4), (2, 4, 8, 4), (8, 4), {"grid": 2}, (2, 2)),  # SKD-style: half the map side, 2x2 nodes
        ((1, 2, 4, 4, 4), (1, 3, 4, 4, 8), (4, 4, 8), {"node_size": (2, 2, 4)}, (2, 2, 1)),  # 3-D
        ((1, 2, 4, 6, 2), (1, 3, 4, 6, 2), (4, 6, 2), {"grid": (2, 3, 1)}, (2, 3, 1)),  # 3-D
    ],
)
def test_node_pooling_matches_pair_loop_reference(mode, pool, s_shape, t_shape, label_size, options, size) -> None:
    f_s, f_t, label, z_t = _inputs(s_shape, t_shape, label_size)
    memberships = {"uniform": None, "label": one_hot(label.numpy(), 3), "teacher": softmax(z_t.numpy())}[mode]
    expected = aa_reference(f_s.numpy(), f_t.numpy(), size, memberships, w_intra=0.7, w_inter=1.9, pool=pool)
    for naive in (False, True):
        loss = AdaptiveAffinityLoss(
            pair_weights=mode, w_intra=0.7, w_inter=1.9, num_classes=3, naive=naive, pool=pool, **options
        )
        value = loss(f_s, f_t, label=label, teacher_logits=z_t)
        assert value.item() == pytest.approx(expected, rel=1e-10), f"naive={naive}"


def test_max_and_avg_pooling_differ() -> None:
    f_s, f_t, label, _ = _inputs((2, 3, 8, 8), (2, 5, 8, 8), (8, 8))
    avg = AdaptiveAffinityLoss(grid=2, pool="avg", pair_weights="uniform")(f_s, f_t)
    mx = AdaptiveAffinityLoss(grid=2, pool="max", pair_weights="uniform")(f_s, f_t)
    assert abs(avg.item() - mx.item()) > 1e-6


def test_grid_gives_the_same_nodes_whatever_the_input_size() -> None:
    loss = AdaptiveAffinityLoss(grid=8)
    by_node = AdaptiveAffinityLoss(node_size=2)
    for side in (16, 32, 64):
        assert loss.grid_size((side, side), (side // 2, side // 2)) == (8, 8)
    assert by_node.grid_size((16, 16), (8, 8)) == (4, 4)
    assert by_node.grid_size((32, 32), (16, 16)) == (8, 8)  # node_size follows the resolution, grid does not
    assert by_node.grid_size((9, 16), (9, 16)) == (5, 8)  # a partial node at the border


def test_invariant_to_feature_scale() -> None:
    f_s, f_t, label, _ = _inputs((2, 3, 8, 8), (2, 5, 4, 4), (8, 8))
    loss = AdaptiveAffinityLoss(grid=4, pool="max", num_classes=3)
    ref = loss(f_s, f_t, label=label).item()
    assert ref > 1e-3
    for factor in (10.0, 0.01):
        assert loss(f_s * factor, f_t, label=label).item() == pytest.approx(ref, rel=1e-5)
        assert loss(f_s, f_t * factor, label=label).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_reduction_none_sum_mean(mode) -> None:
    f_s, f_t, label, z_t = _inputs((3, 3, 8, 8), (3, 5, 4, 4), (8, 8))
    kwargs = dict(grid=4, pair_weights=mode, num_classes=3)
    values = AdaptiveAffinityLoss(reduction="none", **kwargs)(f_s, f_t, label=label, teacher_logits=z_t)
    assert values.shape == (3,)
    mean = AdaptiveAffinityLoss(**kwargs)(f_s, f_t, label=label, teacher_logits=z_t)
    total = AdaptiveAffinityLoss(reduction="sum", **kwargs)(f_s, f_t, label=label, teacher_logits=z_t)
    assert mean.item() == pytest.approx(values.mean().item(), rel=1e-10)
    assert total.item() == pytest.approx(values.sum().item(), rel=1e-10)
    one = AdaptiveAffinityLoss(**kwargs)(f_s[2:], f_t[2:], label=label[2:], teacher_logits=z_t[2:])
    assert values[2].item() == pytest.approx(one.item(), rel=1e-10)


def test_node_pooling_validation() -> None:
    with pytest.raises(ValueError, match="not both"):
        AdaptiveAffinityLoss(grid=2, node_size=2)
    with pytest.raises(ValueError, match="pool"):
        AdaptiveAffinityLoss(pool="min")
    with pytest.raises(ValueError, match="node_size"):
        AdaptiveAffinityLoss(node_size=0)
    with pytest.raises(ValueError, match="reduction"):
        AdaptiveAffinityLoss(reduction="avg")
    with pytest.raises(ValueError, match="node_size .* 3 spatial dims"):
        AdaptiveAffinityLoss(node_size=(2, 2))(torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 4, 4, 4))


def test_default_form_is_the_cheaper_one_and_gives_the_same_loss() -> None:
    loss = AdaptiveAffinityLoss(grid=16)
    # the bundles' ENet taps: 16×16 nodes of 128 (64) student and 256 teacher channels, 2 classes: N×N is cheaper
    assert loss.uses_naive(256, 128, 256, 2) and loss.uses_naive(256, 64, 256, 2)
    assert not loss.uses_naive(4096, 64, 64, 2)  # a 64×64 grid of few channels: the linear form
    assert not loss.uses_naive(2048, 4096, 4096, 2)  # cheaper as N×N, but more nodes than NAIVE_MAX_NODES
    assert not AdaptiveAffinityLoss(naive=False).uses_naive(256, 128, 256, 2)
    assert AdaptiveAffinityLoss(naive=True).uses_naive(4096, 8, 8, 2)
    f_s, f_t = torch.randn(2, 128, 12, 12, dtype=torch.float64), torch.randn(2, 256, 3, 3, dtype=torch.float64)
    label = torch.randint(0, 2, (2, 1, 48, 48))
    linear = AdaptiveAffinityLoss(grid=16, naive=False)(f_s, f_t, label=label)
    assert loss(f_s, f_t, label=label).item() == pytest.approx(linear.item(), rel=1e-9)
    with pytest.raises(ValueError, match="naive"):
        AdaptiveAffinityLoss(naive="yes")


@pytest.mark.parametrize(
    "shape,size",
    [((2, 3, 3, 3), (16, 16)), ((2, 3, 12, 12), (16, 16)), ((2, 3, 48, 40), (16, 7)), ((2, 3, 5, 7, 9), (4, 16, 3)),
     ((2, 3, 17), (5,)), ((2, 3, 6, 6), (6, 16))],
)
def test_average_pooling_equals_torch_adaptive_pooling(shape, size) -> None:
    """The matrix-product average pooling: the same values and gradients as ``F.adaptive_avg_pool*d`` (up/down)."""
    torch_pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn((shape[0], shape[1]) + size, dtype=torch.float64)
    ours = _adaptive_pool(x, size, "avg")
    (g_ours,) = torch.autograd.grad((ours * y).sum(), x)
    ref = torch_pool(x, size)
    (g_ref,) = torch.autograd.grad((ref * y).sum(), x)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=0, atol=1e-13) and torch.allclose(g_ours, g_ref, rtol=0, atol=1e-13)
