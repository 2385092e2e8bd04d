"""Drawing maps over images. OpenCV is imported only when something is drawn."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from camkit.errors import CamkitError

__all__ = ["colorize", "overlay", "to_rgb_uint8"]


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - a core dependency
        raise CamkitError(
            "drawing overlays needs OpenCV: pip install opencv-python-headless"
        ) from err
    return cv2


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy() if array.is_floating_point() else (
            array.detach().cpu().numpy()
        )
    return np.asarray(array)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Convert an image to an ``(H, W, 3)`` uint8 RGB array.

    Accepts ``(H, W)``, ``(H, W, 1|3)`` or ``(1|3, H, W)`` arrays or tensors, either uint8 or
    floating point in ``[0, 1]``.
    """
    img = _as_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise CamkitError(
            f"image has shape {image.shape}; expected (H, W), (H, W, 3) or (3, H, W)."
        )
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if np.issubdtype(img.dtype, np.floating):
        return np.ascontiguousarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    raise CamkitError(f"image has dtype {img.dtype}; expected uint8 or floats in [0, 1].")


def colorize(cam_map: Any, colormap: str = "jet") -> np.ndarray:
    """Colour a ``(H, W)`` map with values in ``[0, 1]`` as an RGB uint8 image.

    ``colormap`` names an OpenCV colormap (``"jet"``, ``"turbo"``, ``"viridis"``, ...).
    """
    cv2 = _cv2()
    values = _as_numpy(cam_map)
    if values.ndim != 2:
        raise CamkitError(f"map has shape {values.shape}; expected a single (H, W) map.")
    code = getattr(cv2, f"COLORMAP_{colormap.upper()}", None)
    if code is None:
        raise CamkitError(
            f"unknown colormap {colormap!r}; use an OpenCV colormap name such as 'jet', "
            "'turbo', 'viridis' or 'inferno'."
        )
    levels = (np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, code), cv2.COLOR_BGR2RGB)


def overlay(image: Any, cam_map: Any, *, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend a coloured map over an image.

    Parameters
    ----------
    image
        RGB image: ``(H, W, 3)`` uint8 (or floats in ``[0, 1]``), grayscale ``(H, W)``, or a
        ``(3, H, W)`` tensor.
    cam_map
        ``(h, w)`` map in ``[0, 1]`` (e.g. ``result.maps[0]``); resized bilinearly to the
        image when the sizes differ.
    alpha
        Weight of the map in the blend, in ``[0, 1]``.
    colormap
        OpenCV colormap name.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise CamkitError(f"alpha={alpha} must lie in [0, 1].")
    cv2 = _cv2()
    rgb = to_rgb_uint8(image)
    values = _as_numpy(cam_map).astype(np.float32)
    if values.ndim != 2:
        raise CamkitError(
            f"map has shape {values.shape}; pass one (H, W) map, e.g. result.maps[0]."
        )
    if values.shape != rgb.shape[:2]:
        values = cv2.resize(values, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = colorize(values, colormap)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)
