"""Finding the layer Grad-CAM explains: by name, by module, by adapter, or by a dry run.

Resolution order (see ``docs/layers.md``):

1. an explicit ``target_layer``: a dotted name from ``model.named_modules()``, the module
   object itself, or a list of either;
2. else the first adapter (:mod:`camkit.adapters`) that recognises the architecture,
   checked by one dry forward when the real input is known (its layer must still give a
   map with height and width > 1 there, else the heuristic decides);
3. else the heuristic over one dry forward: the last module whose output is a 4-D map with
   height and width > 1, taking the outermost module that returns that same tensor
   (``layer4`` over ``layer4.1`` over ``layer4.1.relu``).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from camkit._layers_heuristic import LIST_HINT, Pick, is_map, no_map_error, pick_from_trace
from camkit._layers_table import LayerInfo, LayerTable, shape_text
from camkit._trace import Trace, trace_forward
from camkit.adapters import Adapter, find_adapter
from camkit.adapters._base import first_conv_channels, timm_input_size
from camkit.errors import CamkitError

__all__ = [
    "LayerInfo",
    "LayerTable",
    "as_input_size",
    "enclosing_block_name",
    "integer_images_fault",
    "list_layers",
    "resolve_target_layers",
    "unwrap_model",
    "without_wrapper_prefixes",
]

_log = logging.getLogger(__name__)

LayerSpec = str | nn.Module


# --------------------------------------------------------------------------- the model itself


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel and DDP; torch.compile


def unwrap_model(model: Any) -> nn.Module:
    """The eager module camkit works on: refuse TorchScript, look through wrappers.

    ``torch.compile``'s ``OptimizedModule``, ``nn.DataParallel`` and
    ``DistributedDataParallel`` only forward to the model they hold; hooks, names and the
    single-device forward that explaining needs all live on that model.
    """
    if not isinstance(model, nn.Module):
        raise CamkitError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. If you have a class, "
            "pass an instance (MyNet(), not MyNet)."
        )
    while True:
        if isinstance(model, torch.jit.ScriptModule):  # also when a wrapper holds one
            raise CamkitError(
                f"model is a TorchScript module ({type(model).__name__}); camkit needs "
                "forward hooks, which TorchScript does not run. Pass the eager nn.Module you "
                "scripted or traced (torch.compile'd models are fine)."
            )
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def without_wrapper_prefixes(model: nn.Module, name: str) -> str:
    """``name`` less the prefixes a wrapper adds (``module.``, ``_orig_mod.``), as long as
    ``model`` (already unwrapped) has no child of that name itself."""
    children = {child for child, _ in model.named_children()}
    while name.startswith(WRAPPER_PREFIXES) and name.split(".", 1)[0] not in children:
        name = name.split(".", 1)[1]
    return name


def _require_parameters(model: nn.Module) -> None:
    if next(model.parameters(), None) is None:
        raise CamkitError(
            f"model ({type(model).__name__}) has no parameters, so there is no learned layer "
            "to explain. If the network is kept in a plain list, dict or attribute that "
            "nn.Module does not register, wrap it in nn.ModuleList / nn.ModuleDict or assign "
            "it as a submodule; camkit finds layers through model.named_modules()."
        )


def _refuse_lazy_guess(model: nn.Module) -> None:
    """Refuse a dry run at a guessed size while lazy modules still wait for their shapes.

    The first forward fixes a lazy module's parameter shapes for good, so a dry run on a
    guessed input (say 3 channels for a grayscale model) would break the model.
    """
    lazy = next(
        (name for name, module in model.named_modules() if _has_lazy_parameters(module)), None
    )
    if lazy is not None:
        where = f"{lazy!r}" if lazy else "the model itself"
        raise CamkitError(
            f"{type(model).__name__} has uninitialised lazy parameters ({where}); a dry run "
            "on a guessed input size would fix their shapes to that size for good. Call the "
            "CAM with a real batch, run the model once yourself, or give the size to "
            "camkit.list_layers(model, input_size=(C, H, W))."
        )


def _has_lazy_parameters(module: nn.Module) -> bool:
    return any(
        torch.nn.parameter.is_lazy(tensor)
        for tensor in itertools.chain(
            module.parameters(recurse=False), module.buffers(recurse=False)
        )
    )


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------- the dry run


@dataclasses.dataclass(frozen=True)
class _DryInput:
    tensor: torch.Tensor
    description: str  # what was tried, in words, for error messages
    from_user: bool


def _default_size(model: nn.Module, adapter: Adapter | None) -> tuple[int, int, int]:
    """The adapter's size, else the one a timm model records, else 224 x 224."""
    if adapter is not None:
        channels, height, width = adapter.input_size(model)
        return (channels, height, width)
    if hasattr(model, "pretrained_cfg"):
        return timm_input_size(model)
    return (first_conv_channels(model), 224, 224)


