"""torchvision ResNet, ResNeXt and Wide-ResNet (one class): ``layer4``, 224 px.

``layer4`` is the last residual stage; its output (stride 32) feeds the global average pool.
"""

from __future__ import annotations

from torch import nn

from camkit.adapters._base import Adapter, class_named, has_children


def _matches(model: nn.Module) -> bool:
    return class_named(model, "ResNet") and has_children(model, "conv1", "layer4", "avgpool", "fc")


ADAPTER = Adapter(
    family="torchvision ResNet",
    matches=_matches,
    layer=lambda model: "layer4",
    input_size=lambda model: (model.conv1.in_channels, 224, 224),
)
