"""DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
ECCV 2018) on a ResNet-50/101 backbone (He et al., CVPR 2016, bottleneck blocks with the stride on the 3x3
convolution), written from the papers. Standard (non-separable) ASPP with 256 channels; decoder with a 48-channel
low-level projection and two 3x3 convolutions. No pretrained weights are loaded.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._blocks import check_channels, feature_taps_method, pad_to_multiple

__all__ = ["DeepLabV3Plus"]

_BACKBONES: Dict[str, List[int]] = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
_ASPP_RATES: Dict[int, List[int]] = {16: [6, 12, 18], 8: [12, 24, 36]}


def _deeplab_cbr(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeepLabResNetBottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 expansion) residual block."""

    expansion: int = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class DeepLabResNetEncoder(nn.Module):
    """ResNet stem (7x7/2 conv, 3x3/2 max-pool) and stages 1-4; strides of late stages become dilations."""

    def __init__(self, in_channels: int, depths: List[int], output_stride: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stride_now, dilation, channels = 4, 1, 64
        stages = []
        for i, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            first_dilation = dilation
            if stride == 2 and stride_now >= output_stride:  # keep the resolution, dilate instead
                dilation *= 2
                stride = 1
            stride_now *= stride
            blocks = [DeepLabResNetBottleneck(channels, width, stride, first_dilation)]
            channels = width * DeepLabResNetBottleneck.expansion
            blocks += [DeepLabResNetBottleneck(channels, width, 1, dilation) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        low = self.stage1(self.stem(x))
        return low, self.stage4(self.stage3(self.stage2(low)))


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv + ReLU, broadcast back to the feature size.

    It has no batch norm (a 1x1 map with batch size 1 cannot be normalised in training); a bias replaces it.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and image pooling, 256 ch each, 1x1 projection."""

    def __init__(self, in_channels: int, rates: List[int], channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        branches: List[nn.Module] = [_deeplab_cbr(in_channels, channels, 1)]
        branches += [_deeplab_cbr(in_channels, channels, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(in_channels, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(_deeplab_cbr(channels * len(branches), channels, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """Upsample the ASPP output to 1/4, concatenate the 48-ch projection of stage 1, two 3x3 conv (256 ch)."""

    def __init__(self, low_channels: int = 256, aspp_channels: int = 256, channels: int = 256) -> None:
        super().__init__()
        self.low_proj = _deeplab_cbr(low_channels, 48, 1)
        self.fuse = nn.Sequential(_deeplab_cbr(aspp_channels + 48, channels, 3), _deeplab_cbr(channels, channels, 3))

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=[low.shape[2], low.shape[3]], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.low_proj(low)], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ teacher for 2-D segmentation, returning logits at the input resolution.

    Inputs of any height and width are accepted: they are zero-padded (bottom/right) to a multiple of ``output_stride`` and the
    logits are cropped back, so the output always has the input's spatial size.

    Feature taps (module names in ``named_modules()``, channels, stride w.r.t. the padded input; ``OS`` is
    ``output_stride``):

    ====================  ========  ==============  ===========================================
    name                  channels  stride          what
    ====================  ========  ==============  ===========================================
    ``encoder.stage1``    256       4               ResNet layer1 (also the low-level input)
    ``encoder.stage2``    512       8               ResNet layer2
    ``encoder.stage3``    1024      min(16, OS)     ResNet layer3
    ``encoder.stage4``    2048      OS              ResNet layer4
    ``aspp``              256       OS              ASPP output
    ``decoder``           256       4               decoder output, input of ``head``
    ====================  ========  ==============  ===========================================

    ``DeepLabV3Plus.feature_taps(**kwargs)`` / ``net.feature_taps()`` return this table as
    ``{name: (channels, stride)}``. ``head`` is a 1x1 convolution to ``out_channels``; its logits at 1/4 are
    bilinearly upsampled to the input size.

    Args:
        in_channels: input channels (1 for a slice, 3 for 2.5-D adjacent slices).
        out_channels: number of classes (logit channels).
        backbone: ``"resnet50"`` or ``"resnet101"`` (randomly initialised).
        output_stride: 16 (ASPP rates 6, 12, 18) or 8 (rates 12, 24, 36).

    Shapes: input (B, in_channels, H, W) -> logits (B, out_channels, H, W).

    Example::

        >>> net = DeepLabV3Plus(in_channels=1, out_channels=2, backbone="resnet50", output_stride=16)
        >>> net(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 2, 64, 64])

    Parameters for in=1, out=2: 40.3 M (ResNet-50), 59.3 M (ResNet-101).
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, backbone: str = "resnet50", output_stride: int = 16
    ) -> None:
        super().__init__()
        check_channels(in_channels, out_channels)
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {backbone!r}.")
        if output_stride not in _ASPP_RATES:
            raise ValueError(f"output_stride must be one of {sorted(_ASPP_RATES)}, got {output_stride!r}.")
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "backbone": backbone,
            "output_stride": output_stride,
        }
        self.size_divisible = output_stride
        self.encoder = DeepLabResNetEncoder(in_channels, _BACKBONES[backbone], output_stride)
        self.aspp = ASPP(2048, _ASPP_RATES[output_stride])
        self.decoder = DeepLabV3PlusDecoder()
        self.head = nn.Conv2d(256, out_channels, 1)

    @feature_taps_method
    def feature_taps(
        cls, in_channels: int = 1, out_channels: int = 2, backbone: str = "resnet50", output_stride: int = 16
    ) -> Dict[str, Tuple[int, int]]:
        """``{module_name: (channels, stride)}`` of the natural feature taps (see the class docstring)."""
        check_channels(in_channels, out_channels)
        if output_stride not in _ASPP_RATES:
            raise ValueError(f"output_stride must be one of {sorted(_ASPP_RATES)}, got {output_stride!r}.")
        return {
            "encoder.stage1": (256, 4),
            "encoder.stage2": (512, 8),
            "encoder.stage3": (1024, min(16, output_stride)),
            "encoder.stage4": (2048, output_stride),
            "aspp": (256, output_stride),
            "decoder": (256, 4),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = pad_to_multiple(x, self.size_divisible)
        low, high = self.encoder(x)
        logits = self.head(self.decoder(self.aspp(high), low))
        logits = F.interpolate(logits, size=[x.shape[2], x.shape[3]], mode="bilinear", align_corners=False)
        return logits[:, :, :h, :w]
