"""timm ``MobileNetV3`` class (mobilenetv3*, lcnet*, mobilenetv4*): the last of ``blocks``.

Unlike the EfficientNet class, timm's MobileNetV3 pools *before* ``conv_head``, so the head
conv sees a 1x1 map; the last spatial map is the output of the last block.
"""

from __future__ import annotations

from torch import nn

from camkit.adapters._base import Adapter, class_named, has_children, timm_input_size


def _matches(model: nn.Module) -> bool:
    return (
        class_named(model, "MobileNetV3")
        and has_children(model, "conv_stem", "blocks", "global_pool", "conv_head")
        and isinstance(model.blocks, nn.Sequential)
        and len(model.blocks) > 0
    )


ADAPTER = Adapter(
    family="timm MobileNetV3",
    matches=_matches,
    layer=lambda model: f"blocks.{len(model.blocks) - 1}",
    input_size=timm_input_size,
)
