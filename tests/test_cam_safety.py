"""The engine leaves the model as it found it, whatever the context and whatever goes wrong."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import camkit
from camkit import CamkitError, GradCAM, GradCAMPlusPlus


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def test_works_inside_no_grad_and_inference_mode(resnet, images) -> None:
    reference = GradCAM(resnet, "layer4")(images, [1, 2])
    with torch.no_grad():
        inside = GradCAM(resnet, "layer4")(images, [1, 2])
    with torch.inference_mode():
        made_inside = images.clone()
        in_inference = GradCAM(resnet, "layer4")(made_inside, [1, 2])
        assert torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()
    torch.testing.assert_close(inside.maps, reference.maps)
    torch.testing.assert_close(in_inference.maps, reference.maps)


def test_parameters_untouched_and_frozen_model_works(resnet, images) -> None:
    flags = [p.requires_grad for p in resnet.parameters()]
    before = [p.detach().clone() for p in resnet.parameters()]
    GradCAMPlusPlus(resnet, "layer3")(images)
    GradCAM(resnet, "layer3")(images, torch.tensor([[0, 1], [2, 3]]))  # the batched backward
    assert [p.requires_grad for p in resnet.parameters()] == flags
    assert all(p.grad is None for p in resnet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, resnet.parameters()))

    # Gradients a training loop has accumulated are left exactly as they were.
    for p in resnet.parameters():
        p.grad = torch.full_like(p, 0.5)
    try:
        GradCAM(resnet, "layer4")(images, torch.tensor([[0, 1], [2, 3]]))
        assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in resnet.parameters())
    finally:
        resnet.zero_grad(set_to_none=True)

    resnet.requires_grad_(False)
    try:
        frozen = GradCAM(resnet, "layer4")(images, [1, 2])
        assert all(not p.requires_grad for p in resnet.parameters())
    finally:
        resnet.requires_grad_(True)
    torch.testing.assert_close(frozen.maps, GradCAM(resnet, "layer4")(images, [1, 2]).maps)


def test_graph_starts_at_the_target_layer_and_one_forward_serves_all_classes() -> None:
    torch.manual_seed(8)
    model = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    seen: dict[str, tuple[bool, bool]] = {}
    forwards = []

    def record(name: str):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            seen[name] = (torch.is_grad_enabled(), output.requires_grad)

        return hook

    handles = [
        model.layer2.register_forward_hook(record("before")),
        model.fc.register_forward_hook(record("after")),
        model.register_forward_pre_hook(lambda module, inputs: forwards.append(1)),
    ]
    try:
        GradCAMPlusPlus(model, "layer3")(torch.randn(2, 3, 64, 64), torch.tensor([[0, 1, 2]] * 2))
    finally:
        for handle in handles:
            handle.remove()
    assert seen["before"] == (False, False)  # no autograd graph before the target layer
    assert seen["after"] == (True, True)  # the head records one
    assert len(forwards) == 1  # three classes per image, one forward pass


def test_eval_during_call_and_mode_restored(images) -> None:
    torch.manual_seed(2)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    model.train()
    model.layer2.eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    result = GradCAM(model, "layer4")(images)
    GradCAMPlusPlus(model, "layer3")(images, torch.tensor([[0, 1], [2, 3]]))
    assert [m.training for m in model.modules()] == modes
    # eval: no batch statistics used, no running mean / var / num_batches_tracked updated
    assert any(name.endswith("num_batches_tracked") for name in buffers)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    model.eval()
    torch.testing.assert_close(GradCAM(model, "layer4")(images).maps, result.maps)


def test_dropout_is_off_during_a_call_in_train_mode(images) -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout2d(0.5), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 3),
    ).train()
    first = GradCAM(model, "1")(images, [0, 2])
    for _ in range(3):
        torch.testing.assert_close(GradCAM(model, "1")(images, [0, 2]).maps, first.maps)
    assert model.training and model[2].training
    torch.testing.assert_close(GradCAM(model.eval(), "1")(images, [0, 2]).maps, first.maps)


def test_captured_activation_survives_inplace_ops_after_the_layer() -> None:
    # BasicBlock: out = bn2(out); out += identity; relu(out)  -- bn2 is followed in place.
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    seen = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen["bn2"] = output.detach().clone()  # returns None: the model's output is unchanged

    handle = model.layer4[1].bn2.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    result = GradCAM(model, "layer4.1.bn2")(x, 0, relu=False)
    # An independent gradient: the head after bn2 is  relu(bn2 + identity) -> pool -> fc.
    model_grad = _bn2_head_gradient(model, x, seen["bn2"])
    weights = model_grad.mean(dim=(2, 3))
    expected = torch.einsum("nc,nchw->nhw", weights, seen["bn2"])
    torch.testing.assert_close(result.raw, expected, atol=1e-5, rtol=1e-4)


def _bn2_head_gradient(model: nn.Module, x: torch.Tensor, bn2: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        identity = model.layer4[0](model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
    a = bn2.clone().requires_grad_(True)
    out = torch.relu(a + identity)
    logits = model.fc(torch.flatten(model.avgpool(out), 1))
    (grad,) = torch.autograd.grad(logits[0, 0], a)
    return grad


def test_densenet_features_survive_the_inplace_relu_that_follows() -> None:
    # DenseNet.forward: features = self.features(x); out = F.relu(features, inplace=True)
    torch.manual_seed(10)
    model = torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=8, num_classes=4
    ).eval()
    x = torch.randn(2, 3, 48, 40)
    seen = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen["a"] = output.detach().clone()

    handle = model.features.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    a = seen["a"]
    assert (a < 0).any()  # norm5's output: the in-place ReLU would change it
    classes = torch.tensor([1, 3])
    result = GradCAM(model, "features")(x, classes, relu=False)
    # Head: relu -> global mean -> linear, so dS/dA = [A > 0] * W[c] / (h w).
    w = model.classifier.weight.detach()[classes]
    grad = (a > 0).float() * w[:, :, None, None] / (a.shape[2] * a.shape[3])
    expected = torch.einsum("nc,nchw->nhw", grad.mean(dim=(2, 3)), a)
    torch.testing.assert_close(result.raw, expected, atol=1e-6, rtol=1e-5)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.explode = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.explode:
            raise RuntimeError("boom in the middle of forward")
        return self.fc(y.mean(dim=(2, 3)))


def test_exception_mid_forward_leaves_no_hook_and_is_not_swallowed() -> None:
    model = Exploding().train()
    with pytest.raises(RuntimeError, match="boom"):
        GradCAM(model, "conv")(torch.randn(1, 3, 8, 8))
    assert _hook_count(model) == 0
    assert model.training
    assert torch.is_grad_enabled()
    model.explode = False
    assert GradCAM(model, "conv")(torch.randn(1, 3, 8, 8)).maps.shape == (1, 8, 8)
    assert _hook_count(model) == 0


def test_many_calls_leave_no_hooks_and_flat_memory() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )
    cam = GradCAM(model, "1")
    x = torch.randn(2, 3, 12, 12)
    for _ in range(100):
        cam(x)
    gc.collect()
    tensors_before = _live_tensors()
    rss_before = _rss_kib()
    for _ in range(1000):
        cam(x)
    gc.collect()
    assert _hook_count(model) == 0
    assert _live_tensors() <= tensors_before
    # A call's activations, gradients and maps take ~10 KiB: keeping them (or autograd
    # graphs) alive over 1000 calls would add about 10 MiB.
    assert _rss_kib() - rss_before < 4 * 1024


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def _live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() pokes deprecated torch module attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_two_cam_objects_do_not_see_each_other(resnet, images) -> None:
    first = GradCAM(resnet, "layer4")
    second = GradCAMPlusPlus(resnet, "layer3")
    a1 = first(images, [0, 1])
    second(images, [3, 3])
    a2 = first(images, [0, 1])
    torch.testing.assert_close(a1.maps, a2.maps)
    assert _hook_count(resnet) == 0


def test_a_cam_called_from_a_targets_callable_does_not_meet_the_outer_hooks(
    resnet, images
) -> None:
    inner = GradCAMPlusPlus(resnet, "layer4")
    expected_inner = inner(images, [3, 0])
    got = {}

    def targets(out: torch.Tensor) -> torch.Tensor:
        got["inner"] = inner(images, [3, 0])  # the same model, while the outer call runs
        return out[:, 1]

    outer = GradCAM(resnet, "layer4")(images, targets)
    torch.testing.assert_close(outer.maps, GradCAM(resnet, "layer4")(images, 1).maps)
    torch.testing.assert_close(got["inner"].maps, expected_inner.maps)
    assert _hook_count(resnet) == 0


def test_module_running_twice_is_an_error_naming_block(resnet, images) -> None:
    with pytest.raises(CamkitError, match=r"'layer2\.0\.relu'.*2 times.*'layer2\.0'"):
        GradCAM(resnet, "layer2.0.relu")(images)
    assert _hook_count(resnet) == 0


def test_module_running_three_times_reports_the_true_count() -> None:
    # Bottleneck.relu runs three times per block.
    torch.manual_seed(11)
    model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=3
    )
    with pytest.raises(CamkitError, match=r"'layer1\.0\.relu'.*3 times.*'layer1\.0'"):
        GradCAM(model, "layer1.0.relu")(torch.randn(1, 3, 32, 32))
    assert _hook_count(model) == 0


class Recurrent(nn.Module):
    """One block applied three times: no module around its ReLU runs once."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.block(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_shared_module_without_a_single_run_parent_suggests_none() -> None:
    model = Recurrent()
    with pytest.raises(CamkitError, match=r"'block\.1'.*3 times.*No module enclosing") as info:
        GradCAM(model, "block.1")(torch.randn(1, 3, 8, 8))
    assert "'block'" not in str(info.value)  # 'block' runs three times too
    assert _hook_count(model) == 0


