"""timm ResNet family (resnet*, resnet*d, resnext*, seresnet*, ...): ``layer4``.

timm's class is also called ``ResNet``; it differs from torchvision's by its
``global_pool`` (torchvision: ``avgpool``). The input size comes from the model's
``pretrained_cfg``.
"""

from __future__ import annotations

from torch import nn

from camkit.adapters._base import Adapter, class_named, has_children, timm_input_size


def _matches(model: nn.Module) -> bool:
    return class_named(model, "ResNet") and has_children(model, "layer4", "global_pool", "fc")


ADAPTER = Adapter(
    family="timm ResNet",
    matches=_matches,
    layer=lambda model: "layer4",
    input_size=timm_input_size,
)
