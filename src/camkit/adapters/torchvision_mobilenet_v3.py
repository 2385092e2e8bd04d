"""torchvision MobileNetV3 (small and large): the last block of ``features``, 224 px.

The last block is the 1x1 conv (576 or 960 channels); the squeeze-and-excitation convs
inside earlier blocks work on 1x1 maps and are never candidates.
"""

from __future__ import annotations

from torch import nn

from camkit.adapters._base import Adapter, class_named, first_conv_channels, has_children


def _matches(model: nn.Module) -> bool:
    return (
        class_named(model, "MobileNetV3")
        and has_children(model, "features", "avgpool", "classifier")
        and isinstance(model.features, nn.Sequential)
        and len(model.features) > 0
    )


ADAPTER = Adapter(
    family="torchvision MobileNetV3",
    matches=_matches,
    layer=lambda model: f"features.{len(model.features) - 1}",
    input_size=lambda model: (first_conv_channels(model), 224, 224),
)
