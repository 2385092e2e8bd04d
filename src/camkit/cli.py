"""The ``camkit`` command line.

::

    camkit layers MODEL [--input-size C H W]        # the candidate target layers
    camkit rf MODEL --input-size 3 224 224          # the receptive field of every layer
    camkit explain IMAGE --model MODEL --out cam.png [--checkpoint PATH] [--target N]
                   [--layer NAME] [--method gradcam|gradcampp]
    camkit explain-dataset --model MODEL (--images DIR | --npz FILE) --out DIR [...]

``explain`` and ``explain-dataset`` share their model options (``--model``, ``--checkpoint``,
``--trust-pickle``, ``--model-arg``, ``--input-size``, ``--method``, ``--layer``, ``--target``,
``--device``), defined once in :func:`camkit._cli_models.add_model_options`.

``MODEL`` is a torchvision model name (built with ``weights=None``; torchvision is imported
only then) or a ``module:callable`` / ``path/to/file.py:callable`` that returns a
:class:`torch.nn.Module`. Errors in what was given end the command with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from camkit._cli_models import (
    MODEL_HELP,
    add_input_size_option,
    add_model_arg_option,
    add_model_options,
    add_normalisation_options,
)
from camkit._version import __version__
from camkit.errors import CamkitError

__all__ = ["build_parser", "main"]

_DATASET_MODULE = "camkit._cli_dataset"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``camkit`` command, with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="camkit",
        description="Grad-CAM / Grad-CAM++ maps and receptive fields for PyTorch CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"camkit {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full Python traceback on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    layers = sub.add_parser(
        "layers",
        help="list the layers a CAM can target",
        description="Print the model's layers that a CAM can target (camkit.list_layers).",
    )
    layers.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_input_size_option(
        layers, None, "input size for a dry run that adds each layer's output shape"
    )
    add_model_arg_option(layers)
    layers.set_defaults(func=_run_layers)

    rf = sub.add_parser(
        "rf",
        help="print the receptive field of every layer",
        description="Print each layer's receptive field: size, stride and padding per axis "
        "(camkit.receptive_field).",
    )
    rf.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_input_size_option(
        rf, (3, 224, 224), "input size to trace the model with (default 3 224 224)"
    )
    add_model_arg_option(rf)
    rf.set_defaults(func=_run_rf)

    explain = sub.add_parser(
        "explain",
        help="write a Grad-CAM overlay for one image",
        description="Explain one image's class with Grad-CAM or Grad-CAM++ and write the "
        "heat map blended over the image.",
    )
    explain.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...)")
    explain.add_argument("--out", required=True, help="output image file, e.g. cam.png")
    add_model_options(
        explain,
        input_size=(3, 224, 224),
        input_size_help="size the image is resized to before the model sees it; C is 1 "
        "(grayscale) or 3 (RGB) (default 3 224 224)",
        target_type=int,
        target_help="class index to explain (default: the top class)",
    )
    add_normalisation_options(explain)
    explain.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the heat map in the blend "
        "(default 0.5)"
    )
    explain.add_argument("--colormap", default="jet", help="OpenCV colormap (default jet)")
    explain.set_defaults(func=_run_explain)

    _register_dataset_command(sub)
    return parser


def _register_dataset_command(sub: argparse._SubParsersAction) -> None:
    """Add ``explain-dataset`` when its module is part of this installation."""
    if importlib.util.find_spec(_DATASET_MODULE) is None:
        return
    try:
        module: ModuleType = importlib.import_module(_DATASET_MODULE)
    except ImportError as err:
        reason = str(err)
        broken = sub.add_parser(
            "explain-dataset", help="(unavailable: run it to see why)"
        )
        broken.set_defaults(func=lambda _args: _unavailable(reason))
        return
    module.add_parser(sub)
    # The module's own subparser may set ``func``; otherwise dispatch to ``run``.
    chosen = sub.choices.get("explain-dataset")
    if chosen is not None and chosen.get_default("func") is None:
        chosen.set_defaults(func=module.run)


def _unavailable(reason: str) -> int:
    raise CamkitError(f"explain-dataset is unavailable in this installation: {reason}")


def _run_layers(args: argparse.Namespace) -> int:
    from camkit._cli_models import build_model, parse_model_args
    from camkit.layers import list_layers

    model = build_model(args.model, parse_model_args(args.model_arg))
    size = tuple(args.input_size) if args.input_size is not None else None
    table = _on_model(lambda: list_layers(model, input_size=size), size)
    sys.stdout.write(f"{table}\n")
    return 0


def _run_rf(args: argparse.Namespace) -> int:
    from camkit._cli_models import build_model, parse_model_args
    from camkit.receptive_field import receptive_field

    model = build_model(args.model, parse_model_args(args.model_arg))
    size = tuple(args.input_size)
    table = _on_model(lambda: receptive_field(model, input_size=size), size)
    sys.stdout.write(f"{table}\n")
    return 0


def _run_explain(args: argparse.Namespace) -> int:
    from camkit._cli_explain import explain

    return explain(args)


def _on_model(call: Callable[[], object], size: tuple[int, ...] | None) -> object:
    """Run ``call``, turning a failure of the model's own forward into a one-line error."""
    try:
        return call()
    except NotImplementedError:
        raise
    except CamkitError as err:
        # A failed dry run: the library's message gives Python advice; say it in flags.
        if not isinstance(err.__cause__, RuntimeError):
            raise
        raise _model_failure(err.__cause__, size) from err.__cause__
    except RuntimeError as err:
        raise _model_failure(err, size) from err


def _model_failure(err: RuntimeError, size: tuple[int, ...] | None) -> CamkitError:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    shape = f" on a (1, {', '.join(map(str, size))}) input" if size else ""
    return CamkitError(f"the model failed{shape}: {first}. Check --input-size (and --model-arg).")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``camkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CamkitError as err:
        if args.traceback:
            raise
        sys.stderr.write(f"camkit {args.command}: error: {err}\n")
        return 2
    return 0 if status is None else int(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
