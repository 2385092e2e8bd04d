"""Tests of :func:`camkit.effective_receptive_field` (Luo et al., NeurIPS 2016).

References: the closed form for stacked all-ones 3 x 3 convolutions without
nonlinearity (the map is an outer product of binomial-like rows: support
``2n + 1``, per-axis standard deviation ``sqrt(2n / 3)``, the variance of a
sum of ``n`` independent uniform steps in {-1, 0, 1}), hand-computed maps of
single dilated and strided convolutions, the analytic receptive field (the
effective field can never leave the theoretical one, and equals it for a
model with positive weights and no gating), and averaging identities.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camkit import (
    Box,
    CamkitError,
    EffectiveReceptiveField,
    effective_receptive_field,
    receptive_field,
)


def _ones_stack(n: int, channels: int = 1) -> nn.Sequential:
    layers = []
    for k in range(n):
        conv = nn.Conv2d(channels if k else 1, channels, 3, padding=1, bias=False)
        nn.init.ones_(conv.weight)
        layers.append(conv)
    return nn.Sequential(*layers).double()


def _binomial_row(n: int) -> torch.Tensor:
    # coefficients of (1 + z + z^2)^n
    row = torch.ones(1, dtype=torch.float64)
    for _ in range(n):
        row = torch.nn.functional.conv1d(row.view(1, 1, -1), torch.ones(1, 1, 3,
                                         dtype=torch.float64), padding=2).flatten()
    return row


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_stacked_ones_convolutions_closed_form(n):
    size = 2 * n + 7
    erf = effective_receptive_field(_ones_stack(n), str(n - 1), input_size=(1, size, size),
                                    n_inputs=3)
    c = (size - 1) // 2
    assert erf.cell == (c, c)
    assert erf.support == Box(c - n, c - n, c + n + 1, c + n + 1)
    assert erf.support.height == 2 * n + 1
    expected_std = math.sqrt(2 * n / 3)
    assert erf.std == pytest.approx((expected_std, expected_std), rel=1e-12)
    assert erf.center == pytest.approx((c, c), abs=1e-12)
    row = _binomial_row(n)
    expected = torch.zeros(size, size, dtype=torch.float64)
    expected[c - n: c + n + 1, c - n: c + n + 1] = torch.outer(row, row) / row.sum() ** 2
    torch.testing.assert_close(erf.normalized, expected, rtol=1e-12, atol=1e-15)
    # all the mass lies within the corner of the support, and not before it
    assert erf.radius_for(1.0) == pytest.approx(math.sqrt(2) * n)


def test_radius_of_a_single_box_filter():
    erf = effective_receptive_field(_ones_stack(1), "0", input_size=(1, 9, 9), mass=0.5)
    # 1/9 at distance 0, 4/9 at distance 1: half the mass needs radius 1
    assert erf.radius == 1.0 and erf.mass == 0.5
    assert erf.radius_for(1 / 9) == 0.0
    assert erf.radius_for(5 / 9) == 1.0
    assert erf.radius_for(6 / 9) == pytest.approx(math.sqrt(2))


def test_channels_do_not_change_the_normalised_map():
    one = effective_receptive_field(_ones_stack(2), "1", input_size=(1, 11, 11))
    many = effective_receptive_field(_ones_stack(2, channels=3), "1", input_size=(1, 11, 11))
    torch.testing.assert_close(one.normalized, many.normalized, rtol=1e-12, atol=1e-15)


def test_dilated_convolution_map_has_gaps():
    conv = nn.Conv2d(1, 1, 3, padding=2, dilation=2, bias=False).double()
    nn.init.ones_(conv.weight)
    erf = effective_receptive_field(nn.Sequential(conv), "0", input_size=(1, 9, 9))
    nonzero = (erf.map > 0).nonzero().tolist()
    assert sorted(nonzero) == [[r, c] for r in (2, 4, 6) for c in (2, 4, 6)]
    assert erf.std == pytest.approx((math.sqrt(8 / 3),) * 2, rel=1e-12)
    assert erf.support == Box(2, 2, 7, 7)


def test_strided_cell_centre_of_mass():
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False).double()
    nn.init.ones_(conv.weight)
    erf = effective_receptive_field(nn.Sequential(conv), "0", input_size=(1, 16, 16),
                                    cell=(3, 5))
    assert erf.center == pytest.approx((6.0, 10.0), abs=1e-12)
    assert erf.support == Box(5, 9, 8, 12)


class _Small(nn.Module):
    def __init__(self, positive: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(4, 4, 5)
        if positive:
            for m in (self.conv1, self.conv2, self.conv3):
                nn.init.constant_(m.weight, 0.1)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.conv3(F.relu(self.conv2(self.pool(x))) + 0)


@pytest.mark.parametrize("layer", ["conv1", "pool", "conv2", "conv3"])
def test_positive_model_support_equals_the_analytic_box(layer):
    torch.manual_seed(0)
    model = _Small(positive=True).double()
    size = (2, 48, 48)
    rf = receptive_field(model, input_size=size)[layer]
    inputs = torch.rand(2, *size, dtype=torch.float64) + 0.5  # positive: no ReLU is off
    h, w = rf.output_size
    centre = ((h - 1) // 2, (w - 1) // 2)
    assert rf.box(*centre) == rf.box(*centre, clip=False)  # inside the image
    for cell in [centre, (0, 0), (h - 1, w - 1)]:
        erf = effective_receptive_field(model, layer, inputs, cell=cell)
        s, box, clipped = erf.support, rf.box(*cell, clip=False), rf.box(*cell)
        # inside the clipped box, and equal on every side of the box inside the image
        assert clipped.top <= s.top and clipped.left <= s.left
        assert s.bottom <= clipped.bottom and s.right <= clipped.right
        for side, limit in (("top", 48), ("left", 48)):
            if 0 <= getattr(box, side) < limit:
                assert getattr(s, side) == getattr(box, side), (cell, side)
        for side, limit in (("bottom", 48), ("right", 48)):
            if 0 < getattr(box, side) <= limit:
                assert getattr(s, side) == getattr(box, side), (cell, side)
    erf = effective_receptive_field(model, layer, inputs, cell=centre)
    assert erf.support == rf.box(*centre)


def test_random_model_support_stays_inside_the_analytic_box():
    torch.manual_seed(1)
    model = _Small(positive=False)
    size = (2, 40, 40)
    rf = receptive_field(model, input_size=size)["conv3"]
    erf = effective_receptive_field(model, "conv3", input_size=size, n_inputs=8, cell=(2, 3))
    box = rf.box(2, 3)
    s = erf.support
    assert box.top <= s.top and box.left <= s.left
    assert s.bottom <= box.bottom and s.right <= box.right
    assert erf.normalized.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert erf.n_inputs == 8


def test_map_is_the_mean_of_per_input_maps():
    torch.manual_seed(2)
    model = _Small(positive=False)
    x = torch.randn(3, 2, 24, 24)
    together = effective_receptive_field(model, "conv2", x)
    separate = [effective_receptive_field(model, "conv2", x[k]) for k in range(3)]
    mean = sum(e.map for e in separate) / 3
    torch.testing.assert_close(together.map, mean, rtol=1e-5, atol=1e-9)
    assert together.n_inputs == 3 and separate[0].n_inputs == 1


def test_random_inputs_are_reproducible():
    model = _Small(positive=False)
    a = effective_receptive_field(model, "conv2", input_size=(2, 20, 20), seed=3, n_inputs=2)
    b = effective_receptive_field(model, "conv2", input_size=(2, 20, 20), seed=3, n_inputs=2)
    torch.testing.assert_close(a.map, b.map)


class _InPlaceAfter(nn.Module):
    """The layer's output is changed in place later: the field must not see it."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.big = nn.Conv2d(1, 1, 7, padding=3, bias=False)
        nn.init.ones_(self.small.weight)
        nn.init.ones_(self.big.weight)

    def forward(self, x):
        out = self.small(x)
        out += self.big(x)
        return out


