"""Measures of class-activation maps: faithfulness, focus, agreement and a sanity check.

* :func:`deletion`, :func:`insertion`: how fast the target's score falls (rises) when the
  pixels a map ranks highest are removed (revealed); Petsiuk et al., RISE, BMVC 2018.
* :func:`focus_share`, :func:`entropy`, :func:`region_energy`: how concentrated a map is,
  and how much of its mass falls inside an object box or mask.
* :func:`spearman`, :func:`top_k_iou`, :func:`ssim`: agreement between two maps.
* :func:`randomization_check`: how much the maps change when the model's parameters are
  randomised from the top down; Adebayo et al., NeurIPS 2018.

Everything is batched torch on the maps' (or model's) device and returns one value per image.

>>> from camkit import GradCAM, metrics
>>> res = GradCAM(model)(images)                                   # doctest: +SKIP
>>> metrics.deletion(model, images, res.maps, res.targets).auc     # doctest: +SKIP
"""

from __future__ import annotations

from camkit._metrics_curves import CurveResult, deletion, gaussian_blur, insertion
from camkit._metrics_maps import entropy, focus_share, region_energy, spearman, ssim, top_k_iou
from camkit._metrics_sanity import RandomizationResult, randomization_check, randomize_

__all__ = [
    "CurveResult",
    "RandomizationResult",
    "deletion",
    "entropy",
    "focus_share",
    "gaussian_blur",
    "insertion",
    "randomization_check",
    "randomize_",
    "region_energy",
    "spearman",
    "ssim",
    "top_k_iou",
]
