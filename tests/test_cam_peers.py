"""camkit against the peers, where their definitions match, and their pinned deviations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from _cam_reference import activations_and_gradients, gradcampp_raw, minmax, upsample_and_scale

from camkit import GradCAM, GradCAMPlusPlus

CLASSES = [3, 7, 1]


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(3, 3, 96, 128)
    return model, x


def _informative(result) -> np.ndarray:
    keep = ~result.degenerate.numpy()
    assert keep.any()
    return keep


def test_pytorch_grad_cam_gradcam_matches(setup) -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = setup
    ours = GradCAM(model, "layer4")(x, CLASSES)
    with pgc.GradCAM(model=model, target_layers=[model.layer4]) as theirs:
        peer = theirs(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in CLASSES])
    keep = _informative(ours)
    # pytorch-grad-cam scales, resizes with OpenCV, scales again: the same affine result.
    np.testing.assert_allclose(ours.maps.numpy()[keep], peer[keep], atol=2e-3)


def test_pytorch_grad_cam_gradcampp_differs_only_by_its_epsilon(setup) -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = setup
    ours = GradCAMPlusPlus(model, "layer4")(x, CLASSES)
    with pgc.GradCAMPlusPlus(model=model, target_layers=[model.layer4]) as theirs:
        peer = theirs(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in CLASSES])
    a, g = activations_and_gradients(model, "layer4", x, CLASSES)
    keep = _informative(ours)
    exact = upsample_and_scale(gradcampp_raw(a, g)[keep], (96, 128))
    with_eps = upsample_and_scale(gradcampp_raw(a, g, eps=1e-6)[keep], (96, 128))
    np.testing.assert_allclose(ours.maps.numpy()[keep], exact, atol=5e-4)
    # Their maps follow the formula with 1e-6 added to the denominator ...
    np.testing.assert_allclose(peer[keep], with_eps, atol=2e-3)
    # ... which is visibly not the paper's map when gradients are small (random-init ResNet).
    assert np.abs(exact - with_eps).max() > 0.02


def test_captum_layer_gradcam_matches(setup) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    model, x = setup
    ours = GradCAM(model, "layer4")(x, CLASSES)
    attribution = captum_attr.LayerGradCam(model, model.layer4).attribute(
        x, target=CLASSES, relu_attributions=True
    )
    torch.testing.assert_close(ours.raw, attribution[:, 0].detach(), atol=1e-5, rtol=1e-4)
    upsampled = captum_attr.LayerAttribution.interpolate(attribution, (96, 128), "bilinear")
    keep = _informative(ours)
    np.testing.assert_allclose(
        ours.maps.numpy()[keep], minmax(upsampled[:, 0].detach().double().numpy())[keep],
        atol=1e-5,
    )


def test_torchcam_gradcam_matches_and_gradcampp_deviation(setup) -> None:
    methods = pytest.importorskip("torchcam.methods")
    model, x = setup
    ours = GradCAM(model, "layer4")(x, CLASSES)
    extractor = methods.GradCAM(model, "layer4")
    try:
        scores = model(x)
        (theirs,) = extractor(CLASSES, scores, normalized=False)
    finally:
        extractor.remove_hooks()
    torch.testing.assert_close(ours.raw, theirs.detach(), atol=1e-5, rtol=1e-4)

    # torchcam's Grad-CAM++ divides a boolean-indexed copy, so alpha stays G^2:
    # its weights are sum(G^2 * relu(G)). Pin that, and that camkit follows the paper.
    extractor = methods.GradCAMpp(model, "layer4")
    try:
        scores = model(x)
        (theirs_pp,) = extractor(CLASSES, scores, normalized=False)
    finally:
        extractor.remove_hooks()
    a, g = activations_and_gradients(model, "layer4", x, CLASSES)
    undivided = np.maximum(
        np.einsum("nc,nchw->nhw", (g**2 * np.maximum(g, 0)).sum(axis=(2, 3)), a), 0
    )
    np.testing.assert_allclose(
        theirs_pp.detach().double().numpy(), undivided, rtol=1e-3, atol=1e-12
    )
    ours_pp = GradCAMPlusPlus(model, "layer4")(x, CLASSES)
    keep = _informative(ours_pp)
    np.testing.assert_allclose(
        minmax(ours_pp.raw.double().numpy()[keep]), minmax(gradcampp_raw(a, g)[keep]), atol=1e-4
    )
