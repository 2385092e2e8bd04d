"""Grad-CAM and Grad-CAM++: the shared call, and each method's channel weights.

A call runs one forward pass (no autograd graph before the target layer), one gradient
computation from the explained scores back to the target layer only, and a few tensor ops to
weigh, combine, upsample and scale the maps, all on the model's device.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from camkit._hooks import LayerCapture, ModelState
from camkit.errors import CamkitError, warn_at_caller
from camkit.layers import (
    INTEGER_IMAGES_FIX,
    enclosing_block_name,
    integer_images_fault,
    resolve_target_layers,
    unwrap_model,
)
from camkit.targets import OutputSelector, Targets, select_output, target_scores

__all__ = [
    "CAM",
    "CAMResult",
    "GradCAM",
    "GradCAMPlusPlus",
    "LayerMaps",
    "gradcam_weights",
    "gradcampp_weights",
]

LayerSpec = str | nn.Module | Sequence[str | nn.Module] | None


# --------------------------------------------------------------------------- weights
def gradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM channel weights (Selvaraju et al., arXiv 1610.02391, eq. 1).

    ``w_k`` is the spatial mean of the gradient of the score with respect to channel ``k``.

    Parameters
    ----------
    activations, gradients
        ``(..., C, h, w)`` tensors (``activations`` broadcasts against ``gradients``).

    Returns
    -------
    torch.Tensor
        ``(..., C)`` weights.
    """
    return gradients.mean(dim=(-2, -1))


