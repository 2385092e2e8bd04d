"""Tests of :func:`camkit.receptive_field`.

References, independent of the code under test:

* hand-computed values (the Distill recurrences worked out on paper) and the
  published values for torchvision's resnet18, mobilenet_v2 and vgg16;
* an exact oracle: a *linearised* float64 copy of the model (convolution and
  linear weights a positive constant, biases zero, every other parameter 1,
  activations and normalisations the identity, max-pooling replaced by
  average pooling) has no cancellation and no gating, so the input pixels
  where the gradient of one output cell (summed over channels) is non-zero
  are exactly the pixels that cell depends on. Its span must lie inside the
  clipped box, and every side of the unclipped box that falls inside the
  image must be a side of the span (a side outside the image is padding,
  which has no gradient). Squeeze-and-excitation gates (sigmoid,
  hard-sigmoid) become a positive rescaling with a non-vanishing derivative
  (a product of identities would overflow float64); with ``gates="detach"``
  they are cut from the graph, which leaves the local path only, to be
  compared with ``box(..., local=True)``.
* PyTorch's own resize kernels, whose gradient gives the support of each
  output cell directly.

The oracle runs on torchvision CNN classifiers (all of them behind
``--runslow``, one per family by default) and on random graphs drawn by
hypothesis. Tall, narrow inputs (e.g. 560 x 32) make the deepest layers'
windows fit inside the image along one axis at a small cost; the field of
one axis does not depend on the other's size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import time
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import camkit
from camkit import Box, CamkitError, ReceptiveField, receptive_field

torchvision = pytest.importorskip("torchvision")
from torchvision import models as tvm  # noqa: E402

# --------------------------------------------------------------------------
# the oracle


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


_REAL_MAX_POOL = F.max_pool2d


def _avg_instead_of_max(input, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, return_indices=False):
    k = _pair(kernel_size)
    s = k if stride is None or stride == [] else _pair(stride)
    p, d = _pair(padding), _pair(dilation)
    if d == (1, 1):
        out = F.avg_pool2d(input, k, s, p, ceil_mode, True)
    else:  # average over the same dilated windows, cut to max-pooling's output size
        ref = _REAL_MAX_POOL(input.detach().to("meta"), k, s, p, d, ceil_mode)
        c = input.shape[1]
        w = input.new_ones((c, 1, *k)) / (k[0] * k[1])
        x = F.pad(input, (p[1], p[1] + s[1] + d[1] * k[1], p[0], p[0] + s[0] + d[0] * k[0]))
        out = F.conv2d(x, w, None, s, 0, d, c)[..., : ref.shape[-2], : ref.shape[-1]]
    return (out, torch.zeros_like(out, dtype=torch.long)) if return_indices else out


def _adaptive_avg_instead_of_max(input, output_size, return_indices=False):
    out = F.adaptive_avg_pool2d(input, output_size)
    return (out, torch.zeros_like(out, dtype=torch.long)) if return_indices else out


def _identity(x, *args, **kwargs):
    return x


def _rescaled_gate(x, *args, **kwargs):
    return x / x.detach().abs().amax().clamp_min(1e-300)


def _detached_gate(x, *args, **kwargs):
    return torch.ones_like(x).detach()


_IDENTITY_FUNCTIONAL = (
    "relu relu_ relu6 hardtanh hardtanh_ hardswish silu gelu elu leaky_relu mish softplus tanh "
    "batch_norm layer_norm group_norm instance_norm dropout dropout2d"
).split()


@contextlib.contextmanager
def _linearised_functions(gates: str = "keep"):
    """Activations and norms become identities, max pooling average pooling."""
    gate = _rescaled_gate if gates == "keep" else _detached_gate
    saved = []

    def patch(obj, name, fn):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, fn)

    try:
        for name in _IDENTITY_FUNCTIONAL:
            patch(F, name, _identity)
        for name in ("relu", "relu_", "tanh"):
            patch(torch, name, _identity)
        patch(torch, "sigmoid", gate)
        patch(F, "sigmoid", gate)
        patch(F, "hardsigmoid", gate)
        patch(F, "max_pool2d", _avg_instead_of_max)
        patch(F, "adaptive_max_pool2d", _adaptive_avg_instead_of_max)
        yield
    finally:
        for obj, name, fn in reversed(saved):
            setattr(obj, name, fn)


def _linearised(model: nn.Module, skip: frozenset = frozenset()) -> nn.Module:
    """A float64 copy with positive constant weights (from a real or meta model).

    Modules named in ``skip`` stay on the meta device: the oracle stops the
    forward before they run.
    """
    m = copy.deepcopy(model).eval()
    for mod_name, mod in m.named_modules():
        if mod_name in skip:
            continue
        weighted = isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
        for name, p in list(mod.named_parameters(recurse=False)):
            new = torch.empty(p.shape, dtype=torch.float64)
            if weighted and name == "weight":
                new.fill_(1.0 / p[0].numel())
            elif weighted and name == "bias":
                new.zero_()
            else:
                new.fill_(1.0)
            setattr(mod, name, nn.Parameter(new, requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            new = torch.ones(b.shape, dtype=torch.float64) if b.is_floating_point() else (
                torch.zeros(b.shape, dtype=b.dtype))
            setattr(mod, name, new)
    return m


def _not_reached(model: nn.Module, rf: ReceptiveField, last: str) -> frozenset:
    """Modules whose first call comes after ``last`` in the execution order.

    Modules never called keep real weights: a ``forward`` may use their
    parameters functionally (``F.conv2d(x, self.conv.weight)``).
    """
    modules = dict(model.named_modules())
    first: dict[str, int] = {}
    for k, key in enumerate(rf):
        base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
        for name in (key, base):
            if name in modules:
                first.setdefault(name, k)
    stop = first[last]
    return frozenset(n for n, m in modules.items()
                     if n and not any(True for _ in m.children()) and first.get(n, -1) > stop)


class _Stop(Exception):
    pass


def _gradient_spans(model: nn.Module, input_size, requests: dict, gates: str = "keep",
                    dims: dict | None = None, skip: frozenset = frozenset()):
    """{(module name, cell): (top, left, bottom, right) or None} from input gradients.

    ``requests`` maps module names (in execution order) to cells; ``None`` as a
    cell means the whole output. ``dims`` gives each output's row and column dims
    (default 2 and 3). The forward stops after the last request. Outputs that do
    not depend on the input (a gate cut off by ``gates="detach"``) are left out.
    """
    lin = _linearised(model, skip)
    modules = dict(lin.named_modules())
    captured = {}
    handles = [modules[n].register_forward_hook(
        lambda m, a, o, n=n: captured.__setitem__(n, o)) for n in requests]
    last = list(requests)[-1]

    def stop(m, a, o):
        raise _Stop

    handles.append(modules[last].register_forward_hook(stop))
    x = torch.ones((1, *input_size), dtype=torch.float64, requires_grad=True)
    try:
        with _linearised_functions(gates), contextlib.suppress(_Stop):
            lin(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, cells in requests.items():
        y = captured[name]
        if not y.requires_grad:
            continue
        rows_dim, cols_dim = (dims or {}).get(name, (2, 3))
        for cell in cells:
            target = y
            if cell is not None:  # select the higher dim first so the other stays put
                picks = [(d, c) for d, c in zip((rows_dim, cols_dim), cell) if d is not None]
                for d, c in sorted(picks, reverse=True):
                    target = target.select(d, c)
            target = target.sum()
            (g,) = torch.autograd.grad(target, x, retain_graph=True)
            mask = g[0].abs().sum(0) > 0
            if not bool(mask.any()):
                out[(name, cell)] = None
                continue
            rows = torch.nonzero(mask.any(1)).flatten()
            cols = torch.nonzero(mask.any(0)).flatten()
            out[(name, cell)] = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1,
                                 int(cols[-1]) + 1)
    return out


def _mismatches(entry, cell, span, image, local=False) -> list[str]:
    """Compare one cell's box with its gradient span; [] when they agree."""
    i, j = (0, 0) if cell is None else cell
    box = entry.box(i, j, clip=False, local=local)
    clipped = entry.box(i, j, local=local)
    where = f"{entry.name} cell {cell}: box {tuple(box)} span {span}"
    if span is None:  # only a cell that sees nothing but padding has no gradient
        return [] if clipped.height == 0 or clipped.width == 0 else [f"{where}: no gradient"]
    top, left, bottom, right = span
    problems = []
    if not (clipped.top <= top and clipped.left <= left and bottom <= clipped.bottom
            and right <= clipped.right):
        problems.append(f"{where}: span outside the clipped box {tuple(clipped)}")
    h, w = image
    if 0 <= box.top < h and top != box.top:
        problems.append(f"{where}: top")
    if 0 <= box.left < w and left != box.left:
        problems.append(f"{where}: left")
    if 0 < box.bottom <= h and bottom != box.bottom:
        problems.append(f"{where}: bottom")
    if 0 < box.right <= w and right != box.right:
        problems.append(f"{where}: right")
    return problems


