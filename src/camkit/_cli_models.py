"""Building the model that a ``camkit`` command names, and loading a checkpoint into it.

A model is named either by a torchvision model name (``resnet18``), built with
``weights=None`` (nothing is downloaded), or by a ``module:callable`` path
(``mypackage.models:build`` or ``path/to/file.py:build``) whose callable returns an
:class:`torch.nn.Module`. torchvision is imported only for the first form.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from camkit.errors import CamkitError

__all__ = ["build_model", "load_checkpoint", "parse_model_args"]

# Keys under which training scripts commonly nest the weights in a checkpoint dictionary.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes that wrappers add to every parameter name (DataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["num_classes=10", "name=resnet18"]`` into keyword arguments.

    Values are read as Python literals when they parse as one (``10``, ``0.5``, ``True``,
    ``(1, 2)``), and kept as strings otherwise.
    """
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CamkitError(
                f"--model-arg {item!r} is not KEY=VALUE with KEY a Python identifier, "
                "e.g. --model-arg num_classes=10"
            )
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring) in eval mode."""
    kwargs = dict(kwargs or {})
    if ":" in spec:
        model = _from_callable(spec, kwargs)
    else:
        model = _from_torchvision(spec, kwargs)
    return model.eval()


def _from_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision.models as tv_models
    except ImportError as err:
        raise CamkitError(
            f"model {name!r} is read as a torchvision model name, but torchvision cannot be "
            f"imported ({err}). Install it (pip install torchvision) or name the model as "
            "module:callable, e.g. mypackage.models:build_net."
        ) from err
    names = tv_models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CamkitError(
            f"unknown model {name!r}: not one of torchvision's {len(names)} models.{hint} "
            "torchvision.models.list_models() lists them; other models can be named as "
            "module:callable."
        )
    try:
        return tv_models.get_model(name, weights=None, **kwargs)
    except TypeError as err:
        raise CamkitError(
            f"building torchvision model {name!r} with {kwargs} failed: {err}"
        ) from err


def _from_callable(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_part, _, attr_path = spec.rpartition(":")
    if not module_part or not attr_path:
        raise CamkitError(
            f"model {spec!r} is not of the form module:callable (e.g. mypackage.models:build) "
            "or path/to/file.py:callable."
        )
    module = _import(module_part)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as err:
            raise CamkitError(
                f"{module_part!r} has no attribute {attr_path!r} (model {spec!r})."
            ) from err
    if isinstance(target, nn.Module):
        if kwargs:
            raise CamkitError(
                f"{spec!r} is a module instance, not a callable: --model-arg cannot be applied."
            )
        return target
    if not callable(target):
        raise CamkitError(
            f"{spec!r} is a {type(target).__name__}, not a callable returning a torch.nn.Module."
        )
    try:
        model = target(**kwargs)
    except TypeError as err:
        raise CamkitError(f"calling {spec!r} with {kwargs} failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise CamkitError(
            f"{spec!r} returned a {type(model).__name__}; it must return a torch.nn.Module."
        )
    return model


def _import(module_part: str) -> ModuleType:
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise CamkitError(f"model file {module_part!r} does not exist.")
        name = f"_camkit_user_model_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py file always loads
            raise CamkitError(f"cannot load {module_part!r} as a Python file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as err:
        raise CamkitError(
            f"cannot import {module_part!r} ({err}). The module must be installed or lie "
            "under the current directory; a file can be named as path/to/file.py:callable."
        ) from err


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the weights saved at ``path`` into ``model``.

    Accepts ``torch.save(model.state_dict(), path)`` files and dictionaries that hold such a
    state dict under a common key (``state_dict``, ``model_state_dict``, ``model``, ...).
    Prefixes added by ``DataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``)
    are removed. Files are read with ``weights_only=True``: a pickled model object is refused.
    """
    file = Path(path)
    if not file.is_file():
        raise CamkitError(f"checkpoint file {str(path)!r} does not exist.")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        if zipfile.is_zipfile(file):
            why = (
                "it holds objects other than tensors and plain containers (a pickled model?), "
                "which camkit does not unpickle"
            )
        else:
            why = "it is not a file written by torch.save"
        raise CamkitError(
            f"cannot read checkpoint {str(path)!r}: {why}. Save the weights with "
            "torch.save(model.state_dict(), path)."
        ) from err
    state = _find_state_dict(loaded, path)
    expected = model.state_dict()
    state = _strip_wrapper_prefix(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing entries (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected entries (e.g. {', '.join(unexpected[:3])})"
            )
        if mismatched:
            shapes = "; ".join(mismatched[:3])
            parts.append(f"{len(mismatched)} entries of another shape ({shapes})")
        raise CamkitError(
            f"checkpoint {str(path)!r} does not fit the model: {'; '.join(parts)}. "
            "Build the model with the arguments it was trained with (--model-arg KEY=VALUE, "
            "e.g. num_classes=10)."
        )
    model.load_state_dict(state)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(loaded: Any, path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(loaded):
        return loaded
    if isinstance(loaded, Mapping):
        for key in _STATE_KEYS:
            if _is_state_dict(loaded.get(key)):
                return loaded[key]
        keys = ", ".join(repr(k) for k in list(loaded)[:8])
        raise CamkitError(
            f"checkpoint {str(path)!r} is a dictionary without a state dict (keys: {keys}); "
            f"expected parameter names mapped to tensors, or one under {', '.join(_STATE_KEYS)}."
        )
    raise CamkitError(
        f"checkpoint {str(path)!r} holds a {type(loaded).__name__}; expected a state dict "
        "saved with torch.save(model.state_dict(), path)."
    )


def _strip_wrapper_prefix(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in expected
        ):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