def test_later_in_place_ops_do_not_change_the_layer_output():
    erf = effective_receptive_field(_InPlaceAfter().double(), "small", input_size=(1, 15, 15))
    assert erf.support == Box(6, 6, 9, 9)


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def test_model_state_is_restored_even_after_an_error():
    model = _Small(positive=False)
    model.train()
    model.conv2.eval()
    model.conv1.weight.requires_grad_(False)
    before = _state(model)
    effective_receptive_field(model, model.conv2, input_size=(2, 20, 20), n_inputs=2)
    assert _state(model) == before
    with pytest.raises(CamkitError, match=r"cell=\(99, 0\).*0 <= i < 5"):
        effective_receptive_field(model, "conv2", input_size=(2, 20, 20), cell=(99, 0))
    assert _state(model) == before

    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    wrapper = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        effective_receptive_field(wrapper, "inner.conv2", input_size=(2, 20, 20))
    assert _state(model) == before


def test_errors_are_explained():
    model = _Small(positive=False)
    with pytest.raises(CamkitError, match=r"no layer named 'conv4'.*Closest names: 'conv"):
        effective_receptive_field(model, "conv4", input_size=(2, 16, 16))
    with pytest.raises(CamkitError, match="not a submodule of this _Small"):
        effective_receptive_field(model, nn.Conv2d(1, 1, 1), input_size=(2, 16, 16))
    with pytest.raises(CamkitError, match="or input_size"):
        effective_receptive_field(model, "conv1")
    with pytest.raises(CamkitError, match=r"\(N, C, H, W\)"):
        effective_receptive_field(model, "conv1", torch.zeros(16, 16))
    with pytest.raises(CamkitError, match="floating point"):
        effective_receptive_field(model, "conv1", torch.zeros(1, 2, 16, 16, dtype=torch.long))
    with pytest.raises(CamkitError, match="does not match"):
        effective_receptive_field(model, "conv1", torch.zeros(1, 2, 16, 16),
                                  input_size=(2, 8, 8))
    with pytest.raises(CamkitError, match="mass"):
        effective_receptive_field(model, "conv1", input_size=(2, 16, 16), mass=1.5)
    with pytest.raises(CamkitError, match="n_inputs"):
        effective_receptive_field(model, "conv1", input_size=(2, 16, 16), n_inputs=0)


def test_layers_without_a_feature_map_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with pytest.raises(CamkitError, match="not a feature map"):
        effective_receptive_field(model, "2", input_size=(1, 8, 8))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(1, 1, 3)
            self.aux = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(CamkitError, match="did not produce"):
        effective_receptive_field(Unused(), "aux", input_size=(1, 8, 8))


def test_result_type_and_dtype():
    erf = effective_receptive_field(_Small(positive=False), "conv1", input_size=(2, 28, 20),
                                    n_inputs=2)
    assert isinstance(erf, EffectiveReceptiveField)
    assert erf.map.dtype == torch.float64 and erf.map.shape == (28, 20)
    assert erf.map.device.type == "cpu"
    assert erf.layer == "conv1"


def test_meta_model_is_explained():
    with torch.device("meta"):
        model = _Small(positive=False)
    with pytest.raises(CamkitError, match="meta device"):
        effective_receptive_field(model, "conv2", input_size=(2, 16, 16))
