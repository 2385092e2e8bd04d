"""An independent, slow float64 re-computation of Grad-CAM and Grad-CAM++ for the tests.

It shares no code with camkit: a plain forward hook keeps the layer output, a full
``backward()`` on a float64 copy of the model gives the gradient, and the papers' formulas
are written out in numpy exactly as printed (powers of the gradient included).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def activations_and_gradients(
    model: nn.Module, layer: str, images: torch.Tensor, classes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Return A and dS/dA, float64, shape (N, C, h, w), one class per image."""
    twin = copy.deepcopy(model).double().eval()
    module = dict(twin.named_modules())[layer]
    kept: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output.retain_grad()
        kept.append(output)
        return output * 1.0  # a new tensor, so later in-place ops leave `output` alone

    handle = module.register_forward_hook(keep)
    try:
        logits = twin(images.double())
        score = logits[torch.arange(len(classes)), torch.tensor(classes)].sum()
        score.backward()
    finally:
        handle.remove()
    (activation,) = kept
    return activation.detach().numpy(), activation.grad.numpy()


def gradcam_raw(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    weights = g.mean(axis=(2, 3))
    return np.maximum(np.einsum("nc,nchw->nhw", weights, a), 0.0)


def gradcampp_raw(a: np.ndarray, g: np.ndarray, eps: float = 0.0) -> np.ndarray:
    g2, g3 = g**2, g**3
    sum_a = a.sum(axis=(2, 3), keepdims=True)
    denominator = 2.0 * g2 + sum_a * g3 + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(denominator != 0.0, g2 / denominator, 0.0)
    weights = (alpha * np.maximum(g, 0.0)).sum(axis=(2, 3))
    return np.maximum(np.einsum("nc,nchw->nhw", weights, a), 0.0)


def upsample_and_scale(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (half-pixel centres) upsampling, then per-map min-max."""
    up = F.interpolate(
        torch.from_numpy(raw)[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    low = up.min(axis=(1, 2), keepdims=True)
    high = up.max(axis=(1, 2), keepdims=True)
    return (up - low) / (high - low)


def minmax(raw: np.ndarray) -> np.ndarray:
    low = raw.min(axis=(-2, -1), keepdims=True)
    high = raw.max(axis=(-2, -1), keepdims=True)
    return (raw - low) / (high - low)
