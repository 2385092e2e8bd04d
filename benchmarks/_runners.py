"""What each competitor computes in one timed call.

Every CAM runner takes ``(images, targets)`` and returns input-size maps in ``[0, 1]``, one
per image, for the given class indices, so that all competitors do the same job:

* camkit: its public call (``result.maps``).
* pytorch-grad-cam: its public call (it resizes with OpenCV and scales on the CPU itself).
* torchcam: a grad-enabled forward, the extractor's call (maps at layer resolution, min-max
  scaled), bilinear upsampling to the input size (``align_corners=False``) and min-max scaling
  again, so that, like the others, the map is scaled after upsampling.
* captum: ``LayerGradCam.attribute(..., relu_attributions=True)``, bilinear upsampling with
  ``LayerAttribution.interpolate`` and per-image min-max scaling (captum leaves maps unscaled).

The floors are not CAMs: a no-grad forward, a grad-enabled forward, and a forward plus a full
backward pass (parameter gradients included) of the same target scores.

Imports of the peers happen inside the factories, so a process only loads what it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Runner = Callable[[torch.Tensor, torch.Tensor], object]

#: Target layer per model (the last convolutional stage, as the peers' docs use).
TARGET_LAYERS = {
    "resnet18": "layer4",
    "resnet50": "layer4",
    "mobilenet_v2": "features.18",
}

FLOORS = ("forward_nograd", "forward_grad", "forward_backward")
CAM_COMPETITORS = ("camkit", "pytorch-grad-cam", "torchcam", "captum")
METHODS = ("gradcam", "gradcampp")


def supports(competitor: str, method: str) -> bool:
    """Whether ``competitor`` implements ``method`` (captum has no Grad-CAM++)."""
    return not (competitor == "captum" and method == "gradcampp")


def build_model(name: str) -> nn.Module:
    """A randomly initialised torchvision classifier in eval mode, identical in every process."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def make_inputs(batch: int, size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible random batch and one random class index per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    targets = torch.randint(0, 1000, (batch,), generator=generator)
    return images, targets


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling over the last two axes; a flat map becomes zeros."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), 0)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) upsampling of ``(N, h, w)`` maps to ``size``."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def make_runner(competitor: str, method: str, model: nn.Module, layer: str, size: int) -> Runner:
    """The callable timed for one competitor (see the module docstring)."""
    factories: dict[str, Callable[..., Runner]] = {
        "forward_nograd": _forward_nograd,
        "forward_grad": _forward_grad,
        "forward_backward": _forward_backward,
        "camkit": _camkit,
        "pytorch-grad-cam": _pytorch_grad_cam,
        "torchcam": _torchcam,
        "captum": _captum,
    }
    if competitor not in factories:
        raise ValueError(f"unknown competitor {competitor!r}; known: {', '.join(factories)}")
    if not supports(competitor, method):
        raise ValueError(f"{competitor} has no {method}")
    return factories[competitor](model, layer, method, (size, size))


# --------------------------------------------------------------------------- floors
def _forward_nograd(model, layer, method, size):
    def run(images, targets):
        with torch.no_grad():
            return model(images)

    return run


def _forward_grad(model, layer, method, size):
    def run(images, targets):
        with torch.enable_grad():
            return model(images).detach()

    return run


def _forward_backward(model, layer, method, size):
    def run(images, targets):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(images)
            logits.gather(1, targets[:, None]).sum().backward()
        return logits.detach()

    return run


# --------------------------------------------------------------------------- CAMs
def _camkit(model, layer, method, size):
    import camkit

    cls = {"gradcam": camkit.GradCAM, "gradcampp": camkit.GradCAMPlusPlus}[method]
    cam = cls(model, target_layer=layer)

    def run(images, targets):
        return cam(images, targets).maps

    return run


def _pytorch_grad_cam(model, layer, method, size):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {
        "gradcam": pytorch_grad_cam.GradCAM,
        "gradcampp": pytorch_grad_cam.GradCAMPlusPlus,
    }[method]
    cam = cls(model=model, target_layers=[model.get_submodule(layer)])

    def run(images, targets):
        return cam(
            input_tensor=images,
            targets=[ClassifierOutputTarget(int(t)) for t in targets],
        )

    run.extractor = cam  # kept alive (and reachable for the equality check)
    return run


def _torchcam(model, layer, method, size):
    from torchcam import methods

    cls = {"gradcam": methods.GradCAM, "gradcampp": methods.GradCAMpp}[method]
    extractor = cls(model, target_layer=layer, input_shape=(3, *size))

    def run(images, targets):
        with torch.enable_grad():
            scores = model(images)
            layer_maps = extractor(class_idx=targets.tolist(), scores=scores)[0]
        return minmax(upsample(layer_maps, size))

    run.extractor = extractor
    return run


def _captum(model, layer, method, size):
    from captum.attr import LayerAttribution, LayerGradCam

    explainer = LayerGradCam(model, model.get_submodule(layer))

    def run(images, targets):
        layer_maps = explainer.attribute(images, target=targets, relu_attributions=True)
        return minmax(LayerAttribution.interpolate(layer_maps, size, "bilinear")[:, 0])

    run.explainer = explainer
    return run
