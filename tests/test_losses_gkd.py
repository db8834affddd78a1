"""Generalizable distillation: MSAN, ACT, DCGD, DICD against hand computations, zeros, gradients, 2-D/3-D,
teacher-side pre-training and loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from monai_relkd.engines import load_alignment_network, load_msan_weights, pretrain_teacher_msan
from monai_relkd.losses import (
    AlignmentConsistencyLoss,
    ContrastiveGraphDistillationLoss,
    CrossDistillationLoss,
    DistillationTerm,
    RelationalDistillationLoss,
)
from monai_relkd.losses.gkd import contrastive_graph_terms
from monai_relkd.networks import AlignmentNetwork
from monai_relkd.networks.alignment import style_free_grid


def _identity_msan(channels: int) -> AlignmentNetwork:
    """grid 1, vector_dim = hidden = C, identity weights: for positive features E(F) = D(E(F)) = target(F)."""
    msan = AlignmentNetwork(channels, vector_dim=channels, grid=1, hidden_channels=channels).double()
    with torch.no_grad():
        for layer in (msan.encoder[0], msan.encoder[2], msan.decoder[0], msan.decoder[2]):
            layer.weight.copy_(torch.eye(channels))
            layer.bias.zero_()
    return msan


def test_style_free_grid_removes_channel_scale_and_shift() -> None:
    f = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5, 30.0], dtype=torch.float64).view(1, 3, 1, 1)
    grid = style_free_grid(f, 4)
    assert grid.shape == (2, 3, 16)
    torch.testing.assert_close(style_free_grid(f * scale + 5.0, 4), grid, rtol=0, atol=1e-3)  # up to ε
    torch.testing.assert_close(grid.mean(-1), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("dims", [2, 3])
def test_alignment_network_shapes(dims) -> None:
    msan = AlignmentNetwork(6, vector_dim=5, grid=2, hidden_channels=7, spatial_dims=dims)
    f = torch.randn((4, 6) + (6,) * dims)
    v, rec = msan(f)
    assert v.shape == (4, 5) and rec.shape == (4, 6, 2**dims) and msan.target(f).shape == rec.shape
    torch.testing.assert_close(v.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="expects"):
        msan(torch.randn((4, 5) + (6,) * dims))
    with pytest.raises(ValueError, match="spatial_dims"):
        AlignmentNetwork(6, spatial_dims=1)


def test_graph_terms_hand_computed() -> None:
    # B = 2, orthonormal vectors, student = teacher, τ = 1: intra = -log(e / (e + 1)) each, inter = 0 (one other)
    e = torch.eye(2, dtype=torch.float64)
    intra, inter = contrastive_graph_terms(e, e, 1.0)
    torch.testing.assert_close(intra, torch.full((2,), math.log(1 + math.exp(-1)), dtype=torch.float64))
    assert torch.all(inter == 0)
    # B = 3, τ = 0.5: the inter-coupling KL by explicit loops
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64), dim=1)
    s = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, -1.0]], dtype=torch.float64), dim=1)
    intra, inter = contrastive_graph_terms(s, t, 0.5)
    sn, tn = s.numpy(), t.numpy()
    for i in range(3):
        logits = [sn[i] @ tn[j] / 0.5 for j in range(3)]
        assert intra[i].item() == pytest.approx(-logits[i] + np.log(np.sum(np.exp(logits))), rel=1e-12)
        others = [j for j in range(3) if j != i]
        pt = np.exp([tn[i] @ tn[j] / 0.5 for j in others])
        ps = np.exp([sn[i] @ sn[j] / 0.5 for j in others])
        pt, ps = pt / pt.sum(), ps / ps.sum()
        assert inter[i].item() == pytest.approx(float(np.sum(pt * np.log(pt / ps))), rel=1e-10)


def test_graph_terms_minimal_when_the_student_matches() -> None:
    t = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    _, inter = contrastive_graph_terms(t, t, 0.1)
    assert torch.all(inter.abs() < 1e-12)  # identical graphs
    e = torch.eye(4, dtype=torch.float64)
    intra, _ = contrastive_graph_terms(e, e, 0.01)  # orthonormal, matched, sharp: InfoNCE's minimum 0
    assert torch.all(intra < 1e-12)
    worse, _ = contrastive_graph_terms(e[[1, 0, 3, 2]], e, 0.01)
    assert torch.all(worse > 50)


def test_dicd_zero_when_the_student_vector_reproduces_and_hand_value() -> None:
    f = torch.rand(3, 4, 5, 5, dtype=torch.float64) + 0.1  # positive features: the identity MSAN is exact
    loss = CrossDistillationLoss(_identity_msan(4), _identity_msan(4), reduction="none")
    assert torch.all(loss(f, f.clone()).abs() < 1e-12)
    g = torch.rand(3, 4, 5, 5, dtype=torch.float64) + 0.1
    # hand: target = unit GAP, and for the identity MSAN D(E(x)) = unit GAP of x
    gap = lambda x: torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)  # noqa: E731
    expected = (gap(g) - gap(f)).pow(2).mean(dim=1) * 2  # both exchanged terms are the same here
    torch.testing.assert_close(loss(g, f), expected)


def test_act_hand_value_and_consistency() -> None:
    msan = _identity_msan(3)
    f = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    loss = AlignmentConsistencyLoss(msan, w_reconstruction=1.0, w_consistency=2.0, reduction="none")
    assert torch.all(loss(f).abs() < 1e-12) and torch.all(loss(f, f * 3.0).abs() < 1e-12)  # exact, scale-free
    g = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    gap = lambda x: torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)  # noqa: E731
    torch.testing.assert_close(loss(f, g), 2.0 * (gap(f) - gap(g)).pow(2).sum(dim=1))


@pytest.mark.parametrize("dims", [2, 3])
def test_gradients_reach_the_student_and_its_msan_never_the_teacher(dims) -> None:
    student_msan = AlignmentNetwork(4, vector_dim=8, grid=2, hidden_channels=16, spatial_dims=dims)
    teacher_msan = AlignmentNetwork(6, vector_dim=8, grid=2, hidden_channels=16, spatial_dims=dims)
    f_s = torch.randn((5, 4) + (8,) * dims, requires_grad=True)
    f_t = torch.randn((5, 6) + (4,) * dims, requires_grad=True)
    dcgd = ContrastiveGraphDistillationLoss(student_msan, teacher_msan)
    dicd = CrossDistillationLoss(student_msan, teacher_msan)
    (dcgd(f_s, f_t) + dicd(f_s, f_t)).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student_msan.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher_msan.parameters())
    assert not teacher_msan.training


def test_gkd_terms_in_the_weighted_sum() -> None:
    student_msan, teacher_msan = AlignmentNetwork(4, vector_dim=8), AlignmentNetwork(6, vector_dim=8)
    features = ("student_features", "teacher_features")
    terms = {
        "act": DistillationTerm(AlignmentConsistencyLoss(student_msan), 0.5, inputs=("student_features",)),
        "dcgd": DistillationTerm(ContrastiveGraphDistillationLoss(student_msan, teacher_msan), 0.25, features),
        "dicd": DistillationTerm(CrossDistillationLoss(student_msan, teacher_msan), 2.0, features),
    }
    loss = RelationalDistillationLoss(lambda_logits=0.0, extra_terms=terms)
    assert loss.teacher_required
    trainable = {id(p) for p in loss.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in student_msan.parameters()}
    z = torch.randn(4, 2, 16, 16)
    f_s, f_t = [torch.randn(4, 4, 8, 8)], [torch.randn(4, 6, 4, 4)]
    out = loss(z, z, f_s, f_t, torch.randint(0, 2, (4, 1, 16, 16)))
    expected = out["seg"] + 0.5 * out["act"] + 0.25 * out["dcgd"] + 2.0 * out["dicd"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="vectors differ"):
        CrossDistillationLoss(AlignmentNetwork(4, vector_dim=8), AlignmentNetwork(6, vector_dim=16))
    with pytest.raises(ValueError, match="AlignmentNetwork"):
        ContrastiveGraphDistillationLoss(torch.nn.Linear(2, 2), teacher_msan)


def test_teacher_msan_pretraining_saves_loads_and_checks(tmp_path) -> None:
    teacher = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    loader = [{"image": torch.rand(2, 1, 16, 16)} for _ in range(2)]
    msan = AlignmentNetwork(4, vector_dim=8, grid=2, hidden_channels=16)
    before = [p.detach().clone() for p in msan.parameters()]
    path = tmp_path / "msan.pt"
    trained = pretrain_teacher_msan(teacher, "model.0", msan, loader, path, num_steps=3, log_every=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters()))
    assert not any(p.requires_grad for p in trained.parameters())
    loaded = load_alignment_network(path)
    f = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(loaded.encode(f), trained.encode(f))
    fresh = load_msan_weights(AlignmentNetwork(4, vector_dim=8, grid=2, hidden_channels=16), path)
    torch.testing.assert_close(fresh.encode(f), trained.encode(f))
    with pytest.raises(ValueError, match="saved for"):
        load_msan_weights(AlignmentNetwork(4, vector_dim=8, grid=3, hidden_channels=16), path)
    with pytest.raises(FileNotFoundError, match="pretrain_msan"):
        load_alignment_network(tmp_path / "absent.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read"):
        load_alignment_network(tmp_path / "cut.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_autocast_close_to_float32() -> None:
    dev = torch.device("cuda")
    student_msan = AlignmentNetwork(4, vector_dim=8, grid=2, hidden_channels=16).to(dev)
    teacher_msan = AlignmentNetwork(6, vector_dim=8, grid=2, hidden_channels=16).to(dev)
    f_s, f_t = torch.randn(6, 4, 16, 16, device=dev), torch.randn(6, 6, 8, 8, device=dev)
    losses = [ContrastiveGraphDistillationLoss(student_msan, teacher_msan), CrossDistillationLoss(student_msan, teacher_msan),
              AlignmentConsistencyLoss(student_msan)]
    for loss in losses:
        args = (f_s,) if isinstance(loss, AlignmentConsistencyLoss) else (f_s, f_t)
        ref = loss(*args)
        with torch.autocast("cuda", dtype=torch.float16):
            value = loss(*(a.half() for a in args))
        assert value.device.type == "cuda" and torch.isfinite(value)
        assert value.float().item() == pytest.approx(ref.item(), rel=5e-2, abs=1e-3), type(loss).__name__
