"""imagenet2012 through the streaming loader: images of varying sizes resized on the host to ``[S, S, 3]``
(shorter side to ``round(S*256/224)``, centre crop), the evaluation split streamed in padded, masked batches
(never loaded whole), the in-memory loader refused with a one-line hint. tfds runs under ``mock_data``."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import cli, data
from dgl_jax.data import load_dataset, load_train_source, resize_center_crop
from dgl_jax.steps import evaluate_batch
from dgl_jax.trainer import TrainConfig, Trainer


def reference(image: np.ndarray, size: int) -> np.ndarray:
    """Independent reference: jax.image.resize (linear, antialiased) to the torchvision Resize shape, then the
    torchvision CenterCrop offsets; float32 (PIL rounds to uint8)."""
    h, w = image.shape[:2]
    short = round(size * 256 / 224)
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    out = np.asarray(jax.image.resize(image.astype(np.float32), (nh, nw, 3), "linear", antialias=True))
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return out[top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(47, 17, 3), (23, 33, 3), (101, 61, 3), (375, 500, 3)])
def test_resize_center_crop_gives_s_by_s_and_matches_reference(shape):
    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    out = resize_center_crop(image, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float32) - reference(image, 32)).max() <= 1.0  # PIL's uint8 rounding


def test_resize_center_crop_exact_cases():
    rng = np.random.default_rng(0)
    # shorter side already round(32*256/224) = 37: no resampling, the crop is a plain centre slice
    image = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(image, 32), image[2:34, 9:41])
    # odd margins: rows (39 - 32) / 2 = 3.5 rounds to 4 (Python's round, as torchvision's CenterCrop), cols 2.5 to 2
    image = rng.integers(0, 256, (39, 37, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(image, 32), image[4:36, 2:34])
    # the default S = 224: shorter side 256, then the centre 224 x 224 (a constant image stays constant)
    flat = np.full((300, 410, 3), 77, np.uint8)
    out = resize_center_crop(flat, 224)
    assert out.shape == (224, 224, 3) and (out == 77).all()
    with pytest.raises(ValueError, match=r"expected a uint8 image \[H, W, 3\]"):
        resize_center_crop(np.zeros((8, 8), np.uint8), 4)


def mocked_tfds(num_examples):
    import tensorflow_datasets as tfds

    return (
        tfds.testing.mock_data(num_examples=num_examples),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    )


def test_imagenet_trains_and_evaluates_streamed_under_mock_data():
    config = TrainConfig(dataset="imagenet2012", data_dir="/nonexistent/tfds", loader="grain", image_size=32,
                         batch_size=4, epochs=1, chunk_steps=2, eval_batch_size=4, split=1, augment=True,
                         decay_epochs=None, head="linear", model_options={"width_mult": 0.25})  # fmt: skip
    mock_data, prepared = mocked_tfds(10)  # 10 records per split, each of a random size
    splits = []

    def sources(tfds, name, data_dir, names):
        splits.append(names)
        return tfds.data_source(name, split=names, data_dir=data_dir, download=False)

    with mock_data, prepared, mock.patch.object(data, "_tfds_sources", sources):
        trainer = Trainer(config, log=lambda s: None)
        assert splits == [["train", "validation"]]  # tfds's imagenet2012 test split has no labels
        assert trainer.train_images is None and trainer._eval_data is None  # nothing loaded whole
        assert trainer.data.image_shape == trainer.source.image_shape == (32, 32, 3)
        assert trainer.num_test == 10 and trainer.data.num_classes == 1000 and trainer.steps_per_epoch == 2
        reads = []
        read = trainer.eval_source.read
        trainer.eval_source.read = lambda idx: reads.append(len(idx)) or read(idx)
        events = list(trainer.fit(trainer.init_state()))
        x, y = read(np.arange(10))  # the whole mock validation split, for the reference below

        # validation held out of train: both parts streamed, the same resize
        train, evaluation, eval_source = load_train_source("imagenet2012", config.data_dir, 0.2, image_size=24)
        assert (len(train), len(eval_source), evaluation.name) == (8, 2, "imagenet2012[val]")
        assert eval_source.read(np.arange(2))[0].shape == (2, 24, 24, 3) and evaluation.test_images.shape[0] == 0
    assert [ev.steps for ev in events] == [2] and events[-1].state.epoch == 1
    assert np.isfinite(events[-1].train["loss"]).all()
    assert sorted(reads) == [2, 4, 4]  # three batches of 4: the last one holds 2 examples and 2 padded, masked
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.float32 and ((0 <= y) & (y < 1000)).all()
    # the streamed evaluation equals one unpadded pass over the 10 examples
    stages = events[-1].state.stages
    ref = evaluate_batch(trainer.stages, stages, jnp.asarray(x), jnp.asarray(y))
    ev = events[-1].eval
    assert ev["accuracy"][0] == pytest.approx(float(ref.per_head[0]) / 10, abs=1e-6)
    assert ev["loss"][0] == pytest.approx(float(ref.loss[0]) / 10, rel=1e-5)
    assert ev["ensemble"] == pytest.approx(float(ref.ensemble) / 10, abs=1e-6)


def test_imagenet_refuses_the_memory_loader_and_bad_image_sizes(capsys):
    with pytest.raises(ValueError, match=r"does not fit the in-memory loader .*: pass --loader grain"):
        Trainer(TrainConfig(dataset="imagenet2012"))
    with pytest.raises(ValueError, match="pass --loader grain"):
        load_dataset("imagenet2012", data_dir="/nonexistent/tfds")
    argv = ["train", "--dataset", "imagenet2012", "--no-progress", "--compilation-cache", "off"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "imagenet2012" in err and "--loader grain" in err
    with pytest.raises(ValueError, match=r"image size 32 is not valid; expected none, or an integer >= 1"):
        Trainer(TrainConfig(dataset="cifar10", loader="grain", image_size=32))
    with pytest.raises(ValueError, match="image size 0 is not valid"):
        Trainer(TrainConfig(dataset="imagenet2012", loader="grain", image_size=0))
    with pytest.raises(ValueError, match="image size 32 is not valid for 'digits'"):
        load_train_source("digits", image_size=32)
