"""Loading the study's data and drawing its stratified splits.

Every source ends as the same thing: uint8 images ``(N, C, H, W)`` and int64 labels in two
pools (training and validation). Splits are drawn from the pools by
:func:`stratified_indices`, so the three models of one seed always see the same images.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.errors import StudyInputError

EMBEDDED_FILE = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist_subset.npz"

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# IDX file stems of the original distribution, each found plain or gzipped.
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
DATASETS = ("fmnist", "cifar10", "folder")
# Smallest side for which a total stride of 8 still leaves a 4x4 map.
MIN_SIDE = 25


@dataclass(frozen=True)
class ImageSet:
    """uint8 images ``(N, C, H, W)`` with their int64 labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class Pools:
    """Where splits are drawn from: a training pool, a validation pool, the class names."""

    name: str
    source: str
    classes: tuple[str, ...]
    train: ImageSet
    val: ImageSet

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


# ---------------------------------------------------------------- IDX (MNIST-style) files

_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or ``.gz``) into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise StudyInputError(
            f"{path} is not an IDX file of unsigned bytes (bad header); pass the original "
            "Fashion-MNIST files, e.g. --data-root /usr/share/datasets/fashion-mnist"
        )
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise StudyInputError(
            f"{path} holds {body.size} bytes after its header, expected {int(np.prod(dims))} "
            f"for shape {dims}; the file is truncated or corrupt"
        )
    return body.reshape(dims)


def find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fmnist_idx(root: str | Path) -> Pools:
    """The full Fashion-MNIST from a folder holding its four IDX files."""
    root = Path(root)
    if not root.is_dir():
        raise StudyInputError(
            f"--data-root {root} is not a folder; pass the folder holding the Fashion-MNIST "
            "IDX files (e.g. /usr/share/datasets/fashion-mnist), or omit it for the embedded subset"
        )
    paths = {key: find_idx(root, stem) for key, stem in FMNIST_FILES.items()}
    missing = [FMNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise StudyInputError(
            f"--data-root {root} lacks {', '.join(missing)} (plain or .gz); pass the folder "
            "holding all four Fashion-MNIST IDX files, or omit --data-root for the embedded subset"
        )
    arrays = {key: read_idx(p) for key, p in paths.items()}
    return Pools(
        name="fmnist",
        source=f"Fashion-MNIST IDX files in {root}",
        classes=FMNIST_CLASSES,
        train=ImageSet(arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64)),
        val=ImageSet(arrays["val_images"][:, None], arrays["val_labels"].astype(np.int64)),
    )


def load_fmnist_embedded(path: str | Path = EMBEDDED_FILE) -> Pools:
    """The stratified Fashion-MNIST subset shipped in ``examples/data``."""
    path = Path(path)
    if not path.is_file():
        raise StudyInputError(
            f"the embedded subset {path} is missing; restore it from the repository, rebuild it "
            "with examples/make_fmnist_subset.py, or pass --data-root with the full IDX files"
        )
    with np.load(path, allow_pickle=False) as npz:
        classes = tuple(str(c) for c in npz["classes"])
        train = ImageSet(npz["x_train"][:, None], npz["y_train"].astype(np.int64))
        val = ImageSet(npz["x_test"][:, None], npz["y_test"].astype(np.int64))
    return Pools(
        name="fmnist",
        source=f"embedded Fashion-MNIST subset ({path.name})",
        classes=classes,
        train=train,
        val=val,
    )


# ---------------------------------------------------------------- CIFAR-10 and folders


