"""The three networks of the study, all with the same small-image stem.

torchvision's ImageNet stems divide the input by 32 before the last stage, which turns a
28 px Fashion-MNIST image into a 1x1 map (and a 1x1 Grad-CAM is a constant). All three models
get the same change instead, the usual CIFAR-style stem:

* ResNet-18 and ResNet-10: ``conv1`` becomes a 3x3 convolution with stride 1, no max-pool.
* MobileNetV2: the first convolution has stride 1 and the first stride-2 inverted-residual
  stage (the 24-channel one) runs at stride 1.

Each model then has a total stride of 8 at its target layer: a 28 px or 32 px image gives a
4x4 map. The first convolution takes as many channels as the data has (1 for Fashion-MNIST).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.resnet import BasicBlock, ResNet

MODEL_NAMES = ("resnet18", "mobilenet_v2", "resnet10")
TOTAL_STRIDE = 8

# torchvision's MobileNetV2 setting (expansion t, channels c, repeats n, stride s) with the
# 24-channel stage's stride set to 1.
_MOBILENET_V2_SMALL_INPUT = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str           # for figures and tables
    target_layer: str    # the Grad-CAM layer: the last stage's output, before pooling


SPECS = {
    "resnet18": ModelSpec("resnet18", "ResNet-18", "layer4"),
    "mobilenet_v2": ModelSpec("mobilenet_v2", "MobileNetV2", "features"),
    "resnet10": ModelSpec("resnet10", "ResNet-10", "layer4"),
}


def _resnet(blocks: list[int], in_channels: int, num_classes: int) -> ResNet:
    model = ResNet(BasicBlock, blocks, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _mobilenet_v2(in_channels: int, num_classes: int) -> MobileNetV2:
    model = MobileNetV2(num_classes=num_classes,
                        inverted_residual_setting=_MOBILENET_V2_SMALL_INPUT)
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(
        in_channels, first.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A freshly initialised model (seed torch's generator first for reproducibility)."""
    if name == "resnet18":
        return _resnet([2, 2, 2, 2], in_channels, num_classes)
    if name == "resnet10":
        return _resnet([1, 1, 1, 1], in_channels, num_classes)
    if name == "mobilenet_v2":
        return _mobilenet_v2(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
