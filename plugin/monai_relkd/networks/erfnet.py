"""ERFNet (Romera et al., "ERFNet: Efficient Residual Factorized ConvNet for Real-Time Semantic Segmentation",
IEEE T-ITS 2018), written from the paper's Table I: downsampler blocks, factorised ("non-bottleneck-1D") residual
layers with dilations 2/4/8/16 at 1/8, and a small transposed-convolution decoder.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._blocks import check_channels, feature_taps_method, pad_to_multiple

__all__ = ["ERFNet"]


class DownsamplerBlock(nn.Module):
    """3x3 stride-2 conv (``out - in`` filters) concatenated with a 2x2 max-pool, then BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels <= in_channels:
            raise ValueError(f"downsampler needs out_channels > in_channels, got {in_channels} -> {out_channels}.")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), F.max_pool2d(x, 2, 2)], dim=1)))


class NonBottleneck1D(nn.Module):
    """Residual layer of two factorised 3x3 convolutions (3x1 then 1x3), the second pair dilated."""

    def __init__(self, channels: int, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        d = dilation
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0), bias=True)
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1), bias=True)
        self.bn1 = nn.BatchNorm2d(channels, eps=1e-3)
        self.conv3x1_2 = nn.Conv2d(channels, channels, (3, 1), padding=(d, 0), dilation=(d, 1), bias=True)
        self.conv1x3_2 = nn.Conv2d(channels, channels, (1, 3), padding=(0, d), dilation=(1, d), bias=True)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-3)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv3x1_1(x))
        y = F.relu(self.bn1(self.conv1x3_1(y)))
        y = F.relu(self.conv3x1_2(y))
        y = self.dropout(self.bn2(self.conv1x3_2(y)))
        return F.relu(x + y)


class UpsamplerBlock(nn.Module):
    """3x3 stride-2 transposed convolution (exact 2x upsampling), BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ERFNetEncoder(nn.Module):
    """Layers 1-16 of the paper: 1/2 (16 ch) -> 1/4 (64 ch) -> 1/8 (128 ch)."""

    def __init__(self, in_channels: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.stage0 = DownsamplerBlock(in_channels, 16)
        self.stage1 = nn.Sequential(
            DownsamplerBlock(16, 64), *[NonBottleneck1D(64, 1, dropout / 10.0) for _ in range(5)]
        )
        self.stage2 = nn.Sequential(
            DownsamplerBlock(64, 128), *[NonBottleneck1D(128, d, dropout) for _ in range(2) for d in (2, 4, 8, 16)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(self.stage0(x)))


class ERFNet(nn.Module):
    """ERFNet for 2-D segmentation, returning logits at the input resolution.

    Inputs of any height and width are accepted: they are zero-padded (bottom/right) to a multiple of 8 and the
    logits are cropped back, so the output always has the input's spatial size.

    Feature taps (module names in ``named_modules()``, channels, stride w.r.t. the padded input):

    ====================  ========  ======  ===============================================
    name                  channels  stride  what
    ====================  ========  ======  ===============================================
    ``encoder.stage0``    16        2       first downsampler
    ``encoder.stage1``    64        4       downsampler + 5 non-bottleneck-1D layers
    ``encoder.stage2``    128       8       downsampler + 8 dilated layers, encoder output
    ``decoder.stage1``    64        4       upsampler + 2 layers
    ``decoder``           16        2       decoder output, input of ``head``
    ====================  ========  ======  ===============================================

    ``ERFNet.feature_taps(**kwargs)`` / ``net.feature_taps()`` return this table as ``{name: (channels, stride)}``.
    ``head`` is the final 2x2 stride-2 transposed convolution to ``out_channels``.

    Args:
        in_channels: input channels (1 for a slice, 3 for 2.5-D adjacent slices); at most 15.
        out_channels: number of classes (logit channels).
        dropout: spatial dropout of the 1/8 layers; the 1/4 layers use a tenth of it (0.3 and 0.03 in the paper).

    Shapes: input (B, in_channels, H, W) -> logits (B, out_channels, H, W).

    Example::

        >>> net = ERFNet(in_channels=1, out_channels=2)
        >>> net(torch.randn(2, 1, 96, 96)).shape
        torch.Size([2, 2, 96, 96])

    Parameters: 2.06 M for in=1, out=2.
    """

    size_divisible: int = 8

    def __init__(self, in_channels: int = 1, out_channels: int = 2, dropout: float = 0.3) -> None:
        super().__init__()
        check_channels(in_channels, out_channels)
        if in_channels >= 16:
            raise ValueError(f"ERFNet's first downsampler concatenates the input to 16 channels: in_channels < 16, got {in_channels}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "dropout": dropout}
        self.encoder = ERFNetEncoder(in_channels, dropout)
        self.decoder = nn.Sequential()
        self.decoder.add_module("stage1", nn.Sequential(UpsamplerBlock(128, 64), NonBottleneck1D(64), NonBottleneck1D(64)))
        self.decoder.add_module("stage2", nn.Sequential(UpsamplerBlock(64, 16), NonBottleneck1D(16), NonBottleneck1D(16)))
        self.head = nn.ConvTranspose2d(16, out_channels, 2, stride=2)

    @feature_taps_method
    def feature_taps(
        cls, in_channels: int = 1, out_channels: int = 2, dropout: float = 0.3
    ) -> Dict[str, Tuple[int, int]]:
        """``{module_name: (channels, stride)}`` of the natural feature taps (see the class docstring)."""
        check_channels(in_channels, out_channels)
        return {
            "encoder.stage0": (16, 2),
            "encoder.stage1": (64, 4),
            "encoder.stage2": (128, 8),
            "decoder.stage1": (64, 4),
            "decoder": (16, 2),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = pad_to_multiple(x, 8)
        out = self.head(self.decoder(self.encoder(x)))
        return out[:, :, :h, :w]