def load_cifar10(root: str | Path, download: bool) -> Pools:
    """CIFAR-10 through torchvision; downloads only when asked to."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    try:
        train = CIFAR10(str(root), train=True, download=download)
        val = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise StudyInputError(
            f"no CIFAR-10 under --data-root {root} ({exc}); pass the folder holding "
            "cifar-10-batches-py, or add --download to fetch it there"
        ) from None

    def to_set(ds) -> ImageSet:
        return ImageSet(
            np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)),
            np.asarray(ds.targets, dtype=np.int64),
        )

    return Pools(
        name="cifar10",
        source=f"CIFAR-10 (torchvision) in {root}",
        classes=tuple(train.classes),
        train=to_set(train),
        val=to_set(val),
    )


def _load_image_folder(root: Path, size: int) -> tuple[ImageSet, tuple[str, ...]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise StudyInputError(
            f"--data-root {root} is not an image folder ({exc}); pass a folder with one "
            "sub-folder of images per class"
        ) from None
    images = np.empty((len(folder.samples), 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
            im = im.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            images[i] = np.asarray(im).transpose(2, 0, 1)
    labels = np.asarray(folder.targets, dtype=np.int64)
    return ImageSet(images, labels), tuple(folder.classes)


def load_folder(root: str | Path, image_size: int, val_fraction: float = 0.2) -> Pools:
    """An ImageFolder of the user's images, resized and centre-cropped to ``image_size``.

    ``root/train`` and ``root/val`` are used as given when both exist; otherwise a stratified
    ``val_fraction`` of ``root`` (fixed generator, seed 0) becomes the validation pool.
    """
    root = Path(root)
    if not root.is_dir():
        raise StudyInputError(
            f"--data-root {root} is not a folder; pass a folder with one sub-folder of images "
            "per class (or train/ and val/ folders laid out that way)"
        )
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, classes = _load_image_folder(root / "train", image_size)
        val, val_classes = _load_image_folder(root / "val", image_size)
        if val_classes != classes:
            raise StudyInputError(
                f"{root}/train has classes {list(classes)} but {root}/val has "
                f"{list(val_classes)}; give both the same class sub-folders"
            )
    else:
        both, classes = _load_image_folder(root, image_size)
        order = stratified_indices(both.labels, len(both), np.random.default_rng(0))
        n_val = max(len(classes), round(val_fraction * len(both)))
        val, train = both.take(order[:n_val]), both.take(order[n_val:])
    return Pools(
        name="folder",
        source=f"image folder {root} at {image_size} px",
        classes=classes,
        train=train,
        val=val,
    )


# ---------------------------------------------------------------- entry point and splits


def load_pools(
    dataset: str,
    data_root: str | None,
    *,
    download: bool = False,
    image_size: int = 64,
) -> Pools:
    """Load the named dataset's pools, or raise :class:`StudyInputError` saying what to pass."""
    if dataset == "fmnist":
        return load_fmnist_embedded() if data_root is None else load_fmnist_idx(data_root)
    if dataset == "cifar10":
        if data_root is None:
            raise StudyInputError(
                "--dataset cifar10 needs --data-root DIR (the folder holding "
                "cifar-10-batches-py; add --download to fetch it there)"
            )
        return load_cifar10(data_root, download)
    if dataset == "folder":
        if data_root is None:
            raise StudyInputError(
                "--dataset folder needs --data-root DIR, a folder with one sub-folder of "
                "images per class"
            )
        if image_size < MIN_SIDE:
            raise StudyInputError(
                f"--image-size {image_size} is too small: the models' total stride is 8 and "
                f"the target layer needs at least a 4x4 map; pass --image-size {MIN_SIDE} or more"
            )
        return load_folder(data_root, image_size)
    raise StudyInputError(
        f"unknown dataset {dataset!r}; pass --dataset with one of {', '.join(DATASETS)}"
    )


def select_classes(pools: Pools, names: list[str] | None) -> Pools:
    """Keep only the named classes (relabelled 0..K-1 in the order given)."""
    if not names:
        return pools
    unknown = [n for n in names if n not in pools.classes]
    if unknown:
        raise StudyInputError(
            f"--classes {','.join(unknown)} not in {pools.name}; valid names: "
            f"{', '.join(pools.classes)}"
        )
    old = [pools.classes.index(n) for n in names]
    remap = np.full(len(pools.classes), -1, dtype=np.int64)
    remap[old] = np.arange(len(old))

    def keep(s: ImageSet) -> ImageSet:
        mask = remap[s.labels] >= 0
        return ImageSet(s.images[mask], remap[s.labels[mask]])

    return Pools(pools.name, pools.source, tuple(names), keep(pools.train), keep(pools.val))


def stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices whose class shares follow those of ``labels`` as closely as possible.

    Each class's members are shuffled and given keys ``(rank + u) / class_size`` with ``u``
    uniform in [0, 1); the ``n`` smallest keys are taken. Any prefix of the returned order is
    itself stratified, so a smaller split is always contained in a larger one of the same seed.
    """
    labels = np.asarray(labels)
    if n > len(labels):
        raise StudyInputError(f"asked for {n} images but the pool holds only {len(labels)}")
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")[:n]


def check_sizes(pools: Pools, n_train: int, n_val: int) -> None:
    """Raise :class:`StudyInputError` unless both splits fit their pools (>= 1 per class)."""
    for flag, n, pool in (("--train-size", n_train, pools.train), ("--val-size", n_val, pools.val)):
        if n < len(pools.classes) or n > len(pool):
            raise StudyInputError(
                f"{flag} {n} is out of range for {pools.source}: pass a number between "
                f"{len(pools.classes)} and {len(pool)}"
            )


def draw_split(pools: Pools, n_train: int, n_val: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """The seed's training subset and the validation subset (the same for every seed)."""
    check_sizes(pools, n_train, n_val)
    train_idx = stratified_indices(pools.train.labels, n_train, np.random.default_rng(seed))
    val_idx = stratified_indices(pools.val.labels, n_val, np.random.default_rng(0))
    return pools.train.take(np.sort(train_idx)), pools.val.take(np.sort(val_idx))
