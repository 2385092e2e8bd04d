"""Tracing a model for the receptive-field walk: graph, node names, shapes.

The graph comes from a plain :class:`torch.fx.Tracer` (``torch.nn`` modules
are leaves, everything else is traced through), taken in eval mode so that
training-only branches (auxiliary heads, stochastic depth) are left out.
Shapes come from running that graph on a ``meta`` tensor with ``meta``
copies of the parameters: no memory for activations and no arithmetic, so a
ResNet-152 costs a few milliseconds. Node names follow torchvision's
feature-extraction scheme: the dotted module path, then the op
(``layer1.0.add``), with ``_1``, ``_2`` ... for repeats in the same scope.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from camkit import _rf_ops
from camkit.errors import CamkitError

_FX_SUFFIX = re.compile(r"_\d+$")


@dataclass
class TracedModel:
    """A traced graph plus what the receptive-field walk needs to know of it."""

    root: nn.Module
    graph: fx.Graph
    names: dict[fx.Node, str] = field(default_factory=dict)
    scopes: dict[fx.Node, tuple[str, ...]] = field(default_factory=dict)
    values: dict[fx.Node, object] = field(default_factory=dict)
    specs: dict[fx.Node, object] = field(default_factory=dict)
    real_shapes: bool = False

    @property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.root.named_modules())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trace(model: nn.Module) -> TracedModel:
    """Trace ``model`` with a plain fx tracer (in eval mode) and name its nodes.

    Raises whatever the tracer raises (``torch.fx.proxy.TraceError`` for
    data-dependent control flow, ``TypeError`` for iterating a proxy ...).
    """
    with eval_mode(model):
        graph = fx.Tracer().trace(model)
    traced = TracedModel(root=model, graph=graph)
    _name_nodes(traced)
    return traced


def _name_nodes(traced: TracedModel) -> None:
    used: dict[str, int] = {}
    for node in traced.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = tuple(qualname for qualname, _ in stack.values())
        if node.op == "call_module":
            base = str(node.target)
            paths = (*paths, base) if not paths or paths[-1] != base else paths
        elif node.op in ("placeholder", "output"):
            base = node.name
            paths = ()
        else:
            op = _FX_SUFFIX.sub("", node.name)
            base = f"{paths[-1]}.{op}" if paths and paths[-1] else op
        count = used.get(base, 0)
        used[base] = count + 1
        traced.names[node] = base if count == 0 else f"{base}_{count}"
        traced.scopes[node] = tuple(dict.fromkeys(p for p in paths if p))


# --------------------------------------------------------------------------
# shape propagation


class _MetaState:
    """Meta copies of parameters and buffers, made once per tensor."""

    def __init__(self) -> None:
        self._cache: dict[int, torch.Tensor] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in self._cache:
            self._cache[key] = torch.empty_like(t, device="meta")
        return self._cache[key]

    def module_state(self, m: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: self.tensor(p) for n, p in m.named_parameters()}
        state.update({n: self.tensor(b) for n, b in m.named_buffers()})
        return state


def _fetch_attr(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def propagate_shapes(traced: TracedModel, input_size: tuple[int, ...]) -> None:
    """Fill ``traced.values`` with each node's output for a ``(1, *input_size)`` input.

    The values are ``meta`` tensors when every op has a meta kernel; when one
    does not, the graph is run for real (no autograd) on zeros of that size.
    """
    try:
        _run(traced, input_size, meta=True)
    except Exception as meta_error:
        if model_device(traced.root).type == "meta":
            raise
        try:
            _run(traced, input_size, meta=False)
        except Exception:
            raise meta_error from None
        traced.real_shapes = True


def _run(traced: TracedModel, input_size: tuple[int, ...], *, meta: bool) -> None:
    root = traced.root
    modules = traced.modules
    state = _MetaState()
    dtype = _floating_dtype(root)
    device = torch.device("meta") if meta else model_device(root)
    env: dict[fx.Node, object] = {}
    traced.values = {}
    traced.specs = {}
    first = True

    def load(n: fx.Node) -> object:
        return env[n]

    with eval_mode(root), torch.no_grad():
        for node in traced.graph.nodes:
            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            if node.op == "placeholder":
                if first:
                    value: object = torch.zeros((1, *input_size), dtype=dtype, device=device)
                    first = False
                elif node.args:
                    value = node.args[0]
                else:
                    raise CamkitError(
                        f"the model's forward takes a second required input {node.target!r}; "
                        "receptive_field feeds a single image tensor. Wrap the model so that "
                        "forward(x) takes the image only."
                    )
            elif node.op == "get_attr":
                value = _fetch_attr(root, str(node.target))
                if meta and isinstance(value, torch.Tensor):
                    value = state.tensor(value)
            elif node.op in ("call_function", "call_method", "call_module"):
                value = _call(node, modules, args, kwargs, state, traced, meta)
            else:  # output
                value = args[0] if args else None
            env[node] = value
            traced.values[node] = value if meta else _as_meta(value)


def _call(node: fx.Node, modules: dict[str, nn.Module], args: tuple, kwargs: dict,
          state: _MetaState, traced: TracedModel, meta: bool) -> object:
    mod = modules.get(str(node.target)) if node.op == "call_module" else None
    if meta:
        try:
            spec = _rf_ops.classify(node, mod, args, kwargs)
        except Exception:  # malformed arguments: let the op itself complain below
            spec = None
        if spec is not None:
            traced.specs[node] = spec
            shape = _rf_ops.fast_shape(spec, node, mod, args, kwargs)
            if shape is not None:
                first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
                return torch.empty(shape, dtype=first.dtype, device="meta")
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, str(node.target))(*rest, **kwargs)
    if meta:
        return torch.func.functional_call(mod, state.module_state(mod), args, kwargs)
    return mod(*args, **kwargs)


def _as_meta(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_as_meta(v) for v in value) if type(value) in (tuple, list) else value
    return value