def test_layer_that_never_runs_is_an_error() -> None:
    torch.manual_seed(5)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    with pytest.raises(CamkitError, match=r"'aux1\.conv'.*did not run"):
        GradCAM(model, "aux1.conv")(torch.randn(1, 3, 64, 64))
    assert _hook_count(model) == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_scriptmodule_rejected_and_compiled_model_unwrapped(resnet) -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU()))
    with pytest.raises(CamkitError, match="TorchScript"):
        GradCAM(scripted, "0")
    compiled = torch.compile(resnet)
    cam = GradCAM(compiled, "layer4")
    assert cam.model is resnet
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(cam(x, 2).maps, GradCAM(resnet, "layer4")(x, 2).maps)
    assert _hook_count(resnet) == 0


def test_data_parallel_is_explained_through_the_model_it_holds() -> None:
    # The wrapper only forwards to .module; camkit's names, hooks and forward are that
    # module's, and names copied from the wrapper ("module.layer4") are understood.
    torch.manual_seed(3)
    inner = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    wrapped = nn.DataParallel(inner)  # on a CUDA machine this moves inner to cuda:0
    x = torch.randn(2, 3, 64, 64)
    reference = GradCAM(inner, "layer4")(x, [0, 3])
    for layer in (None, "layer4", "module.layer4", wrapped.module.layer4):
        cam = GradCAM(wrapped, layer)
        assert cam.model is inner
        result = cam(x, [0, 3])
        assert result.layer == "layer4"
        torch.testing.assert_close(result.maps, reference.maps)
    assert _hook_count(inner) == 0 and _hook_count(wrapped) == 0
    field = camkit.receptive_field(wrapped, input_size=(3, 64, 64))
    assert field.method == "analytic" and field["layer4"].size == (435, 435)
    erf = camkit.effective_receptive_field(wrapped, "module.layer4", input_size=(3, 64, 64))
    assert erf.layer == "layer4"


