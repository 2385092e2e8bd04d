"""``camkit explain-dataset``: explain an image folder or an ``.npz`` of images from the shell.

    camkit explain-dataset --model resnet18 --checkpoint r18.pt --images val/ \\
        --input-size 3 224 224 --out cams/

The model options (``--model``, ``--checkpoint``, ``--model-arg``, ``--input-size``,
``--method``, ``--layer``, ``--target``, ...) and ``--mean`` / ``--std`` are those of
``camkit explain``, defined once in :mod:`camkit._cli_models`.

Under ``torchrun --nproc-per-node N -m camkit.cli explain-dataset ...`` the work is split
over the processes (see ``camkit.explain_dataset``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from camkit._cli_models import (
    add_model_options,
    add_normalisation_options,
    cam_from_args,
    model_from_args,
    normalisation,
    note_if_untrained,
)
from camkit.errors import CamkitError

__all__ = ["add_parser", "run"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


# --------------------------------------------------------------------------- datasets
class _Preprocess:
    """uint8 or float ``(C, H, W)`` -> float32, resized, scaled to ``[0, 1]``, normalised.

    ``mean`` / ``std`` are ``--mean`` / ``--std`` as given; their defaults depend on the
    number of channels (see :func:`camkit._cli_models.normalisation`).
    """

    def __init__(self, size: tuple[int, int] | None, mean: list[float] | None,
                 std: list[float] | None) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        x = torch.from_numpy(np.ascontiguousarray(image)).float() / scale
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        channels = x.shape[0]
        mean_given, std_given = normalisation(channels, self.mean, self.std)
        mean = torch.tensor(_per_channel(list(mean_given), channels, "--mean"))
        std = torch.tensor(_per_channel(list(std_given), channels, "--std"))
        if bool((std <= 0).any()):
            raise CamkitError(f"--std {std_given} must be positive.")
        return (x - mean[:, None, None]) / std[:, None, None]

    def settings(self) -> dict[str, Any]:
        """The options as given, for the run's manifest."""
        return {"size": None if self.size is None else list(self.size), "mean": self.mean,
                "std": self.std}


def _per_channel(values: list[float], channels: int, flag: str) -> list[float]:
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

    def _camkit_settings(self) -> dict[str, Any]:
        """Digests of the arrays and the preprocessing (see ``camkit.dataset``)."""
        return {"images": _digest(self.images), "labels": None if self.labels is None
                else _digest(self.labels), "classes": getattr(self, "classes", None),
                **self.preprocess.settings()}

    def __getitem__(self, index: int) -> Any:
        image = self.preprocess(self.images[index])
        if self.labels is None:
            return image
        return image, int(self.labels[index])


class _FolderImages(Dataset):
    """Image files: one subfolder per class (labels in sorted order), or files directly."""

    def __init__(self, root: Path, channels: int, preprocess: _Preprocess) -> None:
        self.root = root
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
        # Without --input-size nothing is resized, so every image must have the first's size.
        self.size = None if preprocess.size is not None else self._read(0).shape[-2:]

    def __len__(self) -> int:
        return len(self.files)

    def _camkit_settings(self) -> dict[str, Any]:
        """The files (names relative to the folder, labels, byte sizes), the channels and the
        preprocessing (see ``camkit.dataset``)."""
        listing = [[path.relative_to(self.root).as_posix(), label, path.stat().st_size]
                   for path, label in self.files]
        return {"files": _digest(json.dumps(listing).encode()), "channels": self.channels,
                **self.preprocess.settings()}

    def __getitem__(self, index: int) -> Any:
        pixels = self._read(index)
        if self.size is not None and pixels.shape[-2:] != self.size:
            first, path = self.files[0][0], self.files[index][0]
            raise CamkitError(
                f"{path} is {pixels.shape[-2]} x {pixels.shape[-1]} pixels, {first} "
                f"{self.size[0]} x {self.size[1]}; images of different sizes cannot be "
                "batched: pass --input-size C H W to resize them all."
            )
        image = self.preprocess(pixels)
        return (image, self.files[index][1]) if self.labelled else image

    def _read(self, index: int) -> np.ndarray:
        """The ``(C, H, W)`` uint8 pixels of file ``index``."""
        import cv2

        path = self.files[index][0]
        flag = cv2.IMREAD_GRAYSCALE if self.channels == 1 else cv2.IMREAD_COLOR
        pixels = cv2.imread(str(path), flag)
        if pixels is None:
            raise CamkitError(
                f"{path} cannot be read as an image. Move or delete it and start again "
                "(the file list is part of the run, so with a new --out, or after deleting "
                "this one)."
            )
        if self.channels == 1:
            return pixels[None]
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)


