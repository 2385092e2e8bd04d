"""Checks and small tensor helpers shared by the ``camkit.metrics`` modules."""

from __future__ import annotations

import torch
from torch import nn

from camkit.errors import CamkitError

__all__ = ["check_maps", "check_nonnegative", "check_pair", "descending_ranks", "model_anchor"]


def check_maps(maps: object, name: str = "maps") -> torch.Tensor:
    """Return ``maps`` as a floating ``(N, H, W)`` tensor with finite values, or raise."""
    if not isinstance(maps, torch.Tensor):
        raise CamkitError(
            f"{name} must be a torch.Tensor of shape (N, H, W), got {type(maps).__name__} "
            "(a CAM call's maps are in result.maps)."
        )
    if maps.ndim != 3:
        hint = ""
        if maps.ndim == 2:
            hint = f" For a single map use {name}.unsqueeze(0)."
        elif maps.ndim == 4:
            hint = (
                f" For (N, 1, H, W) use {name}[:, 0]; for maps with a class axis (N, K, H, W) "
                f"pick one class, e.g. {name}[:, k]."
            )
        raise CamkitError(
            f"{name} has shape {tuple(maps.shape)}; expected (N, H, W).{hint}"
        )
    if 0 in maps.shape:
        raise CamkitError(f"{name} has shape {tuple(maps.shape)}; N, H and W must be non-zero.")
    if maps.dtype == torch.bool or maps.is_complex():
        raise CamkitError(f"{name} has dtype {maps.dtype}; expected real values.")
    if not maps.is_floating_point():
        maps = maps.float()
    if not bool(torch.isfinite(maps).all()):
        raise CamkitError(
            f"{name} contains NaN or infinite values; metrics are defined for finite maps only."
        )
    return maps


def check_pair(a: object, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two map batches that are compared image by image."""
    a, b = check_maps(a, "a"), check_maps(b, "b")
    if a.shape != b.shape:
        raise CamkitError(
            f"a has shape {tuple(a.shape)} but b has shape {tuple(b.shape)}; the two map "
            "batches must match (resize one with torch.nn.functional.interpolate first)."
        )
    if a.device != b.device:
        b = b.to(a.device)
    return a, b


def check_nonnegative(maps: torch.Tensor, name: str, what: str) -> None:
    """Raise when a map that is read as a mass distribution has negative values."""
    if bool((maps < 0).any()):
        raise CamkitError(
            f"{name} has negative values (min {float(maps.min()):.3g}); {what} treats a map as "
            "a distribution of non-negative mass. Use the ReLU'd maps (CAMResult.maps) or "
            "clamp them: maps.clamp(min=0)."
        )


def descending_ranks(values: torch.Tensor) -> torch.Tensor:
    """Position of every entry in the per-row descending order, ties by lower index first.

    Parameters
    ----------
    values
        ``(N, L)`` tensor.

    Returns
    -------
    torch.Tensor
        ``(N, L)`` long tensor: ``0`` for the largest value of each row. A stable sort keeps
        equal values in their original (raster) order, so the result is deterministic.
    """
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    positions = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def model_anchor(model: nn.Module, fallback: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype that inputs to ``model`` should have."""
    reference = next(
        (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None
    )
    if reference is None:
        dtype = fallback.dtype if fallback.is_floating_point() else torch.float32
        return fallback.device, dtype
    return reference.device, reference.dtype
