"""camkit.metrics against closed forms, brute-force oracles and scipy / scikit-image."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from skimage.metrics import structural_similarity
from torch import nn

from camkit import CamkitError, GradCAM
from camkit import metrics as M

# ============================================================== a model with a known answer
SIZE, QUAD, GAIN = 8, 4, 4.0


class QuadrantModel(nn.Module):
    """Class 0's logit is GAIN x the mean of the top-left quadrant; class 1's logit is 0.

    A fixed strided convolution averages each 4 x 4 quadrant, and a fixed linear layer keeps
    only the top-left one. A dropout layer makes train mode visibly random.
    """

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.pool = nn.Conv2d(channels, 1, QUAD, stride=QUAD, bias=False)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.pool.weight.fill_(1.0 / (channels * QUAD * QUAD))
            self.head.weight.zero_()
            self.head.weight[0, 0] = GAIN
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pool(x).flatten(1)))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def oracle_curve(image, order_map, baseline, steps, kind, target=0):
    """The curve by brute force: a python sort with explicit keys, float64 throughout."""
    image = np.asarray(image, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    values = np.asarray(order_map, dtype=np.float64).ravel()
    hw = values.size
    order = sorted(range(hw), key=lambda p: (-values[p], p))
    curve = []
    for i in range(steps + 1):
        chosen = np.zeros(hw, dtype=bool)
        chosen[order[: (i * hw) // steps]] = True
        chosen = chosen.reshape(SIZE, SIZE)
        if kind == "deletion":
            x = np.where(chosen, baseline, image)
        else:
            x = np.where(chosen, image, baseline)
        s = GAIN * x[:, :QUAD, :QUAD].mean()
        p0 = sigmoid(s)
        curve.append(p0 if target == 0 else 1 - p0)
    return np.array(curve)


def quadrant_map() -> torch.Tensor:
    """Quadrant pixels in (1, 2], the rest in [0, 1): the quadrant is ranked first."""
    g = torch.Generator().manual_seed(1)
    m = torch.rand(SIZE, SIZE, generator=g)
    m[:QUAD, :QUAD] += 1.0
    return m


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 2, SIZE, SIZE, generator=g) + 0.5


# ============================================================== deletion / insertion
def test_deletion_closed_form_for_constant_images() -> None:
    # Constant images of value v: with the quadrant ranked first, step i (8 px per step) leaves
    # 16 - min(8 i, 16) quadrant pixels, so p0 = sigmoid(GAIN v (16 - min(8 i, 16)) / 16).
    model = QuadrantModel()
    values = [0.5, 1.0, 2.0]
    x = torch.tensor(values)[:, None, None, None].expand(3, 2, SIZE, SIZE).clone()
    maps = quadrant_map().expand(3, SIZE, SIZE)
    good = M.deletion(model, x, maps, 0, steps=8)
    bad = M.deletion(model, x, -maps, 0, steps=8)
    for n, v in enumerate(values):
        expect_good = [sigmoid(GAIN * v * (16 - min(8 * i, 16)) / 16) for i in range(9)]
        expect_bad = [sigmoid(GAIN * v * (16 - max(0, 8 * i - 48)) / 16) for i in range(9)]
        np.testing.assert_allclose(good.curve[n].numpy(), expect_good, rtol=1e-6)
        np.testing.assert_allclose(bad.curve[n].numpy(), expect_bad, rtol=1e-6)
        np.testing.assert_allclose(
            good.auc[n].item(), np.trapezoid(expect_good, np.arange(9) / 8), rtol=1e-6
        )
    np.testing.assert_array_equal(good.fractions.numpy(), np.arange(9) / 8)
    assert good.kind == "deletion"
    assert torch.equal(good.targets, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("baseline", ["zeros", "mean", "blur", 0.25])
@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_curves_match_brute_force_oracle(images, baseline, kind) -> None:
    model = QuadrantModel()
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, SIZE, SIZE, generator=g).round(decimals=1)  # many ties
    steps = 7  # 64 px do not divide evenly: counts are floor(i * 64 / 7)
    result = getattr(M, kind)(model, images, maps, steps=steps, baseline=baseline, batch_size=5)
    for n in range(3):
        img = images[n].double().numpy()
        if baseline == "zeros":
            base = np.zeros_like(img)
        elif baseline == "mean":
            base = np.broadcast_to(img.mean(axis=(1, 2), keepdims=True), img.shape)
        elif baseline == "blur":
            base = ndimage.gaussian_filter(img, sigma=(0, 5, 5), truncate=1.0, mode="reflect")
        else:
            base = np.full_like(img, baseline)
        expected = oracle_curve(img, maps[n].numpy(), base, steps, kind)
        np.testing.assert_allclose(result.curve[n].numpy(), expected, rtol=1e-5, atol=1e-6)
    counts = np.array([(i * 64) // steps for i in range(steps + 1)])
    np.testing.assert_allclose(result.fractions.numpy(), counts / 64)


def test_right_map_deletes_fastest_and_inserts_fastest(images) -> None:
    model = QuadrantModel()
    right = quadrant_map().expand(3, SIZE, SIZE)
    reverse = -right
    flat = torch.zeros(3, SIZE, SIZE)  # raster order: half the quadrant goes early
    d = {name: M.deletion(model, images, m, steps=16).auc for name, m in
         [("right", right), ("flat", flat), ("reverse", reverse)]}
    i = {name: M.insertion(model, images, m, steps=16, baseline="zeros").auc for name, m in
         [("right", right), ("flat", flat), ("reverse", reverse)]}
    assert bool((d["right"] < d["flat"]).all()) and bool((d["flat"] < d["reverse"]).all())
    assert bool((i["right"] > i["flat"]).all()) and bool((i["flat"] > i["reverse"]).all())


def test_ties_are_broken_in_raster_order() -> None:
    # A constant map removes pixels row by row: step 1 of 8 removes row 0, i.e. 4 of the 16
    # quadrant pixels; step 4 removes rows 0-3, the whole quadrant.
    model = QuadrantModel(channels=1)
    x = torch.ones(1, 1, SIZE, SIZE)
    result = M.deletion(model, x, torch.full((1, SIZE, SIZE), 0.3), 0, steps=8)
    left = [16 - min(4 * i, 16) for i in range(9)]
    np.testing.assert_allclose(
        result.curve[0].numpy(), [sigmoid(GAIN * k / 16) for k in left], rtol=1e-6
    )


def test_targets_logit_and_callable_score(images) -> None:
    model = QuadrantModel()
    maps = quadrant_map().expand(3, SIZE, SIZE)
    p0 = M.deletion(model, images, maps, steps=4).curve
    p1 = M.deletion(model, images, maps, [1, 1, 1], steps=4).curve
    torch.testing.assert_close(p0 + p1, torch.ones_like(p0))
    logit = M.deletion(model, images, maps, 0, steps=4, score="logit").curve
    torch.testing.assert_close(torch.sigmoid(logit), p0)  # class 1's logit is 0
    seen = []

    def score(out, rows):
        seen.append(rows.clone())
        return out[:, 0] * (rows + 1)

    custom = M.deletion(model, images, maps, steps=4, score=score, batch_size=4)
    torch.testing.assert_close(custom.curve, logit * torch.tensor([[1.0], [2.0], [3.0]]))
    assert custom.targets is None
    torch.testing.assert_close(torch.cat(seen), torch.arange(3).repeat_interleave(5))


def test_batch_size_and_batching_do_not_change_curves(images) -> None:
    model = QuadrantModel()
    maps = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    whole = M.insertion(model, images, maps, steps=9, batch_size=1000)
    for b in (1, 4):
        torch.testing.assert_close(M.insertion(model, images, maps, steps=9, batch_size=b).curve,
                                   whole.curve)
    for n in range(3):
        one = M.insertion(model, images[n : n + 1], maps[n : n + 1], steps=9)
        torch.testing.assert_close(one.curve[0], whole.curve[n])


def test_model_mode_restored_and_eval_used(images) -> None:
    model = QuadrantModel().train()
    model.pool.eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    maps = quadrant_map().expand(3, SIZE, SIZE)
    a = M.deletion(model, images, maps, steps=4).curve
    b = M.deletion(model, images, maps, steps=4).curve
    assert torch.equal(a, b)  # dropout off: eval mode during the call
    assert [m.training for m in model.modules()] == flags


def test_model_mode_restored_after_an_error(images) -> None:
    model = QuadrantModel().train()

    def broken(out, rows):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        M.deletion(model, images, torch.rand(3, SIZE, SIZE), steps=2, score=broken)
    assert all(m.training for m in model.modules())


def test_curve_input_errors(images) -> None:
    model = QuadrantModel()
    maps = torch.rand(3, SIZE, SIZE)
    with pytest.raises(CamkitError, match=r"\(3, 4, 4\).*\(3, 8, 8\)"):
        M.deletion(model, images, torch.rand(3, 4, 4))
    with pytest.raises(CamkitError, match=r"expected \(N, H, W\)"):
        M.deletion(model, images, maps[:, None])
    with pytest.raises(CamkitError, match="steps=0"):
        M.deletion(model, images, maps, steps=0)
    with pytest.raises(CamkitError, match="'sepia'"):
        M.insertion(model, images, maps, baseline="sepia")
    with pytest.raises(CamkitError, match="length 2 but the batch has length 3"):
        M.deletion(model, images, maps, [0, 1])
    with pytest.raises(CamkitError, match=r"range over \[5, 5\] but the model has 2 outputs"):
        M.deletion(model, images, maps, 5)
    with pytest.raises(CamkitError, match="no effect"):
        M.deletion(model, images, maps, 0, score=lambda out, rows: out[:, 0])
    with pytest.raises(CamkitError, match="NaN"):
        M.deletion(model, images, torch.full((3, SIZE, SIZE), float("nan")))


def test_single_output_model_needs_a_score_other_than_probability(images) -> None:
    # The softmax of one logit is 1 for every input: a flat curve that says nothing.
    class OneLogit(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, :QUAD, :QUAD].mean(dim=(1, 2, 3))[:, None]

    maps = quadrant_map().expand(3, SIZE, SIZE)
    with pytest.raises(CamkitError, match="single output"):
        M.deletion(OneLogit(), images, maps, steps=4)
    logit = M.deletion(OneLogit(), images, maps, steps=4, score="logit")
    assert bool((logit.curve[:, 0] > logit.curve[:, -1]).all())


def test_constant_and_all_zero_maps_give_finite_curves(images) -> None:
    model = QuadrantModel()
    for maps in (torch.zeros(3, SIZE, SIZE), torch.full((3, SIZE, SIZE), 7.0)):
        for fn in (M.deletion, M.insertion):
            result = fn(model, images, maps, steps=8)
            assert bool(torch.isfinite(result.curve).all() & torch.isfinite(result.auc).all())


@pytest.mark.parametrize("shape", [(2, 3, 12, 9), (1, 1, 4, 3)])
def test_gaussian_blur_matches_scipy(shape) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = ndimage.gaussian_filter(
        x.numpy(), sigma=(0, 0, 5, 5), truncate=1.0, mode="reflect"
    )
    np.testing.assert_allclose(M.gaussian_blur(x).numpy(), expected, rtol=1e-10, atol=1e-12)


# ============================================================== focus
def test_focus_share_closed_form() -> None:
    m = torch.full((10, 10), 0.49)
    m[2:5, 3:8] = 1.0  # 15 pixels at the peak
    m[7:9, 0:2] = 0.5  # 4 pixels exactly at half the peak: counted
    maps = torch.stack([m, m * 1e-20, torch.zeros(10, 10)])
    share = M.focus_share(maps)
    assert share[0].item() == pytest.approx(0.19)
    assert share[1].item() == pytest.approx(0.19)  # no absolute epsilon
    assert math.isnan(share[2].item())  # no positive value: undefined
    assert M.focus_share(maps[:1], threshold=0.6).item() == pytest.approx(0.15)
    with pytest.raises(CamkitError, match=r"threshold=1\.5; expected a number in \(0, 1\]"):
        M.focus_share(maps, threshold=1.5)


def test_entropy_closed_forms() -> None:
    h, w = 6, 7
    uniform_k = torch.zeros(h, w)
    uniform_k.view(-1)[:5] = 3.0
    two_level = torch.full((h, w), 1.0)
    two_level[:2] = 4.0  # 14 px of weight 4, 28 px of weight 1
    total = 14 * 4 + 28
    p_hi, p_lo = 4 / total, 1 / total
    h_two = -(14 * p_hi * math.log(p_hi) + 28 * p_lo * math.log(p_lo))
    one_hot = torch.zeros(h, w)
    one_hot[3, 3] = 2.0
    maps = torch.stack([uniform_k, two_level, torch.ones(h, w), one_hot, two_level * 1e-30])
    nats = M.entropy(maps, normalize=False)
    np.testing.assert_allclose(
        nats.numpy(), [math.log(5), h_two, math.log(h * w), 0.0, h_two], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        M.entropy(maps).numpy(), nats.numpy() / math.log(h * w), rtol=1e-6, atol=1e-7
    )
    assert math.isnan(M.entropy(torch.zeros(1, 3, 3)).item())
    with pytest.raises(CamkitError, match="negative"):
        M.entropy(-maps)


def test_region_energy_boxes_and_masks() -> None:
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(2, 6, 8, generator=g, dtype=torch.float64)
    m = maps.numpy()
    # Integer box (x0, y0, x1, y1) = (2, 1, 5, 4): columns 2..4, rows 1..3.
    e = M.region_energy(maps, boxes=torch.tensor([2, 1, 5, 4]))
    np.testing.assert_allclose(e.numpy(), m[:, 1:4, 2:5].sum((1, 2)) / m.sum((1, 2)), rtol=1e-6)
    # Fractional box: pixel centres c + 0.5 in [1.6, 3.4] -> column 2; r + 0.5 in [0.4, 2.6]
    # -> rows 0..2. Second image: a box covering everything.
    boxes = torch.tensor([[1.6, 0.4, 3.4, 2.6], [0.0, 0.0, 8.0, 6.0]])
    e = M.region_energy(maps, boxes=boxes)
    np.testing.assert_allclose(e.numpy(), [m[0, 0:3, 2].sum() / m[0].sum(), 1.0], rtol=1e-6)
    # Two overlapping boxes per image: their union, overlap counted once.
    two = torch.tensor([[[0, 0, 3, 3], [2, 2, 5, 5]]] * 2)
    union = np.zeros((6, 8), dtype=bool)
    union[0:3, 0:3] = union[2:5, 2:5] = True
    np.testing.assert_allclose(
        M.region_energy(maps, boxes=two).numpy(),
        (m * union).sum((1, 2)) / m.sum((1, 2)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        M.region_energy(maps, mask=torch.from_numpy(union)).numpy(),
        (m * union).sum((1, 2)) / m.sum((1, 2)),
        rtol=1e-6,
    )
    soft = torch.rand(6, 8, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(
        M.region_energy(maps * 1e-25, mask=soft).numpy(),
        (m * soft.numpy()).sum((1, 2)) / m.sum((1, 2)),
        rtol=1e-6,
    )
    with pytest.raises(CamkitError, match="exactly one"):
        M.region_energy(maps)
    with pytest.raises(CamkitError, match=r"\(2, 3\)"):
        M.region_energy(maps, boxes=torch.zeros(2, 3))
    with pytest.raises(CamkitError, match="length 3 but the maps have length 2"):
        M.region_energy(maps, boxes=torch.zeros(3, 4))
    with pytest.raises(CamkitError, match=r"\(5, 8\)"):
        M.region_energy(maps, mask=torch.ones(5, 8, dtype=torch.bool))


# ============================================================== agreement
def test_spearman_matches_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(6)
    a = (torch.randn(5, 9, 11, generator=g) * 2).round()  # heavy ties
    b = (a + torch.randn(5, 9, 11, generator=g) * 2).round()
    b[3] = torch.randn(9, 11, generator=g)
    got = M.spearman(a, b)
    for n in range(5):
        expected = stats.spearmanr(a[n].ravel().numpy(), b[n].ravel().numpy()).statistic
        assert got[n].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(M.spearman(a, a), torch.ones(5))
    assert torch.allclose(M.spearman(a, -a), -torch.ones(5))
    torch.testing.assert_close(M.spearman(torch.exp(a) * 1e-12, b), got)  # monotone invariance
    constant = torch.stack([torch.ones(9, 11), a[0]])
    rho = M.spearman(constant, b[:2])
    assert math.isnan(rho[0].item()) and not math.isnan(rho[1].item())


def test_top_k_iou_matches_set_oracle() -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, 4, (4, 10, 10), generator=g).float()  # ties: raster order decides
    b = torch.randint(0, 4, (4, 10, 10), generator=g).float()
    got = M.top_k_iou(a, b, fraction=0.2)
    for n in range(4):
        def top(v):
            flat = v.ravel().tolist()
            return set(sorted(range(100), key=lambda p: (-flat[p], p))[:20])

        sa, sb = top(a[n]), top(b[n])
        assert got[n].item() == pytest.approx(len(sa & sb) / len(sa | sb))
    ramp = torch.arange(100.0).view(1, 10, 10)
    assert M.top_k_iou(ramp, ramp).item() == 1.0
    assert M.top_k_iou(ramp, -ramp, fraction=0.5).item() == 0.0
    assert M.top_k_iou(ramp, -ramp, fraction=1.0).item() == 1.0  # both regions: every pixel
    with pytest.raises(CamkitError, match="fraction=0"):
        M.top_k_iou(ramp, ramp, fraction=0)


def test_ssim_matches_scikit_image() -> None:
    g = torch.Generator().manual_seed(8)
    a = torch.rand(3, 16, 20, generator=g)
    b = (a + 0.3 * torch.rand(3, 16, 20, generator=g)).clamp(0, 1)
    got = M.ssim(a, b)
    for n in range(3):
        expected = structural_similarity(
            a[n].double().numpy(), b[n].double().numpy(), data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        assert got[n].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(M.ssim(a, a), torch.ones(3))
    with pytest.raises(CamkitError, match="smaller than the 11 x 11"):
        M.ssim(a[:, :8, :8], b[:, :8, :8])


def test_agreement_shape_errors() -> None:
    with pytest.raises(CamkitError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        M.spearman(torch.rand(2, 4, 4), torch.rand(2, 4, 5))
    with pytest.raises(CamkitError, match="unsqueeze"):
        M.top_k_iou(torch.rand(4, 4), torch.rand(4, 4))


# ============================================================== randomisation check
class SideBranchNet(nn.Module):
    """A small CNN whose ``side`` branch runs but cannot influence the logits (times zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(8, 3)
        self.side = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.features(x).mean(dim=(2, 3)))
        return logits + 0 * self.side(x.mean(dim=(2, 3)))


