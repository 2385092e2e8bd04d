"""torchvision MobileNetV2: the last block of ``features`` (the 1x1 conv to 1280 ch), 224 px."""

from __future__ import annotations

from torch import nn

from camkit.adapters._base import Adapter, class_named, first_conv_channels, has_children


def _matches(model: nn.Module) -> bool:
    return (
        class_named(model, "MobileNetV2")
        and has_children(model, "features", "classifier")
        and isinstance(model.features, nn.Sequential)
        and len(model.features) > 0
    )


ADAPTER = Adapter(
    family="torchvision MobileNetV2",
    matches=_matches,
    layer=lambda model: f"features.{len(model.features) - 1}",
    input_size=lambda model: (first_conv_channels(model), 224, 224),
)
