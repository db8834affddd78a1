"""Students (ENet, ESPNet, ERFNet) and teacher (DeepLabV3+) for 2-D segmentation, pure torch.

Every network is a plain ``nn.Module`` whose ``forward(x)`` returns only the logits (B, out_channels, H, W) at the
input resolution, and names its natural feature taps: ``Net.feature_taps(**kwargs)`` (or ``net.feature_taps()``)
returns ``{module_name: (channels, stride)}`` for forward hooks by module name. ``AlignmentNetwork`` is the
model-specific alignment network (MSAN) of generalizable distillation.
"""

from .alignment import AlignmentNetwork
from .deeplabv3plus import DeepLabV3Plus
from .enet import ENet
from .erfnet import ERFNet
from .espnet import ESPNet

__all__ = ["ENet", "ESPNet", "ERFNet", "DeepLabV3Plus", "AlignmentNetwork"]