def as_input_size(model: nn.Module, input_size: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``(C, H, W)``, ``(H, W)`` or an int (square); C from the stem."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    if isinstance(input_size, torch.Size):
        input_size = tuple(input_size)
    if (
        isinstance(input_size, (tuple, list))
        and len(input_size) in (2, 3)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        if len(input_size) == 2:
            return (first_conv_channels(model), input_size[0], input_size[1])
        return (input_size[0], input_size[1], input_size[2])
    raise CamkitError(
        f"input_size must be (C, H, W), (H, W) or an int, got {input_size!r}; e.g. "
        "input_size=(3, 224, 224) (no batch dimension)."
    )


INTEGER_IMAGES_FIX = (
    "camkit passes integer images through unchanged (a model may convert them itself); "
    "convert them as the model expects, e.g. images.float() / 255 followed by the training "
    "normalisation."
)


_DTYPE_WORDS = re.compile(r"dtype|scalar type|type \(|\b(Byte|Char|Short|Int|Long|Bool)\b|"
                          r"not implemented for|unsigned char|can't be cast")


def integer_images_fault(images: torch.Tensor, error: BaseException) -> bool:
    """Whether ``error`` reads like a model refusing the integer dtype of ``images``."""
    if images.is_floating_point() or images.is_complex():
        return False
    if isinstance(error, torch.cuda.OutOfMemoryError) or not isinstance(error, RuntimeError):
        return False
    return _DTYPE_WORDS.search(str(error)) is not None


def _input_from_example(model: nn.Module, example_input: Any) -> _DryInput:
    """The first image of the user's batch, on the model's device and dtype."""
    if not isinstance(example_input, torch.Tensor) or example_input.ndim == 0:
        got = type(example_input).__name__
        if isinstance(example_input, torch.Tensor):
            got = "a 0-dimensional tensor"
        raise CamkitError(f"the input must be a batched tensor (N, C, H, W), got {got}.")
    device, dtype = _device_dtype(model)
    with torch.inference_mode(False):
        x = example_input[:1].clone()  # one image shows every shape; clone: no inference tensor
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)
    shape = tuple(example_input.shape)
    return _DryInput(x, f"the first image of your input (batch shape {shape})", True)


def _input_of_size(model: nn.Module, size: tuple[int, int, int]) -> _DryInput:
    """One random image of ``size``; a private generator leaves the global RNG untouched."""
    device, dtype = _device_dtype(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, *size), generator=generator).to(device=device, dtype=dtype)
    return _DryInput(x, f"a random input of shape {tuple(x.shape)}", False)


def _dry_input(model: nn.Module, example_input: Any, adapter: Adapter | None) -> _DryInput:
    if example_input is not None:
        return _input_from_example(model, example_input)
    _refuse_lazy_guess(model)
    return _input_of_size(model, _default_size(model, adapter))


