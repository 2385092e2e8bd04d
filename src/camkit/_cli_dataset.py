"""``camkit explain-dataset``: explain an image folder or an ``.npz`` of images from the shell.

    camkit explain-dataset --model torchvision.models:resnet18 --weights r18.pt \\
        --images val/ --size 224 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 \\
        --out cams/

Under ``torchrun --nproc-per-node N -m camkit.cli explain-dataset ...`` the work is split
over the processes (see ``camkit.explain_dataset``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from camkit.errors import CamkitError

__all__ = ["add_parser", "run"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


# --------------------------------------------------------------------------- datasets
class _Preprocess:
    """uint8 or float ``(C, H, W)`` -> float32, resized, scaled to ``[0, 1]``, normalised."""

    def __init__(self, size: tuple[int, int] | None, mean: list[float] | None,
                 std: list[float] | None) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        x = torch.from_numpy(np.ascontiguousarray(image)).float() / scale
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        if self.mean is not None or self.std is not None:
            channels = x.shape[0]
            mean = torch.tensor(_per_channel(self.mean, channels, 0.0, "--mean"))
            std = torch.tensor(_per_channel(self.std, channels, 1.0, "--std"))
            x = (x - mean[:, None, None]) / std[:, None, None]
        return x


def _per_channel(values: list[float] | None, channels: int, default: float,
                 flag: str) -> list[float]:
    if values is None:
        return [default] * channels
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise CamkitError(f"{flag} has {len(values)} values for {channels}-channel images; "
                          f"give 1 or {channels}.")
    return values


class _ArrayImages(Dataset):
    """Images and labels held in arrays (e.g. an ``.npz`` file)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None,
                 preprocess: _Preprocess, classes: list[str] | None) -> None:
        self.images, self.labels, self.preprocess = images, labels, preprocess
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = self.preprocess(self.images[index])
        if self.labels is None:
            return image
        return image, int(self.labels[index])


class _FolderImages(Dataset):
    """Image files: one subfolder per class (labels in sorted order), or files directly."""

    def __init__(self, root: Path, channels: int, preprocess: _Preprocess) -> None:
        subfolders = sorted(p for p in root.iterdir() if p.is_dir())
        if subfolders:
            self.classes = [p.name for p in subfolders]
            self.files = [(f, label) for label, folder in enumerate(subfolders)
                          for f in _images_in(folder)]
        else:
            self.files = [(f, -1) for f in _images_in(root)]
        if not self.files:
            raise CamkitError(
                f"--images {root} holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}), "
                "neither directly nor in class subfolders."
            )
        self.labelled = bool(subfolders)
        self.channels, self.preprocess = channels, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        import cv2

        path, label = self.files[index]
        flag = cv2.IMREAD_GRAYSCALE if self.channels == 1 else cv2.IMREAD_COLOR
        pixels = cv2.imread(str(path), flag)
        if pixels is None:
            raise CamkitError(f"{path} cannot be read as an image.")
        if self.channels == 1:
            pixels = pixels[None]
        else:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
        image = self.preprocess(pixels)
        return (image, label) if self.labelled else image


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _channels_first(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise CamkitError(f"{source} has shape {images.shape}; expected (N, H, W), (N, C, H, W) or "
                      "(N, H, W, C) with 1 or 3 channels.")


def _npz_dataset(args: argparse.Namespace, preprocess: _Preprocess) -> _ArrayImages:
    path = Path(args.npz)
    if not path.is_file():
        raise CamkitError(f"--npz {path} is not a file.")
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.files)
        if args.images_key not in keys:
            raise CamkitError(f"{path} has no array {args.images_key!r} (--images-key); it holds "
                              f"{', '.join(keys)}.")
        images = _channels_first(data[args.images_key], f"{path}[{args.images_key!r}]")
        labels = None
        if args.labels_key in keys:
            labels = np.asarray(data[args.labels_key]).astype(np.int64)
            if labels.shape != (len(images),):
                raise CamkitError(f"{path}[{args.labels_key!r}] has shape {labels.shape}; "
                                  f"expected ({len(images)},), one label per image.")
        classes = [str(c) for c in data["classes"]] if "classes" in keys else None
    return _ArrayImages(images, labels, preprocess, classes)


