"""Adapters and the model zoo: camkit's pick on every torchvision CNN and on timm families.

For each model the heuristic's layer must return the network's final spatial map, found
independently by recording torch function calls (tests/_layers_zoo.py), and where an adapter
matches, the adapter's layer must return that same tensor (same object at the same version;
on real tensors also the same values).
"""

from __future__ import annotations

import pytest
import torch
from _layers_zoo import (
    ALL_TORCHVISION,
    TORCHVISION_CNNS,
    TRANSFORMER_PREFIXES,
    expected_torchvision_adapter,
    forward_with_reference,
    has_attention,
    image,
    meta_torchvision,
    real_torchvision,
    timm_model,
)
from torch import nn

from camkit.adapters import Adapter, adapters, find_adapter, register, unregister
from camkit.errors import CamkitError
from camkit.layers import _heuristic_layer, list_layers, resolve_target_layers


def check_pick(model: nn.Module, size: int, adapter_family: str | None) -> str:
    """Assert the pick is the final map and the adapter agrees; return the heuristic's name."""
    x = image(model, size)
    name, module = _heuristic_layer(model, x)
    assert name and model.get_submodule(name) is module

    adapter = find_adapter(model)
    assert (adapter.family if adapter else None) == adapter_family
    names = [name] + ([adapter.layer(model)] if adapter else [])
    reference, got = forward_with_reference(model, x, names)

    picked = got[name]
    assert picked.tensor is reference, f"{name!r} does not return the final map"
    assert reference.shape[-2] > 1 and reference.shape[-1] > 1

    if adapter is not None:
        adapter_name = adapter.layer(model)
        assert resolve_target_layers(model, None, x)[0][0] == adapter_name
        chosen = got[adapter_name]
        assert chosen.tensor is picked.tensor and chosen.version == picked.version
        if chosen.values is not None:
            assert torch.equal(chosen.values, picked.values)
    return name


# --------------------------------------------------------------------------- torchvision


# One or two members of each torchvision family run by default; the other members (wider or
# deeper variants of the same classes) run with --runslow.
DEFAULT_TORCHVISION = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50",
    "resnext50_32x4d", "wide_resnet50_2", "shufflenet_v2_x1_0", "squeezenet1_0",
    "squeezenet1_1", "vgg11", "vgg16_bn", "vit_b_16", "swin_t", "maxvit_t",
}  # fmt: skip

# Names checked by hand against the architectures' source (what an expert would hook).
EXPECTED_TORCHVISION = {
    "resnet50": "layer4",
    "googlenet": "inception5b",  # not the aux heads, defined later but not run in eval
    "inception_v3": "Mixed_7c",
    "densenet121": "features",  # norm5's output; forward() then applies F.relu in place
    "squeezenet1_1": "classifier.2",  # the class-score map before the global pool
    "mobilenet_v3_small": "features",
    "shufflenet_v2_x1_0": "conv5",
    "regnet_y_400mf": "trunk_output",
    "convnext_tiny": "features",
    "mnasnet0_5": "layers",
    "efficientnet_b0": "features",
    "vgg11": "features",
}


def _by_default(names: tuple[str, ...]) -> list:
    slow = pytest.mark.slow
    return [n if n in DEFAULT_TORCHVISION else pytest.param(n, marks=slow) for n in names]


@pytest.mark.parametrize("name", _by_default(ALL_TORCHVISION))
def test_transformer_exclusion_matches_attention(name: str) -> None:
    # The CNN list excludes models by name prefix; this checks the prefixes pick out exactly
    # the models with self-attention, so a new torchvision transformer cannot slip in.
    assert has_attention(meta_torchvision(name)) == name.startswith(TRANSFORMER_PREFIXES)


@pytest.mark.parametrize("name", _by_default(TORCHVISION_CNNS))
def test_torchvision_pick_is_final_map(name: str) -> None:
    size = 299 if name == "inception_v3" else 224
    picked = check_pick(meta_torchvision(name), size, expected_torchvision_adapter(name))
    if name in EXPECTED_TORCHVISION:
        assert picked == EXPECTED_TORCHVISION[name]


@pytest.mark.parametrize("name", ["vgg11", pytest.param("vgg19_bn", marks=pytest.mark.slow)])
def test_vgg_at_320_skips_adaptive_pool(name: str) -> None:
    # At 320 px the features end at 10x10 and avgpool resamples them to 7x7.
    model = meta_torchvision(name)
    assert check_pick(model, 320, None) == "features"
    table = list_layers(model, input_size=(3, 320, 320))
    assert table["avgpool"].output == (1, 512, 7, 7)
    assert table["features"].output == (1, 512, 10, 10)


@pytest.mark.parametrize(
    "name", ["mobilenet_v2", "mobilenet_v3_small", pytest.param("resnet18", marks=pytest.mark.slow)]
)
def test_torchvision_adapter_same_values(name: str) -> None:
    # The adapter names the last block of features, the heuristic features itself.
    check_pick(real_torchvision(name), 64, expected_torchvision_adapter(name))


# Smallest comfortable sizes on a real CPU: the final map stays above 1x1.
_REAL_SIZE = {"alexnet": 128, "inception_v3": 160}


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_CNNS)
def test_torchvision_real_cpu(name: str) -> None:
    model = real_torchvision(name)
    check_pick(model, _REAL_SIZE.get(name, 64), expected_torchvision_adapter(name))


# --------------------------------------------------------------------------- timm