def _digest(data: np.ndarray | bytes) -> str:
    """SHA-256 of an array's dtype, shape and bytes (or of plain bytes)."""
    digest = hashlib.sha256()
    if isinstance(data, np.ndarray):
        digest.update(f"{data.dtype.str}|{data.shape}|".encode())
        data = np.ascontiguousarray(data).tobytes()
    digest.update(data)
    return digest.hexdigest()


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


def _npz_dataset(args: argparse.Namespace, channels: int | None,
                 preprocess: _Preprocess) -> _ArrayImages:
    path = Path(args.npz)
    if not path.is_file():
        raise CamkitError(f"--npz {path} is not a file.")
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.files)
        if args.images_key not in keys:
            raise CamkitError(f"{path} has no array {args.images_key!r} (--images-key); it holds "
                              f"{', '.join(keys)}.")
        images = _channels_first(data[args.images_key], f"{path}[{args.images_key!r}]")
        if channels is not None and images.shape[1] != channels:
            raise CamkitError(f"{path}[{args.images_key!r}] has {images.shape[1]}-channel "
                              f"images but --input-size asks for {channels}; give "
                              f"--input-size {images.shape[1]} H W.")
        labels = None
        if args.labels_key in keys:
            labels = np.asarray(data[args.labels_key]).astype(np.int64)
            if labels.shape != (len(images),):
                raise CamkitError(f"{path}[{args.labels_key!r}] has shape {labels.shape}; "
                                  f"expected ({len(images)},), one label per image.")
        classes = [str(c) for c in data["classes"]] if "classes" in keys else None
    return _ArrayImages(images, labels, preprocess, classes)


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
    add_model_options(
        parser,
        input_size=None,
        input_size_help="read the images with C channels (1: grayscale, 3: RGB) and resize "
        "them to H x W (default: folder images read as RGB, .npz arrays as stored, neither "
        "resized)",
        target_type=_target,
        target_help="what to explain: pred (each image's top class, the default), label "
        "(its label) or a class index",
        device_help="cpu, cuda or cuda:N (default cpu; under torchrun, cuda means "
        "cuda:$LOCAL_RANK)",
    )
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder: one subfolder per class, or files")
    source.add_argument("--npz", help=".npz file with an images array and optional labels")
    data.add_argument("--images-key", default="images", help="array of images in --npz")
    data.add_argument("--labels-key", default="labels", help="array of labels in --npz")
    add_normalisation_options(data)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", required=True, help="output folder")
    run_group.add_argument("--batch-size", type=int, default=32)
    run_group.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    run_group.add_argument("--keep", choices=("maps", "raw", "stats"), default="maps")
    run_group.add_argument("--shard-size", type=int)
    run_group.add_argument("--map-dtype", choices=("float16", "float32"), default="float16")
    run_group.add_argument("--aggregate-size", type=int, default=32)
    run_group.add_argument("--no-report", action="store_true", help="skip report.md")
    run_group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                           help="progress bar (default: when stderr is a terminal)")
    parser.set_defaults(func=run)
    return parser


def _target(text: str) -> str | int:
    """``argparse`` type of ``--target``: ``pred``, ``label`` or a class index."""
    if text in ("pred", "label"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not pred, label or a class index (a non-negative integer)"
        )
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``explain-dataset``; bad input raises :class:`CamkitError` (``camkit`` exits 2)."""
    from camkit.dataset import explain_dataset

    if args.input_size is None:
        channels, size = None, None
    else:
        channels, height, width = args.input_size
        if channels not in (1, 3):
            raise CamkitError(f"explain-dataset reads images with 1 (grayscale) or 3 (RGB) "
                              f"channels; --input-size asks for {channels}.")
        size = (height, width)
    cam = cam_from_args(args, model_from_args(args))
    preprocess = _Preprocess(size, args.mean, args.std)
    if args.images:
        root = Path(args.images)
        if not root.is_dir():
            raise CamkitError(f"--images {root} is not a folder.")
        dataset: Dataset = _FolderImages(root, channels or 3, preprocess)
    else:
        dataset = _npz_dataset(args, channels, preprocess)
    try:
        result = explain_dataset(
            cam, dataset, args.out, batch_size=args.batch_size, num_workers=args.workers,
            targets="pred" if args.target is None else args.target, keep=args.keep,
            shard_size=args.shard_size, map_dtype=args.map_dtype,
            aggregate_size=args.aggregate_size, report=not args.no_report,
            progress=args.progress,
        )
    except OSError as err:
        raise CamkitError(f"cannot read or write the files: {err}") from err
    if int(os.environ.get("RANK", "0")) == 0:
        overall = result.aggregates["overall"]
        accuracy = "" if overall["accuracy"] is None else \
            f", accuracy {overall['accuracy']:.3f} on {overall['labelled']} labelled"
        sys.stdout.write(f"explained {len(result)} images at layer {result.layer}{accuracy}; "
                         f"results in {result.out}\n")
        note_if_untrained(args)
    return 0
