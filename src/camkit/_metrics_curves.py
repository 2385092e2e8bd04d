"""Deletion and insertion curves (Petsiuk, Das and Saenko, "RISE", BMVC 2018).

Pixels are ranked by decreasing map value. The deletion curve replaces the top-ranked pixels
by a baseline, a growing share at a time, and records the model's score for the target class;
the insertion curve starts from the baseline and puts the top-ranked pixels back. A map that
points at what the model uses makes the deletion score fall early (small area) and the
insertion score rise early (large area).

All ``N * (steps + 1)`` perturbed images are built on the model's device from one rank
tensor and run through the model in chunks of ``batch_size`` rows, under ``torch.no_grad()``
and in eval mode; the model's per-module training flags are restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from camkit._hooks import ModelState
from camkit._metrics_common import check_maps, descending_ranks, model_anchor
from camkit.errors import CamkitError
from camkit.targets import OutputSelector, Targets, _as_index_tensor, select_output

__all__ = ["Baseline", "CurveResult", "Score", "deletion", "gaussian_blur", "insertion"]

#: What a removed (deletion) or not-yet-revealed (insertion) pixel is replaced with.
Baseline = str | float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
#: ``"probability"``, ``"logit"`` or ``f(output, rows) -> (B,)`` scores.
Score = str | Callable[[object, torch.Tensor], torch.Tensor]

_BASELINES = ("zeros", "mean", "blur")
_SCORES = ("probability", "logit")


@dataclass(frozen=True)
class CurveResult:
    """A deletion or insertion curve per image.

    Attributes
    ----------
    fractions
        ``(steps + 1,)`` share of pixels removed (deletion) or revealed (insertion) at each
        step, from 0 to 1; step ``i`` alters ``floor(i * H * W / steps)`` pixels.
    curve
        ``(N, steps + 1)`` float32 score of the target after each step.
    auc
        ``(N,)`` float32 area under ``curve`` over ``fractions`` (trapezoid rule).
    targets
        ``(N,)`` class indices scored, or ``None`` when ``score`` was a callable.
    kind
        ``"deletion"`` or ``"insertion"``.
    """

    fractions: torch.Tensor
    curve: torch.Tensor
    auc: torch.Tensor
    targets: torch.Tensor | None
    kind: Literal["deletion", "insertion"]


def gaussian_blur(images: torch.Tensor, sigma: float = 5.0, size: int = 11) -> torch.Tensor:
    """Blur each channel with a normalised, truncated Gaussian kernel.

    The defaults follow the RISE authors' insertion baseline (sigma 5 px, an 11 px kernel).
    Borders are padded by symmetric reflection (the edge pixel repeated, as in
    ``scipy.ndimage``'s ``mode="reflect"``) rather than zeros, so they do not darken.

    Parameters
    ----------
    images
        ``(N, C, H, W)`` floating tensor.
    sigma
        Standard deviation of the Gaussian in pixels, > 0.
    size
        Odd kernel width in pixels (the kernel is ``size x size``, separable).

    Returns
    -------
    torch.Tensor
        The blurred images, same shape, device and dtype.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CamkitError(f"images has shape {got}; expected (N, C, H, W).")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise CamkitError(f"sigma={sigma!r}; expected a positive number of pixels.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise CamkitError(f"size={size!r}; expected an odd positive int, e.g. 11.")
    work = torch.promote_types(images.dtype, torch.float32)
    x = images.to(work)
    offsets = torch.arange(size, device=x.device, dtype=work) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    radius = size // 2
    for dim in (2, 3):
        length = x.shape[dim]
        index = torch.arange(-radius, length + radius, device=x.device) % (2 * length)
        index = torch.where(index >= length, 2 * length - 1 - index, index)
        padded = x.index_select(dim, index)
        shape = (1, 1, size, 1) if dim == 2 else (1, 1, 1, size)
        weight = kernel.reshape(shape).expand(channels, 1, *shape[2:])
        x = F.conv2d(padded, weight, groups=channels)
    return x.to(images.dtype)


def deletion(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Targets = None,
    *,
    steps: int = 50,
    baseline: Baseline = "zeros",
    score: Score = "probability",
    output: OutputSelector = None,
    batch_size: int = 64,
) -> CurveResult:
    """Deletion curve: remove the most salient pixels first and watch the score fall.

    Parameters
    ----------
    model
        The classifier explained. It is not moved; inputs go to its device and dtype.
    images
        ``(N, C, H, W)`` images.
    maps
        ``(N, H, W)`` saliency maps at the images' size (``CAMResult.maps``). Pixels are
        ranked by decreasing value; equal values are taken in raster (row-major) order.
    targets
        ``None`` (each unaltered image's top class), an int, or one class per image.
    steps
        Number of steps; step ``i`` has ``floor(i * H * W / steps)`` pixels removed.
    baseline
        What removed pixels become: ``"zeros"``, ``"mean"`` (each image's per-channel mean),
        ``"blur"`` (:func:`gaussian_blur`), a number, a tensor broadcastable to
        ``(N, C, H, W)``, or a callable ``images -> baseline``.
    score
        ``"probability"`` (softmax of the target; an error for a single-output model, whose
        softmax is always 1), ``"logit"``, or a callable
        ``f(output, rows) -> (B,)`` where ``rows`` holds, for each of the ``B`` output rows,
        the index of its image in ``images``.
    output
        Selector for models returning a tuple or dict, as in :class:`camkit.GradCAM`.
    batch_size
        Perturbed images per forward pass.

    Returns
    -------
    CurveResult
    """
    return _curve(
        "deletion", model, images, maps, targets, steps, baseline, score, output, batch_size
    )


def insertion(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Targets = None,
    *,
    steps: int = 50,
    baseline: Baseline = "blur",
    score: Score = "probability",
    output: OutputSelector = None,
    batch_size: int = 64,
) -> CurveResult:
    """Insertion curve: reveal the most salient pixels first on a baseline image.

    The parameters are those of :func:`deletion`; the baseline (what unrevealed pixels show)
    defaults to a blurred copy of the image, as in the RISE paper. Step 0 is the baseline
    alone, the last step the unaltered image.

    Returns
    -------
    CurveResult
    """
    return _curve(
        "insertion", model, images, maps, targets, steps, baseline, score, output, batch_size
    )


# --------------------------------------------------------------------------- internals
def _curve(
    kind: Literal["deletion", "insertion"],
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Targets,
    steps: int,
    baseline: Baseline,
    score: Score,
    output: OutputSelector,
    batch_size: int,
) -> CurveResult:
    if not isinstance(model, nn.Module):
        raise CamkitError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    images = _check_images(images)
    maps = check_maps(maps)
    n, _, h, w = images.shape
    if maps.shape != (n, h, w):
        raise CamkitError(
            f"maps has shape {tuple(maps.shape)} but images {tuple(images.shape)} need "
            f"({n}, {h}, {w}): one map per image at the image's size (CAMResult.maps is; "
            "upsample others with torch.nn.functional.interpolate)."
        )
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CamkitError(f"{name}={value!r}; expected a positive int.")
    if not callable(score) and score not in _SCORES:
        raise CamkitError(
            f"score={score!r}; expected 'probability', 'logit' or a callable "
            "f(output, rows) -> (B,) scores."
        )
    if callable(score) and targets is not None:
        raise CamkitError(
            "targets has no effect when score is a callable: the callable receives the "
            "output and each row's image index (rows) and picks the score itself."
        )

    device, dtype = model_anchor(model, images)
    images = images.to(device)
    base = _baseline(baseline, images).to(dtype)
    images = images.to(dtype)
    ranks = descending_ranks(maps.to(device).flatten(1))
    hw = h * w
    counts = torch.div(torch.arange(steps + 1, device=device) * hw, steps, rounding_mode="floor")
    fractions = counts.float() / hw

    state = ModelState(model)
    try:
        model.eval()
        with torch.no_grad():
            labels = None
            if not callable(score):
                labels = _labels(model, images, targets, output, batch_size)
            rows_total = n * (steps + 1)
            curve = torch.empty(rows_total, dtype=torch.float32, device=device)
            for start in range(0, rows_total, batch_size):
                rows = torch.arange(start, min(start + batch_size, rows_total), device=device)
                image_of, step_of = rows // (steps + 1), rows % (steps + 1)
                altered = (ranks[image_of] < counts[step_of, None]).view(-1, 1, h, w)
                if kind == "deletion":
                    x = torch.where(altered, base[image_of], images[image_of])
                else:
                    x = torch.where(altered, images[image_of], base[image_of])
                scores = _row_scores(model(x), image_of, labels, score, output, start == 0)
                curve[rows] = scores
    finally:
        state.restore()
    curve = curve.view(n, steps + 1)
    auc = torch.trapezoid(curve, fractions, dim=1)
    return CurveResult(fractions, curve, auc, labels, kind)


def _check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise CamkitError(
            f"images must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}."
        )
    if images.ndim != 4 or 0 in images.shape:
        hint = " For one image use images.unsqueeze(0)." if images.ndim == 3 else ""
        raise CamkitError(
            f"images has shape {tuple(images.shape)}; expected (N, C, H, W) with no empty "
            f"axis.{hint}"
        )
    return images if images.is_floating_point() else images.float()


def _baseline(baseline: Baseline, images: torch.Tensor) -> torch.Tensor:
    work = images.to(torch.promote_types(images.dtype, torch.float32))
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(work)
        if baseline == "mean":
            return work.mean(dim=(2, 3), keepdim=True).expand_as(work)
        if baseline == "blur":
            return gaussian_blur(work)
        raise CamkitError(
            f"baseline={baseline!r}; expected one of {', '.join(map(repr, _BASELINES))}, a "
            "number, a tensor or a callable images -> baseline images."
        )
    if isinstance(baseline, bool):
        raise CamkitError(f"baseline={baseline!r}; expected a number, not a bool.")
    if isinstance(baseline, (int, float)):
        return torch.full_like(work, float(baseline))
    if isinstance(baseline, torch.Tensor):
        value = baseline
    elif callable(baseline):
        value = baseline(work)
        if not isinstance(value, torch.Tensor):
            raise CamkitError(
                f"the baseline callable returned {type(value).__name__}; it must return a "
                f"tensor broadcastable to the images' shape {tuple(work.shape)}."
            )
    else:
        raise CamkitError(
            f"baseline of type {type(baseline).__name__} is not supported; expected a name "
            f"({', '.join(map(repr, _BASELINES))}), a number, a tensor or a callable."
        )
    try:
        return torch.broadcast_to(value.to(device=work.device, dtype=work.dtype), work.shape)
    except RuntimeError as err:
        raise CamkitError(
            f"baseline has shape {tuple(value.shape)}, which does not broadcast to the images' "
            f"shape {tuple(work.shape)}; give (C, 1, 1), (C, H, W) or (N, C, H, W)."
        ) from err


def _labels(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    output: OutputSelector,
    batch_size: int,
) -> torch.Tensor:
    """Class per image: the given ones, or the top class of the unaltered images."""
    n = images.shape[0]
    if targets is not None:
        labels = _as_index_tensor(targets, n, images.device)
        if labels.ndim != 1:
            raise CamkitError(
                f"targets has shape {tuple(labels.shape)}; curves score one class per image: "
                "give an int or (N,) classes (call once per class for several)."
            )
        return labels
    tops = [
        _logits(model(images[i : i + batch_size]), output).argmax(dim=1)
        for i in range(0, n, batch_size)
    ]
    return torch.cat(tops)


def _logits(raw: object, output: OutputSelector) -> torch.Tensor:
    logits = select_output(raw, output)
    if logits.ndim != 2:
        raise CamkitError(
            f"the model's output has shape {tuple(logits.shape)}, not (N, num_classes); pass "
            "score=callable f(output, rows) -> (B,) to say what to record."
        )
    return logits


def _row_scores(
    raw: object,
    image_of: torch.Tensor,
    labels: torch.Tensor | None,
    score: Score,
    output: OutputSelector,
    check_range: bool,
) -> torch.Tensor:
    if callable(score):
        picked = raw if output is None else select_output(raw, output)
        values = score(picked, image_of)
        if not isinstance(values, torch.Tensor) or values.shape != image_of.shape:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise CamkitError(
                f"the score callable returned {got} for {image_of.numel()} rows; it must "
                f"return a ({image_of.numel()},) tensor, one score per row."
            )
        return values.detach().float()
    logits = _logits(raw, output).float()
    if check_range and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise CamkitError(
            f"targets range over [{int(labels.min())}, {int(labels.max())}] but the model has "
            f"{logits.shape[1]} outputs; classes must be in [0, {logits.shape[1] - 1}]."
        )
    if score == "probability":
        if check_range and logits.shape[1] == 1:
            raise CamkitError(
                "the model has a single output, whose softmax is 1 for every input, so the "
                "curve would be flat; pass score='logit', or a callable such as "
                "lambda out, rows: out[:, 0].sigmoid() for a binary classifier."
            )
        logits = logits.softmax(dim=1)
    return logits.gather(1, labels[image_of][:, None])[:, 0]
