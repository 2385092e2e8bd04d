"""timm ``EfficientNet`` class (efficientnet*, mobilenetv2*, mnasnet*, mixnet*, ...): ``bn2``.

The head runs ``conv_head`` (1x1 conv) then ``bn2`` (batch norm *with* its activation) before
the global pool, so ``bn2``'s output is the final, activated feature map.
"""

from __future__ import annotations

from torch import nn

from camkit.adapters._base import Adapter, class_named, has_children, timm_input_size


def _matches(model: nn.Module) -> bool:
    return class_named(model, "EfficientNet") and has_children(
        model, "conv_stem", "blocks", "conv_head", "bn2", "global_pool"
    )


ADAPTER = Adapter(
    family="timm EfficientNet",
    matches=_matches,
    layer=lambda model: "bn2",
    input_size=timm_input_size,
)
