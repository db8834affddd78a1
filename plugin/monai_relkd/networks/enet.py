"""ENet (Paszke et al., "ENet: A Deep Neural Network Architecture for Real-Time Semantic Segmentation", 2016).

Written from the paper's Table 1: an initial block, five stages of bottlenecks (stages 1-3 encode to 1/8,
stages 4-5 decode to 1/2 with max-unpooling) and a final transposed convolution to full resolution.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._blocks import check_channels, feature_taps_method, pad_to_multiple

__all__ = ["ENet"]


def _bn_prelu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))


def _branch(first: nn.Module, middle: nn.Module, internal: int, out_channels: int, dropout: float) -> nn.Sequential:
    """The bottleneck branch of every ENet block: ``first`` (to ``internal`` channels), BN-PReLU, ``middle``,
    BN-PReLU, 1x1 expansion to ``out_channels``, BN-PReLU, spatial dropout."""
    return nn.Sequential(
        first,
        _bn_prelu(internal),
        middle,
        _bn_prelu(internal),
        nn.Conv2d(internal, out_channels, 1, bias=False),
        _bn_prelu(out_channels),
        nn.Dropout2d(dropout),
    )


class InitialBlock(nn.Module):
    """3x3 stride-2 convolution concatenated with a 2x2 max-pool of the input: ``in -> out`` channels, 1/2."""

    def __init__(self, in_channels: int, out_channels: int = 16) -> None:
        super().__init__()
        if out_channels <= in_channels:
            raise ValueError(f"ENet initial block needs out_channels > in_channels, got {in_channels}.")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.act = _bn_prelu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.cat([self.conv(x), self.pool(x)], dim=1))


class ENetBottleneck(nn.Module):
    """Residual bottleneck: 1x1 projection, regular / dilated / asymmetric (5x1, 1x5) conv, 1x1 expansion."""

    def __init__(self, channels: int, kind: str = "regular", dilation: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        internal = channels // 4
        if kind == "asymmetric":
            middle: nn.Module = nn.Sequential(
                nn.Conv2d(internal, internal, (5, 1), padding=(2, 0), bias=False),
                nn.Conv2d(internal, internal, (1, 5), padding=(0, 2), bias=False),
            )
        elif kind in ("regular", "dilated"):
            middle = nn.Conv2d(internal, internal, 3, padding=dilation, dilation=dilation, bias=False)
        else:
            raise ValueError(f"unknown bottleneck kind {kind!r}.")
        self.branch = _branch(nn.Conv2d(channels, internal, 1, bias=False), middle, internal, channels, dropout)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.branch(x))


class DownsamplingBottleneck(nn.Module):
    """Bottleneck halving the resolution; the main path is a max-pool (indices kept) zero-padded in channels,
    the branch starts with a 2x2 stride-2 projection."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.1) -> None:
        super().__init__()
        internal = in_channels // 4
        self.extra = out_channels - in_channels
        self.branch = _branch(nn.Conv2d(in_channels, internal, 2, stride=2, bias=False),
                              nn.Conv2d(internal, internal, 3, padding=1, bias=False), internal, out_channels, dropout)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        main, indices = F.max_pool2d_with_indices(x, [2, 2], [2, 2])
        b, _, h, w = main.shape
        main = torch.cat([main, main.new_zeros(b, self.extra, h, w)], dim=1)
        return self.act(main + self.branch(x)), indices


class UpsamplingBottleneck(nn.Module):
    """Bottleneck doubling the resolution: 1x1 conv + max-unpooling on the main path, 2x2 stride-2 transposed
    conv on the branch."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.1) -> None:
        super().__init__()
        internal = in_channels // 4
        self.main = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.branch = _branch(nn.Conv2d(in_channels, internal, 1, bias=False),
                              nn.ConvTranspose2d(internal, internal, 2, stride=2, bias=False), internal, out_channels,
                              dropout)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        main = self.main(x)
        # the aten op directly: F.max_unpool2d's output-size check does not trace in recent torch
        main = torch._C._nn.max_unpool2d(main, indices, [indices.shape[2] * 2, indices.shape[3] * 2])
        return self.act(main + self.branch(x))


def _stage23(channels: int) -> nn.Sequential:
    """The eight bottlenecks shared by stages 2 and 3 (regular, dilated 2, asym 5, dilated 4, ..., dilated 16)."""
    return nn.Sequential(
        ENetBottleneck(channels, "regular"),
        ENetBottleneck(channels, "dilated", 2),
        ENetBottleneck(channels, "asymmetric"),
        ENetBottleneck(channels, "dilated", 4),
        ENetBottleneck(channels, "regular"),
        ENetBottleneck(channels, "dilated", 8),
        ENetBottleneck(channels, "asymmetric"),
        ENetBottleneck(channels, "dilated", 16),
    )


class ENetEncoder(nn.Module):
    """Initial block and stages 1-3; returns the 1/8 features and the two sets of max-pool indices."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.initial = InitialBlock(in_channels, 16)
        self.down1 = DownsamplingBottleneck(16, 64, dropout=0.01)
        self.stage1 = nn.Sequential(*[ENetBottleneck(64, "regular", dropout=0.01) for _ in range(4)])
        self.down2 = DownsamplingBottleneck(64, 128)
        self.stage2 = _stage23(128)
        self.stage3 = _stage23(128)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.initial(x)
        x, idx1 = self.down1(x)
        x = self.stage1(x)
        x, idx2 = self.down2(x)
        x = self.stage3(self.stage2(x))
        return x, idx1, idx2


