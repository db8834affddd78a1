"""Inference speed-ups that must not change what is computed: ``ChannelArgmaxd`` (the bundles' argmax) and
``fold_batchnorm``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai.data import MetaTensor
from monai.transforms import AsDiscreted

from monai_relkd.inference import ChannelArgmaxd
from monai_relkd.networks import ENet, ERFNet, ESPNet
from monai_relkd.networks.fold import fold_batchnorm


@pytest.mark.parametrize("channels", [2, 3, 5])
def test_channel_argmax_is_monai_argmax(channels):
    values = torch.rand(channels, 7, 6, 4)
    values[:, :2] = 0.5  # ties go to the lowest index
    values[-1, 3] = 2.0
    img = MetaTensor(values, affine=torch.diag(torch.tensor([0.5, 0.6, 3.6, 1.0])), meta={"filename_or_obj": "x"})
    expected = AsDiscreted("pred", argmax=True)({"pred": img})["pred"]
    got = ChannelArgmaxd("pred")({"pred": img, "other": 1})
    assert isinstance(got["pred"], MetaTensor) and got["other"] == 1
    assert got["pred"].shape == (1, 7, 6, 4) and got["pred"].dtype == expected.dtype
    assert torch.equal(got["pred"].as_tensor(), expected.as_tensor())
    assert torch.equal(got["pred"].affine, img.affine) and got["pred"].meta["filename_or_obj"] == "x"


def _randomise_batchnorm(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("network", [ENet, ESPNet, ERFNet], ids=["enet", "espnet", "erfnet"])
def test_fold_batchnorm_keeps_the_outputs(network):
    net = _randomise_batchnorm(network(in_channels=1, out_channels=2))
    folded = fold_batchnorm(net)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    before = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert folded.relkd_folded_batchnorms == before - left
    if network is ENet:  # every ENet BatchNorm but those after a max-pool concatenation / padding follows a conv
        assert folded.relkd_folded_batchnorms >= 0.9 * before


def test_fold_batchnorm_needs_eval_mode_and_leaves_the_original_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net)
    folded = fold_batchnorm(_randomise_batchnorm(net))
    assert isinstance(net[1][0], nn.BatchNorm2d) and isinstance(folded[1][0], nn.Identity)
    assert folded.relkd_folded_batchnorms == 1
