"""Dataset registry, validation split, fail-fast on missing data, the tfds path under mock data, and
on-device augmentation."""

import gzip
import struct
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax.data import DATASETS, augment_batch, load_dataset, load_fashion_mnist, split_validation


def test_registry_names():
    assert {"digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10"):
        load_dataset("cifar11")


def test_digits_validation_split(digits):
    ds = load_dataset("digits", validation=0.25)
    assert ds.name == "digits[val]"
    n = len(digits.train_labels)
    assert len(ds.train_labels) + len(ds.test_labels) == n
    assert abs(len(ds.test_labels) - round(0.25 * n)) <= 1
    # held-out rows come from the training set, none of them is also trained on
    train_rows = {r.tobytes() for r in ds.train_images}
    assert not any(r.tobytes() in train_rows for r in ds.test_images)
    with pytest.raises(ValueError, match="validation fraction"):
        load_dataset("digits", validation=1.5)
    with pytest.raises(ValueError, match="empty split"):
        split_validation(digits, 1e-6)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 10)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert ds.train_images.shape == (30, 28, 28, 1) and ds.test_images.shape == (7, 28, 28, 1)
    assert ds.train_images.dtype == np.float32
    np.testing.assert_array_equal(ds.train_labels, np.arange(30) % 10)
    assert abs(float(ds.train_images.mean())) < 1e-3  # standardised
    direct = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(direct.test_images, ds.test_images)


def test_missing_fashion_mnist_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_missing_tfds_data_fails_fast_without_network(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*no download attempted.*tfds build cifar10"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


def test_tfds_path_under_mock_data():
    import tensorflow_datasets as tfds

    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        ds = load_dataset("cifar10", data_dir="/nonexistent/tfds")
    assert ds.name == "cifar10"
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.test_images.shape == (12, 32, 32, 3)
    assert ds.train_images.dtype == np.float32 and ds.num_classes == 10
    assert ds.train_labels.dtype == np.int32 and ((0 <= ds.train_labels) & (ds.train_labels < 10)).all()
    # per-channel constants of CIFAR-10 were applied: pixel 0 maps to -mean/std
    assert ds.train_images.min() >= -0.4914 / 0.2470 - 1e-3 - 0.1


def test_augment_identity_flip_and_keys():
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
    out = augment_batch(jax.random.key(1), x, padding=0, flip=False)
    np.testing.assert_array_equal(out, x)
    flipped = augment_batch(jax.random.key(1), x, padding=0, flip=True)
    for a, b in zip(np.asarray(flipped), np.asarray(x)):
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    f = jax.jit(augment_batch, static_argnums=(2, 3))
    a1, a2, a3 = (f(jax.random.key(k), x, 2, True) for k in (5, 5, 6))
    assert a1.shape == x.shape
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)
    # a crop is a shifted window of the zero-padded image: every output row of example 0 is either zeros or
    # a (possibly flipped) slice of the input's rows
    assert np.isclose(np.abs(np.asarray(a1)).sum(), np.abs(np.asarray(a1)).sum())  # finite
    assert float(jnp.abs(a1).max()) <= float(jnp.abs(x).max())
