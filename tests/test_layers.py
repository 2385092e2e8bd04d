"""Layer resolution: explicit layers, the heuristic on small hand-built models, the dry run's
cleanup, camkit.list_layers, and the errors (each asserting what its message tells the user).

The hand-built models have known structure, so the expected pick and every output shape can
be worked out on paper (conv k3 p1 keeps H, W; stride 2 halves them).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from _layers_zoo import meta_torchvision
from torch import nn

import camkit
from camkit._trace import trace_forward
from camkit.errors import CamkitError
from camkit.layers import (
    _heuristic_layer,
    enclosing_block_name,
    list_layers,
    resolve_target_layers,
)


def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class Block(nn.Module):
    """A residual block with one ReLU module called twice, like torchvision's BasicBlock."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv(ch, ch), conv(ch, ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


class Net(nn.Module):
    """stem (16 -> 8 px) -> stage (two blocks, 8 px) -> global mean -> fc.

    An auxiliary head, defined last, runs only in training mode (as GoogLeNet's).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv(3, 8, 2), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 5)
        self.aux = nn.Sequential(conv(8, 4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.training:
            self.aux(x)
        x = self.stage(x)
        return self.fc(x.mean((2, 3)))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


x16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- explicit layers


def test_explicit_name_module_and_list() -> None:
    model = net()
    assert resolve_target_layers(model, "stage.1") == [("stage.1", model.stage[1])]
    assert resolve_target_layers(model, model.stem[2]) == [("stem.2", model.stem[2])]
    both = resolve_target_layers(model, ["stage.0", model.stage[1]])
    assert both == [("stage.0", model.stage[0]), ("stage.1", model.stage[1])]
    assert resolve_target_layers(model, ("stage",)) == [("stage", model.stage)]


def test_explicit_layer_needs_no_forward() -> None:
    class Exploding(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("no forward expected")

    model = Exploding()
    assert resolve_target_layers(model, "stage")[0][0] == "stage"


def test_shared_module_reachable_under_both_names() -> None:
    model = net()
    model.alias = model.stage  # the same module registered twice
    assert resolve_target_layers(model, "alias") == [("alias", model.stage)]
    assert resolve_target_layers(model, model.stage)[0][1] is model.stage


def test_compiled_model_resolves_through_orig_mod() -> None:
    model = net()
    compiled = torch.compile(model)  # wraps only; nothing is compiled until called
    assert resolve_target_layers(compiled, "stage") == [("stage", model.stage)]
    assert resolve_target_layers(compiled, "_orig_mod.stage") == [("stage", model.stage)]
    assert resolve_target_layers(compiled, model.stage) == [("stage", model.stage)]
    assert resolve_target_layers(compiled, None, x16) == [("stage", model.stage)]


# --------------------------------------------------------------------------- the heuristic


def test_heuristic_picks_outermost_module_of_last_map_and_skips_aux() -> None:
    model = net()
    model.train()
    model.stage[0].eval()  # a mixed-mode model: flags must come back exactly
    flags = [m.training for m in model.modules()]
    stats = model.stem[1].running_mean.clone()
    rng = torch.get_rng_state()

    # stage, stage.1 and stage.1.relu (2nd call) return the same tensor: stage is outermost.
    assert resolve_target_layers(model, None, x16) == [("stage", model.stage)]
    assert resolve_target_layers(model, None) == [("stage", model.stage)]  # 224 px default

    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model.stem[1].running_mean, stats)  # ran in eval: no stat update
    assert torch.equal(torch.get_rng_state(), rng)
    assert hooks_left(model) == 0


def test_trace_tells_in_place_results_apart() -> None:
    # Block.forward: conv2 returns `out`, then `out += x` and the in-place ReLU change it and
    # the block returns that same object: one object, two different values, two keys.
    model = net()
    trace = trace_forward(model, x16[:1])
    key = {c.name: c.key for c in trace.calls if c.key is not None}
    assert key["stage"] == key["stage.1"]  # a Sequential returns its last child's tensor
    assert key["stage.1.conv2"][0] == key["stage.1"][0]  # same object ("out += x; relu_")
    assert key["stage.1.conv2"] != key["stage.1"]  # ... at a later version
    assert trace.records["stage.1.relu"].calls == 2
    assert trace.records["stage"].output == (1, 8, 8, 8)
    assert "aux" in trace.not_run and "aux.0" in trace.not_run


class Tutorial(nn.Module):
    """The PyTorch tutorial pattern: one ReLU and one pool module reused after each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv(3, 6), conv(6, 8)
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


