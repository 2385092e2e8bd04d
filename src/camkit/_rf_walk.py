"""The forward walk over a traced graph that gives every node its field.

Each tensor that depends on the input carries a :class:`Val`: which of its
dims are the input's rows (``"h"``) and columns (``"w"``), and per input
axis an :class:`~camkit._rf_algebra.AxisField`. Ops are applied in graph
order (the order they execute), by the rules below, one per kind of
:mod:`camkit._rf_ops`. An op the rules cannot follow exactly raises
:class:`Unsupported`, whose message names the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import fx

from camkit import _rf_ops as ops
from camkit._rf_algebra import IDENTITY, AxisField, QuasiAffine, hull, merge_axes
from camkit._rf_trace import TracedModel

AXES = ("h", "w")
_AXIS = {"h": 0, "w": 1}
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
}


# Ops whose output may share memory with their first argument (a view): an
# in-place op on either changes both.
_VIEW_NAMES = frozenset((
    "view view_as reshape reshape_as flatten unflatten ravel squeeze unsqueeze permute "
    "transpose swapaxes swapdims movedim moveaxis t expand expand_as broadcast_to narrow "
    "select chunk split tensor_split unbind unfold diagonal as_strided detach contiguous "
    "getitem"
).split())


class Unsupported(Exception):
    """The walk met an op whose effect on the field it cannot state exactly."""


@dataclass(frozen=True)
class Val:
    """Field of one tensor: spatial labels per dim and one field per input axis."""

    labels: tuple[str | None, ...]
    axes: tuple[AxisField, AxisField]

    def dim_of(self, axis: str) -> int | None:
        return self.labels.index(axis) if axis in self.labels else None


@dataclass
class NodeInfo:
    """What the walk found for one node."""

    val: object  # Val, a tuple/list of Val, or None (does not depend on the input)
    kind: str  # the op, for display ("Conv2d", "add", ...)


def input_val(ndim: int) -> Val:
    if ndim < 2:
        raise Unsupported(f"the input has {ndim} dims; an image needs at least (H, W)")
    field = AxisField(IDENTITY, IDENTITY)
    return Val((None,) * (ndim - 2) + ("h", "w"), (field, field))


def walk(traced: TracedModel) -> dict[fx.Node, NodeInfo]:
    """Give every node of ``traced`` (shapes already propagated) its field."""
    modules = traced.modules
    infos: dict[fx.Node, NodeInfo] = {}
    current: dict[fx.Node, object] = {}  # a node's field after in-place updates
    first = True
    order = {n: k for k, n in enumerate(traced.graph.nodes)}
    sharing = _sharing(traced, modules)

    def val_of(n: fx.Node) -> object:
        return current.get(n, infos[n].val)

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            value = traced.values[node]
            if first and isinstance(value, torch.Tensor):
                infos[node] = NodeInfo(input_val(value.dim()), "input")
                first = False
            else:
                infos[node] = NodeInfo(None, "input")
            continue
        if node.op in ("get_attr", "output"):
            infos[node] = NodeInfo(None, node.op)
            continue
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        ctx = _Ctx(traced, node, val_of, module)
        infos[node] = NodeInfo(ctx.run(), ctx.kind)
        if isinstance(infos[node].val, Val) and _mutates_first_arg(node):
            target = node.args[0]
            if isinstance(target, fx.Node):
                if infos[node].val != val_of(target):
                    _check_no_stale_alias(traced, node, target, sharing, order, ctx)
                current[target] = infos[node].val
    return infos


def _sharing(traced: TracedModel, modules: dict) -> dict[fx.Node, list[fx.Node]]:
    """For each node, every node whose output shares memory with it (itself included).

    A view, or the result of an in-place op, shares the memory of its first
    argument; nodes chained that way form one group.
    """
    group_of: dict[fx.Node, list[fx.Node]] = {}
    for node in traced.graph.nodes:
        src = node.args[0] if node.args else None
        aliases = isinstance(src, fx.Node) and (
            _mutates_first_arg(node)
            or (node.op in ("call_method", "call_function")
                and ops._target_name(node) in _VIEW_NAMES)
            or node.kwargs.get("inplace") is True
            or (node.op == "call_module"
                and getattr(modules.get(str(node.target)), "inplace", False) is True)
        )
        group = group_of[src] if aliases else []  # type: ignore[index]
        group.append(node)
        group_of[node] = group
    return group_of


def _check_no_stale_alias(traced: TracedModel, node: fx.Node, target: fx.Node,
                          sharing: dict[fx.Node, list[fx.Node]], order: dict[fx.Node, int],
                          ctx: _Ctx) -> None:
    """Refuse an in-place op that changes a tensor another live node shares memory with.

    The walk gives the mutated tensor (``target``) its new field, but a node
    sharing its memory (a view taken of it, or the tensor it is a view of)
    changes too, and a use of that node after ``node`` would still get the
    old field.

    Raises
    ------
    Unsupported
        When such a node is used after ``node``.
    """
    for other in sharing[target]:
        if other is node or other is target:
            continue
        later = [u for u in other.users
                 if order[u] > order[node] and _has_tensor(traced.values.get(u))]
        if later:
            raise ctx.fail(
                f"it changes in place a tensor that {traced.names[other]!r} shares memory "
                f"with, and {traced.names[later[0]]!r} reads {traced.names[other]!r} "
                "afterwards; camkit cannot follow a field through such aliasing (write the "
                "update out of place, e.g. y = y + z)"
            )


def _mutates_first_arg(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    return node.op == "call_function" and node.target in _INPLACE_OPERATORS


def _has_tensor(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _pairs(vals: object, metas: object) -> list[tuple[Val, torch.Tensor]]:
    """(field, meta tensor) for every input-dependent tensor among the arguments."""
    out: list[tuple[Val, torch.Tensor]] = []
    if isinstance(vals, Val) and isinstance(metas, torch.Tensor):
        out.append((vals, metas))
    elif isinstance(vals, (tuple, list)) and isinstance(metas, (tuple, list)):
        for v, m in zip(vals, metas, strict=False):
            out.extend(_pairs(v, m))
    elif isinstance(vals, dict) and isinstance(metas, dict):
        for k in vals:
            out.extend(_pairs(vals[k], metas.get(k)))
    elif isinstance(vals, slice) and isinstance(metas, slice):
        pass
    return out


def _flat_vals(value: object) -> list[Val]:
    if isinstance(value, Val):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat_vals(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat_vals(item)]
    return []


def _like(out: object, make) -> object:
    """Give every tensor in ``out`` (a tensor or nested tuple) the field ``make(tensor)``."""
    if isinstance(out, torch.Tensor):
        return make(out)
    if isinstance(out, (tuple, list)):
        return tuple(_like(o, make) for o in out)
    return None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _collapse_all(val: Val, shape: tuple[int, ...]) -> tuple[AxisField, AxisField]:
    axes = list(val.axes)
    for k, lab in enumerate(val.labels):
        if lab is not None:
            a = _AXIS[lab]
            axes[a] = axes[a].collapsed(0, max(shape[k], 1) - 1)
    return axes[0], axes[1]


class _Ctx:
    """One node being processed: its arguments' fields and meta values."""

    def __init__(self, traced: TracedModel, node: fx.Node, val_of, module) -> None:
        self.traced = traced
        self.node = node
        self.name = traced.names[node]
        self.module = module
        self.out = traced.values[node]
        self.arg_vals = fx.node.map_arg(node.args, val_of)
        self.kwarg_vals = fx.node.map_arg(node.kwargs, val_of)
        self.meta_args = fx.node.map_arg(node.args, lambda n: traced.values[n])
        self.meta_kwargs = fx.node.map_arg(node.kwargs, lambda n: traced.values[n])
        self.kind = (type(module).__name__ if module is not None
                     else ops._target_name(node))

    # -- helpers ---------------------------------------------------------
    def fail(self, why: str) -> Unsupported:
        return Unsupported(f"node {self.name!r} ({self.kind}): {why}")

    def primary(self) -> tuple[Val, torch.Tensor]:
        v = self.arg_vals[0] if self.arg_vals else None
        m = self.meta_args[0] if self.meta_args else None
        if not isinstance(v, Val) or not isinstance(m, torch.Tensor):
            raise self.fail("its first argument is not the input-dependent tensor")
        return v, m

    def others(self) -> list[tuple[Val, torch.Tensor]]:
        pairs = _pairs(self.arg_vals[1:], self.meta_args[1:])
        pairs += _pairs(self.kwarg_vals, self.meta_kwargs)
        return pairs

    def absorb(self, result: Val) -> Val:
        """Fold fields of secondary inputs (e.g. a computed weight) in as shared spans."""
        extra = self.others()
        if not extra:
            return result
        axes = list(result.axes)
        for v, m in extra:
            collapsed = _collapse_all(v, tuple(m.shape))
            for a in (0, 1):
                axes[a] = merge_axes([axes[a], collapsed[a]])
        return Val(result.labels, (axes[0], axes[1]))

    # -- dispatch ----------------------------------------------------------
    def run(self) -> object:
        if not _has_tensor(self.out):
            return None
        in_vals = _flat_vals(self.arg_vals) + _flat_vals(self.kwarg_vals)
        if not in_vals:
            return None
        spec = self.traced.specs.get(self.node) or ops.classify(
            self.node, self.module, self.meta_args, self.meta_kwargs)
        self.spec = spec
        if spec.kind == ops.CONSTANT:
            return None
        rule = getattr(self, "rule_" + spec.kind, None)
        if rule is None:
            if not any(a.local for v in in_vals for a in v.axes):
                # nothing local left to move: any op sees all of what its inputs see
                return self._global_like(in_vals)
            raise self.fail(
                "camkit does not know how this op moves spatial positions, so it cannot "
                "follow the field through it"
            )
        return rule()

    def _global_like(self, in_vals: list[Val]) -> object:
        shared: list[tuple[int, int] | None] = [None, None]
        for v in in_vals:
            for a in (0, 1):
                shared[a] = hull(shared[a], v.axes[a].shared)
        axes = (AxisField(None, None, shared[0]), AxisField(None, None, shared[1]))
        return _like(self.out, lambda t: Val((None,) * t.dim(), axes))

    def merge(self, out_shape: tuple[int, ...], pairs: list[tuple[Val, torch.Tensor]],
              skip: int | None = None) -> Val:
        nd = len(out_shape)
        labels: list[str | None] = [None] * nd
        fields: tuple[list[AxisField], list[AxisField]] = ([], [])
        for val, meta in pairs:
            shape = tuple(meta.shape)
            off = nd - len(shape)
            seen = [False, False]
            for k, lab in enumerate(val.labels):
                if lab is None:
                    continue
                a = _AXIS[lab]
                seen[a] = True
                ok = k + off
                if ok == skip or shape[k] == out_shape[ok]:
                    if labels[ok] not in (None, lab):
                        raise self.fail("it combines the input's rows with its columns")
                    labels[ok] = lab
                    fields[a].append(val.axes[a])
                else:  # broadcast of a single cell
                    fields[a].append(val.axes[a].collapsed(0, 0))
            for a in (0, 1):
                if not seen[a]:
                    fields[a].append(val.axes[a])
        for lab in AXES:
            if labels.count(lab) > 1:
                raise self.fail(f"the input's axis {lab!r} ends up in two dims")
        try:
            axes = (merge_axes(fields[0]), merge_axes(fields[1]))
        except ValueError:
            strides = sorted({str(f.start.slope) for fs in fields for f in fs if f.start})
            raise self.fail(
                f"it merges paths with different strides ({', '.join(strides)}); the union "
                "of their windows is not a sliding window"
            ) from None
        return Val(tuple(labels), axes)

    # -- rules -----------------------------------------------------------
    def rule_elementwise(self) -> Val:
        pairs = _pairs(self.arg_vals, self.meta_args) + _pairs(self.kwarg_vals,
                                                               self.meta_kwargs)
        if not isinstance(self.out, torch.Tensor):
            raise self.fail("an elementwise op with several outputs")
        return self.merge(tuple(self.out.shape), pairs)

    def rule_unary(self) -> object:
        v, m = self.primary()
        if not isinstance(self.out, torch.Tensor):
            raise self.fail("a cast or copy with several outputs")
        return self.merge(tuple(self.out.shape), [(v, m)])

    def _spatial_dims(self, v: Val, ndim: int) -> list[tuple[int, int, str | None]]:
        # (position among the op's two dims, tensor dim, label)
        return [(t, ndim - 2 + t, v.labels[ndim - 2 + t]) for t in (0, 1)]

    def rule_window(self) -> Val:
        v, m = self.primary()
        w: ops.Window = self.spec.params["window"]
        ndim = m.dim()
        labels, axes = list(v.labels), list(v.axes)
        for t, k, lab in self._spatial_dims(v, ndim):
            if lab is None:
                continue
            if w.padding_mode != "zeros":
                out = self.out[0] if isinstance(self.out, (tuple, list)) else self.out
                self._check_filled_padding(w, t, m.shape[k], out.shape[k])
            a = _AXIS[lab]
            first = -w.before[t]
            last = first + w.dilation[t] * (w.kernel[t] - 1)
            axes[a] = axes[a].mapped(QuasiAffine.affine(w.stride[t], first),
                                     QuasiAffine.affine(w.stride[t], last))
        if w.mixes_channels and ndim >= 3:
            self._mix_dim(labels, axes, ndim - 3, tuple(m.shape))
        result = Val(tuple(labels), (axes[0], axes[1]))
        result = self.absorb(result)
        return _like(self.out, lambda t: result)  # max-pool with indices gives two outputs

    def _check_filled_padding(self, w: ops.Window, t: int, n: int, o: int) -> None:
        """Refuse a padding filled from the map unless every window reads only its own cells.

        With ``padding_mode`` "reflect" or "replicate" a window that hangs over the
        border reads cells mirrored (or repeated) from inside the map. When those
        lie inside the part of the window that is already in the map, the window
        sees exactly what it would see with zero padding, so the sliding-window
        field stays exact; otherwise (and always for "circular", which wraps to
        the far side) it does not.

        Parameters
        ----------
        w : Window
            The convolution's window.
        t : int
            Which of the window's two dims (0 rows, 1 columns).
        n, o : int
            Cells of the map along that dim before and after the op.
        """
        if w.before[t] <= 0 and w.after[t] <= 0:
            return
        k_eff = w.dilation[t] * (w.kernel[t] - 1) + 1
        first = -w.before[t]  # window of cell 0: first .. first + k_eff - 1
        last = w.stride[t] * (o - 1) - w.before[t]  # window of the last cell
        mode = w.padding_mode
        axis = "rows" if t == 0 else "columns"
        if mode == "reflect":  # cell -c reads c, and cell n - 1 + c reads n - 1 - c
            ok = (first >= 0 or 2 * first + k_eff - 1 >= 0) and (
                last + k_eff - 1 <= n - 1 or 2 * last + k_eff - 1 <= 2 * (n - 1))
        elif mode == "replicate":  # cells past the border read the border cell
            ok = first + k_eff - 1 >= 0 and last <= n - 1
        else:
            raise self.fail(
                f"padding_mode={mode!r} along {axis}: a window at one border reads cells "
                "from the other border, so the field is not a sliding window"
            )
        if not ok:
            limit = ("of at most half the window" if mode == "reflect"
                     else "while every window overlaps the map")
            raise self.fail(
                f"padding_mode={mode!r} along {axis}: a window at the border reads cells of "
                "the map outside its own window, so the field is not a sliding window; "
                f"camkit follows {mode!r} padding {limit}"
            )

    def _mix_dim(self, labels: list, axes: list, k: int, shape: tuple[int, ...],
                 keep_label: bool = False) -> None:
        lab = labels[k]
        if lab is None:
            return
        a = _AXIS[lab]
        axes[a] = axes[a].collapsed(0, max(shape[k], 1) - 1)
        if not keep_label:
            labels[k] = None

    def rule_adaptive(self) -> object:
        v, m = self.primary()
        out = self.out[0] if isinstance(self.out, (tuple, list)) else self.out
        ndim = m.dim()
        labels, axes = list(v.labels), list(v.axes)
        for _, k, lab in self._spatial_dims(v, ndim):
            if lab is None:
                continue
            a = _AXIS[lab]
            n, o = m.shape[k], out.shape[k]
            axes[a] = _adaptive(axes[a], n, o)
        result = Val(tuple(labels), (axes[0], axes[1]))
        return _like(self.out, lambda t: result)

    def rule_transposed(self) -> Val:
        v, m = self.primary()
        p = self.spec.params
        ndim = m.dim()
        labels, axes = list(v.labels), list(v.axes)
        for t, _, lab in self._spatial_dims(v, ndim):
            if lab is None:
                continue
            a = _AXIS[lab]
            k, s, pad, d = p["kernel"][t], p["stride"][t], p["padding"][t], p["dilation"][t]
            if d == 1 and k >= s:
                lo = QuasiAffine.floordiv(1, pad - k + s, s)
                hi = QuasiAffine.floordiv(1, pad, s)
            elif s == 1:
                lo = QuasiAffine.affine(1, pad - d * (k - 1))
                hi = QuasiAffine.affine(1, pad)
            elif k < s:
                raise self.fail(
                    f"transposed convolution with kernel {k} smaller than stride {s}: some "
                    "output cells see no input at all"
                )
            else:
                raise self.fail(
                    f"transposed convolution with both stride {s} and dilation {d} > 1 is not "
                    "supported"
                )
            axes[a] = axes[a].mapped(lo, hi)
        if ndim >= 3:
            self._mix_dim(labels, axes, ndim - 3, tuple(m.shape))
        return self.absorb(Val(tuple(labels), (axes[0], axes[1])))

    def rule_resize(self) -> Val:
        v, m = self.primary()
        p = self.spec.params
        mode = p.get("mode", "nearest")
        ndim = m.dim()
        labels, axes = list(v.labels), list(v.axes)
        for t, k, lab in self._spatial_dims(v, ndim):
            if lab is None:
                continue
            a = _AXIS[lab]
            n_in, n_out = m.shape[k], self.out.shape[k]
            if mode == "area":
                axes[a] = _adaptive(axes[a], n_in, n_out)
                continue
            ratio = self._resize_ratio(p, t, n_in, n_out)
            if ratio == 1 and n_in == n_out:
                continue
            if p.get("antialias"):
                raise self.fail("antialiased resizing is not supported")
            if p.get("align_corners"):
                raise self.fail(
                    f"{mode} resizing with align_corners=True from {n_in} to {n_out} cells: its "
                    "source positions are not exact in floating point"
                )
            num, den = ratio.numerator, ratio.denominator
            if num & (num - 1) or den & (den - 1):
                raise self.fail(
                    f"resizing by {1 / ratio} (from {n_in} to {n_out} cells); camkit follows "
                    "resizes by powers of two exactly and refuses others"
                )
            if mode == "nearest":
                lo = hi = QuasiAffine.floordiv(num, 0, den)
            elif mode == "nearest-exact":
                lo = hi = QuasiAffine.floordiv(2 * num, num, 2 * den)
            elif mode == "bilinear":
                lo = QuasiAffine.floordiv(2 * num, num - den, 2 * den)
                hi = QuasiAffine.floordiv(2 * num, num - den + 2 * den - 1, 2 * den)
            elif mode == "bicubic":
                lo = QuasiAffine.floordiv(2 * num, num - 3 * den, 2 * den)
                hi = QuasiAffine.floordiv(2 * num, num + 3 * den, 2 * den)
            else:
                raise self.fail(f"resize mode {mode!r} is not supported")
            axes[a] = axes[a].mapped(lo, hi)
        return Val(tuple(labels), (axes[0], axes[1]))

    def _resize_ratio(self, p: dict, t: int, n_in: int, n_out: int) -> Fraction:
        sf = p.get("scale_factor")
        if sf is not None and not p.get("recompute_scale_factor"):
            if isinstance(sf, (tuple, list)):
                sf = sf[t]
            return 1 / Fraction(float(sf))
        return Fraction(n_in, n_out)

    def rule_pad(self) -> Val:
        v, m = self.primary()
        pad = self.spec.params["pad"]
        mode = self.spec.params.get("mode", "constant")
        ndim = m.dim()
        axes = list(v.axes)
        for j in range(len(pad) // 2):
            k = ndim - 1 - j
            lab = v.labels[k] if k >= 0 else None
            if lab is None:
                continue
            if mode != "constant" and max(pad[2 * j], pad[2 * j + 1]) > 0:
                raise self.fail(
                    f"{mode!r} padding: the added cells repeat cells from inside the map, so "
                    "they do not continue its sliding window; camkit follows constant "
                    "padding only (a Conv2d with padding_mode='reflect' or 'replicate' of at "
                    "most half its window is fine)"
                )
            shift = QuasiAffine.affine(1, -pad[2 * j])
            axes[_AXIS[lab]] = axes[_AXIS[lab]].mapped(shift, shift)
        return Val(v.labels, (axes[0], axes[1]))

    def _shuffle(self, lo: QuasiAffine, hi: QuasiAffine) -> Val:
        v, m = self.primary()
        ndim = m.dim()
        if ndim >= 3 and v.labels[ndim - 3] is not None:
            raise self.fail("pixel (un)shuffle over a spatial channel dim")
        axes = list(v.axes)
        for _, _, lab in self._spatial_dims(v, ndim):
            if lab is not None:
                axes[_AXIS[lab]] = axes[_AXIS[lab]].mapped(lo, hi)
        return Val(v.labels, (axes[0], axes[1]))

    def rule_pixel_shuffle(self) -> Val:
        f = self.spec.params["factor"]
        q = QuasiAffine.floordiv(1, 0, f)
        return self._shuffle(q, q)

    def rule_pixel_unshuffle(self) -> Val:
        f = self.spec.params["factor"]
        return self._shuffle(QuasiAffine.affine(f, 0), QuasiAffine.affine(f, f - 1))

    def rule_linear(self) -> Val:
        v, m = self.primary()
        labels, axes = list(v.labels), list(v.axes)
        self._mix_dim(labels, axes, m.dim() - 1, tuple(m.shape))
        return self.absorb(Val(tuple(labels), (axes[0], axes[1])))

    def rule_cat(self) -> Val:
        tensors_v, tensors_m = self.arg_vals[0], self.meta_args[0]
        if "tensors" in self.kwarg_vals:
            tensors_v, tensors_m = self.kwarg_vals["tensors"], self.meta_kwargs["tensors"]
        if isinstance(tensors_v, Val):
            raise self.fail("concatenation of a single tensor (not a list)")
        nd = self.out.dim()
        dim = _norm_dim(int(self.spec.params["dim"]), nd)
        pairs = _pairs(tensors_v, tensors_m)
        for v, _ in pairs:
            if v.labels[dim] is not None:
                raise self.fail("concatenation along a spatial axis")
        return self.merge(tuple(self.out.shape), pairs, skip=dim)

    def rule_stack(self) -> Val:
        tensors_v, tensors_m = self.arg_vals[0], self.meta_args[0]
        nd = self.out.dim()
        dim = _norm_dim(int(self.spec.params["dim"]), nd)
        pairs = []
        for v, m in _pairs(tensors_v, tensors_m):
            labels = list(v.labels)
            labels.insert(dim, None)
            pairs.append((Val(tuple(labels), v.axes), m.unsqueeze(dim)))
        return self.merge(tuple(self.out.shape), pairs)

    def rule_reshape(self) -> Val:
        v, m = self.primary()
        if not isinstance(self.out, torch.Tensor):
            raise self.fail("a reshape with several outputs")
        labels, axes = _reshape(v, tuple(m.shape), tuple(self.out.shape), self.fail)
        return Val(labels, axes)

    def rule_permute(self) -> Val:
        v, m = self.primary()
        nd = m.dim()
        p = self.spec.params
        if "dims" in p:
            perm = [_norm_dim(d, nd) for d in p["dims"]]
        elif "swap" in p:
            d0, d1 = (_norm_dim(d, nd) for d in p["swap"])
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            src, dst = p["move"]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm_dim(d, nd) for d in src]
            dst = [_norm_dim(d, nd) for d in dst]
            perm = [-1] * nd
            for s_, d_ in zip(src, dst, strict=True):
                perm[d_] = s_
            rest = iter(d for d in range(nd) if d not in src)
            perm = [d if d >= 0 else next(rest) for d in perm]
        return Val(tuple(v.labels[d] for d in perm), v.axes)

    def rule_getitem(self) -> object:
        container = self.arg_vals[0]
        index = self.spec.params["index"]
        if not isinstance(container, Val):
            if isinstance(container, (tuple, list)):
                return container[index]
            return None
        meta = self.meta_args[0]
        return _index(container, tuple(meta.shape), index, self.fail)

    def rule_reduce(self) -> object:
        v, m = self.primary()
        out = self.out[0] if isinstance(self.out, (tuple, list)) else self.out
        nd = m.dim()
        dim = self.spec.params["dim"]
        if dim is None:
            dims = list(range(nd))
        elif isinstance(dim, (list, tuple)):
            dims = [_norm_dim(int(d), nd) for d in dim]
        else:
            dims = [_norm_dim(int(dim), nd)]
        keep = out.dim() == nd
        labels, axes = list(v.labels), list(v.axes)
        for k in dims:
            self._mix_dim(labels, axes, k, tuple(m.shape), keep_label=True)
        if not keep:
            labels = [lab for k, lab in enumerate(labels) if k not in dims]
        result = Val(tuple(labels), (axes[0], axes[1]))
        return _like(self.out, lambda t: result)

    def rule_dim_mix(self) -> Val:
        v, m = self.primary()
        nd = m.dim()
        dim = self.spec.params["dim"]
        if dim is None:
            dim = 0 if nd in (0, 1, 3) else 1
        labels, axes = list(v.labels), list(v.axes)
        self._mix_dim(labels, axes, _norm_dim(int(dim), nd), tuple(m.shape), keep_label=True)
        return Val(tuple(labels), (axes[0], axes[1]))

    def rule_split(self) -> object:
        v, m = self.primary()
        nd = m.dim()
        dim = _norm_dim(int(self.spec.params["dim"]), nd)
        pieces = self.out
        lab = v.labels[dim]
        if self.spec.label == "unbind":
            out = []
            for c in range(len(pieces)):
                labels = list(v.labels)
                axes = list(v.axes)
                if lab is not None:
                    axes[_AXIS[lab]] = axes[_AXIS[lab]].collapsed(c, c)
                del labels[dim]
                out.append(Val(tuple(labels), (axes[0], axes[1])))
            return tuple(out)
        if lab is None:
            return tuple(v for _ in pieces)
        out, offset = [], 0
        for piece in pieces:
            shift = QuasiAffine.affine(1, offset)
            axes = list(v.axes)
            axes[_AXIS[lab]] = axes[_AXIS[lab]].mapped(shift, shift)
            out.append(Val(v.labels, (axes[0], axes[1])))
            offset += piece.shape[dim]
        return tuple(out)


