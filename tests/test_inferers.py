"""AutocastInferer: the network's forward in mixed precision on the input's device, the output back in float32."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SimpleInferer

from monai_relkd.inferers import AutocastInferer


class _DtypeProbe(torch.nn.Module):
    """A conv that records the dtype its output was computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.seen: torch.dtype | None = None

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.conv(x)
        self.seen = y.dtype
        return y * scale


def test_forward_runs_in_the_autocast_dtype_and_returns_float32():
    net, x = _DtypeProbe(), torch.rand(2, 1, 8, 8)
    out = AutocastInferer("bfloat16")(x, net, scale=2.0)
    assert net.seen == torch.bfloat16 and out.dtype == torch.float32
    reference = SimpleInferer()(x, net, scale=2.0)
    assert net.seen == torch.float32
    # bfloat16 keeps 8 significant bits: close to the float32 forward, not equal to it
    assert torch.allclose(out, reference, atol=0.05) and not torch.equal(out, reference)


def test_disabled_is_the_plain_forward():
    net, x = _DtypeProbe(), torch.rand(2, 1, 8, 8)
    out = AutocastInferer("bfloat16", enabled=False)(x, net)
    assert net.seen == torch.float32 and torch.equal(out, SimpleInferer()(x, net))


def test_gradients_reach_float32_weights():
    net = _DtypeProbe()
    AutocastInferer("bfloat16")(torch.rand(2, 1, 8, 8), net).sum().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.dtype == torch.float32


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        AutocastInferer("int8")