def test_heuristic_steps_back_from_modules_that_run_twice() -> None:
    # The last maps come from the shared pool and ReLU (2 calls each): conv2 is the last map
    # from a module that runs once.
    model = Tutorial()
    assert _heuristic_layer(model, x16)[0] == "conv2"
    table = list_layers(model, input_size=16)
    assert table["pool"].calls == 2 and table["relu"].calls == 2
    assert table.picked == "conv2"
    assert "x2" in str(table)


def test_enclosing_block_name() -> None:
    model = net()
    assert enclosing_block_name(model, "stage.1.relu", x16) == "stage.1"
    assert enclosing_block_name(model, "stage.1.relu") == "stage.1"  # default-size dry run
    assert enclosing_block_name(model, "stage") is None  # only the model itself is above
    model.stage[1] = model.stage[0]  # now stage.0 / stage.1 is one module run twice
    assert enclosing_block_name(model, "stage.1.relu", x16) == "stage"


class PassThrough(nn.Module):
    """stem -> stage -> an ``nn.Identity`` placeholder -> head, as timm's ConvNeXt
    (``norm_pre``) or RegNet (``final_conv``) when the option is off."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 4, 2)
        self.stage = nn.Sequential(conv(4, 4), nn.ReLU())
        self.norm_pre = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm_pre(self.stage(self.stem(x))).mean((2, 3)))


def test_heuristic_prefers_the_maker_over_a_pass_through() -> None:
    # stage, stage.1 and norm_pre return one tensor; norm_pre only hands it on.
    assert _heuristic_layer(PassThrough(), x16)[0] == "stage"
    assert list_layers(PassThrough(), input_size=16).picked == "stage"


def test_pass_through_is_taken_when_the_makers_run_twice() -> None:
    class TutorialOut(Tutorial):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(self.relu(self.conv1(x)))
            x = self.out(self.pool(self.relu(self.conv2(x))))
            return self.fc(x.flatten(1))

    # The shared pool made the last map; the identity returning it is the one that ran once.
    assert _heuristic_layer(TutorialOut(), x16)[0] == "out"


class SEHead(nn.Module):
    """conv -> squeeze-and-excitation (1x1 convs on a 1x1 map) as the last thing before the
    pool, as in MobileNetV3 / EfficientNet blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv(3, 8, 2)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.squeeze(a)))))
        return self.fc((a * scale).mean((2, 3)))


class SEWrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = SEHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_heuristic_ignores_squeeze_excitation_convs() -> None:
    # fc1 / fc2 run last but on 1x1 maps; the product a * scale comes from no module, so the
    # last module-made map is conv's.
    assert _heuristic_layer(SEHead(), x16)[0] == "conv"
    assert _heuristic_layer(SEWrapped(), x16)[0] == "body.conv"