def _run(model: nn.Module, dry: _DryInput) -> Trace:
    try:
        return trace_forward(model, dry.tensor)
    except Exception as exc:
        if dry.from_user and integer_images_fault(dry.tensor, exc):
            fix = INTEGER_IMAGES_FIX
        elif dry.from_user:
            fix = (
                "Check that the input is what the model expects, or pass "
                "target_layer=... to skip the dry run."
            )
        else:
            fix = (
                "If the model expects another input size, call the CAM with a real batch "
                "(camkit then uses its shape), pass target_layer=... to skip the dry run, or "
                "give the size to camkit.list_layers(model, input_size=(C, H, W))."
            )
        raise CamkitError(
            f"camkit runs the model once to find its layers; that forward failed on "
            f"{dry.description}: {type(exc).__name__}: {exc}. {fix}"
        ) from exc


# --------------------------------------------------------------------------- explicit layers


def _from_python_syntax(model: nn.Module, name: str) -> str | None:
    """Turn ``model.features[-1]`` style spellings into the dotted name, if it exists."""
    text = name.strip()
    for prefix in ("model.", "self."):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    parts: list[str] = []
    for piece in re.findall(r"[^.\[\]]+|\[-?\d+\]", text):
        if piece.startswith("["):
            index = int(piece[1:-1])
            try:
                container = model.get_submodule(".".join(parts))
            except AttributeError:
                return None
            if index < 0:
                index += len(container._modules)
            keys = list(container._modules)
            if not 0 <= index < len(keys):
                return None
            parts.append(keys[index])
        else:
            parts.append(piece)
    candidate = ".".join(parts)
    if not candidate or candidate == name:
        return None
    try:
        model.get_submodule(candidate)
    except AttributeError:
        return None
    return candidate


