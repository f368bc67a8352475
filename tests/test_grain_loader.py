"""The streaming loader (``loader='grain'``): bit-identical to the in-memory loader for the same seed, resumes
mid-epoch bit-identically with no iterator state, reads tfds through ``tfds.data_source`` (under
``tfds.testing.mock_data``), rejects bad names, and keeps grain out of the memory path's imports."""

import dataclasses
import subprocess
import sys
import threading
from unittest import mock

import chex
import jax
import numpy as np
import pytest
from conftest import run_until

from dgl_jax import cli
from dgl_jax.data import ArraySource, load_dataset, load_train_source
from dgl_jax.trainer import TrainConfig, Trainer

# 600 training digits, batch 64: 9 steps per epoch in chunks of 4, 4 and 1 steps; a narrow 2-stage model: most
# of the time goes to compiling the model's init and step, about 3 to 6 CPU seconds per stage and program
TINY = dict(head="linear", model_options={"width_mult": 0.25})
CONFIG = TrainConfig(split=2, epochs=1, chunk_steps=4, decay_epochs=None, augment=True, eval_batch_size=200, **TINY)


@pytest.fixture(scope="module")
def grain_trainer(small):
    return Trainer(dataclasses.replace(CONFIG, loader="grain"), dataset=small, log=lambda s: None)


@pytest.fixture(scope="module")
def grain_straight(grain_trainer):
    return run_until(grain_trainer, grain_trainer.init_state())


def test_grain_equals_memory_bit_for_bit(small, grain_trainer, grain_straight):
    memory = Trainer(CONFIG, dataset=small, log=lambda s: None)
    memory._initial = grain_trainer.init_state()  # same model, seed and optimizer: skip a second init
    assert grain_trainer.train_images is None and memory.source is None  # grain never puts the split on device
    straight = run_until(memory, memory.init_state())
    assert (straight.epoch, straight.step) == (grain_straight.epoch, grain_straight.step) == (1, 0)
    chex.assert_trees_all_equal(grain_straight.stages, straight.stages)
    # training moved the parameters (the comparison is not between two untouched initial states)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(memory.init_state().stages[0].params, straight.stages[0].params)
    assert grain_trainer.evaluate(grain_straight.stages) == memory.evaluate(straight.stages)


class RecordingSource(ArraySource):
    """The same examples, noting which thread reads each batch."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.threads = []

    def read(self, indices):
        self.threads.append(threading.current_thread())
        return super().read(indices)


def test_grain_resume_mid_epoch_is_bit_identical(small, grain_trainer, grain_straight):
    grain_trainer.source = source = RecordingSource(small.train_images, small.train_labels)
    stopped = run_until(grain_trainer, grain_trainer.init_state(), stop_after_chunks=1)
    assert (stopped.epoch, stopped.step) == (0, 4)  # mid-epoch
    resumed = run_until(grain_trainer, stopped)  # only epoch and step say where the data stream continues
    chex.assert_trees_all_equal(resumed.stages, grain_straight.stages)
    assert (resumed.epoch, resumed.step) == (1, 0)
    # batches were read ahead on background threads, never by the thread running the steps
    assert len(source.threads) >= 4 + 5 and threading.main_thread() not in source.threads


def test_tfds_streams_under_mock_data():
    import tensorflow_datasets as tfds

    config = TrainConfig(dataset="cifar10", data_dir="/nonexistent/tfds", loader="grain", batch_size=4, epochs=1,
                         chunk_steps=2, eval_batch_size=12, validation=0.25, split=1, **TINY)  # fmt: skip
    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        source, evaluation, eval_source = load_train_source("cifar10", config.data_dir, validation=0.25)
        memory = load_dataset("cifar10", config.data_dir, validation=0.25)
        # the same validation split and normalisation as the in-memory path, read batch by batch
        assert len(source) == 9 and source.image_shape == (32, 32, 3) and evaluation.name == "cifar10[val]"
        assert eval_source is None and evaluation.test_images.shape == (3, 32, 32, 3)  # fixed sizes: in memory
        idx = np.array([8, 0, 3])
        x, y = source.read(idx)
        np.testing.assert_array_equal(x, memory.train_images[idx])
        np.testing.assert_array_equal(y, memory.train_labels[idx])
        np.testing.assert_array_equal(evaluation.test_images, memory.test_images)
        trainer = Trainer(config, log=lambda s: None)
        assert trainer.train_images is None and trainer.steps_per_epoch == 2
        events = list(trainer.fit(trainer.init_state()))
    assert [ev.steps for ev in events] == [2] and events[-1].state.epoch == 1
    assert all(np.isfinite(events[-1].train["loss"])) and len(events[-1].eval["accuracy"]) == trainer.num_stages


def test_bad_loader_names_the_accepted_ones(small):
    with pytest.raises(ValueError, match=r"loader 'disk' is not valid; expected one of \['memory', 'grain'\]"):
        Trainer(dataclasses.replace(CONFIG, loader="disk"), dataset=small)
    with pytest.raises(ValueError, match="loop 'scan' is not valid; expected 'auto' or 'dispatch' with loader"):
        Trainer(dataclasses.replace(CONFIG, loader="grain", loop="scan"), dataset=small)
    assert cli.main(["train", "--loader", "disk", "--no-progress", "--compilation-cache", "off"]) == 2


def test_memory_path_does_not_import_grain():
    code = "import sys, dgl_jax.cli, dgl_jax.trainer; assert 'grain' not in sys.modules, 'grain imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("executor", ["spmd", "threads"])
def test_grain_feeds_the_stage_parallel_pipeline_bit_for_bit(small, grain_trainer, grain_straight, executor):
    # the same batches and keys as the memory loader, so stage-parallel grain equals one-device grain as
    # stage-parallel memory equals one device (allclose: each stage's program is compiled on its own)
    config = dataclasses.replace(CONFIG, loader="grain", devices=2, parallel="stages", executor=executor)
    trainer = Trainer(config, dataset=small, log=lambda s: None)
    trainer._initial = grain_trainer.init_state()
    state = run_until(trainer, trainer.init_state())
    assert (state.epoch, state.step) == (1, 0) and trainer.wire_bytes["measured"] > 0
    chex.assert_trees_all_close(jax.device_get(state.stages), jax.device_get(grain_straight.stages), rtol=1e-5,
                                atol=1e-6)  # fmt: skip
