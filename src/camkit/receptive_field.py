"""Receptive fields of every layer of a CNN, following the graph that executes.

>>> import camkit, torchvision                                   # doctest: +SKIP
>>> rf = camkit.receptive_field(torchvision.models.resnet18(), input_size=(3, 224, 224))
>>> rf["layer4"].size, rf["layer4"].stride, rf["layer4"].padding    # doctest: +SKIP
((435, 435), (32, 32), (217, 217))
>>> rf["layer4"].box(0, 0)                                        # doctest: +SKIP
Box(top=0, left=0, bottom=218, right=218)

The model is traced with :mod:`torch.fx` and each op's effect on spatial
indices is composed forward (Araujo, Norris and Sim, "Computing Receptive
Fields of Convolutional Neural Networks", Distill 2019), exactly, including
dilation, asymmetric padding, ceil-mode pooling, merges of branches and
power-of-two resizes. Where the graph cannot be traced or an op cannot be
followed exactly, the field is measured from input gradients instead, and
``rf.method`` says so. See ``docs/receptive_fields.md``.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import fx, nn

from camkit._rf_algebra import AxisField
from camkit._rf_measure import measure
from camkit._rf_trace import TracedModel, eval_mode, model_device, propagate_shapes, trace
from camkit._rf_walk import AXES, Unsupported, Val, walk
from camkit.errors import CamkitError, warn_at_caller
from camkit.layers import WRAPPER_PREFIXES, as_input_size, unwrap_model

__all__ = ["Box", "LayerField", "ReceptiveField", "receptive_field"]

Stride = int | Fraction


class Box(NamedTuple):
    """Input pixels seen by one cell: rows ``top:bottom``, columns ``left:right``.

    ``bottom`` and ``right`` are exclusive, so ``image[..., b.top:b.bottom,
    b.left:b.right]`` is the patch.
    """

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


class _MissingLayer(CamkitError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class LayerField:
    """The receptive field of one layer's output.

    Per input axis (rows, columns) the local window of cell ``i`` covers input
    pixels ``stride*i - padding`` to ``stride*i - padding + size - 1``.
    ``is_global`` marks outputs that also depend on the whole of some
    region shared by all cells, such as a global pooling or a gate computed
    from one (squeeze-and-excitation); :meth:`box` includes that region.

    Attributes
    ----------
    name : str
        The key of this entry.
    node : str
        The traced node the entry describes (a module's entry is its last node).
    op : str
        What that node runs (a module class or a function name).
    size, stride, padding : tuple
        Per axis ``(h, w)``: window size, effective stride and effective
        padding of the local window. ``stride`` is a :class:`~fractions.Fraction`
        after an upsampling. An output with no local window (after global
        pooling or flattening) reports the shared region with stride 0.
    output_size : tuple of int
        Cells per axis of the output; 1 along an axis it no longer has.
    dims : tuple
        Which dims of the output tensor hold the rows and the columns
        (``(2, 3)`` for NCHW, ``(1, 2)`` for a channels-last permute), ``None``
        for an axis the output no longer has.
    is_global : bool
        Whether every cell also sees a region shared by all cells.
    note : str
        For measured fields, what could not be determined; otherwise empty.
    """

    def __init__(self, name: str, node: str, op: str, axes: tuple[AxisField, AxisField],
                 extents: tuple[int | None, int | None], image: tuple[int, int],
                 note: str = "", dims: tuple[int | None, int | None] = (None, None)) -> None:
        self.name = name
        self.dims = dims
        self.node = node
        self.op = op
        self._axes = axes
        self._extents = extents
        self._image = image
        self.note = note
        triples = [_triple(f) for f in axes]
        self.size: tuple[int, int] = (triples[0][0], triples[1][0])
        self.stride: tuple[Stride, Stride] = (triples[0][1], triples[1][1])
        self.padding: tuple[int, int] = (triples[0][2], triples[1][2])

    @property
    def output_size(self) -> tuple[int, int]:
        return (self._extents[0] or 1, self._extents[1] or 1)

    @property
    def is_global(self) -> bool:
        return any(f.shared is not None for f in self._axes)

    def _spans(self, i: int, j: int, local: bool) -> list[tuple[int, int]]:
        spans = []
        for a, c in enumerate((i, j)):
            n = self.output_size[a]
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n:
                raise CamkitError(
                    f"cell ({i!r}, {j!r}) is outside the output of {self.name!r}, which has "
                    f"{self.output_size[0]} x {self.output_size[1]} cells; pass integer indices "
                    f"0 <= i < {self.output_size[0]} and 0 <= j < {self.output_size[1]}"
                )
            f = self._axes[a]
            if local and f.local:
                spans.append((f.start(c), f.end(c)))
            else:
                spans.append(f.span(c))
        return spans

    def box(self, i: int, j: int, clip: bool = True, *, local: bool = False) -> Box:
        """Input pixels that cell ``(i, j)`` sees.

        Parameters
        ----------
        i, j : int
            Row and column of the cell in this layer's output.
        clip : bool
            Cut the box to the image. With ``clip=False`` it may start below 0
            or end past the image: that part is padding.
        local : bool
            Leave out the region shared by all cells of a global output and
            give the local window only.

        Returns
        -------
        Box
            ``bottom``/``right`` exclusive.
        """
        (top, last_row), (left, last_col) = self._spans(i, j, local)
        box = Box(top, left, last_row + 1, last_col + 1)
        if not clip:
            return box
        h, w = self._image
        top, bottom = min(max(box.top, 0), h), max(min(box.bottom, h), 0)
        left, right = min(max(box.left, 0), w), max(min(box.right, w), 0)
        return Box(top, left, max(bottom, top), max(right, left))

    def center(self, i: int, j: int) -> tuple[float, float]:
        """Centre ``(row, column)`` of cell ``(i, j)``'s local window, in input pixels."""
        (top, bottom), (left, right) = self._spans(i, j, local=True)
        return ((top + bottom) / 2, (left + right) / 2)

    def to_dict(self) -> dict:
        """A JSON-ready description (fractional strides become floats)."""
        return {
            "node": self.node,
            "op": self.op,
            "size": list(self.size),
            "stride": [_json_number(s) for s in self.stride],
            "padding": list(self.padding),
            "output_size": list(self.output_size),
            "global": self.is_global,
            **({"note": self.note} if self.note else {}),
        }

    def __repr__(self) -> str:
        glob = ", global" if self.is_global else ""
        node = f", node={self.node!r}" if self.node != self.name else ""
        return (f"LayerField({self.name!r}{node}, size={self.size}, "
                f"stride={_fmt_tuple(self.stride)}, padding={self.padding}{glob})")


def _triple(f: AxisField) -> tuple[int, Stride, int]:
    if f.start is None or f.end is None:
        lo, hi = f.shared if f.shared is not None else (0, -1)
        return hi - lo + 1, 0, -lo
    period = f.start.period * f.end.period // math.gcd(f.start.period, f.end.period)
    size = max(f.end(r) - f.start(r) + 1 for r in range(period))
    slope = f.start.slope
    stride: Stride = int(slope) if slope.denominator == 1 else slope
    return size, stride, -f.start(0)


def _json_number(v: Stride) -> int | float:
    return v if isinstance(v, int) else float(v)


def _fmt(v: object) -> str:
    return str(v)


def _fmt_pair(pair: tuple) -> str:
    a, b = pair
    return _fmt(a) if a == b else f"{_fmt(a)}x{_fmt(b)}"


def _fmt_tuple(pair: tuple) -> str:
    return "(" + ", ".join(_fmt(v) for v in pair) + ")"


class ReceptiveField(Mapping[str, LayerField]):
    """Receptive fields of a model's layers, in execution order.

    A read-only mapping from layer name to :class:`LayerField`. Keys are the
    dotted module names of :meth:`torch.nn.Module.named_modules` (a module's
    entry describes its output: the last node run inside it) and the traced
    names of functional ops, as torchvision's feature extraction names them
    (``layer1.0.add``; ``_1``, ``_2`` ... for repeats). A module called more
    than once is listed under its name for its last call; ``name_0``,
    ``name_1`` ... name every call.

    Attributes
    ----------
    method : str
        ``"analytic"`` (graph walk, exact) or ``"measured"`` (input gradients).
    input_size : tuple of int
        The ``(C, H, W)`` the fields were computed for.
    reason : str
        Why the field was measured rather than computed; empty otherwise.
    """

    def __init__(self, entries: list[LayerField], aliases: dict[str, LayerField], method: str,
                 input_size: tuple[int, int, int], model_name: str, reason: str = "") -> None:
        self._rows = entries
        self._index = aliases
        self.method = method
        self.input_size = input_size
        self.model_name = model_name
        self.reason = reason

    def _key(self, name: object) -> object:
        """``name``, less the prefixes a wrapper adds where only the stripped name is known."""
        while (isinstance(name, str) and name not in self._index
               and name.startswith(WRAPPER_PREFIXES)):
            name = name.split(".", 1)[1]
        return name

    def __getitem__(self, name: str) -> LayerField:
        try:
            key = self._key(name)
            entry = self._index[key]
        except (KeyError, TypeError):
            pass
        else:
            if entry.name == key:
                return entry
            alias = copy.copy(entry)  # the same field, under the name asked for
            alias.name = key
            return alias
        close = difflib.get_close_matches(str(name), list(self._index), n=3)
        hint = f" Closest names: {', '.join(map(repr, close))}." if close else ""
        raise _MissingLayer(
            f"no layer named {name!r} in the receptive fields of {self.model_name} "
            f"({len(self._index)} names).{hint} List them with list(rf) or print(rf)."
        )

    def __contains__(self, name: object) -> bool:
        try:
            return self._key(name) in self._index
        except TypeError:  # an unhashable name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def to_dict(self) -> dict:
        """A JSON-ready dict: method, input size and one entry per name."""
        return {
            "method": self.method,
            "input_size": list(self.input_size),
            **({"reason": self.reason} if self.reason else {}),
            "layers": {name: entry.to_dict() for name, entry in self._index.items()},
        }

    def __repr__(self) -> str:
        return (f"ReceptiveField({self.model_name}, method={self.method!r}, "
                f"input_size={self.input_size}, {len(self._rows)} layers)")

    def __str__(self) -> str:
        names: dict[int, list[str]] = {}
        for name, entry in self._index.items():
            names.setdefault(id(entry), []).append(name)
        header = ("layer", "op", "output", "size", "stride", "padding", "")
        rows = []
        for e in self._rows:
            label = names.get(id(e), [e.name])
            shown = label[0] + (f" ({', '.join(label[1:])})" if len(label) > 1 else "")
            notes = ("global" if e.is_global else "") + (f" {e.note}" if e.note else "")
            rows.append((shown, e.op, _fmt_pair(e.output_size), _fmt_pair(e.size),
                         _fmt_pair(e.stride), _fmt_pair(e.padding), notes.strip()))
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
        lines = [
            f"Receptive fields of {self.model_name}, input {_fmt_tuple(self.input_size)}, "
            f"method: {self.method}" + (f" ({self.reason})" if self.reason else ""),
        ]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# building the mapping


class _DoesNotRun(Exception):
    """The model (or its traced graph) fails on an input of the requested size."""


def _analytic(model: nn.Module, input_size: tuple[int, int, int]) -> ReceptiveField:
    traced = trace(model)
    try:
        propagate_shapes(traced, input_size)
    except CamkitError:
        raise
    except Exception as exc:
        raise _DoesNotRun(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    infos = walk(traced)
    image = (input_size[-2], input_size[-1])
    entries: dict[fx.Node, LayerField] = {}
    for node, info in infos.items():
        value = traced.values.get(node)
        if isinstance(info.val, Val) and isinstance(value, torch.Tensor):
            dims = tuple(info.val.dim_of(ax) for ax in AXES)
            extents = tuple(value.shape[d] if d is not None else None for d in dims)
            entries[node] = LayerField(traced.names[node], traced.names[node], info.kind,
                                       info.val.axes, extents, image,  # type: ignore[arg-type]
                                       dims=dims)  # type: ignore[arg-type]
    index = _names(traced, entries)
    return ReceptiveField(list(entries.values()), index, "analytic", input_size,
                          type(model).__name__)


def _names(traced: TracedModel, entries: dict[fx.Node, LayerField]) -> dict[str, LayerField]:
    # A module's name points at the last node run inside it (its output).
    last: dict[str, fx.Node] = {}
    for node in entries:
        for path in traced.scopes[node]:
            last[path] = node
    index: dict[str, LayerField] = {}
    for node, entry in entries.items():
        primary = traced.names[node]
        if primary in last and last[primary] is not node:
            primary = f"{primary}_0"  # first call of a module called again later
        aliases = sorted((p for p, n in last.items() if n is node and p != primary),
                         key=lambda p: -p.count("."))
        entry.name = primary
        for name in (primary, *aliases):
            index.setdefault(name, entry)
    return index


def _measured(model: nn.Module, input_size: tuple[int, int, int], n_inputs: int, seed: int,
              reason: str) -> ReceptiveField:
    image = (input_size[-2], input_size[-1])
    rows = [
        LayerField(m.name, m.name, m.kind, m.axes, m.extents, image, m.note,
                   dims=(2, 3) if m.extents[0] is not None else (None, None))
        for m in measure(model, input_size, n_inputs, seed)
    ]
    return ReceptiveField(rows, {r.name: r for r in rows}, "measured", input_size,
                          type(model).__name__, reason)


def _check_input_size(model: nn.Module, input_size: object) -> tuple[int, int, int]:
    if input_size is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise CamkitError(
                "input_size is needed: pass input_size=(C, H, W), e.g. (3, 224, 224); the "
                "model has no Conv2d to take the channel count from"
            )
        return (conv.in_channels, 224, 224)
    return as_input_size(model, input_size)  # the forms list_layers takes


def receptive_field(
    model: nn.Module,
    input_size: tuple[int, int, int] | tuple[int, int] | int | None = None,
    *,
    method: str = "auto",
    n_inputs: int = 16,
    seed: int = 0,
) -> ReceptiveField:
    """Receptive field of every layer of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A model taking one image batch ``(N, C, H, W)``. It is not run on the
        analytic path (a model on the ``meta`` device works); its training
        flags, ``requires_grad`` flags and hooks are left as they were.
    input_size : tuple of int or int, optional
        ``(C, H, W)`` of one input, or ``(H, W)`` or an int (square) with the
        channels of the model's first ``Conv2d``. It sets the output sizes, the
        image the boxes are clipped to, and whether adaptive pooling is global.
        Default: 224 x 224.
    method : {"auto", "analytic", "measured"}
        ``"analytic"`` walks the traced graph and raises :class:`CamkitError`
        naming the op it cannot follow; ``"measured"`` takes input gradients;
        ``"auto"`` tries the first and falls back to the second with a
        warning.
    n_inputs : int
        Random inputs of the measured method; a pixel belongs to a cell's
        field when its gradient is non-zero for at least one of them, so more
        inputs make a path through max pooling or dead units less likely to
        be missed.
    seed : int
        Seed of those random inputs.

    Returns
    -------
    ReceptiveField
        Mapping from layer name to :class:`LayerField`; ``.method`` says which
        method produced it.

    Raises
    ------
    CamkitError
        For bad arguments, a model that does not run on ``input_size``, or
        (with ``method="analytic"``) a graph that cannot be followed.
    """
    model = unwrap_model(model)  # names are those of the model a wrapper holds
    size = _check_input_size(model, input_size)
    if method not in ("auto", "analytic", "measured"):
        raise CamkitError(
            f"method={method!r} is not one of 'auto', 'analytic', 'measured'"
        )
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
        raise CamkitError(f"n_inputs={n_inputs!r} must be a positive int")
    reason = ""
    if method != "measured":
        try:
            return _analytic(model, size)
        except CamkitError:
            raise
        except Unsupported as exc:
            reason = f"the graph walk stopped at {exc}"
            cause: Exception = exc
        except _DoesNotRun as exc:
            why = _run_error(model, size)
            if why is not None:
                detail = exc if why.startswith("the model is on") else why
                raise CamkitError(
                    f"{type(model).__name__} does not run on an input of size (N, {size[0]}, "
                    f"{size[1]}, {size[2]}): {detail}. {_size_advice(model)}"
                ) from exc
            reason = f"the traced graph fails where the model runs ({exc})"
            cause = exc
        except Exception as exc:  # tracing or shape propagation failed
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            cause = exc
        if method == "analytic":
            raise CamkitError(
                f"cannot compute the receptive field of {type(model).__name__} analytically: "
                f"{reason}. Use method='measured' (or 'auto') to measure it from input "
                "gradients instead."
            ) from cause
        if model_device(model).type == "meta":
            raise CamkitError(
                f"cannot compute the receptive field of {type(model).__name__} analytically "
                f"({reason}), and a model on the meta device cannot be measured either (that "
                "takes input gradients); build the model on a real device, e.g. the CPU"
            ) from cause
        warn_at_caller(
            f"camkit.receptive_field: {type(model).__name__} could not be analysed ({reason}); "
            "the fields were measured from input gradients instead (rf.method == 'measured'), "
            "which gives module outputs only and lower bounds where a field reaches the image "
            "border."
        )
    if model_device(model).type == "meta":
        raise CamkitError(
            f"method='measured' takes input gradients, which a model on the meta device "
            f"cannot give; build {type(model).__name__} on a real device, e.g. the CPU"
        )
    try:
        return _measured(model, size, n_inputs, seed, reason or "method='measured'")
    except Exception as exc:
        raise CamkitError(
            f"{type(model).__name__} does not run on an input of size (N, {size[0]}, "
            f"{size[1]}, {size[2]}): {type(exc).__name__}: {_first_line(exc)}. "
            + _size_advice(model)
            + (f" (The graph could not be analysed either: {reason}.)" if reason else "")
        ) from exc


def _size_advice(model: nn.Module) -> str:
    """What to do about a model that rejects the input size."""
    layers = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d)
    if not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules()):
        other = next((m for m in model.modules() if isinstance(m, layers)), None)
        if other is not None:
            return (f"camkit computes receptive fields of 2-D image models, whose input is "
                    f"(N, C, H, W); this model is built from {type(other).__name__} layers.")
    return "Pass an input_size the model accepts."


def _run_error(model: nn.Module, size: tuple[int, int, int]) -> str | None:
    """Why the model itself rejects one input of ``size``, or ``None`` when it runs.

    The model runs in eval mode without autograd; on the ``meta`` device it
    cannot run, and the shape error of the traced graph stands.
    """
    device = model_device(model)
    if device.type == "meta":
        return "the model is on the meta device"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *size), dtype=dtype, device=device))
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