class Resampled(nn.Module):
    """features -> adaptive pool to 7x7 (or an upsample) -> flatten -> linear, like VGG."""

    def __init__(self, resample: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(conv(3, 4, 2), nn.ReLU(), conv(4, 4, 2))
        self.resample = resample
        self.classifier = nn.Linear(4 * 7 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.resample(self.features(x)).flatten(1))


@pytest.mark.parametrize(
    ("resample", "size"),
    [
        (nn.AdaptiveAvgPool2d(7), 40),  # 10x10 -> 7x7, VGG at 320 px
        (nn.AdaptiveMaxPool2d(7), 8),  # 2x2 -> 7x7
        (nn.Upsample(size=(7, 7), mode="bilinear"), 12),  # 3x3 -> 7x7
    ],
)
def test_heuristic_skips_resampling(resample: nn.Module, size: int) -> None:
    model = Resampled(resample)
    x = torch.randn(1, 3, size, size)
    assert _heuristic_layer(model, x)[0] == "features"
    table = list_layers(model, input_size=size)
    assert table["resample"].output == (1, 4, 7, 7) and table["resample"].is_map
    assert table["features"].output == (1, 4, size // 4, size // 4)


class Backbone(nn.Module):
    """Returns its feature map: the model itself is never a candidate."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(3, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_model_returning_a_map_picks_inside_it() -> None:
    assert _heuristic_layer(Backbone(), x16)[0] == "body"


def test_input_moved_to_model_dtype_and_inference_mode_is_fine() -> None:
    model = net().double()
    with torch.inference_mode():
        images = torch.randn(3, 3, 16, 16)  # an inference tensor, float32
        assert resolve_target_layers(model, None, images)[0][0] == "stage"
    assert hooks_left(model) == 0


def test_canonical_size_of_adapter_and_stem_channels() -> None:
    gray = Net()
    gray.stem[0] = conv(1, 8, 2)
    assert list_layers(gray).input_shape == (1, 1, 224, 224)  # channels from the stem
    assert list_layers(gray, input_size=(1, 32, 32)).input_shape == (1, 1, 32, 32)
    assert list_layers(gray, input_size=(20, 24)).input_shape == (1, 1, 20, 24)


def lazy_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), conv(8, 8, 2)).eval()


def test_lazy_model_is_not_shaped_by_a_guessed_size() -> None:
    # A dry run at a guessed size would fix the lazy conv's in_channels for good (and, reading
    # the next conv, to 8): the grayscale model below could no longer run on its own images.
    model = lazy_net()
    for call in (lambda: list_layers(model), lambda: resolve_target_layers(model, None)):
        with pytest.raises(CamkitError, match=r"lazy parameters \('0'\).*input_size"):
            call()
    assert isinstance(model[0], nn.LazyConv2d) and model[0].has_uninitialized_params()
    gray = torch.randn(2, 1, 16, 16)
    assert resolve_target_layers(model, None, gray)[0][0] == "2"  # the real batch: fine
    assert model[0].in_channels == 1
    # (H, W) alone: the lazy stem takes any channel count, so the default 3, not conv 2's 8.
    assert list_layers(lazy_net(), input_size=(16, 16)).input_shape == (1, 3, 16, 16)


# --------------------------------------------------------------------------- the dry run


class Failing(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stage(self.stem(x))  # hooks fire on these first
        raise RuntimeError("boom inside forward")


def test_dry_run_cleans_up_when_forward_raises() -> None:
    model = Failing()
    model.train()
    model.stem.eval()
    flags = [m.training for m in model.modules()]
    with pytest.raises(CamkitError) as info:
        resolve_target_layers(model, None)
    message = str(info.value)
    assert "(1, 3, 224, 224)" in message and "boom inside forward" in message
    assert "input_size=(C, H, W)" in message and "real batch" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert hooks_left(model) == 0
    assert [m.training for m in model.modules()] == flags

    with pytest.raises(CamkitError, match=r"first image of your input \(batch shape \(2, 3"):
        resolve_target_layers(model, None, x16)
    assert hooks_left(model) == 0

    with pytest.raises(RuntimeError, match="boom"):  # the recorder itself: raw error
        trace_forward(model, x16[:1])
    assert hooks_left(model) == 0 and [m.training for m in model.modules()] == flags


def test_dry_run_failure_names_size_for_fixed_size_models() -> None:
    # A CIFAR-style head hard-wired for 32 px fails at the 224 px default.
    model = nn.Sequential(conv(3, 4, 2), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    with pytest.raises(CamkitError, match=r"\(1, 3, 224, 224\).*input_size"):
        resolve_target_layers(model, None)
    assert resolve_target_layers(model, None, torch.randn(2, 3, 32, 32))[0][0] == "0"
    assert list_layers(model, input_size=32).picked == "0"


def test_gradcam_dry_run_uses_the_first_call_shape() -> None:
    # Works only at 32 px: `cam.layer` before a call tries 224 px and says so; the first call
    # resolves on the real batch.
    model = nn.Sequential(conv(3, 4, 2), nn.Flatten(), nn.Linear(4 * 16 * 16, 10)).eval()
    cam = camkit.GradCAM(model)
    with pytest.raises(CamkitError, match=r"\(1, 3, 224, 224\)"):
        cam.layer  # noqa: B018
    result = cam(torch.randn(2, 3, 32, 32))
    assert result.layer == cam.layer == "0" and result.raw.shape == (2, 16, 16)
    assert hooks_left(model) == 0


# --------------------------------------------------------------------------- list_layers


def test_list_layers_table() -> None:
    model = net()
    table = list_layers(model, input_size=(3, 16, 16))
    names = [row.name for row in table]
    # Execution order (first call): parents before children, stage before fc; aux never ran.
    assert names[:4] == ["stem", "stem.0", "stem.1", "stem.2"]
    assert names.index("stage.1.conv2") < names.index("fc")
    assert "aux" not in names and table.not_run[:1] == ("aux",)
    assert [row.index for row in table] == list(range(1, len(table) + 1))
    assert table["stem.0"].output == (1, 8, 8, 8)  # 16 px, stride 2
    assert table["fc"].output == (1, 5) and not table["fc"].is_map
    assert table["stage.0.relu"].calls == 2 and table["stage.0.conv1"].calls == 1
    assert [row.name for row in table if row.picked] == ["stage"] == [table.picked]
    text = str(table)
    assert text.splitlines()[0] == f"Net on input (1, 3, 16, 16): {len(table)} modules ran"
    assert "stage.0.relu" in text and "<- picked" in text and "(1, 8, 8, 8)" in text
    assert "did not run in eval mode: 'aux'" in text
    assert repr(table) == text
    assert camkit.list_layers is list_layers
    assert hooks_left(model) == 0


def test_list_layers_adapter_pick_and_tuple_outputs() -> None:
    table = list_layers(meta_torchvision("resnet18"), input_size=64)
    assert table.picked == "layer4" and "adapter: torchvision ResNet" in str(table)
    assert table["layer4"].output == (1, 512, 2, 2)
    assert table["layer4.1.relu"].calls == 2


def test_list_layers_on_transformer_reports_no_pick() -> None:
    table = list_layers(tiny_vit())
    assert table.picked is None
    assert "picked: none" in str(table)
    assert table["encoder"].output == (1, 50, 16)  # 7x7 patches + class token


@pytest.mark.parametrize("bad", [(0, 16, 16), "224", (3, 16, 16, 1), True, 2.5])
def test_list_layers_bad_input_size(bad: object) -> None:
    with pytest.raises(CamkitError, match=r"input_size must be \(C, H, W\)"):
        list_layers(net(), input_size=bad)


# --------------------------------------------------------------------------- errors


def test_unknown_name_suggests_closest() -> None:
    model = meta_torchvision("resnet18")
    with pytest.raises(CamkitError) as info:
        resolve_target_layers(model, "layer5")
    message = str(info.value)
    assert "'layer5'" in message and "ResNet" in message
    assert "Closest names: 'layer4', 'layer3'" in message
    assert "camkit.list_layers(model)" in message


def test_automatic_layer_follows_the_image_size_of_each_call() -> None:
    # resnet18's layer4 is 1 x 1 at 32 px, so camkit steps back there, and only there.
    torch.manual_seed(0)
    cam = camkit.GradCAM(torchvision.models.resnet18(weights=None, num_classes=3).eval())
    assert cam.layer == "layer4"  # before any call: the canonical 224 px
    for size, layer in [(32, "layer3"), (224, "layer4"), (32, "layer3"), (64, "layer4")]:
        assert cam(torch.randn(1, 3, size, size)).layer == layer
        assert cam.layer == layer  # the latest call's


@pytest.mark.parametrize("method", [camkit.GradCAM, camkit.GradCAMPlusPlus])
def test_unknown_name_fails_at_construction(method) -> None:
    # Not at the first call, which may be far from the line that made the mistake.
    model = meta_torchvision("resnet18")
    with pytest.raises(CamkitError, match="no layer named 'layer5'"):
        method(model, target_layer="layer5")
    assert method(model, target_layer="layer4").layers == ["layer4"]


def test_python_spelling_gets_dotted_name() -> None:
    model = meta_torchvision("mobilenet_v2")
    for spelled in ("features[-1]", "model.features[18]"):
        with pytest.raises(CamkitError, match=r"Did you mean 'features\.18'"):
            resolve_target_layers(model, spelled)
    with pytest.raises(CamkitError, match="No name is close"):
        resolve_target_layers(model, "zzzzzz")


def test_module_outside_the_model() -> None:
    model = net()
    other = copy.deepcopy(model)
    with pytest.raises(CamkitError, match=r"Block that is not a submodule of this Net"):
        resolve_target_layers(model, other.stage[1])
    with pytest.raises(CamkitError, match="is the model itself"):
        resolve_target_layers(model, model)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "names the whole model"),
        ([], "empty sequence"),
        (["stage", "stage"], "lists the layer 'stage' twice"),
        (3, "got int"),
        (["stage", 3.0], "got float"),
    ],
)
def test_bad_target_layer_specs(spec: object, pattern: str) -> None:
    with pytest.raises(CamkitError, match=pattern):
        resolve_target_layers(net(), spec)


def tiny_vit() -> nn.Module:
    vit = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    return vit.VisionTransformer(
        image_size=224, patch_size=32, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    ).eval()


def test_transformer_has_no_final_map() -> None:
    # torchvision's ViT class (vit_b_16 is the same class, larger): conv_proj makes a 4-D map,
    # the patch embedding, and everything after works on (N, tokens, D).
    with pytest.raises(CamkitError) as info:
        resolve_target_layers(tiny_vit(), None)
    message = str(info.value)
    assert "VisionTransformer has no final 4-D feature map" in message
    assert "(1, 3, 224, 224)" in message and "'conv_proj' (1, 16, 7, 7)" in message
    assert "reshape=" in message and "target_layer" in message


@pytest.mark.slow
def test_vit_b_16_has_no_final_map() -> None:
    with pytest.raises(CamkitError, match=r"'conv_proj' .*reshape="):
        resolve_target_layers(meta_torchvision("vit_b_16"), None)


def test_model_without_any_map() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(CamkitError, match=r"no module of Sequential returns a 4-D .*reshape="):
        resolve_target_layers(mlp, None, x16)


def test_map_only_from_modules_run_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv(3, 3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    with pytest.raises(CamkitError, match=r"run more than once.*'conv' \(2 calls\)"):
        resolve_target_layers(Twice(), None, x16)


def test_model_without_parameters() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.nets = [net()]  # a plain list: not registered

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.nets[0](x)

    with pytest.raises(CamkitError, match=r"Holder\) has no parameters.*nn.ModuleList"):
        resolve_target_layers(Holder(), None)


def test_torchscript_model_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but users still have some
        scripted = torch.jit.trace(Backbone().eval(), x16)
    with pytest.raises(CamkitError, match="TorchScript"):
        resolve_target_layers(scripted, None)
    with pytest.raises(CamkitError, match="TorchScript"):
        list_layers(scripted)


def test_not_a_module() -> None:
    with pytest.raises(CamkitError, match=r"instance \(MyNet\(\), not MyNet\)"):
        resolve_target_layers(Net, None)  # type: ignore[arg-type]
    with pytest.raises(CamkitError, match="batched tensor"):
        resolve_target_layers(net(), None, [1, 2, 3])  # type: ignore[arg-type]


def test_gradcam_uses_the_resolved_layer() -> None:
    model = net()
    result = camkit.GradCAM(model)(x16)
    assert result.layer == "stage" and result.raw.shape == (2, 8, 8)
    assert camkit.GradCAM(model, target_layer=model.stage[0]).layer == "stage.0"


@pytest.mark.cuda
def test_dry_run_on_cuda_half_model_with_cpu_input() -> None:
    model = net().cuda().half()
    assert resolve_target_layers(model, None, x16) == [("stage", model.stage)]
    assert list_layers(model, input_size=16)["stage"].output == (1, 8, 8, 8)
    assert hooks_left(model) == 0