class ENetDecoder(nn.Module):
    """Stages 4-5: 1/8 (128 ch) -> 1/4 (64 ch) -> 1/2 (16 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.up4 = UpsamplingBottleneck(128, 64)
        self.stage4 = nn.Sequential(ENetBottleneck(64), ENetBottleneck(64))
        self.up5 = UpsamplingBottleneck(64, 16)
        self.stage5 = nn.Sequential(ENetBottleneck(16))

    def forward(self, x: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.up4(x, idx2))
        return self.stage5(self.up5(x, idx1))


class ENet(nn.Module):
    """ENet for 2-D segmentation, returning logits at the input resolution.

    Inputs of any height and width are accepted: they are zero-padded (bottom/right) to a multiple of 8 and the
    logits are cropped back, so the output always has the input's spatial size.

    Feature taps (module names in ``named_modules()``, channels, stride w.r.t. the padded input):

    ====================  ========  ======  =============================================
    name                  channels  stride  what
    ====================  ========  ======  =============================================
    ``encoder.initial``   16        2       initial block
    ``encoder.stage1``    64        4       stage 1 (4 bottlenecks after bottleneck 1.0)
    ``encoder.stage2``    128       8       stage 2 (8 bottlenecks after bottleneck 2.0)
    ``encoder.stage3``    128       8       stage 3, last encoder stage
    ``decoder.stage4``    64        4       stage 4
    ``decoder``           16        2       decoder output (stage 5), input of ``head``
    ====================  ========  ======  =============================================

    ``ENet.feature_taps(**kwargs)`` / ``net.feature_taps()`` return this table as ``{name: (channels, stride)}``.
    No module's output depends on ``out_channels`` except ``head``, a 2x2 stride-2 transposed convolution.

    Args:
        in_channels: input channels (1 for a slice, 3 for 2.5-D adjacent slices); at most 15.
        out_channels: number of classes (logit channels).

    Shapes: input (B, in_channels, H, W) -> logits (B, out_channels, H, W).

    Example::

        >>> net = ENet(in_channels=1, out_channels=2)
        >>> net(torch.randn(2, 1, 96, 96)).shape
        torch.Size([2, 2, 96, 96])

    Parameters: 0.355 M for in=1, out=2 (Loussaief et al. 2024 quote 353 k; the ENet paper 0.37 M). Choices the
    paper leaves open: bottleneck internal width = input width / 4 (also when downsampling), 2x2 stride-2
    transposed convolutions for upsampling, one PReLU slope per channel, bias-free convolutions.
    """

    size_divisible: int = 8

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        check_channels(in_channels, out_channels)
        if in_channels >= 16:
            raise ValueError(f"ENet's initial block concatenates the input to 16 channels: in_channels < 16, got {in_channels}.")
        self.config = {"in_channels": in_channels, "out_channels": out_channels}
        self.encoder = ENetEncoder(in_channels)
        self.decoder = ENetDecoder()
        self.head = nn.ConvTranspose2d(16, out_channels, 2, stride=2)

    @feature_taps_method
    def feature_taps(cls, in_channels: int = 1, out_channels: int = 2) -> Dict[str, Tuple[int, int]]:
        """``{module_name: (channels, stride)}`` of the natural feature taps (see the class docstring)."""
        check_channels(in_channels, out_channels)
        return {"encoder.initial": (16, 2), "encoder.stage1": (64, 4), "encoder.stage2": (128, 8),
                "encoder.stage3": (128, 8), "decoder.stage4": (64, 4), "decoder": (16, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = pad_to_multiple(x, 8)
        feats, idx1, idx2 = self.encoder(x)
        out = self.head(self.decoder(feats, idx1, idx2))
        return out[:, :, :h, :w]