# --------------------------------------------------------------------------- the model
def _load_model(spec: str, kwargs: dict[str, Any], weights: str | None) -> nn.Module:
    where, _, name = spec.rpartition(":")
    if Path(spec).is_file():
        model = torch.load(spec, map_location="cpu", weights_only=False)
    elif where and name:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if module_spec is None or module_spec.loader is None or not Path(where).is_file():
                raise CamkitError(f"--model {spec}: {where} is not a Python file.")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(where)
            except ImportError as err:
                raise CamkitError(f"--model {spec}: cannot import {where} ({err}).") from err
        if not hasattr(module, name):
            raise CamkitError(f"--model {spec}: {where} has no attribute {name!r}.")
        found = getattr(module, name)
        model = found if isinstance(found, nn.Module) else found(**kwargs)
    else:
        raise CamkitError(
            f"--model {spec!r} is neither a file saved with torch.save(model) nor "
            "'package.module:name' / 'path/file.py:name' naming a module or a function "
            "returning one."
        )
    if not isinstance(model, nn.Module):
        raise CamkitError(f"--model {spec} gave a {type(model).__name__}, not a torch.nn.Module.")
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        model.load_state_dict(state)
    return model


def _device(text: str) -> torch.device:
    device = torch.device(text)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# --------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explain-dataset`` on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "explain-dataset",
        help="explain every image of a folder or .npz file (resumable, torchrun-aware)",
        description=(
            "Run Grad-CAM over a whole image set and write shards, an index, per-class "
            "aggregates and a report to --out. Rerunning with the same arguments resumes."
        ),
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help=(
        "'package.module:name' or 'path/file.py:name' (an nn.Module or a function returning "
        "one), or a file saved with torch.save(model) (unpickled: trusted files only)"))
    model.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for a "
                       "model function, e.g. '{\"num_classes\": 10}'")
    model.add_argument("--weights", help="state dict to load (torch.load, weights only)")
    model.add_argument("--layer", help="target layer, dotted name (default: automatic)")
    model.add_argument("--method", choices=("gradcam", "gradcam++"), default="gradcam")
    model.add_argument("--device", default="cpu",
                       help="cpu, cuda or cuda:N (cuda means cuda:$LOCAL_RANK under torchrun)")
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder: one subfolder per class, or files")
    source.add_argument("--npz", help=".npz file with an images array and optional labels")
    data.add_argument("--images-key", default="images", help="array of images in --npz")
    data.add_argument("--labels-key", default="labels", help="array of labels in --npz")
    data.add_argument("--channels", type=int, choices=(1, 3), default=3,
                      help="read folder images as grayscale (1) or RGB (3)")
    data.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize to H W")
    data.add_argument("--mean", type=float, nargs="+", help="per-channel mean after /255")
    data.add_argument("--std", type=float, nargs="+", help="per-channel std after /255")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", required=True, help="output folder")
    run_group.add_argument("--batch-size", type=int, default=32)
    run_group.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    run_group.add_argument("--targets", default="pred", help="pred, label, or a class index")
    run_group.add_argument("--keep", choices=("maps", "raw", "stats"), default="maps")
    run_group.add_argument("--shard-size", type=int)
    run_group.add_argument("--map-dtype", choices=("float16", "float32"), default="float16")
    run_group.add_argument("--aggregate-size", type=int, default=32)
    run_group.add_argument("--no-report", action="store_true", help="skip report.md")
    run_group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                           help="progress bar (default: when stderr is a terminal)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``explain-dataset``; returns the exit status (2 for bad input)."""
    from camkit.cam import GradCAM, GradCAMPlusPlus
    from camkit.dataset import explain_dataset

    try:
        kwargs = json.loads(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise CamkitError(f"--model-kwargs {args.model_kwargs!r} is not a JSON object.")
        device = _device(args.device)
        model = _load_model(args.model, kwargs, args.weights).to(device)
        method = GradCAMPlusPlus if args.method == "gradcam++" else GradCAM
        cam = method(model, target_layer=args.layer)
        preprocess = _Preprocess(tuple(args.size) if args.size else None, args.mean, args.std)
        if args.images:
            root = Path(args.images)
            if not root.is_dir():
                raise CamkitError(f"--images {root} is not a folder.")
            dataset: Dataset = _FolderImages(root, args.channels, preprocess)
        else:
            dataset = _npz_dataset(args, preprocess)
        targets: Any = args.targets
        if targets not in ("pred", "label"):
            if not targets.isdigit():
                raise CamkitError(f"--targets {targets!r}; expected pred, label or a class "
                                  "index.")
            targets = int(targets)
        result = explain_dataset(
            cam, dataset, args.out, batch_size=args.batch_size, num_workers=args.workers,
            targets=targets, keep=args.keep, shard_size=args.shard_size,
            map_dtype=args.map_dtype, aggregate_size=args.aggregate_size,
            report=not args.no_report, progress=args.progress,
        )
    except (CamkitError, json.JSONDecodeError, OSError) as err:
        sys.stderr.write(f"camkit explain-dataset: error: {err}\n")
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        overall = result.aggregates["overall"]
        accuracy = "" if overall["accuracy"] is None else \
            f", accuracy {overall['accuracy']:.3f} on {overall['labelled']} labelled"
        sys.stdout.write(f"explained {len(result)} images at layer {result.layer}{accuracy}; "
                         f"results in {result.out}\n")
    return 0
