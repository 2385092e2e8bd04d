"""Model zoo helpers for the layer-resolution tests (test_layers.py, test_adapters.py).

The reference for "the final spatial map of the network" is computed here without looking at
modules at all: a ``TorchFunctionMode`` records the output of every torch function the forward
calls (``conv2d``, ``relu_``, ``cat``, ``__iadd__``, ``adaptive_avg_pool2d``, ...), and the final
map is the last recorded output that is a 4-D floating tensor with H, W > 1 and does not come
from an adaptive pooling or interpolation function (which only resample). camkit's heuristic,
which works on module hooks, must return a module whose output is that very tensor object.

Most models are built on the ``meta`` device: parameters take no memory and no time to
initialise, the forward only propagates shapes, and tensor identity (including in-place ops and
their version counters) behaves as on a real device, which is all the pick depends on.
"""

from __future__ import annotations

import functools
import re
import warnings
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

torchvision = pytest.importorskip("torchvision")
tv_models = torchvision.models

# Transformers among torchvision's classifiers: names starting with these. The decision is
# checked, not assumed: test_transformer_exclusion_matches_attention asserts that exactly these
# models contain self-attention modules. ConvNeXt has none (depthwise 7x7 convs + pointwise MLPs
# on an NCHW map) and is treated as the CNN it is.
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")

ALL_TORCHVISION = tuple(tv_models.list_models(module=tv_models))
TORCHVISION_CNNS = tuple(n for n in ALL_TORCHVISION if not n.startswith(TRANSFORMER_PREFIXES))

# What an expert expects the adapters to say for each torchvision family (None: no adapter).
TORCHVISION_ADAPTER = {
    "resnet": "torchvision ResNet",
    "resnext": "torchvision ResNet",
    "wide_resnet": "torchvision ResNet",
    "mobilenet_v2": "torchvision MobileNetV2",
    "mobilenet_v3": "torchvision MobileNetV3",
}


def expected_torchvision_adapter(name: str) -> str | None:
    for prefix, family in TORCHVISION_ADAPTER.items():
        if re.match(rf"{prefix}(\d|_|$)", name):
            return family
    return None


def has_attention(model: nn.Module) -> bool:
    """Whether any submodule is a self-attention layer (by class)."""
    return any(
        isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__
        for m in model.modules()
    )


@contextmanager
def _regnet_params_on_cpu():
    # torchvision's RegNet computes its stage widths with tensors and .tolist(), which a meta
    # tensor cannot do; run only that bookkeeping on the CPU.
    regnet = tv_models.regnet
    original = regnet.BlockParams.__dict__["from_init_params"]

    def on_cpu(cls: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = original


def _quiet_build(builder: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder()


@functools.cache
def meta_torchvision(name: str) -> nn.Module:
    """A torchvision classifier (weights=None) on the meta device, in eval mode. Cached."""
    with _regnet_params_on_cpu(), torch.device("meta"):
        model = _quiet_build(lambda: tv_models.get_model(name, weights=None))
    return model.eval()


def real_torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _quiet_build(lambda: tv_models.get_model(name, weights=None)).eval()


def timm_model(name: str, device: str = "meta") -> nn.Module:
    """A timm model (pretrained=False) in eval mode; meta ones are cached."""
    if device == "meta":
        return _meta_timm(name)
    return _build_timm(name, device)


@functools.cache
def _meta_timm(name: str) -> nn.Module:
    return _build_timm(name, "meta")


def _build_timm(name: str, device: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    with torch.device(device):
        model = _quiet_build(lambda: timm.create_model(name, pretrained=False))
    return model.eval()


class _Recorder(TorchFunctionMode):
    """Keeps (function name, output) for every torch function call, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, Any]] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.outputs.append((getattr(func, "__name__", str(func)), out))
        return out


_RESAMPLING = re.compile(r"adaptive|interpolate|upsample", re.IGNORECASE)


def _final_map(outputs: list[tuple[str, Any]]) -> torch.Tensor:
    for func_name, out in reversed(outputs):
        if (
            isinstance(out, torch.Tensor)
            and out.ndim == 4
            and out.is_floating_point()
            and out.shape[-2] > 1
            and out.shape[-1] > 1
            and not _RESAMPLING.search(func_name)
        ):
            return out
    raise AssertionError("the forward produced no 4-D map")


class Captured:
    """One module's output at the moment its forward returned."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = tensor._version
        self.values = None if tensor.is_meta else tensor.detach().clone()


def forward_with_reference(
    model: nn.Module, x: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, dict[str, Captured]]:
    """One forward: the reference final map and the outputs of the named modules."""
    recorder = _Recorder()
    captured: dict[str, Captured] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            recorder.paused = True
            try:
                captured[name] = Captured(output)
            finally:
                recorder.paused = False

        return hook

    try:
        for name in dict.fromkeys(names):
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
        with torch.no_grad(), recorder:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return _final_map(recorder.outputs), captured


def image(model: nn.Module, size: int, channels: int = 3) -> torch.Tensor:
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, channels, size, size, generator=generator)
    return x.to(parameter.device)
