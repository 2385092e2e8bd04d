"""Grad-CAM and Grad-CAM++ against values computed independently of camkit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from _cam_reference import (
    activations_and_gradients,
    gradcam_raw,
    gradcampp_raw,
    upsample_and_scale,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from camkit import GradCAM, GradCAMPlusPlus

METHODS = {"gradcam": (GradCAM, gradcam_raw), "gradcampp": (GradCAMPlusPlus, gradcampp_raw)}


# ----------------------------------------------------------------- closed forms
class GapLinear(nn.Module):
    """Convolutional features, global average pooling, one linear layer: the CAM setting."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_gap_linear_gradcam_equals_classic_cam() -> None:
    torch.manual_seed(0)
    model = GapLinear()
    x = torch.randn(3, 3, 20, 28)
    classes = [0, 3, 4]
    result = GradCAM(model, "features")(x, classes)

    # Classic CAM (Zhou et al. 2016): map_c = sum_k W[c, k] A_k, no gradients involved.
    with torch.no_grad():
        a = model.features(x).double().numpy()
    w = model.fc.weight.detach().double().numpy()[classes]
    cam = np.maximum(np.einsum("nc,nchw->nhw", w, a), 0.0)
    expected = upsample_and_scale(cam, (20, 28))
    np.testing.assert_allclose(result.maps.numpy(), expected, atol=1e-5)
    # raw differs from CAM only by the 1 / (h * w) of the average pooling.
    np.testing.assert_allclose(result.raw.numpy(), cam / (10 * 14), rtol=1e-4, atol=1e-7)


class HandNet(nn.Module):
    """One 1x1 conv with hand-set weights, then a linear layer over the flattened 2x2 maps.

    The score is s = sum_kij V[k, i, j] A[k, i, j], so dS/dA = V exactly.
    """

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        self.head = nn.Linear(8, 1, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(v.reshape(1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


def test_hand_computed_maps() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # A[0] = x, A[1] = 2x.  V chosen by hand.
    v = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[0.5, 0.5], [-1.0, 1.0]]])
    model = HandNet(v)

    # Grad-CAM: w0 = mean(V0) = 0.5, w1 = mean(V1) = 0.25
    # map = 0.5 x + 0.25 * 2x = x = [[1, 2], [3, 4]]
    gc = GradCAM(model, "conv")(x, 0)
    np.testing.assert_allclose(gc.raw[0].numpy(), [[1.0, 2.0], [3.0, 4.0]], rtol=1e-6)
    np.testing.assert_allclose(gc.maps[0].numpy(), [[0.0, 1 / 3], [2 / 3, 1.0]], atol=1e-6)

    # Grad-CAM++: alpha = 1 / (2 + S_k V) where V != 0; S_0 = 10, S_1 = 20.
    # channel 0, V0 = [1, -1, 2, 0]: positive entries 1 -> 1/12, 2 -> 2/22; w0 = 1/12 + 2/22
    # channel 1, V1 = [.5, .5, -1, 1]: 0.5 -> 0.5/12 twice, 1 -> 1/22; w1 = 1/12 + 1/22
    w0 = 1 / 12 + 2 / 22
    w1 = 1 / 12 + 1 / 22
    expected = (w0 + 2 * w1) * np.array([[1.0, 2.0], [3.0, 4.0]])
    pp = GradCAMPlusPlus(model, "conv")(x, 0)
    np.testing.assert_allclose(pp.raw[0].numpy(), expected, rtol=1e-6)


