"""What the study measures on a trained model: Grad-CAM maps, their statistics, receptive fields.

* Maps: Grad-CAM at the model's target layer for every validation image, explaining the
  predicted class (what the model used for its answer).
* Focus share (pixels at or above half the map's maximum) and normalised entropy of every
  map: low values mean a narrow map, high values a broad one.
* Deletion and insertion areas (Petsiuk et al., 2018) on a fixed stratified subset of the
  validation images: pixels are removed (set to the data's black background) or revealed
  (from a blurred copy) in order of map value while the predicted class's probability is
  recorded. A faithful map has a low deletion and a high insertion area. The areas are also
  given relative to the unaltered image's probability, which compares models of different
  confidence fairly.
* The analytic receptive field of the target layer, and the input box that each image's
  hottest map cell sees.
* The effective receptive field (Luo et al., 2016) of the target layer's centre cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import camkit
from camkit import metrics

CAM_BATCH = 128


@dataclass
class ModelMaps:
    """Grad-CAM of one trained model over the validation images (kept on the CPU)."""

    maps: torch.Tensor        # (V, H, W) in [0, 1]
    raw: torch.Tensor         # (V, h, w)
    preds: torch.Tensor       # (V,) predicted classes (the classes explained)
    confidence: torch.Tensor  # (V,) softmax probability of the prediction
    degenerate: torch.Tensor  # (V,) bool
    layer: str


@dataclass
class MapStats:
    focus_share: float
    entropy: float
    deletion_auc: float
    insertion_auc: float
    deletion_auc_rel: float
    insertion_auc_rel: float
    degenerate_maps: int
    focus_images: int
    curve_images: int
    deletion_curve: list[float] = field(default_factory=list)
    insertion_curve: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def explain(model: nn.Module, target_layer: str, x: torch.Tensor) -> ModelMaps:
    """Grad-CAM of the predicted class for every image of ``x``, in batches."""
    cam = camkit.GradCAM(model, target_layer=target_layer)
    parts = []
    for start in range(0, len(x), CAM_BATCH):
        res = cam(x[start : start + CAM_BATCH])
        probs = res.output.softmax(dim=1)
        parts.append((
            res.maps.cpu(), res.raw.cpu(), res.targets.cpu(),
            probs.gather(1, res.targets[:, None])[:, 0].cpu(), res.degenerate.cpu(),
        ))
    cat = [torch.cat(items) for items in zip(*parts)]
    return ModelMaps(*cat, layer=res.layer)


def map_statistics(
    model: nn.Module,
    x: torch.Tensor,
    explained: ModelMaps,
    curve_idx: np.ndarray,
    *,
    steps: int,
    background: torch.Tensor,
) -> MapStats:
    """Focus share and entropy over every map; deletion/insertion over ``curve_idx``."""
    focus = metrics.focus_share(explained.maps)
    ent = metrics.entropy(explained.maps)
    idx = torch.as_tensor(curve_idx)
    images, maps, targets = x[idx.to(x.device)], explained.maps[idx], explained.preds[idx]
    dele = metrics.deletion(model, images, maps, targets, steps=steps, baseline=background)
    ins = metrics.insertion(model, images, maps, targets, steps=steps, baseline="blur")
    return MapStats(
        focus_share=_nanmean(focus),
        entropy=_nanmean(ent),
        deletion_auc=_nanmean(dele.auc),
        insertion_auc=_nanmean(ins.auc),
        deletion_auc_rel=_nanmean(_relative_auc(dele.curve, dele.fractions, dele.curve[:, 0])),
        insertion_auc_rel=_nanmean(_relative_auc(ins.curve, ins.fractions, ins.curve[:, -1])),
        degenerate_maps=int(explained.degenerate.sum()),
        focus_images=int(torch.isfinite(focus).sum()),
        curve_images=len(curve_idx),
        deletion_curve=dele.curve.float().mean(0).cpu().tolist(),
        insertion_curve=ins.curve.float().mean(0).cpu().tolist(),
        fractions=dele.fractions.cpu().tolist(),
    )


def _relative_auc(curve: torch.Tensor, fractions: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Area under ``curve / full``: the curve relative to the unaltered image's probability.

    Raw areas favour a model that is never confident (its probabilities are low whatever is
    removed); dividing by each image's own probability compares the shapes of the curves.
    """
    rel = curve.float() / full.float().clamp_min(1e-12)[:, None]
    return torch.trapezoid(rel, fractions.float().to(rel.device), dim=1)


