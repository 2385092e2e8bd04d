"""Per-family knowledge: which layer Grad-CAM should use, and at which input size.

An adapter names the target layer of a model family without running the model. camkit asks
the adapters first (yours, then the built-in ones) and falls back to the heuristic over a dry
forward when none matches. The built-in ones recognise models by class name and module
structure only: neither torchvision nor timm is imported.

>>> from camkit.adapters import Adapter, register
>>> register(Adapter(                                        # doctest: +SKIP
...     family="my UNet encoder",
...     matches=lambda m: type(m).__name__ == "UNetClassifier",
...     layer=lambda m: "encoder.stage4",
...     input_size=lambda m: (1, 256, 256),
... ))
"""

from __future__ import annotations

from torch import nn

from camkit.adapters import (
    timm_efficientnet,
    timm_mobilenetv3,
    timm_resnet,
    torchvision_mobilenet_v2,
    torchvision_mobilenet_v3,
    torchvision_resnet,
)
from camkit.adapters._base import Adapter
from camkit.errors import CamkitError

__all__ = ["Adapter", "adapters", "find_adapter", "register", "unregister"]

_BUILT_IN: tuple[Adapter, ...] = (
    torchvision_resnet.ADAPTER,
    torchvision_mobilenet_v2.ADAPTER,
    torchvision_mobilenet_v3.ADAPTER,
    timm_resnet.ADAPTER,
    timm_efficientnet.ADAPTER,
    timm_mobilenetv3.ADAPTER,
)
_registered: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    """Add an adapter. Adapters registered later are asked first, before the built-in ones.

    Returns the adapter, so that a module can keep it (``ADAPTER = register(Adapter(...))``).
    """
    if not isinstance(adapter, Adapter):
        raise CamkitError(
            f"register() expects a camkit.adapters.Adapter, got {type(adapter).__name__}; "
            "build one with Adapter(family=..., matches=..., layer=..., input_size=...)."
        )
    _registered.insert(0, adapter)
    return adapter


def unregister(adapter: Adapter) -> None:
    """Remove an adapter added with :func:`register` (no error if it is not there)."""
    while adapter in _registered:
        _registered.remove(adapter)


def adapters() -> tuple[Adapter, ...]:
    """Every adapter, in the order they are asked."""
    return (*_registered, *_BUILT_IN)


def find_adapter(model: nn.Module) -> Adapter | None:
    """The first adapter whose ``matches(model)`` is true, or ``None``."""
    for adapter in adapters():
        if adapter.matches(model):
            return adapter
    return None
