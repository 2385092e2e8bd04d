"""``camkit explain``: read an image, explain one class, write the overlay.

OpenCV reads and writes the files (through ``imdecode`` / ``imencode``, so paths with any
characters work); the map is drawn with :func:`camkit.overlay` over the image at its own size.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camkit._cli_models import cam_from_args, model_from_args, normalisation, note_if_untrained
from camkit.errors import CamkitError
from camkit.viz import overlay

__all__ = ["explain", "load_image", "to_tensor", "write_image"]

def _cv2() -> Any:
    import cv2

    return cv2


def load_image(path: str, channels: int) -> np.ndarray:
    """Read ``path`` as ``(H, W, 3)`` RGB (``channels=3``) or ``(H, W)`` grayscale uint8."""
    if channels not in (1, 3):
        raise CamkitError(
            f"explain reads images with 1 (grayscale) or 3 (RGB) channels; --input-size "
            f"asks for {channels}."
        )
    file = Path(path)
    if file.is_dir():
        raise CamkitError(
            f"image {path!r} is a folder; explain takes one image file (explain-dataset "
            "takes a folder)."
        )
    if not file.is_file():
        raise CamkitError(f"image file {path!r} does not exist.")
    cv2 = _cv2()
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.fromfile(file, dtype=np.uint8), flag)
    if image is None:
        raise CamkitError(
            f"cannot read {path!r} as an image; OpenCV reads PNG, JPEG, BMP, TIFF, WebP and "
            "other common formats."
        )
    return image if channels == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_tensor(
    image: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize a uint8 image to ``size = (H, W)`` and normalise it to a ``(1, C, H, W)`` batch.

    Pixels are scaled to ``[0, 1]``, then ``(x - mean) / std`` per channel.
    """
    cv2 = _cv2()
    height, width = size
    if image.shape[:2] != (height, width):
        shrinking = height * width < image.shape[0] * image.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    pixels = image.astype(np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[-1]
    mean_arr = np.asarray(_per_channel(mean, channels, "--mean"), dtype=np.float32)
    std_arr = np.asarray(_per_channel(std, channels, "--std"), dtype=np.float32)
    if np.any(std_arr <= 0):
        raise CamkitError(f"--std {list(std)} must be positive.")
    pixels = (pixels - mean_arr) / std_arr
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def _per_channel(values: Sequence[float], channels: int, flag: str) -> list[float]:
    if len(values) == 1:
        return list(values) * channels
    if len(values) != channels:
        raise CamkitError(
            f"{flag} has {len(values)} values for a {channels}-channel input; give one value "
            f"or {channels}."
        )
    return list(values)


def write_image(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image; the format follows the file extension."""
    cv2 = _cv2()
    file = check_output_path(path)
    try:
        ok, encoded = cv2.imencode(file.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise _no_encoder(path, file.suffix)
    try:
        with open(file, "wb") as handle:  # unlike ndarray.tofile, reports a failed flush
            handle.write(encoded.tobytes())
    except OSError as err:
        raise CamkitError(
            f"cannot write {path!r}: {err.strerror or err}. Pass --out a writable file path, "
            "e.g. --out ./cam.png"
        ) from None


def check_output_path(path: str) -> Path:
    """The image file ``path`` as a :class:`~pathlib.Path`, refused early when it cannot be one.

    Only what can be told without writing is checked here (an empty name, a folder or a
    name ending in a separator, a missing parent folder, an extension OpenCV cannot
    encode); :func:`write_image` reports what the write itself runs into.
    """
    file = Path(path)
    if not path or file.is_dir() or path.endswith(("/", os.sep)):
        raise CamkitError(
            f"--out {path!r} is {'empty' if not path else 'a folder'}; pass an image file "
            "path, e.g. --out ./cam.png"
        )
    if not file.parent.is_dir():
        raise CamkitError(f"cannot write {path!r}: directory {str(file.parent)!r} does not exist.")
    have_writer = getattr(_cv2(), "haveImageWriter", None)
    if file.suffix and have_writer is not None and not have_writer(str(file)):
        raise _no_encoder(path, file.suffix)
    return file


def _no_encoder(path: str, suffix: str) -> CamkitError:
    return CamkitError(
        f"cannot write {path!r}: OpenCV has no encoder for extension {suffix!r}; use .png or "
        ".jpg."
    )


def explain(args: argparse.Namespace) -> int:
    """Run ``camkit explain`` (see ``camkit explain --help``)."""
    channels, height, width = args.input_size
    check_output_path(args.out)  # before the model is built and run
    image = load_image(args.image, channels)
    batch = to_tensor(image, (height, width), *normalisation(channels, args.mean, args.std))
    cam = cam_from_args(args, model_from_args(args))
    try:
        result = cam(batch, targets=args.target)
    except NotImplementedError:
        raise
    except RuntimeError as err:
        raise CamkitError(
            f"the model failed on a (1, {channels}, {height}, {width}) input: "
            f"{_first_line(err)}. Check --input-size (and --model-arg)."
        ) from err

    drawn = overlay(image, result.maps[0], alpha=args.alpha, colormap=args.colormap)
    write_image(args.out, drawn)
    target = int(result.targets[0]) if result.targets is not None else None
    sys.stdout.write(
        f"{args.out}: class {target} (score {float(result.scores[0]):.4g}), "
        f"layer {result.layer}, {args.method}\n"
    )
    if bool(result.degenerate[0]):
        sys.stderr.write(
            "camkit: note: the map has no positive value, so the overlay shows none; this "
            "layer gives no positive evidence for the class.\n"
        )
    note_if_untrained(args)
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
