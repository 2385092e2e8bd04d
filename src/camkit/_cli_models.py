"""The model options that ``camkit`` commands share; building the model and loading its weights.

:func:`add_model_options` defines the flags of every command that explains with a model
(``explain``, ``explain-dataset``); :func:`model_from_args` and :func:`cam_from_args` turn
them into a model and a CAM.

A model is named either by a torchvision model name (``resnet18``), built with
``weights=None`` (nothing is downloaded), or by a ``module:callable`` path
(``mypackage.models:build`` or ``path/to/file.py:build``) whose callable returns an
:class:`torch.nn.Module`. torchvision is imported only for the first form.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import os
import pickle
import sys
import traceback
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from camkit.cam import GradCAM, GradCAMPlusPlus
from camkit.errors import CamkitError
from camkit.layers import WRAPPER_PREFIXES

__all__ = [
    "METHODS",
    "MODEL_HELP",
    "add_input_size_option",
    "add_model_arg_option",
    "add_model_options",
    "add_normalisation_options",
    "build_model",
    "cam_from_args",
    "load_checkpoint",
    "model_from_args",
    "normalisation",
    "note_if_untrained",
    "parse_model_args",
    "positive_int",
    "resolve_device",
]

METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_HELP = (
    "a torchvision model name (e.g. resnet18, built without pretrained weights) or "
    "module:callable / path/to/file.py:callable returning a torch.nn.Module"
)

# Keys under which training scripts commonly nest the weights in a checkpoint dictionary.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")

# --------------------------------------------------------------------------- options
def positive_int(text: str) -> int:
    """``argparse`` type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def add_model_arg_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the repeatable ``--model-arg KEY=VALUE``."""
    parser.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="keyword argument for building the model (repeatable), e.g. num_classes=10; "
        "values are read as Python literals when possible",
    )


def add_input_size_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    default: tuple[int, int, int] | None,
    help_text: str,
) -> None:
    """Add ``--input-size C H W`` (positive integers)."""
    parser.add_argument(
        "--input-size",
        nargs=3,
        type=positive_int,
        metavar=("C", "H", "W"),
        default=default,
        help=help_text,
    )


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    input_size: tuple[int, int, int] | None,
    input_size_help: str,
    target_type: Any,
    target_help: str,
    device_help: str = "torch device (default cpu)",
) -> None:
    """Add the flags of a command that explains with a model, in a "model" group.

    ``--model``, ``--checkpoint``, ``--trust-pickle``, ``--model-arg``, ``--input-size``,
    ``--method``, ``--layer``, ``--target`` and ``--device``. Only the defaults and help of
    ``--input-size``, ``--target`` and ``--device`` differ between commands.
    """
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help=MODEL_HELP)
    group.add_argument(
        "--checkpoint", help="weights to load: a state dict saved with "
        "torch.save(model.state_dict(), path), possibly nested under 'state_dict', 'model', ..."
    )
    group.add_argument(
        "--trust-pickle", action="store_true", help="let --checkpoint hold pickled Python "
        "objects (e.g. a whole model saved with torch.save(model)); unpickling runs code "
        "from the file, so use it only for files you trust"
    )
    add_model_arg_option(group)
    add_input_size_option(group, input_size, input_size_help)
    group.add_argument("--method", choices=tuple(METHODS), default="gradcam",
                       help="gradcam (default) or gradcampp (Grad-CAM++)")
    group.add_argument(
        "--layer", help="dotted name of the target layer (default: chosen automatically; "
        "see camkit layers)"
    )
    group.add_argument("--target", type=target_type, help=target_help)
    group.add_argument("--device", default="cpu", help=device_help)


def add_normalisation_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--mean`` and ``--std``, applied after pixels are scaled to ``[0, 1]``."""
    parser.add_argument(
        "--mean", type=float, nargs="+", help="per-channel mean subtracted after scaling "
        "pixels to [0, 1] (default: ImageNet's for RGB, 0 for grayscale)"
    )
    parser.add_argument(
        "--std", type=float, nargs="+", help="per-channel divisor (default: ImageNet's for "
        "RGB, 1 for grayscale; 1 when only --mean is given)"
    )


def normalisation(
    channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Sequence[float], Sequence[float]]:
    """The ``(mean, std)`` that ``--mean`` / ``--std`` (or their defaults) give ``channels``."""
    if mean is None and std is None:
        return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,), (1.0,))
    return (mean if mean is not None else (0.0,)), (std if std is not None else (1.0,))


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device; under torchrun a bare ``cuda`` is ``cuda:$LOCAL_RANK``."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CamkitError(f"--device {name!r} is not a torch device (e.g. cpu, cuda:0).") from err
    if device.type == "meta":
        raise CamkitError(
            "--device meta holds no values, so nothing can be explained on it; use cpu or cuda."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CamkitError(f"--device {name!r}: this PyTorch build sees no CUDA device.")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """Build ``--model`` with ``--model-arg``, load ``--checkpoint``, move it to ``--device``."""
    model = build_model(args.model, parse_model_args(args.model_arg))
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint, trust_pickle=args.trust_pickle)
    return model.to(resolve_device(args.device))


