"""Effective receptive field (Luo, Li, Urtasun and Zemel, NeurIPS 2016).

The theoretical receptive field says which input pixels *can* reach a cell;
the effective one says how much each of them does. Following Luo et al., the
gradient of one output cell (summed over channels) with respect to the input
is taken for a set of inputs, and its magnitude, summed over input channels
and averaged over the inputs, is the map. Normalised to unit mass it is a
distribution over pixels, summarised by its centre of mass, per-axis
standard deviation and the radius around the centre that holds a given
share of the mass.

For ``n`` stacked 3 x 3 convolutions with all-ones kernels and no
nonlinearity the map is the ``n``-fold convolution of a 3 x 3 box: support
``2n + 1`` pixels and per-axis standard deviation ``sqrt(2n / 3)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from camkit._rf_trace import eval_mode, model_device
from camkit.errors import CamkitError
from camkit.layers import resolve_target_layers, unwrap_model
from camkit.receptive_field import Box, _check_input_size

__all__ = ["EffectiveReceptiveField", "effective_receptive_field"]


@dataclass(frozen=True)
class EffectiveReceptiveField:
    """The effective receptive field of one cell.

    Attributes
    ----------
    layer : str
        Dotted name of the layer.
    cell : tuple of int
        ``(i, j)`` of the cell in the layer's output.
    map : torch.Tensor
        ``(H, W)`` float64 (CPU): mean over inputs of ``|d cell / d input|``,
        summed over input channels.
    normalized : torch.Tensor
        ``map`` divided by its sum.
    center : tuple of float
        Centre of mass ``(row, column)`` in input pixels.
    std : tuple of float
        Standard deviation of the rows and of the columns.
    mass : float
        The share of the mass :attr:`radius` was computed for.
    radius : float
        Smallest Euclidean distance from :attr:`center` within which the
        pixels hold at least ``mass`` of the total.
    support : Box
        Bounding box of the non-zero pixels (bottom/right exclusive).
    n_inputs : int
        Number of inputs averaged over.
    """

    layer: str
    cell: tuple[int, int]
    map: torch.Tensor
    normalized: torch.Tensor
    center: tuple[float, float]
    std: tuple[float, float]
    mass: float
    radius: float
    support: Box
    n_inputs: int

    def radius_for(self, mass: float) -> float:
        """Radius around :attr:`center` holding at least ``mass`` of the map."""
        _check_mass(mass)
        return _radius(self.normalized, self.center, mass)


def _check_mass(mass: object) -> float:
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
        raise CamkitError(f"mass={mass!r} must be a number in (0, 1], e.g. 0.95")
    return float(mass)


def _radius(p: torch.Tensor, center: tuple[float, float], mass: float) -> float:
    rows = torch.arange(p.shape[0], dtype=torch.float64)[:, None]
    cols = torch.arange(p.shape[1], dtype=torch.float64)[None, :]
    dist = ((rows - center[0]) ** 2 + (cols - center[1]) ** 2).sqrt().flatten()
    order = torch.argsort(dist, stable=True)
    cumulative = torch.cumsum(p.flatten()[order], 0)
    k = int(torch.searchsorted(cumulative, torch.tensor(mass - 1e-12, dtype=torch.float64)))
    return float(dist[order[min(k, dist.numel() - 1)]])


def _inputs(model: nn.Module, inputs: object, input_size: object, n_inputs: int,
            seed: int) -> torch.Tensor:
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    if inputs is not None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (3, 4):
            raise CamkitError(
                f"inputs must be an image tensor (N, C, H, W) or (C, H, W), got "
                f"{type(inputs).__name__}"
                + (f" of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else "")
            )
        if not inputs.is_floating_point():
            raise CamkitError(
                f"inputs must be floating point, got {inputs.dtype}; convert with .float()"
            )
        x = inputs if inputs.dim() == 4 else inputs.unsqueeze(0)
        if input_size is not None and tuple(x.shape[1:]) != tuple(input_size):
            raise CamkitError(
                f"input_size={tuple(input_size)} does not match the inputs' shape "
                f"{tuple(x.shape[1:])}; pass one of the two"
            )
        return x.detach().to(device=device, dtype=dtype)
    if input_size is None:
        raise CamkitError(
            "pass inputs (a batch of images) or input_size=(C, H, W) for random inputs"
        )
    size = _check_input_size(model, input_size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n_inputs, *size), generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def effective_receptive_field(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: torch.Tensor | None = None,
    input_size: tuple[int, int, int] | None = None,
    *,
    cell: tuple[int, int] | None = None,
    mass: float = 0.95,
    n_inputs: int = 16,
    seed: int = 0,
) -> EffectiveReceptiveField:
    """Effective receptive field of one cell of ``layer`` (Luo et al., 2016).

    Parameters
    ----------
    model : torch.nn.Module
        The model. It runs in eval mode for the call; its training flags,
        ``requires_grad`` flags and hooks are restored afterwards.
    layer : str or torch.nn.Module
        The layer, by dotted name (``"layer4"``) or as a submodule. A module
        called several times is taken at its last call.
    inputs : torch.Tensor, optional
        Images ``(N, C, H, W)`` to average over. Default: ``n_inputs``
        standard-normal images of ``input_size``.
    input_size : tuple of int, optional
        ``(C, H, W)`` of the random inputs (needed when ``inputs`` is None).
    cell : tuple of int, optional
        ``(i, j)`` in the layer's output; default the centre cell
        ``((h - 1) // 2, (w - 1) // 2)``.
    mass : float
        Share of the map the reported :attr:`~EffectiveReceptiveField.radius` holds.
    n_inputs : int
        Number of random inputs.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    EffectiveReceptiveField
    """
    model = unwrap_model(model)
    if not isinstance(layer, (str, nn.Module)):
        raise CamkitError(
            f"layer must be a dotted module name or an nn.Module, got {type(layer).__name__}"
        )
    ((name, module),) = resolve_target_layers(model, layer)
    if model_device(model).type == "meta":
        raise CamkitError(
            f"{type(model).__name__} is on the meta device, which holds no values to take "
            "gradients of; build it on a real device, e.g. the CPU"
        )
    mass = _check_mass(mass)
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
        raise CamkitError(f"n_inputs={n_inputs!r} must be a positive int")
    x = _inputs(model, inputs, input_size, n_inputs, seed).requires_grad_(True)

    outputs: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple, out: object) -> object:
        if isinstance(out, torch.Tensor):
            outputs.append(out)
            return out.clone()  # later in-place ops must not change what we hold
        return None

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = module.register_forward_hook(hook)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with eval_mode(model), torch.enable_grad():
            model(x)
        handle.remove()
        if not outputs:
            raise CamkitError(
                f"layer {name!r} did not produce a tensor in the forward pass (it may be "
                "unused in eval mode); pick a layer that runs"
            )
        y = outputs[-1]
        outputs.clear()
        if y.dim() != 4:
            raise CamkitError(
                f"layer {name!r} outputs shape {tuple(y.shape)}, not a feature map (N, C, h, w); "
                "pick a convolutional layer"
            )
        h, w = y.shape[-2:]
        i, j = ((h - 1) // 2, (w - 1) // 2) if cell is None else _check_cell(cell, h, w, name)
        if y.grad_fn is None:
            raise CamkitError(f"the output of layer {name!r} does not depend on the input")
        (grad,) = torch.autograd.grad(y[:, :, i, j].sum(), x)
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    per_input = grad.detach().abs().sum(dim=1).to(torch.float64).cpu()
    erf_map = per_input.mean(dim=0)
    total = float(erf_map.sum())
    if not total > 0:
        raise CamkitError(
            f"the gradient of cell ({i}, {j}) of {name!r} is zero for every input (dead units or "
            "a constant output); try other inputs or another cell"
        )
    p = erf_map / total
    rows = torch.arange(p.shape[0], dtype=torch.float64)
    cols = torch.arange(p.shape[1], dtype=torch.float64)
    p_rows, p_cols = p.sum(dim=1), p.sum(dim=0)
    cy, cx = float((p_rows * rows).sum()), float((p_cols * cols).sum())
    sy = float((p_rows * (rows - cy) ** 2).sum().sqrt())
    sx = float((p_cols * (cols - cx) ** 2).sum().sqrt())
    nz_rows = torch.nonzero(p_rows > 0).flatten()
    nz_cols = torch.nonzero(p_cols > 0).flatten()
    support = Box(int(nz_rows[0]), int(nz_cols[0]), int(nz_rows[-1]) + 1, int(nz_cols[-1]) + 1)
    return EffectiveReceptiveField(
        layer=name,
        cell=(int(i), int(j)),
        map=erf_map,
        normalized=p,
        center=(cy, cx),
        std=(sy, sx),
        mass=mass,
        radius=_radius(p, (cy, cx), mass),
        support=support,
        n_inputs=int(x.shape[0]),
    )


def _check_cell(cell: object, h: int, w: int, name: str) -> tuple[int, int]:
    ok = (
        isinstance(cell, (tuple, list))
        and len(cell) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) for c in cell)
    )
    if not ok or not (0 <= cell[0] < h and 0 <= cell[1] < w):  # type: ignore[index]
        raise CamkitError(
            f"cell={cell!r} is not a cell of {name!r}, whose output has {h} x {w} cells; pass "
            f"(i, j) with 0 <= i < {h} and 0 <= j < {w}"
        )
    return int(cell[0]), int(cell[1])  # type: ignore[index]