def test_reduced_precision_models_give_float32_maps(images) -> None:
    torch.manual_seed(6)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    full = GradCAM(model, "layer4")(images, [0, 1])
    for dtype in (torch.bfloat16, torch.float16):
        low = GradCAM(model.to(dtype), "layer4")(images, [0, 1])  # float32 images are cast
        assert low.maps.dtype == torch.float32 and low.scores.dtype == torch.float32
        keep = ~(full.degenerate | low.degenerate)
        # rank agreement, not equality: a half-precision forward is not the same function
        corr = np.corrcoef(low.maps[keep].flatten().numpy(), full.maps[keep].flatten().numpy())
        assert corr[0, 1] > 0.9
    model.float()


def test_channels_last_inputs_match_contiguous(resnet, images) -> None:
    contiguous = GradCAM(resnet, "layer4")(images, [2, 3])
    channels_last = GradCAM(resnet, "layer4")(
        images.to(memory_format=torch.channels_last), [2, 3]
    )
    torch.testing.assert_close(channels_last.maps, contiguous.maps, atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_cuda_matches_cpu_and_stays_on_device(images) -> None:
    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    cpu = GradCAM(model, "layer4")(images, [1, 4])
    gpu_model = model.cuda()
    gpu = GradCAM(gpu_model, "layer4")(images.cuda(), [1, 4])
    assert gpu.maps.device.type == "cuda" and gpu.raw.device.type == "cuda"
    torch.testing.assert_close(gpu.maps.cpu(), cpu.maps, atol=1e-3, rtol=0)
    moved = GradCAM(gpu_model, "layer4")(images, [1, 4])  # CPU input follows the model
    assert moved.maps.device.type == "cuda"