@pytest.fixture
def side_net() -> tuple[SideBranchNet, torch.Tensor]:
    torch.manual_seed(0)
    model = SideBranchNet()
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    return model, x


def test_randomization_cascade(side_net) -> None:
    model, x = side_net
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cam = functools.partial(GradCAM, target_layer="features")
    result = M.randomization_check(model, x, cam, keep_maps=True)

    # Untouched: parameters, buffers, modes, hooks, global random state.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)

    # Steps: modules with parameters in reverse order of execution.
    assert result.steps == ["original", "side", "fc", "features.2", "features.0"]
    reference = GradCAM(model, target_layer="features")(x)
    torch.testing.assert_close(result.original, reference.maps)
    assert torch.equal(result.targets, reference.targets)
    assert result.maps.shape == (5, 8, 16, 16)
    # Row 0 and the step that randomises a branch with no influence: the maps are unchanged.
    for row in (0, 1):
        assert torch.equal(result.maps[row], result.original)
        assert torch.allclose(result.spearman[row], torch.ones(8))
        assert torch.allclose(result.ssim[row], torch.ones(8))
        assert torch.allclose(result.top_k_iou[row], torch.ones(8))
    # Everything randomised: the maps no longer resemble the original ones.
    last = result.spearman[-1]
    finite = last[~last.isnan()]
    assert finite.numel() >= 4
    assert finite.abs().mean().item() < 0.3
    assert result.spearman[2:].nanmean().item() < 0.8