def _adaptive(field: AxisField, n: int, o: int) -> AxisField:
    if o == 1:
        return field.collapsed(0, n - 1)
    return field.mapped(QuasiAffine.floordiv(n, 0, o), QuasiAffine.floordiv(n, n - 1, o))


def _reshape(v: Val, in_shape: tuple[int, ...], out_shape: tuple[int, ...], fail):
    axes = list(v.axes)
    labels: list[str | None] = [None] * len(out_shape)
    for k, lab in enumerate(v.labels):
        if lab is not None and in_shape[k] == 1:
            axes[_AXIS[lab]] = axes[_AXIS[lab]].collapsed(0, 0)
    ins = [(k, n) for k, n in enumerate(in_shape) if n != 1]
    outs = [(k, n) for k, n in enumerate(out_shape) if n != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = ins[i][1], outs[j][1]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i])
                pi *= ins[i][1]
                i += 1
            elif j < len(outs):
                gj.append(outs[j])
                pj *= outs[j][1]
                j += 1
            else:  # pragma: no cover - sizes always match for a valid reshape
                break
        for k, _ in gi:
            lab = v.labels[k]
            if lab is None:
                continue
            if len(gi) == 1 and len(gj) == 1:
                labels[gj[0][0]] = lab
            elif len(gi) == 1:
                raise fail(f"the input's axis {lab!r} is split into several dims")
            else:
                axes[_AXIS[lab]] = axes[_AXIS[lab]].collapsed(0, in_shape[k] - 1)
    return tuple(labels), (axes[0], axes[1])


def _index(v: Val, shape: tuple[int, ...], index: object, fail) -> Val:
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(it, (torch.Tensor, list)) for it in items):
        raise fail("advanced (tensor) indexing of a spatial tensor")
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[object] = []
    for it in items:
        if it is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - consumed))
        else:
            expanded.append(it)
    expanded.extend([slice(None)] * (len(shape) - sum(1 for it in expanded if it is not None)))
    labels: list[str | None] = []
    axes = list(v.axes)
    k = 0
    for it in expanded:
        if it is None:
            labels.append(None)
            continue
        n, lab = shape[k], v.labels[k]
        k += 1
        if isinstance(it, bool) or not isinstance(it, (int, slice)):
            raise fail(f"indexing with {type(it).__name__}")
        if isinstance(it, int):
            if lab is not None:
                c = it + n if it < 0 else it
                axes[_AXIS[lab]] = axes[_AXIS[lab]].collapsed(c, c)
            continue
        start, _, step = it.indices(n)
        if lab is not None and (start, step) != (0, 1):
            shift = QuasiAffine.affine(step, start)
            axes[_AXIS[lab]] = axes[_AXIS[lab]].mapped(shift, shift)
        labels.append(lab)
    return Val(tuple(labels), (axes[0], axes[1]))
