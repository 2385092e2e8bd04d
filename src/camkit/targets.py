"""Turning the user's ``targets`` and the model's output into the scores to explain."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from camkit.errors import CamkitError

__all__ = ["OutputSelector", "Targets", "select_output", "target_scores"]

#: What ``targets`` may be: see :meth:`camkit.GradCAM.__call__`.
Targets = (
    None | int | Sequence[int] | np.ndarray | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
)
#: How to pick the logits out of a model that returns a tuple, list or dict.
OutputSelector = None | int | str | Callable[[Any], torch.Tensor]


def select_output(output: Any, selector: OutputSelector) -> torch.Tensor:
    """Return the tensor to explain from whatever the model returned.

    Parameters
    ----------
    output
        The model's return value.
    selector
        ``None`` when the model returns a tensor; an index or key into a tuple, list or
        dict output; or a callable applied to the output.
    """
    if selector is None:
        if isinstance(output, torch.Tensor):
            return output
        raise CamkitError(_needs_selector(output))
    if callable(selector):
        picked = selector(output)
    else:
        try:
            picked = output[selector]
        except (KeyError, IndexError, TypeError) as err:
            raise CamkitError(
                f"output={selector!r} does not select anything from the model's "
                f"{type(output).__name__} output: {_describe(output)}."
            ) from err
    if not isinstance(picked, torch.Tensor):
        raise CamkitError(
            f"output={selector!r} selected a {type(picked).__name__}, not a tensor of scores; "
            f"the model returned {_describe(output)}."
        )
    return picked


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return "a mapping with keys " + ", ".join(repr(k) for k in output)
    if isinstance(output, (tuple, list)):
        kinds = ", ".join(
            f"[{i}] {tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__}"
            for i, o in enumerate(output)
        )
        return f"a {type(output).__name__} of {len(output)}: {kinds}"
    return f"a {type(output).__name__}"


def _needs_selector(output: Any) -> str:
    hint = "output=0" if isinstance(output, (tuple, list)) else "output='logits'"
    return (
        f"the model returned {_describe(output)}, not a tensor of class scores. Pass "
        f"{hint} (an index or key) or output=callable to GradCAM to say which part to explain."
    )


def target_scores(
    targets: Targets, output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the scores to explain.

    Parameters
    ----------
    targets
        ``None`` (each image's top class), an int (one class for all images), a sequence,
        1-D array or 1-D tensor (one class per image), a 2-D ``(N, K)`` array or tensor
        (``K`` classes per image), or a callable ``f(output) -> (N,)`` or ``(N, K)`` scores.
    output
        The selected model output, ``(N, num_classes)`` unless ``targets`` is a callable.

    Returns
    -------
    scores
        ``(N,)`` or ``(N, K)`` scores, part of the autograd graph.
    indices
        The class indices explained (same shape as ``scores``), or ``None`` for a callable.
    """
    n = output.shape[0] if output.ndim else 0
    if callable(targets) and not isinstance(targets, torch.Tensor):
        scores = targets(output)
        if not isinstance(scores, torch.Tensor) or scores.ndim not in (1, 2):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise CamkitError(
                f"the targets callable returned {got}; it must return a (N,) or (N, K) tensor "
                f"of scores, N={n} being the batch size."
            )
        if scores.shape[0] != n:
            raise CamkitError(
                f"the targets callable returned {scores.shape[0]} scores for a batch of {n}; "
                "return one score (or one row of K scores) per image."
            )
        _require_classes(scores, "the targets callable returned")
        return scores, None

    if output.ndim != 2:
        raise CamkitError(
            f"the model's output has shape {tuple(output.shape)}, not (N, num_classes); "
            "pass targets=callable returning (N,) scores, e.g. "
            "targets=lambda out: out[:, 3].mean(dim=(-2, -1)) for a segmentation output."
        )
    num_classes = output.shape[1]
    if targets is None:
        indices = output.detach().argmax(dim=1)
    else:
        indices = _as_index_tensor(targets, n, output.device)
        _require_classes(indices, "targets has")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
        bad = indices[(indices < 0) | (indices >= num_classes)][0].item()
        raise CamkitError(
            f"target class {bad} is out of range: the model has {num_classes} outputs, "
            f"so classes must be in [0, {num_classes - 1}]."
        )
    if indices.ndim == 1:
        scores = output.gather(1, indices[:, None])[:, 0]
    else:
        scores = output.gather(1, indices)
    return scores, indices


def _require_classes(values: torch.Tensor, what: str) -> None:
    """Refuse an ``(N, 0)`` request: no class per image leaves nothing to explain."""
    if values.ndim == 2 and values.shape[1] == 0:
        raise CamkitError(
            f"{what} shape {tuple(values.shape)}: no class to explain per image. Give at "
            "least one class per image, (N, K) with K >= 1."
        )


def _as_index_tensor(targets: Any, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(targets, bool) or isinstance(targets, (float, np.floating)):
        raise CamkitError(f"targets={targets!r}: expected a class index (int), not a "
                          f"{type(targets).__name__}.")
    if isinstance(targets, (int, np.integer)):
        return torch.full((n,), int(targets), dtype=torch.long, device=device)
    try:
        indices = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor)
                                  else targets)
    except (TypeError, ValueError) as err:
        raise CamkitError(
            f"targets of type {type(targets).__name__} cannot be read as class indices; pass "
            "None, an int, a sequence of ints, a 1-D/2-D integer tensor or a callable."
        ) from err
    if indices.numel() == 0 and indices.ndim == 1:
        indices = indices.long()  # [] reads as float64: say what is wrong with it instead
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise CamkitError(
            f"targets has dtype {indices.dtype}; class indices must be integers."
        )
    if indices.ndim == 0:
        return torch.full((n,), int(indices), dtype=torch.long, device=device)
    if indices.ndim > 2:
        raise CamkitError(
            f"targets has shape {tuple(indices.shape)}; expected (N,) for one class per image "
            "or (N, K) for K classes per image."
        )
    if indices.shape[0] != n:
        raise CamkitError(
            f"targets has length {indices.shape[0]} but the batch has length {n}; give one "
            "class per image (or an int for all of them)."
        )
    return indices.to(device=device, dtype=torch.long)
