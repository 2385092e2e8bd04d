"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

A map that explains the model must change when the model's learned parameters are replaced by
random ones. The check randomises the layers of a *copy* of the model from the output down
(cascading: each step keeps the earlier steps' randomisation; or one layer at a time),
recomputes the maps with the same method and the same target classes, and measures how similar
each step's maps are to the original ones. The user's model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from camkit._hooks import ModelState
from camkit._metrics_common import check_maps
from camkit._metrics_maps import _fraction, spearman, ssim, top_k_iou
from camkit.errors import CamkitError, warn_at_caller

__all__ = ["RandomizationResult", "randomization_check", "randomize_"]

#: ``cam(model) -> explainer``; ``explainer(images, targets)`` returns a CAMResult or maps.
CamFactory = Callable[[nn.Module], Callable[..., Any]]
# Step i of a check with seed s draws from seed s * _SEED_STRIDE + i: distinct for every
# (seed, step) pair with fewer than 2**20 steps.
_SEED_STRIDE = 2**20


@dataclass(frozen=True)
class RandomizationResult:
    """Similarity of the maps to the original ones after each randomisation step.

    Attributes
    ----------
    steps
        ``S + 1`` labels: ``"original"``, then the dotted name of the layer randomised at each
        step (cascade: that layer and all before it in this list).
    spearman
        ``(S + 1, N)`` rank correlation with the original maps (:func:`spearman`); row 0 is 1.
        NaN where a step's map is constant (for instance all zeros).
    ssim
        ``(S + 1, N)`` structural similarity (:func:`ssim`), NaN when the maps are smaller
        than the SSIM window.
    top_k_iou
        ``(S + 1, N)`` IoU of the top regions (:func:`top_k_iou`).
    original
        ``(N, H, W)`` maps of the unmodified model.
    targets
        The classes explained at every step, or ``None`` (callable targets, or an explainer
        that does not report them).
    maps
        ``(S + 1, N, H, W)`` maps of every step when ``keep_maps=True``, else ``None``.
    """

    steps: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor
    top_k_iou: torch.Tensor
    original: torch.Tensor
    targets: torch.Tensor | None
    maps: torch.Tensor | None


def randomize_(module: nn.Module, generator: torch.Generator, *, recurse: bool = True) -> None:
    """Replace the floating parameters of ``module`` by random values, in place.

    Each parameter tensor gets i.i.d. Gaussian values with the mean and standard deviation of
    its current entries: the learned arrangement is destroyed while the scale of the
    activations is kept (so deep networks neither explode nor vanish). A tensor whose entries
    are all equal (an untrained norm layer's ones) has nothing learned to destroy and keeps
    its value. Buffers (batch-norm running statistics) are left as they are.

    Parameters
    ----------
    module
        The module to randomise.
    generator
        A CPU generator: the draws are the same on every device.
    recurse
        Also randomise the parameters of every submodule (the default); ``False`` touches
        only the parameters that ``module`` holds itself.
    """
    with torch.no_grad():
        for param in module.parameters(recurse=recurse):
            if not param.is_floating_point() or param.numel() == 0:
                continue
            values = param.detach().to(torch.float64)
            mean = values.mean()
            std = values.std(correction=0)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((mean + std * noise.to(param.device)).to(param.dtype))


def randomization_check(
    model: nn.Module,
    images: torch.Tensor,
    cam: CamFactory,
    targets: Any = None,
    *,
    layers: Sequence[str] | None = None,
    mode: Literal["cascade", "independent"] = "cascade",
    seed: int = 0,
    fraction: float = 0.2,
    keep_maps: bool = False,
) -> RandomizationResult:
    """Randomise the model's layers from the top down and measure how much the maps change.

    Parameters
    ----------
    model
        The model explained. Only deep copies of it are modified: its parameters, buffers,
        training flags and hooks are untouched, and the global random state is not used.
    images
        ``(N, C, H, W)`` images.
    cam
        ``cam(model) -> explainer``, typically a method class (``camkit.GradCAM``) or a
        ``functools.partial`` of one with its options, e.g.
        ``partial(GradCAM, target_layer="layer4")`` (name layers by their dotted name: a
        module object would belong to the original model, not the copy). The explainer is
        called as ``explainer(images, targets)`` and returns a ``CAMResult`` or ``(N, H, W)``
        maps.
    targets
        Passed to the explainer. ``None``: the classes the original maps explain
        (``CAMResult.targets``), kept fixed for every step.
    layers
        Dotted names of the modules to randomise, one step each, in the order given (each
        module with all its submodules). ``None``: every module that has parameters of its
        own and runs in the forward pass, in reverse order of execution (the logits first);
        each step then randomises only that module's own parameters, so a module that holds
        parameters and also has children (the root model with a learnable logit offset, a
        block with a layer-scale vector) does not randomise its children with it.
    mode
        ``"cascade"``: step ``i`` randomises layers ``1..i``. ``"independent"``: step ``i``
        randomises layer ``i`` alone.
    seed
        Non-negative int. Step ``i`` draws its values from a CPU generator seeded with
        ``seed * 2**20 + i``, so the draws do not depend on the device or on the global
        random state, and step ``i`` randomises a layer the same way in both modes.
    fraction
        Region size for :func:`top_k_iou`.
    keep_maps
        Also return every step's maps.

    Returns
    -------
    RandomizationResult
    """
    if not isinstance(model, nn.Module):
        raise CamkitError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(cam):
        raise CamkitError(
            f"cam must be a callable model -> explainer (e.g. camkit.GradCAM), got "
            f"{type(cam).__name__}."
        )
    if mode not in ("cascade", "independent"):
        raise CamkitError(f"mode={mode!r}; expected 'cascade' or 'independent'.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**40:
        raise CamkitError(f"seed={seed!r}; expected an int in [0, 2**40).")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CamkitError(f"images has shape {got}; expected (N, C, H, W).")

    fraction = _fraction(fraction, "fraction")  # before the expensive steps, not after

    pristine = copy.deepcopy(model)
    names = _layer_names(pristine, images, layers)
    whole_modules = layers is not None
    original, used = _explain(cam, pristine, images, targets, "the original model")
    fixed = targets if targets is not None else used
    original = original.detach()
    window_fits = min(original.shape[1:]) >= 11

    rows: list[torch.Tensor] = [original]
    work = pristine if mode == "cascade" else None
    for step, name in enumerate(names, start=1):
        if mode == "independent":
            work = copy.deepcopy(pristine)
        generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + step)
        randomize_(work.get_submodule(name), generator, recurse=whole_modules)
        maps, _ = _explain(cam, work, images, fixed, f"step {step} ({_label(name)})")
        if maps.shape != original.shape:
            raise CamkitError(
                f"the maps at step {step} have shape {tuple(maps.shape)}, the original ones "
                f"{tuple(original.shape)}; the explainer must return maps of one shape."
            )
        rows.append(maps.detach())

    stacked = torch.stack(rows)  # (S + 1, N, H, W)
    reference = original.expand_as(stacked).flatten(0, 1)
    every = stacked.flatten(0, 1)
    shape = stacked.shape[:2]
    rank = spearman(reference, every).view(shape)
    iou = top_k_iou(reference, every, fraction).view(shape)
    if window_fits:
        structure = ssim(reference, every).view(shape)
    else:
        warn_at_caller(
            f"maps of size {tuple(original.shape[1:])} are smaller than the 11 x 11 SSIM "
            "window; RandomizationResult.ssim is NaN."
        )
        structure = torch.full(shape, torch.nan, device=stacked.device)
    return RandomizationResult(
        steps=["original", *(_label(n) for n in names)],
        spearman=rank,
        ssim=structure,
        top_k_iou=iou,
        original=original,
        targets=fixed if isinstance(fixed, torch.Tensor) else used,
        maps=stacked if keep_maps else None,
    )


def _label(name: str) -> str:
    return name if name else "(model)"


def _explain(
    cam: CamFactory, model: nn.Module, images: torch.Tensor, targets: Any, when: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    result = cam(model)(images, targets)
    maps = getattr(result, "maps", result)
    if not isinstance(maps, torch.Tensor):
        raise CamkitError(
            f"the explainer returned {type(result).__name__} for {when}; it must return a "
            "CAMResult (with .maps) or an (N, H, W) tensor of maps."
        )
    maps = check_maps(maps, "the explainer's maps")
    if maps.shape[0] != images.shape[0]:
        raise CamkitError(
            f"the explainer returned {maps.shape[0]} maps for {images.shape[0]} images "
            f"({when})."
        )
    used = getattr(result, "targets", None)
    return maps, used if isinstance(used, torch.Tensor) else None


def _layer_names(model: nn.Module, images: torch.Tensor, layers: Sequence[str] | None) -> list[str]:
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise CamkitError(
                f"layers={layers!r}; expected a list of dotted module names, e.g. "
                "['fc', 'layer4', 'layer3']."
            )
        known = dict(model.named_modules())
        for name in layers:
            if name not in known:
                with_params = [n for n, m in known.items() if n and _owns_parameters(m)]
                raise CamkitError(
                    f"layers: {name!r} is not a module of the model. Modules with parameters: "
                    f"{', '.join(with_params[:30])}{' ...' if len(with_params) > 30 else ''}."
                )
        if len(layers) == 0:
            raise CamkitError("layers is empty; give at least one module name (or None).")
        return list(layers)
    names = _execution_order(model, images)
    if not names:
        raise CamkitError(
            "the model has no module with parameters that runs in the forward pass, so there "
            "is nothing to randomise."
        )
    return names[::-1]


def _owns_parameters(module: nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def _execution_order(model: nn.Module, images: torch.Tensor) -> list[str]:
    """Modules with parameters of their own, in the order of their first call in a forward."""
    order: list[str] = []
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: object) -> None:
            if name not in order:
                order.append(name)

        return hook

    state = ModelState(model)
    try:
        for name, module in model.named_modules():
            if _owns_parameters(module):
                handles.append(module.register_forward_pre_hook(hook_for(name)))
        model.eval()
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        x = images[:1]
        if reference is not None:
            x = x.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        state.restore()
    return order
