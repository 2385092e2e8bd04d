"""Measures of one map (focus, entropy, mass in a region) and of agreement between two maps.

Every function takes ``(N, H, W)`` maps and returns one value per image, ``(N,)``, on the maps'
device. None uses an absolute epsilon: the measures that are scale-free by definition
(everything except :func:`ssim`) give the same value for ``maps`` and ``c * maps``, ``c > 0``.
Where a value is undefined (an all-zero map has no distribution), it is NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from camkit._metrics_common import check_maps, check_nonnegative, check_pair, descending_ranks
from camkit.errors import CamkitError

__all__ = ["entropy", "focus_share", "region_energy", "spearman", "ssim", "top_k_iou"]


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for reductions wherever the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _fraction(value: object, name: str, *, allow_zero: bool = False) -> float:
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        low_ok(value) and value <= 1
    ):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise CamkitError(f"{name}={value!r}; expected a number in {interval}.")
    return float(value)


# --------------------------------------------------------------------------- focus
def focus_share(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Share of the image where the map reaches ``threshold`` times its maximum.

    ``share = #{p : m_p >= threshold * max(m)} / (H * W)``. With the default ``0.5`` this is
    the area above half the peak: small for a map focused on a small region, near 1 for a
    flat map.

    Parameters
    ----------
    maps
        ``(N, H, W)`` maps.
    threshold
        Level relative to each map's maximum, in ``(0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 shares in ``(0, 1]``; NaN for a map with no positive value.
    """
    maps = check_maps(maps)
    threshold = _fraction(threshold, "threshold")
    peak = maps.amax(dim=(1, 2), keepdim=True)
    share = (maps >= threshold * peak).float().mean(dim=(1, 2))
    return torch.where(peak[:, 0, 0] > 0, share, torch.nan)


def entropy(maps: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Shannon entropy of each map read as a distribution over pixels.

    ``p = m / sum(m)``, ``H = -sum_p p log p`` (natural log, ``0 log 0 = 0``). With
    ``normalize`` the value is divided by ``log(H * W)``, the entropy of a flat map, so it
    lies in ``[0, 1]`` whatever the resolution: 0 for a single hot pixel, 1 for a flat map.

    Parameters
    ----------
    maps
        ``(N, H, W)`` non-negative maps.
    normalize
        Divide by ``log(H * W)`` (a ``1 x 1`` map then gives 0).

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 entropies (nats, or a share of the maximum); NaN for an all-zero map.
    """
    maps = check_maps(maps)
    check_nonnegative(maps, "maps", "entropy")
    p = maps.flatten(1).to(_exact_dtype(maps.device))
    total = p.sum(dim=1, keepdim=True)
    p = p / torch.where(total > 0, total, 1)
    value = -torch.special.xlogy(p, p).sum(dim=1)
    if normalize:
        size = p.shape[1]
        value = value / math.log(size) if size > 1 else torch.zeros_like(value)
    return torch.where(total[:, 0] > 0, value, torch.nan).float()


def region_energy(
    maps: torch.Tensor,
    *,
    boxes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of each map's total mass that lies inside a box or a mask.

    ``E = sum_p m_p w_p / sum_p m_p`` with ``w`` the region's indicator (or a soft mask with
    weights in ``[0, 1]``). Give exactly one of ``boxes`` and ``mask``.

    Parameters
    ----------
    maps
        ``(N, H, W)`` non-negative maps.
    boxes
        ``(4,)`` (one box for all images), ``(N, 4)`` or ``(N, B, 4)`` boxes
        ``(x0, y0, x1, y1)`` in pixels, x along the width. Pixel ``(r, c)`` is inside when its
        centre ``(c + 0.5, r + 0.5)`` is, so integer boxes are the half-open ranges
        ``x0 <= c < x1``, ``y0 <= r < y1``. With ``B`` boxes per image the region is their
        union (pad images with fewer objects by repeating a box).
    mask
        ``(H, W)`` or ``(N, H, W)`` boolean mask, or weights in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 shares in ``[0, 1]``; NaN for an all-zero map.
    """
    maps = check_maps(maps)
    check_nonnegative(maps, "maps", "region_energy")
    if (boxes is None) == (mask is None):
        raise CamkitError(
            "region_energy needs exactly one region: boxes=(x0, y0, x1, y1) tensor(s) or "
            "mask=(H, W) / (N, H, W) tensor; got "
            + ("neither." if boxes is None else "both.")
        )
    weights = _box_mask(boxes, maps) if boxes is not None else _soft_mask(mask, maps)
    work = _exact_dtype(maps.device)
    m = maps.to(work)
    total = m.sum(dim=(1, 2))
    inside = (m * weights.to(work)).sum(dim=(1, 2))
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1), torch.nan).float()


def _box_mask(boxes: object, maps: torch.Tensor) -> torch.Tensor:
    n, h, w = maps.shape
    b = torch.as_tensor(boxes, device=maps.device)
    if b.dtype == torch.bool or b.is_complex() or b.ndim not in (1, 2, 3) or b.shape[-1] != 4:
        raise CamkitError(
            f"boxes has shape {tuple(b.shape)} and dtype {b.dtype}; expected real (4,), (N, 4) "
            "or (N, B, 4) boxes (x0, y0, x1, y1) in pixels."
        )
    b = b.to(_exact_dtype(maps.device))
    if b.ndim == 1:  # one box for every image
        b = b[None, None]
    elif b.ndim == 2:  # one box per image
        b = b[:, None]
    if b.shape[0] not in (1, n):
        raise CamkitError(
            f"boxes has length {b.shape[0]} but the maps have length {n}; give one box (or one "
            "row of boxes) per image, or a single (4,) box for all of them."
        )
    if not bool(torch.isfinite(b).all()) or bool((b[..., 2] < b[..., 0]).any()) or bool(
        (b[..., 3] < b[..., 1]).any()
    ):
        raise CamkitError(
            "boxes must be finite (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0 (xyxy pixel "
            "coordinates, x along the width)."
        )
    cols = torch.arange(w, device=maps.device, dtype=b.dtype) + 0.5
    rows = torch.arange(h, device=maps.device, dtype=b.dtype) + 0.5
    x0, y0, x1, y1 = (b[..., i, None, None] for i in range(4))  # (n, B, 1, 1)
    inside = (x0 <= cols) & (cols <= x1) & (y0 <= rows[:, None]) & (rows[:, None] <= y1)
    return inside.any(dim=1).expand(n, h, w)