def test_randomization_flags_a_method_that_ignores_the_model(side_net) -> None:
    # An "explainer" that returns the image's brightness does not depend on the model: the
    # check reports similarity 1 at every step.
    model, x = side_net

    def brightness(_model):
        return lambda images, targets: images.mean(dim=1)

    result = M.randomization_check(model, x, brightness, targets=0)
    assert torch.allclose(result.spearman, torch.ones_like(result.spearman))
    assert torch.allclose(result.top_k_iou, torch.ones_like(result.top_k_iou))


def test_randomization_independent_and_seeded(side_net) -> None:
    model, x = side_net
    cam = functools.partial(GradCAM, target_layer="features")
    first = M.randomization_check(
        model, x, cam, layers=["side", "fc", "features.0"], mode="independent", keep_maps=True
    )
    again = M.randomization_check(
        model, x, cam, layers=["side", "fc", "features.0"], mode="independent", keep_maps=True
    )
    other = M.randomization_check(model, x, cam, layers=["fc"], seed=1, keep_maps=True)
    assert first.steps == ["original", "side", "fc", "features.0"]
    assert torch.equal(first.maps, again.maps)
    assert torch.equal(first.maps[1], first.original)
    assert not torch.equal(first.maps[2], other.maps[1])
    # Independent fc step equals a cascade of fc alone with the same seed (seed + step 2).
    fc_only = M.randomization_check(model, x, cam, layers=["side", "fc"], keep_maps=True)
    torch.testing.assert_close(first.maps[2], fc_only.maps[2])
    with pytest.raises(CamkitError, match="'layer9' is not a module"):
        M.randomization_check(model, x, cam, layers=["layer9"])
    with pytest.raises(CamkitError, match="mode='sideways'"):
        M.randomization_check(model, x, cam, mode="sideways")


