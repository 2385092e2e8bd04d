"""The measured receptive field: where input gradients of a cell are non-zero.

Used when the graph cannot be traced or followed exactly. Every submodule's
output is captured with forward hooks during one forward pass over a batch
of random inputs; for a few probe cells per module the gradient of the
cell (summed over channels and the batch) with respect to the input is
taken, and the rows and columns where it is non-zero give that cell's span.
A (size, stride, padding) triple is then fitted to the spans. The result is
a lower bound: a path whose gradient happens to vanish on every random input
(a dead ReLU, say) is not seen, and a span cut by the image border hides
the part outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from camkit._rf_algebra import AxisField, QuasiAffine
from camkit._rf_trace import eval_mode, model_device


@dataclass
class Measured:
    """One module's measured field."""

    name: str
    kind: str
    axes: tuple[AxisField, AxisField]
    extents: tuple[int | None, int | None]
    note: str = ""


def measure(model: nn.Module, input_size: tuple[int, ...], n_inputs: int,
            seed: int) -> list[Measured]:
    """Measure the field of every submodule with a 4-D or flat output."""
    device = model_device(model)
    if device.type == "meta":
        raise RuntimeError("a model on the meta device has no values to take gradients of")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n_inputs, *input_size), generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)

    captured: dict[str, tuple[int, torch.Tensor]] = {}
    kinds = {}
    counter = [0]
    handles = []
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            if isinstance(output, torch.Tensor) and output.dim() >= 1 and output.grad_fn:
                counter[0] += 1
                captured[name] = (counter[0], output)
                return output.clone()  # later in-place ops must not alter what we hold
            return None
        return hook

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, m in model.named_modules():
            if name:
                kinds[name] = type(m).__name__
                handles.append(m.register_forward_hook(make_hook(name)))
        with eval_mode(model), torch.enable_grad():
            model(x)
        for h in handles:
            h.remove()
        handles.clear()
        results = []
        for name, (_, y) in sorted(captured.items(), key=lambda kv: kv[1][0]):
            results.append(_measure_one(name, kinds[name], x, y, input_size[-2:]))
        return results
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _support(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]] | None:
    (g,) = torch.autograd.grad(y, x, retain_graph=True)
    mask = g.detach().abs().sum(dim=tuple(range(g.dim() - 2))) > 0
    if not bool(mask.any()):
        return None
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def _probes(n: int) -> list[int]:
    c = (n - 1) // 2
    return sorted({i for i in (0, c, c + 1, n - 1) if 0 <= i < n})


def _measure_one(name: str, kind: str, x: torch.Tensor, y: torch.Tensor,
                 image: tuple[int, int]) -> Measured:
    if y.dim() != 4:
        span = _support(x, y.sum())
        if span is None:
            shared = (AxisField(None, None, (0, image[0] - 1)),
                      AxisField(None, None, (0, image[1] - 1)))
            return Measured(name, kind, shared, (None, None), "no non-zero gradient seen")
        axes = (AxisField(None, None, span[0]), AxisField(None, None, span[1]))
        return Measured(name, kind, axes, (None, None))
    n_h, n_w = y.shape[-2], y.shape[-1]
    ph, pw = _probes(n_h), _probes(n_w)
    count = max(len(ph), len(pw))
    ph += [ph[-1]] * (count - len(ph))
    pw += [pw[-1]] * (count - len(pw))
    spans: tuple[list, list] = ([], [])
    for i, j in zip(ph, pw, strict=True):
        span = _support(x, y[:, :, i, j].sum())
        if span is not None:
            spans[0].append((i, *span[0]))
            spans[1].append((j, *span[1]))
    notes = []
    axes = []
    for a in (0, 1):
        field, note = _fit(sorted(set(spans[a])), (n_h, n_w)[a], image[a])
        axes.append(field)
        if note:
            notes.append(f"{'hw'[a]}: {note}")
    return Measured(name, kind, (axes[0], axes[1]), (n_h, n_w), "; ".join(notes))


def _fit(probes: list[tuple[int, int, int]], n: int, size: int) -> tuple[AxisField, str]:
    """Fit (r, S, P) to clipped spans ``(cell, first, last)`` along one axis."""
    if not probes:
        return AxisField(None, None, (0, size - 1)), "no non-zero gradient seen"
    if all(a == 0 and b == size - 1 for _, a, b in probes):
        return AxisField(None, None, (0, size - 1)), "every probed cell sees the whole input"
    open_start = [(i, a) for i, a, _ in probes if a > 0]
    open_end = [(i, b) for i, _, b in probes if b < size - 1]
    stride = 0 if n == 1 else None
    for pts in (open_start, open_end):
        for (i1, v1), (i2, v2) in pairwise(pts):
            if stride is None and i2 != i1 and (v2 - v1) % (i2 - i1) == 0:
                stride = (v2 - v1) // (i2 - i1)
    note = ""
    if stride is None:
        stride = 1
        note = "stride not determined (spans cut by the border); assumed 1"
    if open_start:
        i, a = open_start[0]
        first = a - stride * i
    else:
        i, a, _ = probes[-1]
        first = a - stride * i
        note = note or "field reaches past the image start: padding is a lower bound"
    if open_end:
        i, b = open_end[-1]
        last = b - stride * i
    else:
        i, _, b = probes[0]
        last = b - stride * i
        note = note or "field reaches past the image end: size is a lower bound"
    field = AxisField(QuasiAffine.affine(stride, first), QuasiAffine.affine(stride, last))
    for i, a, b in probes:
        lo, hi = max(field.start(i), 0), min(field.end(i), size - 1)
        if (lo, hi) != (a, b) and not note:
            note = f"cell {i} spans {a}..{b}, the fitted window gives {lo}..{hi}"
    return field, note
