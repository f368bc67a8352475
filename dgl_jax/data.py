"""Datasets as in-memory NHWC float32 arrays with integer labels, normalised per channel.

``digits`` (scikit-learn's bundled 8x8 digits; offline, the embedded default), ``fashion_mnist`` (local
IDX files, e.g. Debian's ``dataset-fashion-mnist``; else tfds) and the tfds datasets ``mnist``, ``cifar10``,
``cifar100``, ``svhn_cropped``, ``imagenet2012`` read through ``tfds.data_source``, all behind
:func:`load_dataset` (registry :data:`DATASETS`). :func:`augment_batch` is the on-device, PRNG-keyed
random crop + flip. For streaming (``--loader grain``), :func:`load_train_source` gives the training split as a
random-access source read on the host (:class:`ArraySource`, :class:`TfdsSource`) instead of arrays; datasets
whose images vary in size (:data:`RESIZED`: ``imagenet2012``) are resized on the host to ``[S, S, 3]``
(:func:`resize_center_crop`) and their evaluation split is streamed as well.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any, NamedTuple

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
    gz = path.suffix == ".gz"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable {'gzip' if gz else 'IDX'} file: {why}") from None
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


# ----------------------------------------------------------------------------------------------------------
# Registry: one interface for every dataset
# ----------------------------------------------------------------------------------------------------------
# Per-channel (mean, std) of the training images scaled to [0, 1], the usual published constants.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist_tfds": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetInfo(NamedTuple):
    """A registry entry: how to load the dataset, whether a horizontal flip is a valid augmentation, and
    how a user gets the data offline and online (shown in error messages and the README)."""

    load: Any  # Callable[[str | None], Dataset]
    flip: bool
    offline: str
    online: str


def tfds_loader(name: str) -> Any:
    """A loader reading the tfds dataset ``name`` through ``tfds.data_source`` (never downloading)."""
    return lambda data_dir=None: load_tfds(name, data_dir)


def _load_fashion(data_dir: str | os.PathLike | None = None) -> Dataset:
    try:
        return load_fashion_mnist(data_dir)
    except FileNotFoundError as idx_error:
        if data_dir is not None:
            raise
        try:
            return load_tfds("fashion_mnist", None)
        except FileNotFoundError as tfds_error:
            raise FileNotFoundError(f"{idx_error} Alternatively: {tfds_error}") from None


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        lambda data_dir=None: load_digits(), False, "bundled with scikit-learn (1797 8x8 images)", "nothing to fetch"
    ),
    "fashion_mnist": DatasetInfo(
        _load_fashion,
        True,
        "IDX files: apt-get install dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or --data-dir",
        "tfds: python -m tensorflow_datasets.scripts.download_and_prepare --datasets=fashion_mnist",
    ),
    **{
        name: DatasetInfo(
            tfds_loader(name),
            name not in ("mnist", "svhn_cropped"),
            f"a prepared tfds folder: --data-dir DIR (or TFDS_DATA_DIR) holding {name}/<version>/",
            (
                "manual download of ILSVRC2012 tars to <data_dir>/downloads/manual, then tfds build imagenet2012"
                if name == "imagenet2012"
                else f"tfds build {name} (or download_and_prepare) on a machine with network"
            ),
        )
        for name in ("mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012")
    },
}


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, validation: float = 0.0, seed: int = 0
) -> Dataset:
    """Loads a registered dataset (one of :data:`DATASETS`) as normalised in-memory arrays.

    ``validation`` > 0 holds out that fraction of the training set (shuffled with ``seed``) and returns it
    in place of the test split (``name`` gets a ``[val]`` suffix), so the test set stays untouched.
    Missing data raises ``FileNotFoundError`` within seconds, with the command that fetches it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {validation}")
    ds = DATASETS[name].load(data_dir)
    return split_validation(ds, validation, seed) if validation else ds