_slow = pytest.mark.slow
TIMM = [
    ("resnet18", "timm ResNet", "layer4"),
    ("resnet50d", "timm ResNet", "layer4"),
    pytest.param("resnext50_32x4d", "timm ResNet", "layer4", marks=_slow),
    pytest.param("seresnext26d_32x4d", "timm ResNet", "layer4", marks=_slow),
    ("mobilenetv2_100", "timm EfficientNet", "bn2"),
    ("efficientnet_b0", "timm EfficientNet", "bn2"),
    pytest.param("tf_efficientnetv2_b0", "timm EfficientNet", "bn2", marks=_slow),
    pytest.param("mixnet_s", "timm EfficientNet", "bn2", marks=_slow),
    pytest.param("mnasnet_100", "timm EfficientNet", "bn2", marks=_slow),
    ("mobilenetv3_large_100", "timm MobileNetV3", "blocks"),
    ("mobilenetv4_conv_small", "timm MobileNetV3", "blocks"),
    pytest.param("lcnet_050", "timm MobileNetV3", "blocks", marks=_slow),
    pytest.param("densenet121", None, None, marks=_slow),
    ("regnety_002", None, "s4"),  # not final_conv, an nn.Identity after s4
    ("convnext_atto", None, "stages"),  # not norm_pre, an nn.Identity after stages
    pytest.param("ghostnet_100", None, None, marks=_slow),
]


@pytest.mark.parametrize(("name", "family", "expected"), TIMM)
def test_timm_pick_is_final_map(name: str, family: str | None, expected: str | None) -> None:
    picked = check_pick(timm_model(name), 224, family)
    if expected is not None:
        assert picked == expected


@pytest.mark.parametrize(
    ("name", "family"),
    [("lcnet_050", "timm MobileNetV3"), ("mobilenetv2_050", "timm EfficientNet")],
)
def test_timm_adapter_same_values(name: str, family: str) -> None:
    check_pick(timm_model(name, "cpu"), 96, family)


def test_timm_canonical_size_used_for_dry_run() -> None:
    # tf_efficientnetv2_b0 is trained at 192 px; timm records it in pretrained_cfg.
    model = timm_model("tf_efficientnetv2_b0")
    assert list_layers(model).input_shape == (1, 3, 192, 192)


def test_adapter_layer_is_checked_on_the_real_input() -> None:
    # At 32 px (CIFAR images into an ImageNet ResNet) layer4 is 1x1: a CAM with nothing to
    # localise. With the real input known, camkit checks and falls back to the heuristic.
    model = meta_torchvision("resnet18")
    small, large = (torch.empty(2, 3, s, s, device="meta") for s in (32, 64))
    assert resolve_target_layers(model, None) == [("layer4", model.layer4)]  # nothing runs
    assert resolve_target_layers(model, None, large)[0][0] == "layer4"
    assert resolve_target_layers(model, None, small)[0][0] == "layer3"
    table = list_layers(model, input_size=32)
    assert table.picked == "layer3" and table["layer4"].output == (1, 512, 1, 1)
    assert "adapter's 'layer4' gives (1, 512, 1, 1)" in str(table)


def test_adapter_kept_when_the_check_cannot_run() -> None:
    class Exploding(_Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no dry runs here")

    mine = register(Adapter("tiny", lambda m: isinstance(m, Exploding), lambda m: "stem",
                            lambda m: (1, 8, 8)))  # fmt: skip
    try:
        model = Exploding()
        assert resolve_target_layers(model, None, torch.randn(1, 1, 8, 8))[0][0] == "stem"
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    finally:
        unregister(mine)


def test_wrapped_resnet_found_by_the_heuristic() -> None:
    # No adapter sees through nn.Sequential(normalize, resnet); the heuristic finds layer4.
    class Normalize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 0.45) / 0.225

    resnet = meta_torchvision("resnet18")
    wrapped = nn.Sequential(Normalize(), resnet)
    assert find_adapter(wrapped) is None
    assert resolve_target_layers(wrapped, None) == [("1.layer4", resnet.layer4)]


# --------------------------------------------------------------------------- registry


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.stage = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def test_registered_adapter_is_asked_first_and_removable() -> None:
    mine = Adapter(
        family="tiny",
        matches=lambda m: type(m).__name__ == "_Tiny",
        layer=lambda m: "stem",
        input_size=lambda m: (1, 8, 8),
    )
    model = _Tiny()
    assert resolve_target_layers(model, None)[0][0] == "stage"  # heuristic, 224 px default
    register(mine)
    try:
        assert adapters()[0] is mine
        assert resolve_target_layers(model, None)[0][0] == "stem"
        table = list_layers(model)
        assert table.input_shape == (1, 1, 8, 8)
        assert table.picked == "stem" and "adapter: tiny" in str(table)
    finally:
        unregister(mine)
    assert find_adapter(model) is None


def test_adapter_naming_a_missing_layer_falls_back_to_heuristic() -> None:
    broken = register(
        Adapter("broken", lambda m: isinstance(m, _Tiny), lambda m: "nope", lambda m: (1, 8, 8))
    )
    try:
        assert resolve_target_layers(_Tiny(), None)[0][0] == "stage"
    finally:
        unregister(broken)


def test_register_rejects_non_adapter() -> None:
    with pytest.raises(CamkitError, match="Adapter"):
        register(lambda m: "layer4")  # type: ignore[arg-type]


def test_adapters_match_structure_not_just_names() -> None:
    class ResNet(nn.Module):  # a user's class that happens to share the name
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

    assert find_adapter(ResNet()) is None

    # torchvision's ResNet with a grayscale stem: the canonical size follows conv1.
    model = meta_torchvision("resnet18")
    with torch.device("meta"):
        gray = real_resnet_like(model)
    adapter = find_adapter(gray)
    assert adapter is not None and adapter.input_size(gray) == (1, 224, 224)


def real_resnet_like(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return clone