def _unknown_name(model: nn.Module, name: str, given: str | None = None) -> CamkitError:
    """The error for ``name`` (``given`` by the user as written, wrapper prefix and all)."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    spelled = _from_python_syntax(model, name)
    if spelled is not None:
        suggestion = f"Did you mean {spelled!r}? camkit uses the dotted names of named_modules()."
    else:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        suggestion = (
            "Closest names: " + ", ".join(map(repr, close)) + "."
            if close
            else "No name is close to it."
        )
    shown = repr(name) if given in (None, name) else f"{given!r} (read as {name!r})"
    return CamkitError(
        f"no layer named {shown} in {type(model).__name__} ({len(names)} named modules). "
        f"{suggestion} Names are the dotted paths of model.named_modules(); {LIST_HINT}."
    )


def _explicit(model: nn.Module, item: Any, names: dict[int, str]) -> tuple[str, nn.Module]:
    if isinstance(item, str):
        name = without_wrapper_prefixes(model, item)
        if not name:
            raise CamkitError(
                "target_layer '' names the whole model; pick a layer inside it "
                f"({LIST_HINT})."
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise _unknown_name(model, name, item) from None
        return name, module
    if isinstance(item, nn.Module):
        if item is model:
            raise CamkitError(
                "target_layer is the model itself; pick a layer inside it "
                f"({LIST_HINT})."
            )
        found = names.get(id(item))
        if found is None:
            raise CamkitError(
                f"target_layer is a {type(item).__name__} that is not a submodule of this "
                f"{type(model).__name__} (a layer taken from another copy of the model, such "
                "as one made by copy.deepcopy?). Pass a module reached from the model itself, "
                "e.g. model.layer4, or its dotted name."
            )
        return found, item
    raise CamkitError(
        "target_layer must be None, a dotted layer name, an nn.Module inside the model, or a "
        f"list of those; got {type(item).__name__}."
    )


# --------------------------------------------------------------------------- public API


def _adapter_pick(model: nn.Module) -> tuple[Adapter | None, str | None]:
    """The matching adapter and its layer name, if the name exists in the model."""
    adapter = find_adapter(model)
    if adapter is None:
        return None, None
    name = adapter.layer(model)
    try:
        model.get_submodule(name)
    except AttributeError:
        _log.debug("adapter %r names missing layer %r; using the heuristic", adapter.family, name)
        return adapter, None
    return adapter, name


def _checked_pick(
    model: nn.Module, trace: Trace, adapter: Adapter | None, adapter_name: str | None
) -> Pick:
    """The adapter's layer if it gave a map with H, W > 1 in ``trace``, else the heuristic's.

    An adapter names its layer without seeing the input; on a small one (a ResNet on 32 px
    images) that layer's map is 1x1, and Grad-CAM on a 1x1 map cannot localise anything.
    """
    if adapter is None or adapter_name is None:
        return pick_from_trace(trace)
    module = model.get_submodule(adapter_name)
    hooked = next((r.name for r in trace.records.values() if r.module is module), None)
    tensors = [c.tensor for c in trace.calls if c.name == hooked]
    if tensors and is_map(tensors[-1]):
        return Pick(adapter_name, f"adapter: {adapter.family}")
    if hooked is None:
        outcome = "does not run"
    else:
        outcome = f"gives {shape_text(trace.records[hooked].output)}"
    fallback = pick_from_trace(trace)
    why = (
        f"heuristic; the {adapter.family} adapter's {adapter_name!r} {outcome} at this "
        "input, no map to localise on"
    )
    _log.info("%s: using the heuristic", why)
    return dataclasses.replace(fallback, why=why) if fallback.name is not None else fallback


def resolve_target_layers(
    model: nn.Module,
    target_layer: LayerSpec | Sequence[LayerSpec] | None,
    example_input: torch.Tensor | None = None,
) -> list[tuple[str, nn.Module]]:
    """Resolve ``target_layer`` into ``[(dotted_name, module), ...]``.

    Parameters
    ----------
    model
        The network (eager; a ``torch.compile``'d, ``DataParallel`` or DDP model is searched
        through the model it wraps, and names are relative to that model; names copied
        from the wrapper, with ``_orig_mod.`` or ``module.`` in front, are accepted too).
    target_layer
        ``None`` (automatic: adapter, else heuristic), a dotted name from
        ``model.named_modules()``, a module inside ``model``, or a sequence of those.
    example_input
        A real batch, used (its first image) for the dry forward: the heuristic's, or the
        check that an adapter's layer still is a map larger than 1x1 at this size. Without
        it, an adapter's layer is taken unchecked, and the heuristic's dry forward uses the
        adapter's or the model's canonical size, else 224 x 224.

    Returns
    -------
    list of (str, nn.Module)
        One pair per requested layer, in the order given.

    Raises
    ------
    CamkitError
        For an unknown name (with the closest names), a module outside the model, a model
        without any 4-D feature map, a model without parameters, a TorchScript model, a
        dry forward that fails, or uninitialised lazy modules without ``example_input``.
    """
    root = unwrap_model(model)
    if target_layer is None:
        return [_auto(root, example_input)]
    if isinstance(target_layer, (str, nn.Module)):
        items: list[Any] = [target_layer]
    elif isinstance(target_layer, Sequence):
        items = list(target_layer)
        if not items:
            raise CamkitError(
                "target_layer is an empty sequence; give at least one layer, or None to let "
                "camkit choose."
            )
    else:
        raise CamkitError(
            "target_layer must be None, a dotted layer name, an nn.Module inside the model, or "
            f"a list of those; got {type(target_layer).__name__}."
        )
    names = {id(module): name for name, module in root.named_modules() if name}
    resolved = [_explicit(root, item, names) for item in items]
    seen: set[int] = set()
    for name, module in resolved:
        if id(module) in seen:
            raise CamkitError(f"target_layer lists the layer {name!r} twice; list it once.")
        seen.add(id(module))
    return resolved


def _auto(model: nn.Module, example_input: torch.Tensor | None) -> tuple[str, nn.Module]:
    _require_parameters(model)
    adapter, name = _adapter_pick(model)
    if name is not None and example_input is not None:
        # The real input is known: check that the adapter's layer still is a map at its size.
        dry = _input_from_example(model, example_input)
        try:
            trace = trace_forward(model, dry.tensor)
        except Exception:  # the real call will say what is wrong; trust the adapter here
            _log.debug("dry run failed; keeping adapter %r's layer", adapter.family)
        else:
            pick = _checked_pick(model, trace, adapter, name)
            if pick.name is None:
                raise no_map_error(model, trace, dry.description, pick)
            _log.info("camkit picked layer %r (%s)", pick.name, pick.why)
            return pick.name, model.get_submodule(pick.name)
    if name is not None:
        _log.info("camkit picked layer %r (adapter: %s)", name, adapter.family)
        return name, model.get_submodule(name)
    return _heuristic_layer(model, example_input, adapter)


def _heuristic_layer(
    model: nn.Module, example_input: torch.Tensor | None, adapter: Adapter | None = None
) -> tuple[str, nn.Module]:
    """The heuristic's layer, from one dry forward (ignores adapters except for the size)."""
    dry = _dry_input(model, example_input, adapter)
    trace = _run(model, dry)
    pick = pick_from_trace(trace)
    if pick.name is None:
        raise no_map_error(model, trace, dry.description, pick)
    _log.info("camkit picked layer %r (%s)", pick.name, pick.why)
    return pick.name, model.get_submodule(pick.name)


