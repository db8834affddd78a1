"""Inference-only rewrite: fold each BatchNorm into the convolution that feeds it (eval mode, same outputs up to
float rounding)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]

_CONV = (nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm2d, nn.BatchNorm3d)


def _last_conv(module: nn.Module) -> tuple[nn.Module, str] | None:
    """``(parent, name)`` of ``module``'s output convolution when ``module`` is one, or a Sequential ending in one."""
    parent, name = None, None
    while isinstance(module, nn.Sequential) and len(module) > 0:
        parent, name = module, list(module._modules)[-1]
        module = module[-1]
    return (parent, name) if isinstance(module, _CONV) and parent is not None else None


def _first_bn(module: nn.Module) -> tuple[nn.Module, str] | None:
    """``(parent, name)`` of ``module``'s input BatchNorm when ``module`` is a Sequential starting with one."""
    parent, name = None, None
    while isinstance(module, nn.Sequential) and len(module) > 0:
        parent, name = module, list(module._modules)[0]
        module = module[0]
    return (parent, name) if isinstance(module, _BN) and parent is not None else None


def fold_batchnorm(network: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution inside an ``nn.Sequential`` into that convolution.

    The convolution gets the BatchNorm's scale and shift in its weight and bias (``torch.nn.utils.fusion.
    fuse_conv_bn_eval``) and the BatchNorm becomes ``nn.Identity``: one elementwise pass less per pair, the same
    outputs up to float rounding. Pairs are found structurally - a ``Conv2d``/``Conv3d`` (or a Sequential ending in
    one) immediately followed, in the same Sequential, by a BatchNorm (or a Sequential starting with one) - so a
    BatchNorm applied in a ``forward`` by attribute name (ERFNet's ``bn1``, ResNet's ``bn1``) is left as it is.

    Args:
        network: a network in eval mode (BatchNorm with running statistics).
        inplace: modify ``network`` itself instead of a deep copy.

    Returns:
        the folded network in eval mode; ``folded.relkd_folded_batchnorms`` holds the number of pairs folded.

    Raises:
        ValueError: ``network`` is in training mode (folding uses the running statistics).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> fold_batchnorm(net)[1]
        Identity()
    """
    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode (call .eval() first): folding uses the "
                         "BatchNorm running statistics.")
    net = network if inplace else copy.deepcopy(network)
    folded = 0
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv_at = _last_conv(seq._modules[first]) or (seq, first)
            bn_at = _first_bn(seq._modules[second]) or (seq, second)
            conv, bn = getattr(*conv_at), getattr(*bn_at)
            if not (isinstance(conv, _CONV) and isinstance(bn, _BN)) or bn.num_features != conv.out_channels:
                continue
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            with torch.no_grad():
                setattr(conv_at[0], conv_at[1], fuse_conv_bn_eval(conv, bn))
            setattr(bn_at[0], bn_at[1], nn.Identity())
            folded += 1
    net.relkd_folded_batchnorms = folded
    return net.eval()
