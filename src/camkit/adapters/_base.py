"""The adapter record and the small structural tests the family modules share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["Adapter", "class_named", "first_conv_channels", "has_children", "timm_input_size"]


@dataclass(frozen=True)
class Adapter:
    """What camkit knows about one model family.

    Attributes
    ----------
    family
        A short human name, shown in ``camkit.list_layers`` ("torchvision ResNet").
    matches
        ``matches(model) -> bool``: whether ``model`` belongs to the family. Test class
        names and module structure; never import the library that defines the family.
    layer
        ``layer(model) -> str``: the dotted name (as in ``model.named_modules()``) of the
        layer Grad-CAM should use.
    input_size
        ``input_size(model) -> (C, H, W)``: the size the family is normally run at, used for
        a dry forward when no real input is known yet.
    """

    family: str
    matches: Callable[[nn.Module], bool]
    layer: Callable[[nn.Module], str]
    input_size: Callable[[nn.Module], tuple[int, int, int]]


def class_named(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s class, or one of its base classes, is called ``name``."""
    return any(cls.__name__ == name for cls in type(model).__mro__)


def has_children(model: nn.Module, *names: str) -> bool:
    """Whether every name is a direct submodule of ``model``."""
    children = model._modules
    return all(isinstance(children.get(name), nn.Module) for name in names)


def first_conv_channels(model: nn.Module, default: int = 3) -> int:
    """Input channels of the first ``Conv2d`` in definition order (the stem, as a rule).

    A lazy conv that has not run yet (``in_channels == 0``) takes any channel count:
    ``default``. The next conv's count says nothing about the input.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels if module.in_channels > 0 else default
    return default


def timm_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size a timm model records in its ``pretrained_cfg`` (else 224 px)."""
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attribute, None)
        if isinstance(cfg, Mapping):
            size = cfg.get("input_size")
            if (
                isinstance(size, (tuple, list))
                and len(size) == 3
                and all(isinstance(v, int) and v > 0 for v in size)
            ):
                return (size[0], size[1], size[2])
    return (first_conv_channels(model), 224, 224)