def enclosing_block_name(
    model: nn.Module, name: str, example_input: torch.Tensor | None = None
) -> str | None:
    """The nearest ancestor of layer ``name`` that runs exactly once per forward.

    Used to suggest a replacement for a layer that runs several times (a shared ReLU).

    Parameters
    ----------
    model
        The network.
    name
        Dotted name of the layer that ran more than once.
    example_input
        A batch whose first image is used for one dry forward; without it, the model's
        canonical size (as for ``list_layers``).

    Returns
    -------
    str or None
        The ancestor's dotted name, or ``None`` when no proper ancestor (the model itself
        excluded) runs once.
    """
    root = unwrap_model(model)
    trace = _run(root, _dry_input(root, example_input, find_adapter(root)))
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:depth])
        try:
            module = root.get_submodule(ancestor)
        except AttributeError:
            return None
        if trace.calls_of(module) == 1:
            return ancestor
    return None


def list_layers(model: nn.Module, input_size: Any = None) -> LayerTable:
    """The layers a forward pass runs, with output shapes: what to choose a layer from.

    Parameters
    ----------
    model
        The network. It is run once on one random image, in eval mode without grad; its
        mode is restored and no hook is left.
    input_size
        ``(C, H, W)``, ``(H, W)`` or an int (square). ``None``: the adapter's or the model's
        canonical size, else 224 x 224 with the stem's channel count (refused while lazy
        modules have not run: the dry run would fix their shapes).

    Returns
    -------
    LayerTable
        Rows in execution order (order of first call) with dotted name, class, output
        shape, number of calls, and which layer camkit picks; ``print()`` it for a table.
    """
    root = unwrap_model(model)
    adapter, adapter_name = _adapter_pick(root)
    if input_size is None:
        _refuse_lazy_guess(root)
        size = _default_size(root, adapter)
    else:
        size = as_input_size(root, input_size)
    dry = _input_of_size(root, size)
    trace = _run(root, dry)
    pick = _checked_pick(root, trace, adapter, adapter_name)
    picked, reason = pick.name, pick.why
    maps = {c.name for c in trace.calls if is_map(c.tensor)}
    rows = [
        LayerInfo(
            index=i,
            name=record.name,
            type=type(record.module).__name__,
            output=record.output,
            calls=record.calls,
            is_map=record.name in maps,
            picked=record.name == picked,
        )
        for i, record in enumerate(trace.records.values(), start=1)
    ]
    return LayerTable(
        type(root).__name__, tuple(dry.tensor.shape), rows, picked, reason, trace.not_run
    )
