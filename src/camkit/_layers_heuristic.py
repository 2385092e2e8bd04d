"""The heuristic: which module of a traced forward returns the network's final feature map.

See ``docs/layers.md`` ("The heuristic") for the rule and the reasons behind each part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from camkit._trace import Call, Trace
from camkit.errors import CamkitError

__all__ = ["LIST_HINT", "Pick", "is_map", "no_map_error", "only_resamples", "pick_from_trace"]

LIST_HINT = "call camkit.list_layers(model) to see every layer with its output shape"


def is_map(tensor: torch.Tensor | None) -> bool:
    """A 4-D floating map with height and width > 1."""
    return (
        tensor is not None
        and tensor.ndim == 4
        and tensor.is_floating_point()
        and tensor.shape[-2] > 1
        and tensor.shape[-1] > 1
    )


def only_resamples(module: nn.Module) -> bool:
    """Modules that resample a map without computing features (adaptive pools, upsampling).

    VGG's ``AdaptiveAvgPool2d((7, 7))`` turns a 10x10 map at 320 px into 7x7: a map, but
    not a feature map of its own. timm's ``SelectAdaptivePool2d`` and friends match by name.
    """
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)):
        return True
    name = type(module).__name__.lower()
    return "adaptive" in name and "pool" in name


@dataclass(frozen=True)
class Pick:
    """The heuristic's answer: a name, or why there is none."""

    name: str | None
    why: str  # for list_layers' footer and logs
    skipped: tuple[Call, ...] = ()  # the last map's calls, when none of its modules ran once
    map_before_tokens: str | None = None  # a 4-D map the network turned into tokens
    tokens: str | None = None  # a later module working on (N, tokens, D)


def _is_tokens(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.ndim == 3 and tensor.is_floating_point()


def _is_self_or_ancestor(name: str, of: str) -> bool:
    """Whether module ``name`` is module ``of`` or contains it (by dotted name)."""
    return name == of or of.startswith(name + ".")


def pick_from_trace(trace: Trace) -> Pick:
    """The outermost run-once module returning the last non-resampled 4-D map.

    "Outermost" means the module that made the map or one containing it; a module after it
    that merely hands the same tensor on (an ``nn.Identity`` placeholder) is taken only when
    none of those ran once.

    A map after which the network goes on with 3-D token sequences (a transformer's patch
    embedding) is not a final feature map: that case returns no name.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for position, call in enumerate(trace.calls):
        if call.key is not None:
            groups.setdefault(call.key, []).append(position)
    seen: set[tuple[int, int]] = set()
    skipped: tuple[Call, ...] = ()
    for call in reversed(trace.calls):
        key = call.key
        if key is None or key in seen or not is_map(call.tensor):
            continue
        seen.add(key)
        group = [trace.calls[p] for p in groups[key]]  # innermost producer first
        if only_resamples(trace.records[group[0].name].module):
            continue
        once = [c for c in group if trace.records[c.name].calls == 1]
        # group[0] made the tensor; a later sibling returning it unchanged (timm's
        # ``norm_pre = nn.Identity()``) only passes it on: prefer the maker and its ancestors.
        made = [c for c in once if _is_self_or_ancestor(c.name, group[0].name)]
        once = made or once
        if not once:
            skipped = skipped or tuple(group)
            continue
        later = trace.calls[groups[key][-1] + 1 :]
        tokens = next((c.name for c in later if _is_tokens(c.tensor)), None)
        if tokens is not None:
            why = "the last 4-D map becomes a token sequence"
            return Pick(None, why, map_before_tokens=once[-1].name, tokens=tokens)
        return Pick(once[-1].name, "heuristic: the outermost module returning the last 4-D map")
    return Pick(None, "no module returns a 4-D map with height and width > 1", skipped)


def no_map_error(model: nn.Module, trace: Trace, tried: str, pick: Pick) -> CamkitError:
    """The error for a model where the heuristic found no layer; ``tried`` names the input."""
    kind = type(model).__name__
    if pick.skipped:
        names = ", ".join(
            f"{c.name!r} ({trace.records[c.name].calls} calls)" for c in pick.skipped
        )
        return CamkitError(
            f"the last 4-D map of {kind} comes only from modules that run more than once per "
            f"forward: {names}; camkit needs a layer that runs once. Pass target_layer= a "
            f"module that runs once ({LIST_HINT}: see its calls column)."
        )
    reshape = (
        "Pick a layer yourself (target_layer=..., "
        f"{LIST_HINT}) and pass reshape= to GradCAM, a function turning that layer's output "
        "into (N, C, h, w); for a ViT with a class token and an h x w patch grid: "
        "reshape=lambda t: t[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2)."
    )
    if pick.map_before_tokens is not None:
        shape = trace.records[pick.map_before_tokens].output
        return CamkitError(
            f"{kind} has no final 4-D feature map on {tried}: its last 4-D map, "
            f"{pick.map_before_tokens!r} {shape}, is turned into a token sequence that later "
            f"layers such as {pick.tokens!r} keep working on (a vision transformer?). "
            f"{reshape} If {pick.map_before_tokens!r} is the map you want, pass it as "
            "target_layer."
        )
    tokens = [c.name for c in trace.calls if _is_tokens(c.tensor)]
    hint = f" The last module with a 3-D (N, tokens, D) output is {tokens[-1]!r}." if tokens else ""
    return CamkitError(
        f"no module of {kind} returns a 4-D (N, C, H, W) map with H, W > 1 on "
        f"{tried}, so there is no convolutional feature map to explain (a transformer or an "
        "MLP? or an input too small for any map to stay above 1x1?). "
        f"{reshape}{hint}"
    )
