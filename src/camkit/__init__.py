"""camkit: class-activation maps and receptive fields for PyTorch CNNs.

>>> from camkit import GradCAM
>>> result = GradCAM(model)(images)          # doctest: +SKIP
>>> result.maps.shape                        # (N, H, W), values in [0, 1]   # doctest: +SKIP
"""

from camkit import metrics
from camkit._version import __version__
from camkit.cam import CAMResult, GradCAM, GradCAMPlusPlus
from camkit.dataset import DatasetExplanations, explain_dataset, load_explanations
from camkit.erf import EffectiveReceptiveField, effective_receptive_field
from camkit.errors import CamkitError
from camkit.layers import list_layers
from camkit.receptive_field import Box, ReceptiveField, receptive_field
from camkit.viz import overlay

__all__ = [
    "Box",
    "CAMResult",
    "CamkitError",
    "DatasetExplanations",
    "EffectiveReceptiveField",
    "GradCAM",
    "GradCAMPlusPlus",
    "ReceptiveField",
    "__version__",
    "effective_receptive_field",
    "explain_dataset",
    "list_layers",
    "load_explanations",
    "metrics",
    "overlay",
    "receptive_field",
]