def test_map_without_positive_value_is_zero_and_flagged() -> None:
    v = -torch.ones(2, 2, 2)  # every channel weight negative, activations positive
    model = HandNet(v)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    for cls in (GradCAM, GradCAMPlusPlus):
        result = cls(model, "conv")(x, 0)
        assert bool(result.degenerate[0])
        assert torch.equal(result.maps, torch.zeros_like(result.maps))
        assert not torch.isnan(result.raw).any()
    signed = GradCAM(model, "conv")(x, 0, relu=False)
    expected = -3.0 * np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(signed.raw[0].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("cls", [GradCAM, GradCAMPlusPlus])
def test_one_by_one_final_map_is_flagged_not_rounding_noise(cls) -> None:
    # resnet18 on 32 x 32 images: layer4 is 1 x 1. Its upsampled map is constant up to
    # float32 rounding, which min-max scaling must not blow up into a [0, 1] pattern.
    torch.manual_seed(4)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    with pytest.warns(UserWarning, match="'layer4' gives a 1 x 1 map") as caught:
        result = cls(model, "layer4")(torch.randn(3, 3, 32, 32))  # top classes
    assert caught[0].filename == __file__  # points at the user's call
    assert result.raw.shape == (3, 1, 1) and (result.raw > 0).any()
    assert result.degenerate.all()
    assert torch.equal(result.maps, torch.zeros_like(result.maps))


# ----------------------------------------------------------------- float64 re-computation
class ConvHead(nn.Module):
    """A head that is not GAP + linear: a conv, then attention-weighted pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.attention = nn.Conv2d(16, 1, 1)
        self.classifier = nn.Conv2d(16, 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        weights = torch.softmax(self.attention(f).flatten(2), dim=-1)  # (N, 1, hw)
        return (self.classifier(f).flatten(2) * weights).sum(-1)


def _models() -> dict[str, tuple[nn.Module, str, tuple[int, int]]]:
    torch.manual_seed(0)
    tv = torchvision.models
    return {
        "resnet18": (tv.resnet18(weights=None), "layer4", (64, 96)),
        "mobilenet_v2": (tv.mobilenet_v2(weights=None), "features", (64, 64)),
        "vgg11_flatten_head": (tv.vgg11(weights=None), "features", (64, 96)),
        "squeezenet_conv_head": (tv.squeezenet1_1(weights=None), "features.12", (80, 64)),
        "attention_pool": (ConvHead(), "features", (40, 56)),
    }


MODELS = _models()
SPATIAL_GRADIENT_HEADS = {"vgg11_flatten_head", "squeezenet_conv_head", "attention_pool"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_float64_reference(name: str, method: str) -> None:
    model, layer, size = MODELS[name]
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(3, 3, *size)
    classes = [1, 5, 2]
    cam_cls, reference = METHODS[method]
    result = cam_cls(model, layer)(x, classes)

    a, g = activations_and_gradients(model, layer, x, classes)
    raw = reference(a, g)
    if name in SPATIAL_GRADIENT_HEADS:  # heads where Grad-CAM is not plain CAM
        assert np.abs(g - g.mean(axis=(2, 3), keepdims=True)).max() > 1e-6
    flat = raw.max(axis=(1, 2)) == raw.min(axis=(1, 2))  # nothing to scale: zeros, flagged
    assert result.degenerate.tolist() == flat.tolist()
    assert not flat.all(), "pick inputs whose maps are informative"
    live = ~flat
    scale = raw[live].max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result.raw.numpy()[live] / scale, raw[live] / scale, atol=2e-4)
    np.testing.assert_allclose(
        result.maps.numpy()[live], upsample_and_scale(raw[live], size), atol=5e-4
    )
    assert not result.maps[torch.from_numpy(flat)].any()
    assert result.targets.tolist() == classes


def test_several_classes_per_image_equal_separate_calls() -> None:
    model, layer, size = MODELS["attention_pool"]
    torch.manual_seed(2)
    x = torch.randn(2, 3, *size)
    classes = torch.tensor([[0, 3, 6], [2, 2, 5]])
    for cls in (GradCAM, GradCAMPlusPlus):
        cam = cls(model, layer)
        both = cam(x, classes)
        assert both.maps.shape == (2, 3, *size)
        assert both.raw.shape[:2] == (2, 3)
        for k in range(3):
            single = cam(x, classes[:, k])
            torch.testing.assert_close(both.maps[:, k], single.maps, atol=1e-5, rtol=0)
            torch.testing.assert_close(both.scores[:, k], single.scores)


def test_logit_scale_invariance_and_no_epsilon() -> None:
    """Tiny logits (1e-9 of the original) give the same Grad-CAM maps, and a Grad-CAM++
    that still follows the exact formula (a 1e-6 epsilon would swamp it)."""
    model, layer, size = MODELS["attention_pool"]
    torch.manual_seed(3)
    x = torch.randn(2, 3, *size)
    scaled = nn.Sequential(model, _Scale(1e-9)).eval()
    gc = GradCAM(model, layer)(x, [1, 4])
    gc_small = GradCAM(scaled, "0." + layer)(x, [1, 4])
    torch.testing.assert_close(gc_small.maps, gc.maps, atol=1e-5, rtol=0)

    pp_small = GradCAMPlusPlus(scaled, "0." + layer)(x, [1, 4])
    a, g = activations_and_gradients(scaled, "0." + layer, x, [1, 4])
    exact = upsample_and_scale(gradcampp_raw(a, g), size)
    with_eps = upsample_and_scale(gradcampp_raw(a, g, eps=1e-6), size)
    np.testing.assert_allclose(pp_small.maps.numpy(), exact, atol=1e-4)
    assert np.abs(exact - with_eps).max() > 0.05  # the epsilon would have changed the map


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


# ----------------------------------------------------------------- properties
_SMALL = ConvHead().eval()


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 4),
    h=st.integers(8, 24),
    w=st.integers(8, 24),
    seed=st.integers(0, 2**16),
    plus=st.booleans(),
)
def test_batch_equals_images_one_by_one_and_permutes(
    n: int, h: int, w: int, seed: int, plus: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=generator)
    classes = torch.randint(0, 7, (n,), generator=generator)
    cam = (GradCAMPlusPlus if plus else GradCAM)(_SMALL, "features")
    batch = cam(x, classes)
    for i in range(n):
        one = cam(x[i : i + 1], classes[i : i + 1])
        torch.testing.assert_close(batch.maps[i], one.maps[0], atol=1e-5, rtol=0)
        assert bool(batch.degenerate[i]) == bool(one.degenerate[0])
    order = torch.randperm(n, generator=generator)
    permuted = cam(x[order], classes[order])
    torch.testing.assert_close(permuted.maps, batch.maps[order], atol=1e-5, rtol=0)


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(1e-12, 1e6), seed=st.integers(0, 2**16))
def test_gradcam_maps_do_not_depend_on_logit_scale(scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 20, generator=generator)
    base = GradCAM(_SMALL, "features")(x, [0, 6])
    scaled_model = nn.Sequential(_SMALL, _Scale(scale)).eval()
    scaled = GradCAM(scaled_model, "0.features")(x, [0, 6])
    torch.testing.assert_close(scaled.maps, base.maps, atol=1e-4, rtol=0)