def _check_against_oracle(model, input_size, names, cells_per_layer=None, gates="keep",
                          local=False):
    rf = receptive_field(model, input_size, method="analytic")
    requests = {}
    for name in names:
        e = rf[name]
        h, w = e.output_size
        if cells_per_layer is not None:
            cells = cells_per_layer(e)
        else:
            cells = sorted({(0, 0), ((h - 1) // 2, (w - 1) // 2), (h - 1, w - 1)})
        requests[name] = cells
    spans = _gradient_spans(model, input_size, requests, gates=gates,
                            dims={name: rf[name].dims for name in names},
                            skip=_not_reached(model, rf, names[-1]))
    problems = []
    for (name, cell), span in spans.items():
        problems += _mismatches(rf[name], cell, span, input_size[1:], local=local)
    assert not problems, "\n".join(problems[:20])
    return rf, spans


# --------------------------------------------------------------------------
# torchvision models

# Classifiers built on attention are left out of the CNN sweep: ViT and Swin
# and MaxViT mix every token (or window) with every other, so a cell has no
# sliding window to check. test_non_cnn_families_use_attention confirms the
# split by looking for attention in each traced graph.
NON_CNN_PREFIXES = ("vit_", "swin_", "maxvit_")
ALL_MODELS = tvm.list_models(module=tvm)
CNN_MODELS = [n for n in ALL_MODELS if not n.startswith(NON_CNN_PREFIXES)]
# one per family for the default run
FAMILY_MODELS = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
    "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf",
    "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11_bn",
    "wide_resnet50_2",
]


def _build(name: str) -> nn.Module:
    """Build a torchvision model on the meta device (no weights, no init time)."""
    import torchvision.models.regnet as regnet

    original = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):  # it computes widths with torch ops
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tvm.get_model(name, weights=None)
    finally:
        regnet.BlockParams.from_init_params = classmethod(original)


def _module_layers(model: nn.Module, rf: ReceptiveField, count: int) -> list[str]:
    """About ``count`` module names spread over the execution order, up to the head."""
    modules = dict(model.named_modules())
    names = []
    for name in rf:
        if name in modules:
            if any(isinstance(m, nn.Linear) and m.weight.numel() > 4_000_000
                   for m in modules[name].modules()):
                break  # a global head too big to copy in float64 for every test
            names.append(name)
    local = [n for n in names if not rf[n].is_global]
    deepest = local[-1] if local else names[-1]
    step = max(1, len(names) // count)
    picked = dict.fromkeys([*names[::step], deepest, names[-1]])
    order = {n: k for k, n in enumerate(names)}
    return sorted(picked, key=order.__getitem__)


def _tall_size(model: nn.Module, name: str, vertical: bool,
               max_side: int) -> tuple[int, int, int]:
    """An input long enough along one axis for the deepest window to fit inside."""
    square = receptive_field(model, (3, 224, 224), method="analytic")
    reach = max(e.size[0] + 2 * int(e.stride[0]) for e in square.values() if e.stride[0])
    long_side = min(max(reach + 8, 96), max_side)
    short = 80 if name == "inception_v3" else 64
    return (3, long_side, short) if vertical else (3, short, long_side)


def _middle_cells(entry) -> list[tuple[int, int]]:
    h, w = entry.output_size
    return sorted({(0, 0), ((h - 1) // 2, (w - 1) // 2), (h - 1, w - 1)})


def _torchvision_oracle(name: str, layers: int, size: tuple[int, int, int]) -> None:
    model = _build(name)
    rf = receptive_field(model, size, method="analytic")
    names = _module_layers(model, rf, layers)
    _check_against_oracle(model, size, names, _middle_cells)
    # With squeeze-and-excitation every layer after the first gate is global; with
    # the gates cut off, the local windows must match exactly as well.
    if any(e.box(0, 0, clip=False, local=True) != e.box(0, 0, clip=False) and e.stride[0]
           for e in rf.values()):
        _check_against_oracle(model, size, names, _middle_cells, gates="detach", local=True)


def _small_size(name: str) -> tuple[int, int, int]:
    # the smallest inputs the family accepts with a few cells left in its last stage
    if name == "inception_v3":
        return (3, 80, 80)
    if name.startswith(("convnext", "densenet", "efficientnet_v2")):
        return (3, 40, 48)
    return (3, 64, 64)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_torchvision_family_matches_gradient_oracle(name):
    _torchvision_oracle(name, layers=4, size=_small_size(name))


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "googlenet"])
def test_deepest_windows_fit_a_tall_input_exactly(name):
    model = _build(name)
    _torchvision_oracle(name, layers=3, size=_tall_size(model, name, name != "googlenet", 700))


@pytest.mark.slow
@pytest.mark.parametrize("name", CNN_MODELS)
def test_every_torchvision_cnn_matches_gradient_oracle(name):
    model = _build(name)
    vertical = CNN_MODELS.index(name) % 2 == 0
    _torchvision_oracle(name, layers=8, size=_small_size(name))
    _torchvision_oracle(name, layers=8, size=_tall_size(model, name, vertical, 2400))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_non_cnn_families_use_attention(name):
    model = _build(name)
    graph = torch.fx.Tracer().trace(model.eval())
    attention = False
    for node in graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        # torchvision's Swin calls its attention through a function that torch.fx keeps whole
        # (``shifted_window_attention``), so any traced function named for attention counts.
        if "attention" in target or target in ("matmul", "bmm", "einsum", "baddbmm"):
            attention = True
        if node.op == "call_module" and isinstance(
            model.get_submodule(node.target), nn.MultiheadAttention
        ):
            attention = True
    assert attention == name.startswith(NON_CNN_PREFIXES)


def test_resnet18_known_values():
    rf = receptive_field(_build("resnet18"), input_size=(3, 224, 224))
    assert rf.method == "analytic"
    expected = {"layer1": (43, 4, 21), "layer2": (99, 8, 49), "layer3": (211, 16, 105),
                "layer4": (435, 32, 217)}
    for name, (size, stride, padding) in expected.items():
        e = rf[name]
        assert (e.size, e.stride, e.padding) == ((size,) * 2, (stride,) * 2, (padding,) * 2)
    assert rf["layer4"].output_size == (7, 7)


def test_mobilenet_v2_and_vgg16_known_values():
    mv2 = receptive_field(_build("mobilenet_v2"), input_size=(3, 224, 224))["features.18"]
    assert (mv2.size, mv2.stride, mv2.padding) == ((491, 491), (32, 32), (245, 245))
    vgg = receptive_field(_build("vgg16"), input_size=(3, 224, 224))["features"]
    assert (vgg.size, vgg.stride, vgg.padding) == ((212, 212), (32, 32), (90, 90))


def test_resnet18_interior_cells_match_oracle_exactly():
    # 448 rows: every side of layer4's middle cell lies inside the image.
    model = _build("resnet18")
    rf, spans = _check_against_oracle(
        model, (3, 448, 40), ["layer3", "layer4"], lambda e: [(e.output_size[0] // 2, 0)]
    )
    i = rf["layer4"].output_size[0] // 2
    assert spans[("layer4", (i, 0))][0] == 32 * i - 217
    assert spans[("layer4", (i, 0))][2] == 32 * i - 217 + 435


def test_table_for_deep_models_is_fast():
    # A meta model cannot run a forward, and 1024 x 1024 would make one slow:
    # the analytic path only does index arithmetic.
    for name in ("resnet152", "densenet201"):
        model = _build(name)
        start = time.process_time()
        rf = receptive_field(model, input_size=(3, 1024, 1024))
        elapsed = time.process_time() - start
        assert rf.method == "analytic"
        assert elapsed < 3.0, f"{name}: {elapsed:.2f} s of CPU time"


# --------------------------------------------------------------------------
# hand-computed fields


def _single(module: nn.Module, size=(1, 32, 32)) -> camkit.LayerField:
    rf = receptive_field(nn.Sequential(module), input_size=size, method="analytic")
    return rf["0"]


def test_dilated_non_square_conv():
    # rows: k=7, s=2, p=3, d=1 -> size 7, stride 2, padding 3
    # cols: k=3, s=1, p=0, d=2 -> size 2*(3-1)+1 = 5, stride 1, padding 0
    e = _single(nn.Conv2d(1, 1, (7, 3), stride=(2, 1), padding=(3, 0), dilation=(1, 2)))
    assert e.size == (7, 5) and e.stride == (2, 1) and e.padding == (3, 0)
    assert e.box(2, 4, clip=False) == Box(2 * 2 - 3, 4, 2 * 2 - 3 + 7, 4 + 5)
    assert e.output_size == (16, 28)


def test_same_padding_with_even_kernel_is_asymmetric():
    # total padding 3 for k=4: PyTorch puts 1 before and 2 after
    e = _single(nn.Conv2d(1, 1, (4, 5), padding="same"))
    assert e.size == (4, 5) and e.padding == (1, 2) and e.stride == (1, 1)
    assert e.output_size == (32, 32)


def test_dilation_shifts_the_start_of_a_chain():
    # conv3x3 d=2 p=2 then conv3x3 s=2 p=1 then conv3x3 d=3 p=3:
    # r: 1 -> 5 -> 5+1*2 = 7 -> 7 + 2*6 = 19 ; S: 1 -> 1 -> 2 -> 2 ; P: 0 -> 2 -> 3 -> 3 + 2*3 = 9
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=2, dilation=2),
                          nn.Conv2d(1, 1, 3, stride=2, padding=1),
                          nn.Conv2d(1, 1, 3, padding=3, dilation=3))
    rf = receptive_field(model, input_size=(1, 40, 40))
    assert [rf[str(k)].size[0] for k in range(3)] == [5, 7, 19]
    assert [rf[str(k)].padding[0] for k in range(3)] == [2, 3, 9]
    assert rf["2"].stride == (2, 2)
    _check_against_oracle(model, (1, 40, 40), ["0", "1", "2"])


def test_ceil_mode_pooling_sizes_follow_pytorch():
    for n in range(5, 13):
        pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        e = _single(pool, (1, n, n + 1))
        real = pool(torch.zeros(1, 1, n, n + 1)).shape[-2:]
        assert e.output_size == tuple(real)
        assert e.size == (3, 3) and e.stride == (2, 2) and e.padding == (1, 1)
    _check_against_oracle(nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True)), (1, 10, 11),
                          ["0"], lambda e: [(i, i) for i in range(min(e.output_size))])


def test_elementwise_layers_keep_the_field():
    model = nn.Sequential(nn.Conv2d(1, 2, 5, stride=2), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.Dropout(0.5), nn.SiLU(), nn.GroupNorm(1, 2))
    rf = receptive_field(model, input_size=(1, 20, 20))
    triples = {(rf[str(k)].size, rf[str(k)].stride, rf[str(k)].padding) for k in range(6)}
    assert triples == {((5, 5), (2, 2), (0, 0))}


def test_boxes_are_clipped_and_exclusive():
    e = _single(nn.Conv2d(1, 1, 5, stride=3, padding=2), (1, 10, 12))
    # cell i covers rows 3i-2 .. 3i+2
    assert e.box(0, 0, clip=False) == Box(-2, -2, 3, 3)
    assert e.box(0, 0) == Box(0, 0, 3, 3)
    assert e.box(3, 3) == Box(7, 7, 10, 12)
    assert e.box(3, 3, clip=False) == Box(7, 7, 12, 12)
    assert e.box(1, 2).height == 5 and e.box(1, 2).width == 5
    assert e.center(1, 2) == (3.0, 6.0)
    with pytest.raises(CamkitError, match="outside the output"):
        e.box(4, 0)
    with pytest.raises(CamkitError, match="outside the output"):
        e.box(-1, 0)


# --------------------------------------------------------------------------
# graph semantics: names, scopes, functional ops


class _Residual(nn.Module):
    """A block whose shortcut conv runs last: its output is the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.shortcut = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        out = self.conv(x)
        sc = self.shortcut(x)
        return out + sc


def test_module_entry_is_its_output_not_its_last_submodule():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), _Residual())
    rf = receptive_field(model, input_size=(1, 16, 16))
    assert rf["1.shortcut"].size == (3, 3)
    assert rf["1"].size == (5, 5)
    assert rf["1"].node == rf["1.add"].node == "1.add"  # the same field, named as asked
    assert (rf["1"].name, rf["1.add"].name) == ("1", "1.add")
    assert str(rf).index("1.shortcut") < str(rf).index("1.add")


def test_resnet_names_follow_torchvision_node_names():
    from torchvision.models.feature_extraction import get_graph_node_names

    model = tvm.resnet18()
    rf = receptive_field(model, input_size=(3, 64, 64))
    _, eval_names = get_graph_node_names(model)
    repeated_first_calls = {n for n in eval_names if f"{n}_1" in eval_names}
    missing = [n for n in eval_names if n not in rf and n not in repeated_first_calls
               and n not in ("x",)]
    assert missing == []
    # a module called twice: its name means its last call, name_0 its first
    assert rf["layer1.0.relu"].node == rf["layer1.0"].node == "layer1.0.relu_1"
    assert rf["layer1.0.relu_0"].size == (19, 19)
    assert rf["layer1.0.relu"].size == (27, 27)
    assert rf["layer1.0.add"].size == (27, 27)


class _Functional(nn.Module):
    """Every functional form the issue names, as Inception and DenseNet call them."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 2, 3, 3))
        self.w2 = nn.Parameter(torch.randn(3, 3, 3, 3))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.conv2d(x, self.w1, stride=1, padding=1)
        a = F.max_pool2d(x, kernel_size=3, stride=2)
        b = F.avg_pool2d(x, 3, stride=2)
        c = torch.add(a, b)
        c += F.conv2d(a, self.w2, padding=1)
        d = operator.add(c, F.relu(b))
        e = torch.cat([d, F.max_pool2d(b, 3, 1, 1, ceil_mode=True)], 1)
        f = F.adaptive_avg_pool2d(e, (1, 1))
        return self.fc(torch.flatten(f, 1))


def test_functional_ops_by_traced_names_and_oracle():
    model = _Functional()
    rf = receptive_field(model, input_size=(2, 21, 19), method="analytic")
    for name in ("conv2d", "max_pool2d", "avg_pool2d", "add", "conv2d_1", "add_1", "add_2",
                 "relu", "cat", "adaptive_avg_pool2d", "flatten", "fc"):
        assert name in rf, name
    # conv 3 (p1): r3 S1 P1; pools 3 s2: r5 S2 P1; conv on a: r5+2*2=9 P1+2=3
    assert (rf["max_pool2d"].size, rf["max_pool2d"].stride, rf["max_pool2d"].padding) == (
        (5, 5), (2, 2), (1, 1))
    assert rf["add_1"].size == (9, 9) and rf["add_1"].padding == (3, 3)
    # max-pool 3 s1 p1 on b: r 5+2*2 = 9, P 1 + 2 = 3: the union with d keeps 9 / 3
    assert rf["cat"].size == (9, 9) and rf["cat"].padding == (3, 3)
    assert rf["adaptive_avg_pool2d"].is_global and rf["fc"].is_global
    assert rf["fc"].box(0, 0) == Box(0, 0, 21, 19)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(x)

    # the oracle needs modules: the whole model is one
    spans = _gradient_spans(Wrapped().double(), (2, 21, 19), {"body": [None]})
    assert spans[("body", None)] == (0, 0, 21, 19)


class _Gated(nn.Module):
    """Squeeze-and-excitation: a global gate multiplies a local path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(self.pool(y)))
        return self.conv2(y * gate)


def test_gate_makes_the_field_global_but_keeps_the_local_window():
    model = _Gated()
    rf = receptive_field(model, input_size=(1, 30, 30))
    e = rf["conv2"]
    assert e.is_global
    assert (e.size, e.stride, e.padding) == ((9, 9), (2, 2), (4, 4))
    assert e.box(7, 7, local=True) == Box(10, 10, 19, 19)
    assert e.box(7, 7) == Box(0, 0, 30, 30)
    assert not rf["conv"].is_global
    names = ["conv", "pool", "conv2"]
    _check_against_oracle(model, (1, 30, 30), names)
    _check_against_oracle(model, (1, 30, 30), ["conv", "conv2"], gates="detach", local=True)


def test_adaptive_pooling_is_global_only_at_one_cell():
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.AdaptiveAvgPool2d((5, 1)))
    rf = receptive_field(model, input_size=(1, 13, 11))
    e = rf["1"]
    assert e.output_size == (5, 1) and e.is_global
    # rows: bins of 11 cells into 5 -> bin i spans floor(11i/5) .. ceil(11(i+1)/5)-1
    assert [e.box(i, 0, clip=False)[::2] for i in range(5)] == [
        (0, 5), (2, 7), (4, 9), (6, 11), (8, 13)]
    assert e.stride[0] == Fraction(11, 5)
    _check_against_oracle(model, (1, 13, 11), ["1"], lambda e: [(i, 0) for i in range(5)])


# --------------------------------------------------------------------------
# resizes and transposed convolutions


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic"])
@pytest.mark.parametrize("factor", [2, 4, 0.5])
def test_resize_support_matches_pytorch_kernel(mode, factor):
    class Resize(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=factor, mode=mode)

    n = 16
    model = nn.Sequential(Resize())
    rf = receptive_field(model, input_size=(1, n, n + 4), method="analytic")
    e = rf["0"]
    x = torch.rand(1, 1, n, n + 4, dtype=torch.float64, requires_grad=True)
    y = model(x)
    assert e.output_size == tuple(y.shape[-2:])
    h, w = e.output_size
    for i in range(h):
        (g,) = torch.autograd.grad(y[0, 0, i, min(i, w - 1)], x)
        rows = torch.nonzero(g[0, 0].abs().sum(1)).flatten()
        box = e.box(i, min(i, w - 1), clip=False)
        if 0 <= box.top and box.bottom <= n:  # cells whose window is inside the image
            assert (int(rows[0]), int(rows[-1]) + 1) == (box.top, box.bottom), (i, box)
        else:
            clipped = e.box(i, min(i, w - 1))
            assert clipped.top <= int(rows[0]) and int(rows[-1]) < clipped.bottom
    if factor == 2:
        assert e.stride == (Fraction(1, 2), Fraction(1, 2))


def test_upsample_then_conv_merges_with_the_skip_path():
    class UNetish(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 2, 3, stride=2, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.skip = nn.Conv2d(1, 2, 3, padding=1)
            self.out = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.out(self.up(self.down(x)) + self.skip(x))

    model = UNetish()
    rf = receptive_field(model, input_size=(1, 24, 20), method="analytic")
    # down: r3 S2 P1. Nearest x2: cell i copies down cell i // 2, so even and odd
    # cells see different windows: [2(i//2) - 1, 2(i//2) + 1].
    up = rf["up"]
    assert up.stride == (1, 1) and up.size == (3, 3) and up.padding == (1, 1)
    assert up.box(2, 2, clip=False) == up.box(3, 3, clip=False) == Box(1, 1, 4, 4)
    # add with the skip conv [i-1, i+1], then a 3x3 conv: even cells [i-3, i+2],
    # odd cells [i-2, i+2]
    out = rf["out"]
    assert out.size == (6, 6) and out.padding == (3, 3) and out.stride == (1, 1)
    assert out.box(4, 4, clip=False) == Box(1, 1, 7, 7)
    assert out.box(5, 5, clip=False) == Box(3, 3, 8, 8)
    _check_against_oracle(model, (1, 24, 20), ["up", "out"],
                          lambda e: [(i, i) for i in range(min(e.output_size))])


def test_transposed_convolution_matches_oracle():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1),
                          nn.ConvTranspose2d(2, 2, (3, 4), stride=(2, 3), padding=(1, 0)),
                          nn.Conv2d(2, 1, 3, padding=1))
    rf = receptive_field(model, input_size=(1, 17, 15), method="analytic")
    assert rf["1"].stride == (1, Fraction(2, 3))
    _check_against_oracle(model, (1, 17, 15), ["0", "1", "2"],
                          lambda e: [(i, j) for i in range(0, e.output_size[0], 3)
                                     for j in range(0, e.output_size[1], 4)])


# --------------------------------------------------------------------------
# random graphs (hypothesis)


class _Op(nn.Module):
    """One random op; functional forms keep their weights in ``self.conv``."""

    def __init__(self, spec: dict, c_in: int, c_out: int) -> None:
        super().__init__()
        self.spec = spec
        kind = spec["kind"]
        if kind in ("conv", "fconv", "same", "padconv"):
            self.conv = nn.Conv2d(c_in, c_out, spec["k"], spec.get("s", 1),
                                  "same" if kind == "same" else spec.get("p", 0), spec["d"])
        elif kind == "convT":
            self.conv = nn.ConvTranspose2d(c_in, c_out, spec["k"], spec["s"], spec["p"])
        elif kind == "maxpool":
            self.pool = nn.MaxPool2d(spec["k"], spec["s"], spec["p"], spec["d"],
                                     ceil_mode=spec["ceil"])
        elif kind == "avgpool":
            self.pool = nn.AvgPool2d(spec["k"], spec["s"], spec["p"], ceil_mode=spec["ceil"],
                                     count_include_pad=spec["count_pad"])
        elif kind == "adaptive":
            self.pool = nn.AdaptiveAvgPool2d(spec["size"])
        elif kind in ("residual", "concat"):
            self.branches = nn.ModuleList(
                nn.Sequential(*(_Op(o, ci, co) for o, ci, co in branch))
                for branch in spec["branches"])
        elif kind == "norm":
            self.norm = nn.BatchNorm2d(c_in)

    def forward(self, x):
        s, kind = self.spec, self.spec["kind"]
        if kind in ("conv", "same", "convT"):
            return self.conv(x)
        if kind == "padconv":  # explicit asymmetric padding, as TF-style 'SAME' ports do
            return self.conv(F.pad(x, s["pad"]))
        if kind == "fconv":
            return F.conv2d(x, self.conv.weight, None, s["s"], s["p"], s["d"])
        if kind in ("maxpool", "avgpool", "adaptive"):
            return self.pool(x)
        if kind == "fmaxpool":
            return F.max_pool2d(x, s["k"], s["s"], s["p"], s["d"], ceil_mode=s["ceil"])
        if kind == "favgpool":
            return F.avg_pool2d(x, s["k"], s["s"], s["p"], ceil_mode=s["ceil"])
        if kind == "upsample":
            return F.interpolate(x, scale_factor=2, mode=s["mode"])
        if kind == "relu":
            return F.relu(x)
        if kind == "norm":
            return self.norm(x)
        outs = [b(x) for b in self.branches]
        if kind == "concat":
            return torch.cat(outs, dim=1)
        merge = s["merge"]
        if merge == "operator":
            return outs[0] + outs[1]
        if merge == "torch.add":
            return torch.add(outs[0], outs[1])
        if merge == "iadd":
            y = outs[0]
            y += outs[1]
            return y
        return outs[0].add_(outs[1])  # in-place method


def _out(n: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    if not ceil:
        return span // s + 1 if span >= 0 else 0
    out = -(-span // s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out if span >= 0 else 0


@st.composite
def _centred_op(draw, c_in, c_out, stride):
    """An op with an odd window and 'same'-style padding: output floor((n-1)/s)+1."""
    kind = draw(st.sampled_from(["conv", "fconv", "maxpool", "avgpool"]))
    k = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(2))
    if kind in ("conv", "fconv"):
        d = tuple(draw(st.integers(1, 2)) for _ in range(2))
        p = tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
        return ({"kind": kind, "k": k, "s": stride, "p": p, "d": d}, c_in, c_out)
    p = tuple(kk // 2 for kk in k)
    if kind == "maxpool":
        return ({"kind": kind, "k": k, "s": stride, "p": p, "d": (1, 1), "ceil": False},
                c_in, c_in)
    return ({"kind": kind, "k": k, "s": stride, "p": p, "ceil": False, "count_pad": True},
            c_in, c_in)


@st.composite
def _branch(draw, c_in, c_out, stride):
    ops, c = [], c_in
    n_ops = draw(st.integers(1, 2))
    for k in range(n_ops):
        last = k == n_ops - 1
        spec, ci, co = draw(_centred_op(c, c_out if last else 2, stride if k == 0 else (1, 1)))
        if last and co != c_out:  # pools keep channels: finish with a 1x1 conv
            ops.append((spec, ci, co))
            spec, ci, co = ({"kind": "conv", "k": (1, 1), "s": (1, 1), "p": (0, 0),
                             "d": (1, 1)}, co, c_out)
        ops.append((spec, ci, co))
        c = co
    return ops


@st.composite
def _random_net(draw):
    h, w = draw(st.integers(6, 36)), draw(st.integers(6, 36))
    size, c = [h, w], draw(st.integers(1, 2))
    c_in = c
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(
            ["conv", "fconv", "same", "maxpool", "fmaxpool", "avgpool", "favgpool", "padconv",
             "adaptive", "upsample", "convT", "relu", "norm", "residual", "concat"]))
        spec, new, c_out = {"kind": kind}, list(size), c
        if kind in ("conv", "fconv"):
            k = tuple(draw(st.integers(1, 5)) for _ in range(2))
            d = tuple(draw(st.integers(1, 3)) for _ in range(2))
            s = tuple(draw(st.integers(1, 3)) for _ in range(2))
            p = tuple(draw(st.integers(0, dd * (kk - 1))) for kk, dd in zip(k, d))
            spec.update(k=k, d=d, s=s, p=p)
            if any(dd > n for dd, n in zip(d, size)):
                continue  # taps further apart than the map: some cells see only padding
            new = [_out(n, *a) for n, a in zip(size, zip(k, s, p, d))]
            c_out = draw(st.integers(1, 3))
        elif kind == "same":
            k = tuple(draw(st.integers(1, 4)) for _ in range(2))
            spec.update(k=k, d=tuple(draw(st.integers(1, 2)) for _ in range(2)))
            c_out = draw(st.integers(1, 3))
            if any(dd > n for dd, n in zip(spec["d"], size)):
                continue
        elif kind in ("maxpool", "fmaxpool", "avgpool", "favgpool"):
            k = tuple(draw(st.integers(1, 4)) for _ in range(2))
            s = tuple(draw(st.integers(1, 3)) for _ in range(2))
            p = tuple(draw(st.integers(0, kk // 2)) for kk in k)
            d = tuple(draw(st.integers(1, 2)) for _ in range(2)) if "max" in kind else (1, 1)
            ceil = draw(st.booleans())
            spec.update(k=k, s=s, p=p, d=d, ceil=ceil, count_pad=draw(st.booleans()))
            if any(dd > n for dd, n in zip(d, size)):
                continue
            if any(pp > (dd * (kk - 1) + 1) // 2 for kk, pp, dd in zip(k, p, d)):
                continue
            new = [_out(n, kk, ss, pp, dd, ceil) for n, kk, ss, pp, dd in zip(size, k, s, p, d)]
        elif kind == "padconv":
            # a kernel longer than each pad: no output cell sees padding only
            pad = tuple(draw(st.integers(0, 3)) for _ in range(4))
            k = (draw(st.integers(max(pad[2:]) + 1, 5)), draw(st.integers(max(pad[:2]) + 1, 5)))
            spec.update(pad=pad, k=k, d=(1, 1))
            new = [size[0] + pad[2] + pad[3] - k[0] + 1, size[1] + pad[0] + pad[1] - k[1] + 1]
            c_out = draw(st.integers(1, 3))
        elif kind == "adaptive":
            out = tuple(draw(st.integers(1, n)) for n in size)
            spec.update(size=out)
            new = list(out)
        elif kind == "upsample":
            if max(size) > 24:
                continue
            spec.update(mode=draw(st.sampled_from(["nearest", "bilinear", "nearest-exact"])))
            new = [2 * n for n in size]
        elif kind == "convT":
            # No padding: a padded transposed conv maps the positions just outside its output
            # onto real input rows, which a later window reading past the border (a dilated
            # 'same' conv) then counts; test_padded_transposed_conv_border_box is that case.
            k = tuple(draw(st.integers(1, 4)) for _ in range(2))
            s = tuple(draw(st.integers(1, kk)) for kk in k)
            p = (0, 0)
            spec.update(k=k, s=s, p=p)
            new = [(n - 1) * ss - 2 * pp + kk for n, kk, ss, pp in zip(size, k, s, p)]
            c_out = draw(st.integers(1, 3))
            if max(new) > 64:
                continue
        elif kind in ("residual", "concat"):
            stride = tuple(draw(st.integers(1, 2)) for _ in range(2))
            c_out = draw(st.integers(1, 3))
            n_branches = 2 if kind == "residual" else draw(st.integers(2, 3))
            branches = [draw(_branch(c, c_out, stride)) for _ in range(n_branches)]
            if kind == "residual":
                spec.update(merge=draw(st.sampled_from(["operator", "torch.add", "iadd",
                                                        "add_"])))
            else:
                c_out = c_out * n_branches
            spec.update(branches=branches)
            new = [(n - 1) // ss + 1 for n, ss in zip(size, stride)]
        if min(new) < 1:
            continue
        ops.append((spec, c, c_out))
        size, c = new, c_out
    if not ops:
        ops.append(({"kind": "relu"}, c, c))
    model = nn.Sequential(*(_Op(spec, ci, co) for spec, ci, co in ops))
    return model, (c_in, h, w)


def _random_graph_case(net, spread: bool) -> None:
    model, size = net
    with torch.no_grad():
        real = model.eval()(torch.zeros(1, *size)).shape[-2:]
    rf = receptive_field(model, input_size=size, method="analytic")
    names = [str(k) for k in range(len(model))]
    assert rf[names[-1]].output_size == tuple(real)

    def cells(e):
        h, w = e.output_size
        rows = {0, (h - 1) // 2, h - 1} | ({1, h - 2} if spread else set())
        cols = {0, (w - 1) // 2, w - 1} | ({1, w - 2} if spread else set())
        return [(i, j) for i in sorted(rows & set(range(h))) for j in sorted(cols & set(range(w)))]

    _check_against_oracle(model, size, names, cells)


@pytest.mark.xfail(strict=True, reason="known: the box of a border cell after a padded "
                   "transposed conv can include rows only padding positions map to")
def test_padded_transposed_conv_border_box():
    # Found by the random test: cell 0 of the dilated 'same' conv reads row -1 (padding) and
    # row 1 of its input; the transposed conv maps row -1 onto input rows 0-1, so the box
    # starts at row 0 while only rows 1-2 reach the cell.
    model = nn.Sequential(
        _Op({"kind": "convT", "k": (4, 1), "s": (2, 1), "p": (3, 0)}, 1, 1),
        _Op({"kind": "conv", "k": (1, 1), "s": (1, 1), "p": (0, 0), "d": (1, 1)}, 1, 1),
        _Op({"kind": "same", "k": (2, 1), "d": (2, 1)}, 1, 1),
    )
    names = [str(k) for k in range(len(model))]
    _check_against_oracle(model, (1, 6, 6), names, lambda e: [(0, 0)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_net())
def test_random_graphs_match_gradient_oracle(net):
    _random_graph_case(net, spread=False)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_net())
def test_many_random_graphs_match_gradient_oracle(net):
    _random_graph_case(net, spread=True)


# --------------------------------------------------------------------------
# what cannot be followed exactly


class _UnequalStrides(nn.Module):
    def forward(self, x):
        return x[:, :, :8, :8] + x[:, :, ::2, ::2]


def test_unequal_strides_at_a_merge_are_refused_by_name():
    with pytest.raises(CamkitError, match=r"'add'.*different strides \(1, 2\)"):
        receptive_field(_UnequalStrides(), input_size=(1, 16, 16), method="analytic")


class _Roll(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return torch.roll(self.conv(x), 2, dims=2)


def test_unknown_spatial_op_is_refused_or_measured():
    with pytest.raises(CamkitError, match="'roll'"):
        receptive_field(_Roll(), input_size=(1, 16, 16), method="analytic")
    with pytest.warns(UserWarning, match="roll"):
        rf = receptive_field(_Roll(), input_size=(1, 16, 16))
    assert rf.method == "measured" and "roll" in rf.reason
    assert (rf["conv"].size, rf["conv"].stride, rf["conv"].padding) == ((3, 3), (1, 1), (0, 0))


def test_resize_by_three_is_refused_by_name():
    model = nn.Sequential(nn.Upsample(scale_factor=3), nn.Conv2d(1, 1, 3))
    with pytest.raises(CamkitError, match=r"node '0' \(Upsample\).*powers of two"):
        receptive_field(model, input_size=(1, 8, 8), method="analytic")


def test_transposed_conv_with_kernel_smaller_than_stride_is_refused():
    model = nn.Sequential(nn.ConvTranspose2d(1, 1, 1, stride=2))
    with pytest.raises(CamkitError, match="kernel 1 smaller than stride 2"):
        receptive_field(model, input_size=(1, 8, 8), method="analytic")


# Padding filled from the map itself. Cell -c of a reflect-padded map is cell c,
# so a 3x3 conv with padding 2 gives cell 0 the window -2..0 but it reads rows
# 0..2; circular padding reads the far border. Treating either as zero padding
# gives a box that misses pixels the cell sees.


def _every_cell(e):
    h, w = e.output_size
    return [(i, j) for i in range(h) for j in range(w)]


class _FunctionalPad(nn.Module):
    def __init__(self, pad, mode):
        super().__init__()
        self.pad, self.mode = pad, mode
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode=self.mode))


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, 1, 3, padding=2, padding_mode="reflect")),
    nn.Sequential(nn.Conv2d(1, 1, 3, padding=3, padding_mode="replicate")),
    nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")),
    nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(1, 1, 3)),
    nn.Sequential(nn.ReplicationPad2d((0, 0, 2, 0)), nn.Conv2d(1, 1, 3)),
    _FunctionalPad((1, 1, 1, 1), "circular"),
    _FunctionalPad((2, 0, 0, 0), "reflect"),
], ids=["conv-reflect", "conv-replicate", "conv-circular", "ReflectionPad2d",
        "ReplicationPad2d", "F.pad-circular", "F.pad-reflect"])
def test_padding_filled_from_the_map_is_refused_by_name(model):
    name = "conv" if isinstance(model, _FunctionalPad) else "0"
    node = "pad" if isinstance(model, _FunctionalPad) else "0"
    with pytest.raises(CamkitError, match=rf"node '{node}' .*(reflect|replicate|circular)"):
        receptive_field(model, input_size=(1, 12, 12), method="analytic")
    with pytest.warns(UserWarning, match=rf"node '{node}'"):
        rf = receptive_field(model, input_size=(1, 12, 12))
    assert rf.method == "measured" and name in rf


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["reflect", "replicate"]), k=st.integers(1, 5),
       d=st.integers(1, 3), s=st.integers(1, 3), p=st.integers(0, 6), n=st.integers(2, 14),
       stem=st.booleans())
def test_reflect_and_replicate_conv_padding_is_exact_or_refused(mode, k, d, s, p, n, stem):
    # rows get the drawn conv; columns a plain 'same' one
    conv = nn.Conv2d(1, 1, (k, 3), (s, 1), (p, 1), (d, 1), padding_mode=mode)
    layers = [nn.Conv2d(1, 1, 3, 2, 1), conv] if stem else [conv]
    model = nn.Sequential(*layers)
    size = (1, 2 * n if stem else n, 7)
    try:
        model(torch.zeros(1, *size))
    except RuntimeError:  # padding too large for the map, or a window longer than it
        assume(False)
    name = str(len(layers) - 1)
    try:
        rf = receptive_field(model, input_size=size, method="analytic")
    except CamkitError as exc:
        assert f"node {name!r}" in str(exc) and f"padding_mode={mode!r}" in str(exc)
        return
    _check_against_oracle(model, size, [name], _every_cell)
    k_eff = d * (k - 1) + 1
    assert rf[name].size[0] == (3 + 2 * (k_eff - 1) if stem else k_eff)


def test_same_size_reflect_padding_stays_analytic():
    model = nn.Sequential(nn.Conv2d(1, 2, 7, padding=3, padding_mode="reflect"),
                          nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="reflect"),
                          nn.Conv2d(2, 1, 3, padding=1, padding_mode="replicate"))
    rf = receptive_field(model, input_size=(1, 15, 14), method="analytic")
    assert (rf["2"].size, rf["2"].stride, rf["2"].padding) == ((13, 13), (2, 2), (6, 6))
    _check_against_oracle(model, (1, 15, 14), ["0", "1", "2"], _every_cell)


# In-place updates through views: the walk gives the mutated tensor its new
# field, but a tensor sharing its memory changes as well.


class _InPlaceOnView(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.small = nn.Conv2d(1, 4, 1)
        self.big = nn.Conv2d(1, 4, 7, padding=3)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.small(x)
        if self.how == "slice":  # a view of y is changed, y is read
            y[:, :2].mul_(self.big(x)[:, :2])
        elif self.how == "view":
            y.view(y.shape).add_(self.big(x))
        elif self.how == "rebound":  # y itself becomes the view: nothing stale
            y = y.view(y.shape)
            y += self.big(x)
        else:  # plain in-place add
            y += self.big(x)
        return self.out(y)


@pytest.mark.parametrize("how", ["slice", "view"])
def test_in_place_update_through_a_view_is_refused(how):
    model = _InPlaceOnView(how)
    op = "mul_" if how == "slice" else "add_"
    with pytest.raises(CamkitError, match=rf"node '{op}'.*'small' shares memory"):
        receptive_field(model, input_size=(1, 16, 16), method="analytic")
    with pytest.warns(UserWarning, match="shares memory"):
        rf = receptive_field(model, input_size=(1, 16, 16))
    assert rf.method == "measured"
    assert (rf["out"].size, rf["out"].padding) == ((7, 7), (3, 3))


@pytest.mark.parametrize("how", ["rebound", "plain"])
def test_in_place_update_without_a_stale_view_stays_analytic(how):
    model = _InPlaceOnView(how)
    rf = receptive_field(model, input_size=(1, 16, 16), method="analytic")
    assert (rf["out"].size, rf["out"].padding) == ((7, 7), (3, 3))
    # (the oracle would see 'small' after the update: it holds that very tensor)
    _check_against_oracle(model, (1, 16, 16), ["big", "out"])


# --------------------------------------------------------------------------
# the measured fallback and model state


class _Twin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.p = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 4, 5, stride=2, padding=2)
        self.c3 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)

    def body(self, x):
        return self.c3(F.relu(self.c2(self.p(F.relu(self.bn(self.c1(x)))))))

    def forward(self, x):
        return self.body(x)


class _DataDependent(_Twin):
    def forward(self, x):
        if x.sum() > -1e30:  # fx cannot trace a branch on a value
            return self.body(x)
        return x


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for m in model.modules()])


def test_untraceable_model_falls_back_to_measured_and_says_so():
    torch.manual_seed(0)
    model = _DataDependent()
    model.train()
    model.c2.weight.requires_grad_(False)
    before = _state(model)
    with pytest.warns(UserWarning, match="measured"):
        rf = receptive_field(model, input_size=(3, 40, 40))
    assert rf.method == "measured" and "TraceError" in rf.reason
    assert _state(model) == before
    reference = receptive_field(_Twin(), input_size=(3, 40, 40))
    assert reference.method == "analytic"
    for name in ("c1", "p", "c2", "c3"):
        assert (rf[name].size, rf[name].stride, rf[name].padding) == (
            reference[name].size, reference[name].stride, reference[name].padding), name
        assert rf[name].output_size == reference[name].output_size
    assert "measured" in str(rf) and rf.to_dict()["method"] == "measured"
    with pytest.raises(CamkitError, match="TraceError"):
        receptive_field(model, input_size=(3, 40, 40), method="analytic")
    assert _state(model) == before


def test_analytic_path_leaves_the_model_as_it_was():
    model = tvm.resnet18()
    model.train()
    model.layer1.eval()
    model.fc.weight.requires_grad_(False)
    before = _state(model)
    receptive_field(model, input_size=(3, 64, 64))
    assert _state(model) == before
    with pytest.raises(CamkitError):
        receptive_field(nn.Sequential(model, _Roll()), input_size=(3, 64, 64),
                        method="analytic")
    assert _state(model) == before


def test_measured_method_on_request_matches_analytic():
    model = _Twin()
    measured = receptive_field(model, input_size=(3, 48, 48), method="measured")
    analytic = receptive_field(model, input_size=(3, 48, 48), method="analytic")
    assert measured.method == "measured" and measured.reason == "method='measured'"
    for name in ("c1", "bn", "p", "c2", "c3"):
        assert measured[name].size == analytic[name].size
        assert measured[name].padding == analytic[name].padding


def test_model_that_does_not_run_on_the_size_is_an_error():
    model = nn.Sequential(nn.Conv2d(1, 1, 9))
    with pytest.raises(CamkitError, match="input_size"):
        receptive_field(model, input_size=(1, 4, 4))


def test_one_dimensional_model_is_explained():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    for method in ("auto", "analytic", "measured"):
        with pytest.raises(CamkitError, match=r"2-D image models.*Conv1d"):
            receptive_field(model, input_size=(3, 16, 16), method=method)


def test_meta_model_that_cannot_be_traced_says_it_cannot_be_measured():
    with torch.device("meta"):
        model = _DataDependent()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that it was measured
        with pytest.raises(CamkitError, match=r"TraceError.*meta device cannot be measured"):
            receptive_field(model, input_size=(3, 16, 16))
    with pytest.raises(CamkitError, match=r"method='measured'.*meta device"):
        receptive_field(_build("resnet18"), input_size=(3, 64, 64), method="measured")


# --------------------------------------------------------------------------
# the mapping


def test_mapping_table_and_json():
    rf = receptive_field(tvm.resnet18(), input_size=(3, 64, 64))
    assert isinstance(rf, ReceptiveField)
    keys = list(rf)
    assert keys.index("conv1") < keys.index("layer1") < keys.index("layer4") < keys.index("fc")
    text = str(rf)
    assert "method: analytic" in text and "layer4.1.relu_1" in text
    assert text.index("layer2.0.downsample.0") < text.index("layer3.0.conv1")
    data = json.loads(json.dumps(rf.to_dict()))
    assert data["method"] == "analytic" and data["input_size"] == [3, 64, 64]
    assert data["layers"]["layer4"]["size"] == [435, 435]
    assert data["layers"]["fc"]["global"] is True
    assert len(rf) == len(data["layers"])
    assert "layer5" not in rf
    with pytest.raises(KeyError, match="layer4"):
        rf["layer5"]
    with pytest.raises(CamkitError, match="Closest names"):
        rf["layer5"]


def test_default_input_size_takes_channels_from_the_first_conv():
    rf = receptive_field(nn.Sequential(nn.Conv2d(5, 1, 3)))
    assert rf.input_size == (5, 224, 224)
    assert rf["0"].output_size == (222, 222)


@pytest.mark.parametrize("bad", [(1, 3, 224, 224), (3, 0, 4), (3.0, 8, 8), "3x8x8", True])
def test_bad_input_size_is_explained(bad):
    with pytest.raises(CamkitError, match=r"\(C, H, W\)"):
        receptive_field(nn.Conv2d(3, 1, 3), input_size=bad)


def test_input_size_takes_the_forms_list_layers_takes():
    model = nn.Sequential(nn.Conv2d(2, 1, 3))
    for size in (20, (20, 20), (2, 20, 20)):  # channels from the first conv when not given
        rf = receptive_field(model, input_size=size)
        assert rf.input_size == (2, 20, 20) and rf["0"].output_size == (18, 18)


def test_bad_arguments_are_explained():
    with pytest.raises(CamkitError, match="method"):
        receptive_field(nn.Conv2d(3, 1, 3), input_size=(3, 8, 8), method="exact")
    with pytest.raises(CamkitError, match=r"nn\.Module"):
        receptive_field(lambda x: x, input_size=(3, 8, 8))
    with pytest.raises(CamkitError, match="n_inputs"):
        receptive_field(nn.Conv2d(3, 1, 3), input_size=(3, 8, 8), n_inputs=0)


def test_channel_count_that_no_conv_takes_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3))
    with pytest.raises(CamkitError, match=r"\(N, 1, 8, 8\).*3 channels.*got 1"):
        receptive_field(model, input_size=(1, 8, 8))
    assert receptive_field(model, input_size=(3, 8, 8))["1"].size == (5, 5)