def _nanmean(values: torch.Tensor) -> float:
    values = values.detach().float().cpu()
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


# ---------------------------------------------------------------- receptive fields


@dataclass
class FieldInfo:
    """The analytic receptive field of a target layer, or why it is not available."""

    size: tuple[int, int] | None
    stride: tuple[int, int] | None
    padding: tuple[int, int] | None
    entry: Any = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size) if self.size else None,
            "stride": list(self.stride) if self.stride else None,
            "padding": list(self.padding) if self.padding else None,
            "note": self.note,
        }

    def hottest_box(self, raw_map: torch.Tensor) -> tuple[tuple[int, int], Any, Any] | None:
        """The hottest cell ``(i, j)`` of one raw map and the input box it sees.

        Returns the cell, the box clipped to the image and the unclipped box (which may
        reach beyond the image on every side when the field is larger than the image).
        """
        if self.entry is None:
            return None
        w = raw_map.shape[-1]
        flat = int(torch.argmax(raw_map.reshape(-1)))
        i, j = divmod(flat, w)
        return (i, j), self.entry.box(i, j), self.entry.box(i, j, clip=False)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (int, float)):
        return (int(value), int(value))
    return tuple(int(v) for v in value)


def receptive_field_of(model: nn.Module, layer: str, image_shape: tuple[int, ...]) -> FieldInfo:
    """``camkit.receptive_field`` of ``layer``; a note instead when it cannot be computed."""
    try:
        rf = camkit.receptive_field(model, input_size=tuple(image_shape))
        entry = rf[layer]
        return FieldInfo(_pair(entry.size), _pair(entry.stride), _pair(entry.padding), entry)
    except NotImplementedError:
        return FieldInfo(None, None, None, note="camkit.receptive_field is not implemented yet")
    except Exception as exc:  # report, do not hide: the note goes into the report
        return FieldInfo(None, None, None, note=f"receptive field failed: {exc}")


@dataclass
class ErfInfo:
    """The effective receptive field of the target layer's centre cell."""

    map: np.ndarray | None      # (H, W) normalised gradient magnitude, or None
    std: tuple[float, float] | None
    radius: float | None        # radius holding the library's default share of the mass
    cell: tuple[int, int] | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "std": list(self.std) if self.std else None,
            "radius": self.radius,
            "cell": list(self.cell) if self.cell else None,
            "note": self.note,
        }


def effective_field_of(model: nn.Module, layer: str, inputs: torch.Tensor) -> ErfInfo:
    """``camkit.effective_receptive_field`` over ``inputs``; a note when it is unavailable."""
    try:
        erf = camkit.effective_receptive_field(model, layer, inputs=inputs)
    except NotImplementedError:
        return ErfInfo(None, None, None, None, note="camkit.effective_receptive_field is not "
                       "implemented yet")
    except Exception as exc:
        return ErfInfo(None, None, None, None, note=f"effective receptive field failed: {exc}")
    erf_map = getattr(erf, "map", None)
    if isinstance(erf_map, torch.Tensor):
        erf_map = erf_map.detach().float().cpu().numpy()
    std = getattr(erf, "std", None)
    radius = getattr(erf, "radius", None)
    cell = getattr(erf, "cell", None)
    return ErfInfo(
        erf_map,
        tuple(float(s) for s in std) if std is not None else None,
        float(radius) if radius is not None else None,
        tuple(int(c) for c in cell) if cell is not None else None,
    )