def _soft_mask(mask: object, maps: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise CamkitError(f"mask must be a torch.Tensor, got {type(mask).__name__}.")
    n, h, w = maps.shape
    if mask.shape not in ((h, w), (n, h, w)):
        raise CamkitError(
            f"mask has shape {tuple(mask.shape)}; expected ({h}, {w}) or ({n}, {h}, {w}) to "
            "match the maps."
        )
    weights = mask.to(device=maps.device)
    if weights.dtype != torch.bool:
        if weights.is_complex() or not bool(((weights >= 0) & (weights <= 1)).all()):
            raise CamkitError(
                "mask must be boolean or hold weights in [0, 1] (a soft region); got values "
                "outside that range."
            )
    return torch.broadcast_to(weights, (n, h, w))


# --------------------------------------------------------------------------- agreement
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per-row ranks (0-based), tied values sharing the mean of their positions."""
    values, order = torch.sort(x, dim=1, stable=True)
    length = x.shape[1]
    positions = torch.arange(length, device=x.device).expand_as(order)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    last = torch.where(ends, positions, length - 1).flip(1).cummin(dim=1).values.flip(1)
    mean = (first + last).to(_exact_dtype(x.device)) / 2
    return torch.empty_like(mean).scatter_(1, order, mean)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between two maps, image by image.

    The Pearson correlation of the pixels' ranks, tied values receiving the average of
    their ranks (as ``scipy.stats.spearmanr`` does).

    Parameters
    ----------
    a, b
        ``(N, H, W)`` maps of equal shape.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 correlations in ``[-1, 1]``; NaN where either map is constant.
    """
    a, b = check_pair(a, b)
    ra, rb = _average_ranks(a.flatten(1)), _average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    flat = (a.amax(dim=(1, 2)) == a.amin(dim=(1, 2))) | (b.amax(dim=(1, 2)) == b.amin(dim=(1, 2)))
    rho = (ra * rb).sum(dim=1) / torch.where(flat, 1, denominator)
    return torch.where(flat, torch.nan, rho.clamp(-1, 1)).float()


def top_k_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Intersection over union of the two maps' top-``fraction`` regions.

    Each region holds the ``k = round(fraction * H * W)`` (at least 1) highest pixels; equal
    values are taken in raster (row-major) order, so the regions are always of size ``k``
    and the result is deterministic.

    Parameters
    ----------
    a, b
        ``(N, H, W)`` maps of equal shape.
    fraction
        Share of pixels in each region, in ``(0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 IoU in ``[0, 1]``.
    """
    a, b = check_pair(a, b)
    fraction = _fraction(fraction, "fraction")
    size = a.shape[1] * a.shape[2]
    k = min(size, max(1, round(fraction * size)))
    top_a = descending_ranks(a.flatten(1)) < k
    top_b = descending_ranks(b.flatten(1)) < k
    both = (top_a & top_b).sum(dim=1).float()
    return both / (2 * k - both)


def ssim(
    a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, sigma: float = 1.5
) -> torch.Tensor:
    """Mean structural similarity of two maps (Wang, Bovik, Sheikh, Simoncelli, 2004).

    Local means, variances and covariance are taken under a normalised Gaussian window
    (standard deviation ``sigma``, width ``2 * round(3.5 * sigma) + 1``: 11 px for 1.5) at
    every position where the window fits inside the map;
    ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``
    with ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = data_range``, averaged over the
    positions. This matches ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False``. Unlike the other measures it
    depends on the maps' scale through ``L``: pass maps in ``[0, data_range]``.

    Parameters
    ----------
    a, b
        ``(N, H, W)`` maps of equal shape, ``H, W`` at least the window width.
    data_range
        The maps' value range ``L`` (1 for ``CAMResult.maps``).
    sigma
        Standard deviation of the Gaussian window in pixels.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 mean SSIM, 1 for identical maps.
    """
    a, b = check_pair(a, b)
    for name, value in (("data_range", data_range), ("sigma", sigma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise CamkitError(f"{name}={value!r}; expected a positive number.")
    radius = int(3.5 * sigma + 0.5)
    size = 2 * radius + 1
    if min(a.shape[1:]) < size:
        raise CamkitError(
            f"maps of size {tuple(a.shape[1:])} are smaller than the {size} x {size} SSIM "
            f"window (sigma={sigma}); use a smaller sigma or larger maps."
        )
    work = _exact_dtype(a.device)
    offsets = torch.arange(-radius, radius + 1, device=a.device, dtype=work)
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, g.view(1, 1, -1, 1))
        return F.conv2d(x, g.view(1, 1, 1, -1))

    x, y = a.to(work)[:, None], b.to(work)[:, None]
    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx * mx
    vy = local_mean(y * y) - my * my
    cxy = local_mean(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return index.mean(dim=(1, 2, 3)).float()