def note_if_untrained(args: argparse.Namespace) -> None:
    """After a successful run without ``--checkpoint``, say that the weights were not loaded."""
    if args.checkpoint is None:
        sys.stderr.write(
            f"camkit: note: no --checkpoint, so {args.model} kept the weights it was built "
            "with (random for a torchvision name) and its maps show nothing learned; pass "
            "--checkpoint PATH to explain a trained model.\n"
        )


def cam_from_args(args: argparse.Namespace, model: nn.Module) -> GradCAM:
    """The ``--method`` CAM on ``model`` at ``--layer``."""
    return METHODS[args.method](model, target_layer=args.layer)


# --------------------------------------------------------------------------- building
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
            "module:callable, e.g. mypackage.models:build_net or path/to/file.py:build_net."
        ) from err
    names = tv_models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CamkitError(
            f"unknown model {name!r}: not one of torchvision's {len(names)} models.{hint} "
            "torchvision.models.list_models() lists them; other models can be named as "
            "module:callable or path/to/file.py:callable."
        )
    try:
        return tv_models.get_model(name, weights=None, **kwargs)
    except Exception as err:  # a bad --model-arg: TypeError, or a value the model refuses
        raise CamkitError(
            f"building torchvision model {name!r} with {kwargs} failed: "
            f"{type(err).__name__}: {_first_line(err)}"
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
    except Exception as err:
        raise _user_code_error(f"calling {spec!r} with {kwargs}", err) from err
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
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise _user_code_error(f"importing {module_part!r}", err) from err
        return module
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as err:
        if err.name is not None and module_part.split(".")[0] != err.name.split(".")[0]:
            raise _user_code_error(f"importing {module_part!r}", err) from err
        raise CamkitError(
            f"cannot import {module_part!r} ({err}). The module must be installed or lie "
            "under the current directory; a file can be named as path/to/file.py:callable."
        ) from err
    except Exception as err:
        raise _user_code_error(f"importing {module_part!r}", err) from err


def _user_code_error(what: str, err: BaseException) -> CamkitError:
    """One line for an exception raised by the user's model code, with where it was raised."""
    where = ""
    if isinstance(err, SyntaxError) and err.filename:
        where = f" ({err.filename}, line {err.lineno})"
    elif err.__traceback__ is not None:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f" ({frame.filename}, line {frame.lineno})"
    return CamkitError(
        f"{what} raised {type(err).__name__}: {_first_line(err)}{where}. Fix the model code, "
        "or run it in Python to see the whole traceback."
    )


# --------------------------------------------------------------------------- loading
def load_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> None:
    """Load the weights saved at ``path`` into ``model``.

    Accepts ``torch.save(model.state_dict(), path)`` files and dictionaries that hold such a
    state dict under a common key (``state_dict``, ``model_state_dict``, ``model``, ...).
    Prefixes added by ``DataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``)
    are removed. Files are read with ``weights_only=True``; a file holding other pickled
    objects (a whole model saved with ``torch.save(model)``, an optimizer's settings) is
    refused unless ``trust_pickle`` is true. A trusted whole model gives its state dict:
    its weights are loaded into ``model``, which must have the same architecture.
    """
    file = Path(path)
    if file.is_dir():
        raise CamkitError(f"checkpoint {str(path)!r} is a folder; pass the weights file.")
    if not file.is_file():
        raise CamkitError(f"checkpoint file {str(path)!r} does not exist.")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling garbage fails in many ways (KeyError, ValueError...)
        if trust_pickle:
            loaded = _load_trusted(file, path)
        elif zipfile.is_zipfile(file):
            raise CamkitError(
                f"checkpoint {str(path)!r} holds pickled Python objects besides tensors (a "
                "whole pickled model, saved with torch.save(model)?), which camkit does not "
                "unpickle unless asked: unpickling can run code from the file. If you trust "
                "it, add --trust-pickle; better, save the weights with "
                "torch.save(model.state_dict(), path)."
            ) from err
        else:
            raise CamkitError(
                f"cannot read checkpoint {str(path)!r}: it is not a file written by "
                "torch.save. Save the weights with torch.save(model.state_dict(), path)."
            ) from err
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
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


def _load_trusted(file: Path, path: str | os.PathLike[str]) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError) as err:
        raise CamkitError(
            f"cannot read checkpoint {str(path)!r}: it is not a file written by torch.save."
        ) from err
    except (ImportError, AttributeError) as err:
        raise CamkitError(
            f"cannot unpickle checkpoint {str(path)!r}: {err}. The classes it was saved with "
            "must be importable under the same module names."
        ) from err
    except Exception as err:
        raise CamkitError(
            f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
            if isinstance(loaded.get(key), nn.Module):  # a trusted {"model": model, ...}
                return loaded[key].state_dict()
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
    for prefix in WRAPPER_PREFIXES:  # added to every parameter name
        if all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in expected
        ):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