def gradcampp_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights (Chattopadhyay et al., arXiv 1710.11063, eq. 19).

    With an exponential output ``Y = exp(S)`` the paper's coefficients reduce to
    ``alpha = G^2 / (2 G^2 + sum_ab(A) G^3)`` (0 where the denominator vanishes), and
    ``w_k = sum_ij alpha * relu(G)``, ``G = dS/dA``. Where ``G != 0`` the fraction equals
    ``1 / (2 + sum_ab(A) G)``, which is how it is evaluated here: no powers that could underflow
    in float32 for small gradients, and no epsilon that would break scale invariance.

    Parameters
    ----------
    activations, gradients
        ``(..., C, h, w)`` tensors (``activations`` broadcasts against ``gradients``).

    Returns
    -------
    torch.Tensor
        ``(..., C)`` weights.
    """
    total = activations.sum(dim=(-2, -1), keepdim=True)
    denominator = 2 + total * gradients
    usable = (gradients != 0) & (denominator != 0)
    alpha = torch.where(usable, 1 / torch.where(usable, denominator, 1), 0)
    return (alpha * gradients.clamp(min=0)).sum(dim=(-2, -1))


WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerMaps:
    """The maps of one target layer (see :class:`CAMResult`)."""

    name: str
    maps: torch.Tensor
    raw: torch.Tensor
    degenerate: torch.Tensor


@dataclass(frozen=True)
class CAMResult:
    """What a CAM call returns.

    Attributes
    ----------
    maps
        ``(N, H, W)`` (``(N, K, H, W)`` for 2-D targets) maps in ``[0, 1]`` at the input's
        size: the ReLU'd map, bilinearly upsampled (``align_corners=False``), min-max scaled
        per image. For several target layers, the fusion described in :class:`CAM`.
    raw
        ``(N, h, w)`` (or ``(N, K, h, w)``) map at the layer's resolution before upsampling
        and scaling; ReLU'd unless the call passed ``relu=False``. For several layers, the
        first layer's (see ``per_layer`` for each).
    targets
        The class indices explained, ``(N,)`` or ``(N, K)``; ``None`` for callable targets.
    scores
        The explained scores (the model's logits for those classes), float32.
    output
        The model's (selected) output, detached, float32.
    layer
        Dotted name of the target layer (``"a+b"`` for several).
    degenerate
        ``True`` where a map has no spatial variation (for instance no positive value):
        such a map is all zeros, never NaN.
    per_layer
        ``name -> LayerMaps`` for each target layer, in the order given.
    """

    maps: torch.Tensor
    raw: torch.Tensor
    targets: torch.Tensor | None
    scores: torch.Tensor
    output: torch.Tensor
    layer: str
    degenerate: torch.Tensor
    per_layer: dict[str, LayerMaps] = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"CAMResult(layer={self.layer!r}, maps={tuple(self.maps.shape)}, "
            f"raw={tuple(self.raw.shape)}, degenerate={int(self.degenerate.sum())})"
        )


# --------------------------------------------------------------------------- the call
class CAM:
    """A gradient-weighted class-activation map method; subclasses choose the weights.

    Parameters
    ----------
    model
        Any :class:`torch.nn.Module` computing scores from ``(N, C, H, W)`` images. It is not
        moved or modified; a ``torch.compile``'d, ``DataParallel`` or DDP model is explained
        through the module it wraps, on that module's device.
    target_layer
        ``None`` (an adapter's choice for known families, else the last module whose output
        is a spatial map; see ``camkit.list_layers``), a dotted module name, a module, or a
        list of those. With several layers, ``maps`` is their fusion: the mean of the
        per-layer scaled maps, scaled again to ``[0, 1]``. Names and modules are checked
        here, when the CAM is built (so a layer added to the model later is not found);
        the automatic choice waits for the first call, which shows the input size.
    output
        Which part of a tuple / dict output holds the scores: an index, a key or a callable.
    reshape
        For layers whose output is not ``(N, C, h, w)`` (a vision transformer's tokens): a
        function turning the activation into ``(N, C, h, w)``. It is applied to the
        activation and to its gradient alike, so it must only rearrange values (drop a class
        token, transpose, reshape).
    """

    #: The channel-weight function of the method.
    weights: WeightFn = staticmethod(gradcam_weights)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        *,
        output: OutputSelector = None,
        reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        model = unwrap_model(model)  # refuses TorchScript; through compile / DataParallel
        if target_layer is not None:  # a wrong name fails here, not at the first call
            resolve_target_layers(model, target_layer)
        self.model = model
        self._target_spec = target_layer
        self._layers: list[tuple[str, nn.Module]] | None = None  # those of the latest call
        # The automatic choice depends on the image size (a map that is 1 x 1 on small
        # images is stepped back from), so it is made once per (C, H, W).
        self._automatic: dict[tuple[int, ...] | None, list[tuple[str, nn.Module]]] = {}
        self.output = output
        self.reshape = reshape

    # ------------------------------------------------------------------ layers
    @property
    def layers(self) -> list[str]:
        """Dotted names of the target layers: those of the latest call; before any call, the
        automatic choice for the adapter's or the model's canonical input size."""
        layers = self._layers if self._layers is not None else self._resolve(None)
        return [name for name, _ in layers]

    @property
    def layer(self) -> str:
        """Dotted name of the target layer (``"a+b"`` for several)."""
        return "+".join(self.layers)

    def _resolve(self, example: torch.Tensor | None) -> list[tuple[str, nn.Module]]:
        if self._target_spec is not None:
            if self._layers is None:
                self._layers = resolve_target_layers(self.model, self._target_spec)
            return self._layers
        size = None if example is None else tuple(example.shape[1:])
        if size not in self._automatic:
            self._automatic[size] = resolve_target_layers(self.model, None, example)
        self._layers = self._automatic[size]
        return self._layers

    # ------------------------------------------------------------------ call
    def __call__(
        self, images: torch.Tensor, targets: Targets = None, *, relu: bool = True
    ) -> CAMResult:
        """Compute the maps for a batch.

        Parameters
        ----------
        images
            ``(N, C, H, W)`` batch, moved to the model's device. Floating images are cast to
            the model's floating dtype; integer images (``uint8``) are passed unchanged, for
            models that convert and normalise them themselves: camkit does not guess a
            scaling.
        targets
            ``None`` (each image's top class), an int (one class for all), a sequence,
            array or 1-D tensor of one class per image, a 2-D ``(N, K)`` tensor of K classes
            per image (maps gain a class axis), or a callable ``f(output) -> (N,)`` or
            ``(N, K)`` scores for outputs that are not plain logits.
        relu
            Apply the ReLU to ``raw``. ``maps`` always shows the positive part.

        Returns
        -------
        CAMResult
        """
        x = self._prepare(images)
        with _integer_input_hint(x):
            layers = self._resolve(x)
        state = ModelState(self.model)
        try:
            self.model.eval()
            with torch.inference_mode(False):
                # The hooks live for the model's forward only: whatever runs afterwards (the
                # output selector, a targets callable, even another CAM) does not reach them.
                with torch.no_grad(), LayerCapture(layers) as capture, _integer_input_hint(x):
                    output = self.model(x)
                self._check_capture(capture, layers, x)
                with torch.enable_grad():
                    logits = select_output(output, self.output)
                    scores, indices = target_scores(targets, logits)
                if not scores.requires_grad:
                    raise CamkitError(
                        "the explained scores do not depend on the target layer's output; "
                        "check that the layer lies on the path to the selected output."
                    )
                activations = [capture.activations[name] for name, _ in layers]
                gradients = _gradients(scores, activations, [name for name, _ in layers])
                # Let go of the graph (kept by a batched backward) before the maps are made.
                activations = [a.detach() for a in activations]
                scores, logits = scores.detach(), logits.detach()
                del output, capture
        finally:
            state.restore()

        size = tuple(x.shape[-2:])
        per_layer = {}
        for (name, _), act, grad in zip(layers, activations, gradients):
            per_layer[name] = self._layer_maps(name, act, grad, scores.ndim, size, relu)
        first = next(iter(per_layer.values()))
        if len(per_layer) == 1:
            maps, degenerate = first.maps, first.degenerate
        else:
            fused = torch.stack([m.maps for m in per_layer.values()]).mean(dim=0)
            maps, degenerate = _scale(fused)
        return CAMResult(
            maps=maps,
            raw=first.raw,
            targets=indices,
            scores=scores.float(),
            output=logits.float(),
            layer="+".join(per_layer),
            degenerate=degenerate,
            per_layer=per_layer,
        )

    def _check_capture(
        self, capture: LayerCapture, layers: list[tuple[str, nn.Module]], x: torch.Tensor
    ) -> None:
        """Raise if a target layer did not run, or ran more than once, in the forward."""
        missing = capture.missing()
        if missing:
            raise CamkitError(
                f"target layer(s) {', '.join(map(repr, missing))} did not run during the "
                "forward pass (a branch that is skipped in eval mode, such as an auxiliary "
                "head?). Pick a layer that runs: camkit.list_layers(model)."
            )
        for name, count in capture.repeated().items():
            try:
                block = enclosing_block_name(self.model, name, x[:1])
            except CamkitError:  # only the hint is lost; the error below still stands
                block = None
            instead = (
                f"Use the enclosing block {block!r}, which runs once, or another module "
                "that runs once"
                if block is not None
                else "No module enclosing it runs exactly once; choose another module that "
                "runs once"
            )
            module = dict(layers)[name]
            raise CamkitError(
                f"target layer {name!r} ({type(module).__name__}) ran {count} times in one "
                "forward pass, so its activation is ambiguous (a shared module such as "
                f"torchvision's BasicBlock.relu is called more than once). {instead}; "
                "camkit.list_layers(model) marks modules that run more than once."
            )

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise CamkitError(
                f"images must be a torch.Tensor of shape (N, C, H, W), got "
                f"{type(images).__name__}."
            )
        if images.ndim != 4:
            hint = " For one image use images.unsqueeze(0)." if images.ndim == 3 else ""
            raise CamkitError(
                f"images has shape {tuple(images.shape)}; expected (N, C, H, W).{hint}"
            )
        if images.shape[0] == 0:
            raise CamkitError("images is an empty batch (N = 0).")
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        reference = next((t for t in tensors if t.is_floating_point()), None)
        if reference is not None:
            dtype = reference.dtype if images.is_floating_point() else None
            images = images.to(device=reference.device, dtype=dtype)
        if images.is_inference():
            with torch.inference_mode(False):
                images = images.clone()
        return images

    def _layer_maps(
        self,
        name: str,
        activation: torch.Tensor,
        gradient: torch.Tensor,
        score_dims: int,
        size: tuple[int, ...],
        relu: bool,
    ) -> LayerMaps:
        dtype = torch.promote_types(activation.dtype, torch.float32)
        a, g = activation.to(dtype), gradient.to(dtype)
        if self.reshape is not None:
            given = tuple(a.shape)
            a, g = self.reshape(a), self._reshape_batched(g, score_dims)
            if a.ndim != 4:
                raise CamkitError(
                    f"reshape turned the activations of target layer {name!r}, of shape "
                    f"{given}, into shape {tuple(a.shape)}, not (N, C, h, w). It must return "
                    "a 4-D tensor, e.g. tokens.transpose(1, 2).reshape(N, C, h, w)."
                )
        if a.ndim != 4:
            raise CamkitError(
                f"target layer {name!r} gives activations of shape {tuple(a.shape)}, not "
                "(N, C, h, w). Choose a convolutional layer (camkit.list_layers(model)) or pass "
                "reshape=fn turning them into (N, C, h, w)."
            )
        if a.shape[-2:] == (1, 1):
            alone = self._layers is not None and len(self._layers) == 1
            warn_at_caller(
                f"target layer {name!r} gives a 1 x 1 map at this input size, so its map is "
                f"constant{' (result.degenerate is True)' if alone else ''} and shows no "
                "location. Choose a layer with a larger map (camkit.list_layers(model, "
                "input_size=...) lists them), or pass larger images."
            )
        if score_dims == 2:  # g: (N, K, C, h, w)
            weights = type(self).weights(a[:, None], g)
            signed = torch.einsum("nkc,nchw->nkhw", weights, a)
        else:
            weights = type(self).weights(a, g)
            signed = torch.einsum("nc,nchw->nhw", weights, a)
        positive = signed.clamp(min=0)
        upsampled = F.interpolate(
            positive.reshape(-1, 1, *positive.shape[-2:]),
            size=size,
            mode="bilinear",
            align_corners=False,
        ).reshape(*positive.shape[:-2], *size)
        # Flatness is judged at the layer's resolution: interpolating a constant map (a 1 x 1
        # final map, say) leaves float32 rounding ripples that min-max scaling would inflate.
        flat = positive.amax(dim=(-2, -1)) == positive.amin(dim=(-2, -1))
        maps, degenerate = _scale(upsampled, flat)
        return LayerMaps(name, maps, positive if relu else signed, degenerate)

    def _reshape_batched(self, g: torch.Tensor, score_dims: int) -> torch.Tensor:
        if score_dims == 1:
            return self.reshape(g)
        n, k = g.shape[:2]
        shaped = self.reshape(g.flatten(0, 1))
        return shaped.reshape(n, k, *shaped.shape[1:])


def _gradients(
    scores: torch.Tensor, activations: list[torch.Tensor], names: list[str]
) -> list[torch.Tensor]:
    """d(scores)/d(activation) per image; ``(N, K, ...)`` for ``(N, K)`` scores.

    Images do not interact in eval mode, so the gradient of the summed scores holds each
    image's own gradient. ``K`` scores per image use one batched backward pass, with a loop
    as the fallback for operations that the batched backward does not support; the batched
    attempt keeps the graph so that the fallback can still run after it fails half-way.

    Raises
    ------
    CamkitError
        When the scores do not depend on one of the activations (``names`` gives the layers).
    """
    if scores.ndim == 1:
        grads = list(torch.autograd.grad(scores.sum(), activations, allow_unused=True))
        _require_used(grads, names)
        return grads
    n, k = scores.shape
    basis = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grad_outputs = basis[:, None, :].expand(k, n, k)
    try:
        batched = list(torch.autograd.grad(
            scores, activations, grad_outputs=grad_outputs, is_grads_batched=True,
            retain_graph=True, allow_unused=True,
        ))
    except RuntimeError:
        per_class = [
            torch.autograd.grad(
                scores[:, j].sum(), activations, retain_graph=j < k - 1, allow_unused=True
            )
            for j in range(k)
        ]
        _require_used(list(per_class[0]), names)
        batched = [torch.stack(parts) for parts in zip(*per_class)]
    _require_used(batched, names)
    return [g.transpose(0, 1) for g in batched]


def _require_used(gradients: list[torch.Tensor | None], names: list[str]) -> None:
    unused = [name for name, g in zip(names, gradients) if g is None]
    if unused:
        raise CamkitError(
            f"the explained scores do not depend on target layer(s) "
            f"{', '.join(map(repr, unused))}; check that each layer lies on the path to the "
            "selected output (output=...)."
        )


@contextlib.contextmanager
def _integer_input_hint(images: torch.Tensor) -> Iterator[None]:
    """Turn a model's error on integer images into one that says how to convert them."""
    try:
        yield
    except RuntimeError as err:
        if not integer_images_fault(images, err):
            raise
        raise CamkitError(
            f"the model failed on images of dtype {images.dtype}: {err}. {INTEGER_IMAGES_FIX}"
        ) from err


def _scale(
    maps: torch.Tensor, flat: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map min-max scaling over the last two axes, with no epsilon.

    Parameters
    ----------
    maps
        ``(..., H, W)`` non-negative maps.
    flat
        ``(...)`` booleans marking maps already known to carry no spatial variation (their
        layer-resolution map is constant), whatever ``maps`` itself shows.

    Returns
    -------
    scaled, degenerate
        The scaled maps, and where a map could not be scaled (no variation, for instance
        no positive value, or marked ``flat``): such a map is all zeros.
    """
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    ok = (span > 0) & (high > 0)
    if flat is not None:
        ok = ok & ~flat[..., None, None]
    scaled = torch.where(ok, (maps - low) / torch.where(ok, span, 1), 0)
    return scaled.clamp(0, 1), ~ok[..., 0, 0]


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, arXiv 1610.02391).

    ``map = relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of ``dS/dA_k``. See
    :class:`CAM` for the parameters and :meth:`CAM.__call__` for the call.
    """

    weights = staticmethod(gradcam_weights)


class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018, arXiv 1710.11063).

    Pixel-weighted gradients (:func:`gradcampp_weights`); otherwise as :class:`GradCAM`.
    """

    weights = staticmethod(gradcampp_weights)
