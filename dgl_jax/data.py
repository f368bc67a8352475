"""Datasets as in-memory NHWC float32 arrays with integer labels, normalised per channel.

``digits`` (scikit-learn's bundled 8x8 digits; offline, the embedded default) and ``fashion_mnist`` (local
IDX files, e.g. Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


class Dataset(NamedTuple):
    """Train/test arrays: images ``[n, H, W, C]`` float32 (normalised), labels ``[n]`` int32."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def normalize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel standardisation of ``[n, H, W, C]`` arrays with the training set's mean and std."""
    mean = train.mean(axis=(0, 1, 2), keepdims=True)
    std = train.std(axis=(0, 1, 2), keepdims=True) + 1e-8
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digit images, shuffled with ``seed`` and split ``1-test_fraction`` / rest."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images[..., None] / 16.0).astype(np.float32)
    labels = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    tr, te = normalize(images[train], images[test])
    return Dataset("digits", tr, labels[train], te, labels[test], 10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    return None


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST (60k/10k, 28x28x1) from the four IDX files in ``data_dir`` or Debian's package path."""
    dirs = [Path(data_dir)] if data_dir else [Path(d) for d in FASHION_MNIST_DIRS]
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for d in dirs:
        paths = [_find_idx(d, s) for s in stems]
        if all(paths):
            xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
            tr, te = normalize(xtr[..., None] / 255.0, xte[..., None] / 255.0)
            return Dataset("fashion_mnist", tr, ytr.astype(np.int32), te, yte.astype(np.int32), 10)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {[str(d) for d in dirs]}. Install them with "
        "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or pass --data-dir pointing to a folder "
        f"holding {', '.join(s + '.gz' for s in stems)}."
    )
