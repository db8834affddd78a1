"""ESPNet (Mehta et al., "ESPNet: Efficient Spatial Pyramid of Dilated Convolutions for Semantic Segmentation",
ECCV 2018), written from the paper's Sec. 3 and Fig. 4(d): ESP modules (point-wise reduction, a spatial pyramid
of dilated 3x3 convolutions with hierarchical feature fusion), input reinforcement at 1/2 and 1/4, and the
light decoder working at ``out_channels`` width.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._blocks import check_channels, feature_taps_method, pad_to_multiple

__all__ = ["ESPNet", "ESPBlock"]


def _br(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, eps=1e-3), nn.PReLU(channels))


def _cbr(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        _br(out_channels),
    )


class ESPBlock(nn.Module):
    """Efficient spatial pyramid module.

    Reduce ``in -> d`` channels (1x1 conv, or 3x3 stride-2 conv when ``stride=2``), apply ``K`` parallel 3x3
    convolutions with dilations ``1, 2, 4, ..., 2^(K-1)``, sum the dilated outputs hierarchically (HFF), concatenate
    to ``out`` channels, add the input when shapes allow (``residual``), then BN + PReLU.
    ``K = min(branches, out_channels)`` so the module also works at a classifier's small width.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, residual: bool = True, branches: int = 5
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}.")
        k = max(1, min(branches, out_channels))
        d = out_channels // k
        n1 = out_channels - (k - 1) * d
        if stride == 2:
            self.reduce = nn.Conv2d(in_channels, d, 3, stride=2, padding=1, bias=False)
        else:
            self.reduce = nn.Conv2d(in_channels, d, 1, bias=False)
        self.pyramid = nn.ModuleList(
            [
                nn.Conv2d(d, n1 if i == 0 else d, 3, padding=2**i, dilation=2**i, bias=False)
                for i in range(k)
            ]
        )
        self.residual = bool(residual and stride == 1 and in_channels == out_channels)
        self.act = _br(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        outs: List[torch.Tensor] = []
        for i, conv in enumerate(self.pyramid):
            y = conv(r)
            if i >= 2:  # hierarchical feature fusion of the dilated branches
                y = y + outs[-1]
            outs.append(y)
        y = torch.cat(outs, dim=1)
        if self.residual:
            y = y + x
        return self.act(y)


class _Level1(nn.Module):
    """3x3 stride-2 CBR to 16 channels, concatenated with the input average-pooled to 1/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = _cbr(in_channels, 16, 3, stride=2)
        self.act = _br(16 + in_channels)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.act(torch.cat([self.conv(x), image], dim=1))


class _ESPLevel(nn.Module):
    """Strided ESP, ``depth`` ESP blocks, concatenation of [blocks, strided output(, image)], BN + PReLU."""

    def __init__(self, in_channels: int, channels: int, depth: int, image_channels: int = 0) -> None:
        super().__init__()
        self.down = ESPBlock(in_channels, channels, stride=2)
        self.blocks = nn.Sequential(*[ESPBlock(channels, channels) for _ in range(depth)])
        self.with_image = image_channels > 0
        self.act = _br(2 * channels + image_channels)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        down = self.down(x)
        feats = [self.blocks(down), down]
        if self.with_image:
            feats.append(image)
        return self.act(torch.cat(feats, dim=1))


class ESPNetEncoder(nn.Module):
    """ESPNet-C body: returns the level-1 (1/2), level-2 (1/4) and level-3 (1/8) concatenated features."""

    def __init__(self, in_channels: int, p: int, q: int) -> None:
        super().__init__()
        self.stage0 = _Level1(in_channels)
        self.stage1 = _ESPLevel(16 + in_channels, 64, p, image_channels=in_channels)
        self.stage2 = _ESPLevel(128 + in_channels, 128, q)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        half = F.avg_pool2d(x, 2, 2)
        quarter = F.avg_pool2d(half, 2, 2)
        l1 = self.stage0(x, half)
        l2 = self.stage1(l1, quarter)
        l3 = self.stage2(l2, quarter)  # no image reinforcement at level 3
        return l1, l2, l3


class ESPNetDecoder(nn.Module):
    """Project each level to ``C = out_channels``, upsample with 2x2 transposed convs and fuse: 1/8 -> 1/2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        c = out_channels
        self.proj3 = nn.Sequential(nn.Conv2d(256, c, 1, bias=False), nn.BatchNorm2d(c, eps=1e-3))
        self.up3 = nn.ConvTranspose2d(c, c, 2, stride=2, bias=False)
        self.proj2 = _cbr(128 + in_channels, c, 1)
        self.fuse2 = nn.Sequential(_br(2 * c), ESPBlock(2 * c, c, residual=False))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, bias=False), _br(c))
        self.fuse1 = _cbr(16 + in_channels + c, c, 3)

    def forward(self, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor) -> torch.Tensor:
        y = self.up3(self.proj3(l3))
        y = self.up2(self.fuse2(torch.cat([self.proj2(l2), y], dim=1)))
        return self.fuse1(torch.cat([y, l1], dim=1))


