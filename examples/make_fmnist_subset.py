"""Build ``examples/data/fashion_mnist_subset.npz`` from the original Fashion-MNIST IDX files.

    python examples/make_fmnist_subset.py --idx-root /usr/share/datasets/fashion-mnist

The IDX files come from Debian's ``dataset-fashion-mnist`` package (``dpkg -L
dataset-fashion-mnist`` lists them) or from the Fashion-MNIST repository. The subset is a
stratified draw (generator seed 0) of ``--train-per-class`` training and ``--test-per-class``
test images per class, stored as compressed uint8 arrays. The same inputs give the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from study.data import EMBEDDED_FILE, FMNIST_CLASSES, FMNIST_FILES, find_idx, read_idx


def per_class_draw(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class, sorted, drawn without replacement."""
    picked = []
    for c in range(len(FMNIST_CLASSES)):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idx-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", default=str(EMBEDDED_FILE))
    args = parser.parse_args(argv)

    root = Path(args.idx_root)
    paths = {key: find_idx(root, stem) for key, stem in FMNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        print(f"error: {root} lacks the Fashion-MNIST IDX files; pass --idx-root "
              "(apt install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)",
              file=sys.stderr)
        return 2
    arrays = {key: read_idx(p) for key, p in paths.items()}
    rng = np.random.default_rng(0)
    train = per_class_draw(arrays["train_labels"], args.train_per_class, rng)
    test = per_class_draw(arrays["val_labels"], args.test_per_class, rng)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        x_train=arrays["train_images"][train],
        y_train=arrays["train_labels"][train],
        x_test=arrays["val_images"][test],
        y_test=arrays["val_labels"][test],
        train_index=train.astype(np.int32),   # positions in the original files
        test_index=test.astype(np.int32),
        classes=np.array(FMNIST_CLASSES),
    )
    for key, p in paths.items():
        print(f"{p.name}  sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}  ({key})")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest}): "
          f"{len(train)} training and {len(test)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
