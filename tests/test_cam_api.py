"""The call's contract: targets, outputs, shapes, errors, fusion, reshape and overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camkit import CamkitError, GradCAM, GradCAMPlusPlus, overlay


class Tiny(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.top = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.top(self.body(x)).amax(dim=(2, 3)))


class TupleOut(Tiny):
    def forward(self, x: torch.Tensor):  # type: ignore[override]
        logits = super().forward(x)
        return logits, logits.softmax(1)


class DictOut(Tiny):
    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return {"features": x.mean(), "logits": super().forward(x)}


@pytest.fixture()
def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture()
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 16)


def test_result_fields(tiny: Tiny, x: torch.Tensor) -> None:
    r = GradCAM(tiny, "top")(x)
    with torch.no_grad():
        logits = tiny(x)
    assert r.maps.shape == (3, 12, 16) and r.raw.shape == (3, 6, 8)
    assert r.maps.dtype == torch.float32
    assert float(r.maps.min()) >= 0.0 and float(r.maps.max()) <= 1.0
    assert torch.equal(r.targets, logits.argmax(1))
    torch.testing.assert_close(r.scores, logits.gather(1, r.targets[:, None])[:, 0])
    torch.testing.assert_close(r.output, logits)
    assert r.layer == "top" and GradCAM(tiny, tiny.top).layer == "top"
    assert "layer='top'" in repr(r)


@pytest.mark.parametrize(
    "targets",
    [2, [2, 2, 2], np.array([2, 2, 2]), torch.tensor([2, 2, 2]), np.int64(2), torch.tensor(2)],
)
def test_target_forms_agree(tiny: Tiny, x: torch.Tensor, targets) -> None:
    reference = GradCAM(tiny, "top")(x, lambda out: out[:, 2])
    result = GradCAM(tiny, "top")(x, targets)
    assert result.targets.tolist() == [2, 2, 2]
    assert reference.targets is None
    torch.testing.assert_close(result.maps, reference.maps)


def test_callable_targets_with_several_scores(tiny: Tiny, x: torch.Tensor) -> None:
    result = GradCAMPlusPlus(tiny, "top")(x, lambda out: out[:, [0, 4]])
    assert result.maps.shape == (3, 2, 12, 16)
    direct = GradCAMPlusPlus(tiny, "top")(x, torch.tensor([[0, 4]] * 3))
    torch.testing.assert_close(result.maps, direct.maps)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([1, 2], "length 2 but the batch has length 3"),
        ([], "length 0 but the batch has length 3"),
        (torch.zeros(4, 2, dtype=torch.long), "length 4 but the batch has length 3"),
        (7, "out of range"),
        (-1, "out of range"),
        ([0.5, 1.0, 2.0], "integers"),
        (True, "not a bool"),
        (torch.zeros(3, 1, 1, dtype=torch.long), "expected \\(N,\\)"),
        (lambda out: out[None], "must return a \\(N,\\) or \\(N, K\\) tensor"),
        (lambda out: out[:2, 0], "2 scores for a batch of 3"),
        ("cat", "cannot be read as class indices|integers"),
        (torch.zeros(3, 0, dtype=torch.long), "no class to explain"),
        (lambda out: out[:, :0], "no class to explain"),
    ],
)
def test_bad_targets(tiny: Tiny, x: torch.Tensor, targets, message: str) -> None:
    with pytest.raises(CamkitError, match=message):
        GradCAM(tiny, "top")(x, targets)


def test_tuple_and_dict_outputs_need_a_selector(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    expected = GradCAM(Tiny().eval(), "top")(x, 1).maps
    for model, selector, hint in ((TupleOut(), 0, "output=0"), (DictOut(), "logits", "'logits'")):
        torch.manual_seed(0)
        model = type(model)().eval()
        with pytest.raises(CamkitError, match=hint):
            GradCAM(model, "top")(x, 1)
        torch.testing.assert_close(GradCAM(model, "top", output=selector)(x, 1).maps, expected)
    with pytest.raises(CamkitError, match="keys 'features', 'logits'"):
        GradCAM(DictOut().eval(), "top", output="scores")(x, 1)
    torch.testing.assert_close(
        GradCAM(TupleOut().eval(), "top", output=lambda out: out[0])(x, 1).maps.shape,
        expected.shape,
    )


class TwoHeads(nn.Module):
    """Two independent branches, one per output: branch ``a`` does not feed ``out[1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)
        self.fa = nn.Linear(4, 2)
        self.fb = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fa(self.a(x).mean(dim=(2, 3))), self.fb(self.b(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("layers", ["a", ["b", "a"]])
@pytest.mark.parametrize("targets", [0, torch.tensor([[0, 1], [1, 0]])])
def test_layer_off_the_path_to_the_output_is_named(layers, targets) -> None:
    # b's parameters require grad, so out[1] has a graph; it just does not reach 'a'.
    model = TwoHeads().eval()
    with pytest.raises(CamkitError, match=r"do not depend on target layer\(s\) 'a'"):
        GradCAM(model, layers, output=1)(torch.randn(2, 3, 8, 8), targets)


class _NumpySquare(torch.autograd.Function):
    """x ** 2 with a backward in numpy, which the batched (vmap) backward cannot run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.from_numpy(2 * x.numpy() * grad.numpy())


class NumpyHead(Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.top(_NumpySquare.apply(self.body(x)))
        return self.fc(features.amax(dim=(2, 3)))


@pytest.mark.parametrize("cls", [GradCAM, GradCAMPlusPlus])
def test_several_classes_fall_back_to_a_loop_when_batched_backward_fails(cls, x) -> None:
    torch.manual_seed(0)
    model = NumpyHead().eval()
    classes = torch.tensor([[0, 4], [2, 2], [3, 1]])
    both = cls(model, "body")(x, classes)
    for k in range(2):
        single = cls(model, "body")(x, classes[:, k])
        torch.testing.assert_close(both.maps[:, k], single.maps)


class ToFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


def test_integer_images_reach_a_model_that_converts_them(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    tiny = Tiny().eval()
    model = nn.Sequential(ToFloat(), tiny).eval()
    images = (x * 40 + 128).clamp(0, 255).to(torch.uint8)
    result = GradCAM(model, "1.top")(images, [0, 1, 2])
    expected = GradCAM(tiny, "top")(images.float() / 255, [0, 1, 2])
    torch.testing.assert_close(result.maps, expected.maps)


@pytest.mark.parametrize("layer", [None, "top"])  # the automatic layer's dry run, the call
def test_integer_images_a_model_cannot_take_say_how_to_convert(tiny, x, layer) -> None:
    images = (x * 40 + 128).clamp(0, 255).to(torch.uint8)
    tiny.train()
    with pytest.raises(CamkitError, match=r"integer images through unchanged.*float\(\) / 255"):
        GradCAM(tiny, layer)(images)
    assert tiny.training  # the model's mode survives the failed forward


def test_other_errors_on_integer_images_are_left_as_they_are(x) -> None:
    # A model that converts the images itself and then fails on a shape: not a dtype problem.
    broken = nn.Sequential(ToFloat(), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(5, 2)).eval()
    images = (x * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
        GradCAM(broken, "1")(images)
    assert not isinstance(info.value, CamkitError)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 3, 8, 8), dtype=np.float32), "torch.Tensor"),
        (torch.zeros(3, 8, 8), "unsqueeze\\(0\\)"),
        (torch.zeros(0, 3, 8, 8), "empty batch"),
    ],
)
def test_bad_images(tiny: Tiny, images, message: str) -> None:
    with pytest.raises(CamkitError, match=message):
        GradCAM(tiny, "top")(images)


def test_not_a_module() -> None:
    with pytest.raises(CamkitError, match=r"torch\.nn\.Module"):
        GradCAM(lambda t: t)  # type: ignore[arg-type]


def test_several_layers_fuse_by_mean_of_scaled_maps(tiny: Tiny, x: torch.Tensor) -> None:
    both = GradCAM(tiny, ["body", "top"])(x, [0, 1, 2])
    body = GradCAM(tiny, "body")(x, [0, 1, 2])
    top = GradCAM(tiny, "top")(x, [0, 1, 2])
    assert both.layer == "body+top" and list(both.per_layer) == ["body", "top"]
    torch.testing.assert_close(both.per_layer["body"].maps, body.maps)
    torch.testing.assert_close(both.per_layer["top"].maps, top.maps)
    mean = (body.maps + top.maps) / 2
    low = mean.amin(dim=(1, 2), keepdim=True)
    high = mean.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(both.maps, (mean - low) / (high - low))


class TokenNet(nn.Module):
    """A transformer-like model: tokens (N, 1 + h*w, D), class token first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        tokens = self.mix(tokens)
        return self.head(torch.tanh(tokens).mean(1))


def test_reshape_for_token_layers() -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    x = torch.randn(2, 3, 16, 12)
    with pytest.raises(CamkitError, match="reshape="):
        GradCAM(model, "mix")(x)

    def to_map(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 3)

    result = GradCAM(model, "mix", reshape=to_map)(x, [0, 2])
    assert result.raw.shape == (2, 4, 3) and result.maps.shape == (2, 16, 12)
    # Reference: gradients by autograd on the token tensor, then the same rearrangement.
    tokens = model.mix(torch.cat(
        [model.embed(x).flatten(2).transpose(1, 2).mean(1, keepdim=True),
         model.embed(x).flatten(2).transpose(1, 2)], dim=1)).detach().requires_grad_(True)
    logits = model.head(torch.tanh(tokens).mean(1))
    (grad,) = torch.autograd.grad(logits[0, 0] + logits[1, 2], tokens)
    a, g = to_map(tokens.detach()), to_map(grad)
    expected = torch.einsum("nc,nchw->nhw", g.mean(dim=(2, 3)), a).clamp(min=0)
    torch.testing.assert_close(result.raw, expected, atol=1e-6, rtol=1e-5)
    flat = GradCAM(model, "mix", reshape=lambda t: t.reshape(t.shape[0], -1))
    with pytest.raises(CamkitError, match=r"reshape turned .* of shape \(2, 13, \d+\), into "
                                          r"shape \(2, \d+\)"):
        flat(x)


def test_overlay_blends_and_resizes() -> None:
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    cam_map = torch.zeros(10, 15)
    cam_map[5:, :] = 1.0
    out = overlay(image, cam_map, alpha=0.5, colormap="jet")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    # jet: 0 is dark blue, 1 is dark red, so the hot half is redder than the cold half
    assert out[-1, 0, 0] > out[0, 0, 0] and out[0, 0, 2] > out[-1, 0, 2]
    assert np.array_equal(overlay(image, cam_map, alpha=0.0), image)
    gray = overlay(np.zeros((20, 30), dtype=np.float32), cam_map)
    assert gray.shape == (20, 30, 3)
    with pytest.raises(CamkitError, match="colormap"):
        overlay(image, cam_map, colormap="nope")
    with pytest.raises(CamkitError, match="one \\(H, W\\) map"):
        overlay(image, torch.zeros(2, 10, 15))