class ESPNet(nn.Module):
    """ESPNet (the full network with decoder, Fig. 4(d) of the paper) for 2-D segmentation, returning logits.

    Inputs of any height and width are accepted: they are zero-padded (bottom/right) to a multiple of 8 and the
    logits are cropped back, so the output always has the input's spatial size.

    Feature taps (module names in ``named_modules()``, channels, stride w.r.t. the padded input; ``in`` is
    ``in_channels``, ``C`` is ``out_channels``):

    ====================  ==========  ======  =====================================================
    name                  channels    stride  what
    ====================  ==========  ======  =====================================================
    ``encoder.stage0``    16 + in     2       level 1: conv + input reinforcement
    ``encoder.stage1``    128 + in    4       level 2: strided ESP + ``p`` ESP blocks (+ image)
    ``encoder.stage2``    256         8       level 3: strided ESP + ``q`` ESP blocks, encoder output
    ``decoder.fuse2``     C           4       level-2/level-3 fusion (ESP block)
    ``decoder``           C           2       decoder output, input of ``head``
    ====================  ==========  ======  =====================================================

    As in the paper the decoder works at the number of classes, so its taps are narrow (``C`` channels); for
    feature distillation the encoder taps are the informative ones.
    ``ESPNet.feature_taps(**kwargs)`` / ``net.feature_taps()`` return this table as ``{name: (channels, stride)}``.

    Args:
        in_channels: input channels (1 for a slice, 3 for 2.5-D adjacent slices).
        out_channels: number of classes (logit channels).
        p: depth alpha_2 (ESP blocks at 1/4); the paper's ESPNet uses 2.
        q: depth alpha_3 (ESP blocks at 1/8); the paper's ESPNet uses 8.

    Shapes: input (B, in_channels, H, W) -> logits (B, out_channels, H, W).

    Example::

        >>> net = ESPNet(in_channels=1, out_channels=2, p=2, q=8)
        >>> net(torch.randn(2, 1, 96, 96)).shape
        torch.Size([2, 2, 96, 96])

    Parameters for in=1, out=2: 0.345 M with the defaults p=2, q=8 (each level-3 block adds 32 k, each level-2
    block 7.9 k; p=2, q=3 gives 0.183 M, p=3, q=8 0.352 M).
    """

    size_divisible: int = 8

    def __init__(self, in_channels: int = 1, out_channels: int = 2, p: int = 2, q: int = 8) -> None:
        super().__init__()
        check_channels(in_channels, out_channels)
        for name, value in (("p", p), ("q", q)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "p": p, "q": q}
        self.encoder = ESPNetEncoder(in_channels, p, q)
        self.decoder = ESPNetDecoder(in_channels, out_channels)
        self.head = nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2)

    @feature_taps_method
    def feature_taps(
        cls, in_channels: int = 1, out_channels: int = 2, p: int = 2, q: int = 8
    ) -> Dict[str, Tuple[int, int]]:
        """``{module_name: (channels, stride)}`` of the natural feature taps (see the class docstring)."""
        check_channels(in_channels, out_channels)
        return {
            "encoder.stage0": (16 + in_channels, 2),
            "encoder.stage1": (128 + in_channels, 4),
            "encoder.stage2": (256, 8),
            "decoder.fuse2": (out_channels, 4),
            "decoder": (out_channels, 2),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = pad_to_multiple(x, 8)
        l1, l2, l3 = self.encoder(x)
        out = self.head(self.decoder(l1, l2, l3))
        return out[:, :, :h, :w]
