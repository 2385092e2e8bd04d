"""The rules that turn measured numbers into the study's verdicts.

Fit verdict of one model (on the seed means of the last epoch, and per seed):

* **underfits** if its training accuracy stays below ``TRAIN_ACC_UNDERFIT`` (it does not even
  fit the images it was trained on);
* otherwise **overfits** if the generalisation gap (training minus validation accuracy)
  exceeds ``GAP_OVERFIT``;
* otherwise **fits**.

A comparison claim "metric of A is higher (lower) than of B" is decided on the paired
per-seed differences (the models of one seed share data, split and batch order):

* **supported** if every seed's difference points the claimed way and the mean difference is
  larger than ``MIN_EFFECT``;
* **contradicted** if every seed's difference points the other way and the mean difference
  is larger than ``MIN_EFFECT``;
* **inconclusive** otherwise (seeds disagree, or the difference is too small to matter).

A verdict claim ("ResNet-18 overfits") is supported when the verdict on the seed means and
every per-seed verdict say so, contradicted when neither the mean nor any seed does, and
inconclusive otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GAP_OVERFIT = 0.10
TRAIN_ACC_UNDERFIT = 0.90
MIN_EFFECT = 0.01


def fit_verdict(train_acc: float, val_acc: float) -> str:
    if train_acc < TRAIN_ACC_UNDERFIT:
        return "underfits"
    if train_acc - val_acc > GAP_OVERFIT:
        return "overfits"
    return "fits"


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                "values": vals}
    mean = sum(finite) / len(finite)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "min": min(finite), "max": max(finite),
            "values": vals}


@dataclass(frozen=True)
class Comparison:
    """Claim: ``metric`` of model ``a`` is ``higher`` (or lower) than of model ``b``."""

    claim: str       # the original study's words this tests
    metric: str
    a: str
    b: str
    higher: bool

    def decide(self, a_values: Sequence[float], b_values: Sequence[float]) -> dict[str, Any]:
        sign = 1.0 if self.higher else -1.0
        diffs = [sign * (x - y) for x, y in zip(a_values, b_values)]
        finite = [d for d in diffs if math.isfinite(d)]
        mean = sum(finite) / len(finite) if finite else math.nan
        if finite and len(finite) == len(diffs) and abs(mean) > MIN_EFFECT:
            if all(d > 0 for d in finite):
                outcome = "supported"
            elif all(d < 0 for d in finite):
                outcome = "contradicted"
            else:
                outcome = "inconclusive"
        else:
            outcome = "inconclusive"
        return {
            "claim": self.claim,
            "test": f"{self.metric}: {self.a} {'>' if self.higher else '<'} {self.b}",
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "per_seed_difference": [sign * d for d in diffs],  # a - b, as measured
            "mean_difference": sign * mean if math.isfinite(mean) else math.nan,
            "outcome": outcome,
        }


@dataclass(frozen=True)
class VerdictClaim:
    """Claim: ``model``'s fit verdict is ``expected``."""

    claim: str
    model: str
    expected: str

    def decide(self, mean_verdict: str, seed_verdicts: Sequence[str]) -> dict[str, Any]:
        matches = sum(v == self.expected for v in seed_verdicts)
        if mean_verdict == self.expected and matches == len(seed_verdicts):
            outcome = "supported"
        elif mean_verdict != self.expected and matches == 0:
            outcome = "contradicted"
        else:
            outcome = "inconclusive"
        return {
            "claim": self.claim,
            "test": f"verdict of {self.model} is '{self.expected}'",
            "model": self.model,
            "measured": mean_verdict,
            "per_seed": list(seed_verdicts),
            "outcome": outcome,
        }


# The original study's claims, each as tests the measured numbers can decide.
VERDICT_CLAIMS = (
    VerdictClaim("ResNet-18 (the largest) overfits", "resnet18", "overfits"),
    VerdictClaim("MobileNetV2 (the smallest) underfits", "mobilenet_v2", "underfits"),
    VerdictClaim("ResNet-10 is the sweet spot", "resnet10", "fits"),
)
COMPARISONS = (
    Comparison("The larger ResNet overfits more", "gap", "resnet18", "resnet10", higher=True),
    Comparison("ResNet-10 generalises best", "val_acc", "resnet10", "resnet18", higher=True),
    Comparison("ResNet-10 generalises best", "val_acc", "resnet10", "mobilenet_v2", higher=True),
    Comparison("The overfit model attends to narrower regions", "focus_share",
               "resnet18", "resnet10", higher=False),
    Comparison("The overfit model attends to narrower regions", "entropy",
               "resnet18", "resnet10", higher=False),
    Comparison("The sweet-spot model looks at the image broadly", "focus_share",
               "resnet10", "mobilenet_v2", higher=True),
    Comparison("The sweet-spot model looks at the image broadly", "entropy",
               "resnet10", "mobilenet_v2", higher=True),
    Comparison("The underfit model misses the important features", "deletion_auc_rel",
               "mobilenet_v2", "resnet10", higher=True),
    Comparison("The underfit model misses the important features", "insertion_auc_rel",
               "mobilenet_v2", "resnet10", higher=False),
)
