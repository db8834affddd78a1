"""Students and teacher: output shapes, documented feature taps, parameter counts, determinism, trainability,
TorchScript."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from monai_relkd.networks import DeepLabV3Plus, ENet, ERFNet, ESPNet

STUDENTS = [ENet, ESPNet, ERFNet]
ALL = [ENet, ESPNet, ERFNet, DeepLabV3Plus]
IDS = [c.__name__ for c in ALL]

# target parameter counts for in=1, out=2 (ESPNet: a range)
PARAM_TARGETS = {ENet: 0.35e6, ERFNet: 2.06e6, DeepLabV3Plus: 40e6}


@pytest.fixture(scope="module")
def nets() -> dict:
    torch.manual_seed(0)
    return {cls: cls(in_channels=1, out_channels=2) for cls in ALL}


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("cls", ALL, ids=IDS)
@pytest.mark.parametrize("size", [(64, 64), (96, 80), (50, 70)])
def test_output_shape_any_size(nets, cls, size):
    net = nets[cls].eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (2, 2, *size)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_in_out_channels(cls):
    net = cls(in_channels=3, out_channels=4).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


@pytest.mark.parametrize(
    "cls,kwargs",
    [(ENet, {}), (ESPNet, {}), (ESPNet, {"in_channels": 3, "out_channels": 3, "p": 1, "q": 2}), (ERFNet, {}),
     (DeepLabV3Plus, {}), (DeepLabV3Plus, {"output_stride": 8})],
)
def test_feature_taps_documented_and_hookable(cls, kwargs):
    taps = cls.feature_taps(**kwargs)
    net = cls(**kwargs).eval()
    assert net.feature_taps() == taps
    modules = dict(net.named_modules())
    for key in ("encoder.stage1", "encoder.stage2", "decoder"):
        assert key in taps, key
    assert taps["encoder.stage1"][1] == 4 and taps["encoder.stage2"][1] == 8
    for name in taps:
        assert name in modules, f"{name} not in named_modules()"
        assert f"``{name}``" in cls.__doc__, f"{name} not documented"
    got = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in taps]
    h, w = 64, 96
    in_channels = kwargs.get("in_channels", 1)
    with torch.no_grad():
        net(torch.randn(1, in_channels, h, w))
    for handle in handles:
        handle.remove()
    for name, (channels, stride) in taps.items():
        out = got[name]
        assert isinstance(out, torch.Tensor), name
        assert out.shape == (1, channels, h // stride, w // stride), (name, out.shape, channels, stride)


def test_parameter_counts(nets):
    for cls, target in PARAM_TARGETS.items():
        n = _params(nets[cls])
        assert abs(n - target) / target < 0.03, (cls.__name__, n)
    assert abs(_params(nets[ENet]) - 353_000) / 353_000 < 0.03
    assert 0.18e6 <= _params(nets[ESPNet]) <= 0.36e6
    assert 0.18e6 <= _params(ESPNet(p=2, q=3)) <= 0.36e6
    assert _params(ESPNet(p=2, q=9)) > _params(ESPNet(p=2, q=8)) > _params(ESPNet(p=1, q=8))


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_eval_deterministic(nets, cls):
    net = nets[cls].eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def _disk(size: int = 64) -> tuple:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (((yy - 30.0) ** 2 + (xx - 34.0) ** 2) < 14.0**2).long()
    image = mask.float()[None, None] + 0.1 * torch.randn(1, 1, size, size)
    return image, mask[None]


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_few_steps_lower_the_loss(cls):
    torch.manual_seed(0)
    net = cls(in_channels=1, out_channels=2).train()
    image, mask = _disk()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(net(image), mask)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and sum(losses[-3:]) / 3 < 0.95 * losses[0], losses


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch >= 2.10 deprecates torch.jit.script
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_torchscript_trace_and_script(nets, cls):
    net = nets[cls].eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, x)
        scripted = torch.jit.script(net)
        other = torch.randn(1, 1, 48, 80)  # traced graphs keep the padding, so other sizes work too
        ref = net(other)
        assert torch.allclose(traced(other), ref, atol=1e-5)
        assert torch.allclose(scripted(other), ref, atol=1e-5)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (ENet, {"in_channels": 0}),
        (ENet, {"in_channels": 16}),
        (ERFNet, {"out_channels": 0}),
        (ERFNet, {"dropout": 1.5}),
        (ESPNet, {"p": -1}),
        (ESPNet, {"q": 2.5}),
        (DeepLabV3Plus, {"backbone": "resnet18"}),
        (DeepLabV3Plus, {"output_stride": 32}),
    ],
)
def test_invalid_arguments(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)