class OffsetNet(nn.Module):
    """The root holds a parameter of its own (a logit offset) besides its children's."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)
        self.offset = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3))) + self.offset


@pytest.mark.parametrize("mode", ["cascade", "independent"])
def test_default_steps_randomise_a_modules_own_parameters_only(mode) -> None:
    # The root's step must randomise the offset alone, not the whole model with it. An
    # additive logit offset has no effect on Grad-CAM for fixed targets, so that step leaves
    # the maps exactly as the previous step (cascade) or the original (independent) had them.
    torch.manual_seed(0)
    model = OffsetNet()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(11))
    cam = functools.partial(GradCAM, target_layer="features")
    result = M.randomization_check(model, x, cam, mode=mode, keep_maps=True)
    assert result.steps == ["original", "fc", "features.0", "(model)"]
    unchanged = result.original if mode == "independent" else result.maps[-2]
    assert torch.equal(result.maps[-1], unchanged)
    assert not torch.equal(result.maps[-2], result.original)
    # Naming the root explicitly randomises every submodule, as documented for `layers`.
    whole = M.randomization_check(model, x, cam, layers=[""], keep_maps=True)
    assert not torch.equal(whole.maps[1], whole.original)
    own = OffsetNet()
    before = own.fc.weight.detach().clone()
    M.randomize_(own, torch.Generator().manual_seed(0), recurse=False)
    assert torch.equal(own.fc.weight, before)
    assert not torch.equal(own.offset, OffsetNet().offset)


def test_randomization_leaves_the_model_untouched_when_a_step_fails(side_net) -> None:
    model, x = side_net
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(copy_of_model):
        explain = GradCAM(copy_of_model, target_layer="features")

        def run(images, targets):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return explain(images, targets)

        return run

    with pytest.raises(RuntimeError, match="boom"):
        M.randomization_check(model, x, failing)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_randomization_checks_fraction_before_any_step(side_net) -> None:
    model, x = side_net
    calls = []

    def counting(_model):
        calls.append(1)
        return lambda images, targets: images.mean(dim=1)

    with pytest.raises(CamkitError, match="fraction=0"):
        M.randomization_check(model, x, counting, fraction=0)
    assert calls == []


def test_randomize_keeps_moments_and_constant_tensors() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(200, 100)
    norm = nn.BatchNorm1d(5)
    before = layer.weight.detach().clone()
    M.randomize_(layer, torch.Generator().manual_seed(0))
    M.randomize_(norm, torch.Generator().manual_seed(0))
    w = layer.weight.detach()
    assert w.mean().item() == pytest.approx(before.mean().item(), abs=2e-3)
    assert w.std().item() == pytest.approx(before.std().item(), rel=0.02)
    assert abs(np.corrcoef(w.ravel().numpy(), before.ravel().numpy())[0, 1]) < 0.02
    assert torch.equal(norm.weight, torch.ones(5)) and torch.equal(norm.bias, torch.zeros(5))


# ============================================================== device
@pytest.mark.cuda
def test_metrics_run_on_the_gpu_and_match_cpu(images) -> None:
    model = QuadrantModel()
    maps = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(10))
    cpu = M.insertion(model, images, maps, steps=6)
    gpu = M.insertion(model.cuda(), images, maps, steps=6)  # inputs follow the model
    assert gpu.curve.device.type == "cuda" and gpu.auc.device.type == "cuda"
    torch.testing.assert_close(gpu.curve.cpu(), cpu.curve, rtol=1e-5, atol=1e-6)
    a, b = torch.rand(2, 3, 12, 12).cuda(), torch.rand(3, 12, 12).cuda()
    for fn in (M.spearman, M.top_k_iou, M.ssim):
        out = fn(a[0], b)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), fn(a[0].cpu(), b.cpu()), rtol=1e-5, atol=1e-6)
    for fn in (M.focus_share, M.entropy):
        torch.testing.assert_close(fn(b).cpu(), fn(b.cpu()))
    net = SideBranchNet()
    x = torch.rand(4, 3, 16, 16)
    cam = functools.partial(GradCAM, target_layer="features")
    on_cpu = M.randomization_check(net, x, cam)
    on_gpu = M.randomization_check(net.cuda(), x, cam)
    torch.testing.assert_close(on_gpu.spearman.cpu(), on_cpu.spearman, rtol=1e-4, atol=1e-4)