def split_validation(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """Holds out ``fraction`` of ``ds``'s training examples as the evaluation split (``[val]`` in the name)."""
    val, train = validation_indices(len(ds.train_labels), fraction, seed)
    return Dataset(
        f"{ds.name}[val]",
        ds.train_images[train],
        ds.train_labels[train],
        ds.train_images[val],
        ds.train_labels[val],
        ds.num_classes,
    )


def validation_indices(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(validation, train)`` indices of an ``n``-example training split: a ``seed``-shuffled permutation
    cut after ``round(n * fraction)`` (shared by the in-memory and the streaming paths)."""
    n_val = int(round(n * fraction))
    if not 1 <= n_val < n:
        raise ValueError(f"validation fraction {fraction} of {n} training examples leaves an empty split")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_val], perm[n_val:]


# ----------------------------------------------------------------------------------------------------------
# tfds datasets through tfds.data_source (array_record; TensorFlow is not needed to read)
# ----------------------------------------------------------------------------------------------------------
def default_tfds_dir() -> str:
    """Where tfds keeps prepared data: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def load_tfds(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Reads tfds dataset ``name`` (train and test splits) into memory through ``tfds.data_source``.

    The builder is asked whether the data is prepared *before* anything that could download, so missing
    data fails in seconds with instructions instead of tfds's network retries. Images ``[n, H, W, C]`` are
    scaled to [0, 1] and standardised with :data:`NORMALIZATION`. Records are read once, straight from the
    random-access data source, for the trainer's in-memory loader (the whole set on the device, batches
    gathered inside jit); :func:`load_train_source` is the streaming counterpart.
    """
    if name in RESIZED:
        raise ValueError(memory_loader_error(name))
    tfds, builder, data_dir = _tfds_builder(name, data_dir)
    train, test = (TfdsSource(name, s) for s in _tfds_sources(tfds, name, data_dir, ["train", "test"]))
    (xtr, ytr), (xte, yte) = (s.read(np.arange(len(s))) for s in (train, test))
    return Dataset(name, xtr, ytr, xte, yte, int(builder.info.features["label"].num_classes))


def memory_loader_error(name: str) -> str:
    """The one-line error for a dataset of :data:`RESIZED` asked of the in-memory loader."""
    return (
        f"dataset {name!r} does not fit the in-memory loader (images of varying sizes; even its evaluation split "
        "is tens of GB as float32): pass --loader grain (TrainConfig(loader='grain')) to stream it from the host"
    )


def _tfds_sources(tfds: Any, name: str, data_dir: str, splits: list[str]) -> list[Any]:
    return tfds.data_source(name, split=splits, data_dir=data_dir, download=False)


def _tfds_builder(name: str, data_dir: str | os.PathLike | None) -> tuple[Any, Any, str]:
    """``(tfds module, builder, data_dir)`` after checking that the data is prepared (no download)."""
    import tensorflow_datasets as tfds  # lazy: slow import, only needed for tfds datasets

    data_dir = str(data_dir) if data_dir is not None else default_tfds_dir()
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        info = DATASETS.get(name)
        how = f"{info.online}; offline: {info.offline}" if info else f"tfds build {name}"
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {data_dir} (no download attempted). Get it with: {how}."
        )
    return tfds, builder, data_dir


def scale_tfds_images(name: str, images: np.ndarray) -> np.ndarray:
    """uint8 images ``[n, H, W, C]`` of tfds dataset ``name`` scaled to [0, 1] and standardised with
    :data:`NORMALIZATION`: float32 ``[n, H, W, C]`` (elementwise, so a batch gives the same bits as the
    whole array)."""
    key = "fashion_mnist_tfds" if name == "fashion_mnist" else name
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[key])
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Training splits read on the host, batch by batch (the streaming loader)
# ----------------------------------------------------------------------------------------------------------
class ArraySource:
    """A training split held in memory: ``images [n, H, W, C]`` float32 (normalised), ``labels [n]`` int32."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = np.asarray(images), np.asarray(labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``indices [k]``: ``(images [k, H, W, C] float32, labels [k] int32)``."""
        return self.images[indices], self.labels[indices]


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 image ``[H, W, 3]`` of any size as ``[size, size, 3]`` uint8: the shorter side is resized to
    ``round(size * 256 / 224)`` (bilinear, antialiased: PIL), the longer one in proportion (truncated, as
    torchvision's ``Resize``), then the centre ``size x size`` is cropped (offsets rounded, as torchvision's
    ``CenterCrop``). At ``size=224``: resize to 256, crop 224, the usual ImageNet evaluation transform."""
    from PIL import Image  # Pillow: installed with matplotlib

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    short = round(size * 256 / 224)
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return image[top : top + size, left : left + size]


class TfdsSource:
    """A tfds split read record by record from its random-access ``tfds.data_source`` (array_record, no
    TensorFlow), optionally restricted to ``indices`` (e.g. the training part of a validation split); images
    are scaled with :func:`scale_tfds_images` as they are read, after :func:`resize_center_crop` to
    ``[image_size, image_size, 3]`` when ``image_size`` is given (datasets whose images vary in size)."""

    def __init__(self, name: str, source: Any, indices: np.ndarray | None = None, image_size: int | None = None):
        self.name, self.source, self.image_size = name, source, image_size
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)
        self._shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            self._shape = tuple(self.read(np.arange(1))[0].shape[1:])
        return self._shape

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``indices [k]`` (positions in this source): ``(images [k, H, W, C] float32, labels [k]
        int32)``."""
        records = [self.source[int(i)] for i in self.indices[np.asarray(indices)]]
        if self.image_size is None:
            images = np.stack([r["image"] for r in records])
        else:
            images = np.stack([resize_center_crop(r["image"], self.image_size) for r in records])
        return scale_tfds_images(self.name, images), np.asarray([r["label"] for r in records], np.int32)


TrainSource = ArraySource | TfdsSource
TFDS_STREAMED = ("mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012")
# Datasets whose images vary in size, with the default side S of the [S, S, 3] images they are resized to
# (resize_center_crop); only the streaming loader reads them, evaluation split included
RESIZED: dict[str, int] = {"imagenet2012": 224}
# The evaluation split where it is not "test" (tfds's imagenet2012 test split has no labels)
EVAL_SPLIT: dict[str, str] = {"imagenet2012": "validation"}


def load_train_source(
    name: str,
    data_dir: str | os.PathLike | None = None,
    validation: float = 0.0,
    seed: int = 0,
    image_size: int | None = None,
) -> tuple[TrainSource, Dataset, TfdsSource | None]:
    """``(train, evaluation, eval_source)``: the training split of dataset ``name`` as a source read on the
    host; a :class:`Dataset` holding the evaluation split in memory (its ``train_images`` are empty,
    ``[0, H, W, C]``); and ``None``, or, for the datasets of :data:`RESIZED`, the evaluation split as a
    source too (then ``evaluation`` holds only the name, the class count and empty ``[0, S, S, 3]`` arrays).

    tfds datasets (:data:`TFDS_STREAMED`) are never read whole: at most the evaluation split (the test split,
    :data:`EVAL_SPLIT`, or the ``validation`` part of train chosen as in :func:`load_dataset`) is loaded.
    Other datasets fit in memory and are wrapped in an :class:`ArraySource`. Images of :data:`RESIZED`
    datasets are read as ``[S, S, 3]`` with :func:`resize_center_crop`, ``S = image_size`` (default: the
    dataset's entry); ``image_size`` given for any other dataset is a ``ValueError``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {validation}")
    if image_size is not None and (name not in RESIZED or not (isinstance(image_size, int) and image_size >= 1)):
        raise ValueError(
            f"image size {image_size!r} is not valid for {name!r}; expected none, or an integer >= 1 for the "
            f"datasets whose images vary in size ({sorted(RESIZED)})"
        )
    if name not in TFDS_STREAMED:
        ds = load_dataset(name, data_dir, validation, seed)
        empty = dict(train_images=ds.train_images[:0], train_labels=ds.train_labels[:0])
        return ArraySource(ds.train_images, ds.train_labels), ds._replace(**empty), None
    size = image_size or RESIZED.get(name)
    tfds, builder, data_dir = _tfds_builder(name, data_dir)
    train_src, test_src = _tfds_sources(tfds, name, data_dir, ["train", EVAL_SPLIT.get(name, "test")])
    train, test = TfdsSource(name, train_src, image_size=size), TfdsSource(name, test_src, image_size=size)
    label = name
    if validation:
        val, keep = validation_indices(len(train), validation, seed)
        train, test = TfdsSource(name, train_src, keep, size), TfdsSource(name, train_src, val, size)
        label = f"{name}[val]"
    num_classes = int(builder.info.features["label"].num_classes)
    if name in RESIZED:  # too large for memory: the evaluation split is streamed as well
        x, y = np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32)
        return train, Dataset(label, x, y, x, y, num_classes), test
    xte, yte = test.read(np.arange(len(test)))
    return train, Dataset(label, xte[:0], yte[:0], xte, yte, num_classes), None


# ----------------------------------------------------------------------------------------------------------
# On-device augmentation
# ----------------------------------------------------------------------------------------------------------
def default_crop_padding(image_size: int) -> int:
    """The paper's 4-pixel padding at 32x32, scaled with the image size (at least 1)."""
    return max(1, image_size // 8)


def augment_batch(key: Any, images: Any, padding: int = 4, flip: bool = True) -> Any:
    """Random crop with zero ``padding`` plus (if ``flip``) a random horizontal flip, per example.

    ``images``: ``[batch, H, W, C]`` (already normalised, so zero padding is the mean colour). Pure and
    jittable; the same ``key`` gives the same augmentation.
    """
    import jax
    import jax.numpy as jnp

    n, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * padding + 1)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (n,))
        crop = jnp.where(do_flip[:, None, None, None], crop[:, :, ::-1, :], crop)
    return crop
