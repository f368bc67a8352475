"""Trainer: bit-identical resume through orbax checkpoints (mid-epoch, across sequential phases), padded and
masked evaluation, the method registry as an extension point, the data order and the dropped-batch note."""

import dataclasses

import chex
import jax
import numpy as np
import pytest
from conftest import run_until

from dgl_jax.checkpoint import Checkpointer, state_tree
from dgl_jax.input_pipeline import epoch_order
from dgl_jax.methods import METHODS, Method, register_method
from dgl_jax.steps import dgl_step, evaluate_batch
from dgl_jax.trainer import TrainConfig, Trainer, config_from_dict, config_to_dict


def checkpoint_roundtrip(tmp_path, trainer, state):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    ck.save(state.epoch * trainer.steps_per_epoch + state.step, state_tree(state.stages, state.extra, state.key),
            {"epoch": state.epoch, "step": state.step})  # fmt: skip
    fresh = trainer.init_state()
    tree, meta = Checkpointer(tmp_path / "ck").restore(state_tree(fresh.stages, fresh.extra, fresh.key))
    return fresh._replace(stages=tree["stages"], extra=tree["extra"], key=jax.random.wrap_key_data(tree["key"]),
                          epoch=meta["epoch"], step=meta["step"])  # fmt: skip


@pytest.fixture(scope="module")
def dgl_trainer(small):
    """Shared by the tests (one model init and one compilation of the step for the module)."""
    config = TrainConfig(epochs=3, chunk_steps=4, decay_epochs=(2,), eval_batch_size=100)
    return Trainer(config, dataset=small, log=lambda s: None)


@pytest.mark.parametrize(
    "method,epochs,stop", [("dgl", 3, 5), ("sequential", 1, 4)], ids=["dgl-mid-epoch", "sequential-next-phase"]
)
def test_resume_is_bit_identical(small, dgl_trainer, tmp_path, method, epochs, stop):
    # 600 // 64 = 9 steps per epoch in chunks of 4: stopping after 5 chunks is mid-epoch 2 (dgl) / in phase 2
    config = dataclasses.replace(dgl_trainer.config, method=method, epochs=epochs)
    trainer = dgl_trainer if method == "dgl" else Trainer(config, dataset=small, log=lambda s: None)
    trainer._initial = dgl_trainer.init_state()  # same model, seed and optimizer: skip a second init
    straight = run_until(trainer, trainer.init_state())
    assert straight.epoch == trainer.total_epochs and straight.step == 0
    stopped = run_until(trainer, trainer.init_state(), stop_after_chunks=stop)
    assert 0 < stopped.epoch * trainer.steps_per_epoch + stopped.step < trainer.total_epochs * 9
    resumed = run_until(trainer, checkpoint_roundtrip(tmp_path, trainer, stopped))
    chex.assert_trees_all_equal(resumed.stages, straight.stages)
    chex.assert_trees_all_equal(resumed.extra, straight.extra)
    assert (resumed.epoch, resumed.step) == (straight.epoch, straight.step)
    # and training did something: the final states differ from the initial ones
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(trainer.init_state().stages[0].params, straight.stages[0].params)


def test_evaluate_pads_and_masks_the_last_batch(small, dgl_trainer):
    trainer = dgl_trainer
    state = run_until(trainer, trainer.init_state(), stop_after_chunks=1)
    out = trainer.evaluate(state.stages)  # 359 = 3 x 100 + 59: the last batch is padded with 41 rows
    ref = jax.jit(lambda st, x, y: evaluate_batch(trainer.stages, st, x, y))(
        state.stages, small.test_images, small.test_labels
    )
    np.testing.assert_allclose(out["accuracy"], np.asarray(ref.per_head) / 359, rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["loss"], np.asarray(ref.loss) / 359, rtol=1e-5)
    assert out["ensemble"] == pytest.approx(float(ref.ensemble) / 359)


def test_data_order_and_dropped_examples_note(small):
    trainer = Trainer(TrainConfig(batch_size=64, epochs=1), dataset=small, log=lambda s: None)
    assert trainer.steps_per_epoch == 9 and trainer.used_per_epoch == 576
    assert "576 used per epoch" in trainer.describe() and "last 24" in trainer.describe()
    key = jax.random.key(0)
    p0, _ = epoch_order(key, 0, 600)
    p0b, _ = epoch_order(key, 0, 600)
    p1, _ = epoch_order(key, 1, 600)
    np.testing.assert_array_equal(p0, p0b)
    assert not np.array_equal(p0, p1)
    assert sorted(np.asarray(p1).tolist()) == list(range(600))


def test_registered_method_plugs_in(small, dgl_trainer):
    calls = []

    def make_step(stages, config, phase, features):
        calls.append(config.method_options["tag"])

        def step(states, extra, x, y, key):
            states, m = dgl_step(stages, states, x, y)
            return (
                states,
                {"count": extra["count"] + 1},
                {"loss": m["loss"], "accuracy": m["accuracy"], "extra": m["loss"][0]},
            )

        return step

    def validate(config):
        if "tag" not in config.method_options:
            raise ValueError("method 'counting_dgl' needs method option 'tag'")

    init_extra = lambda *a: {"count": jax.numpy.zeros((), "int32")}  # noqa: E731
    register_method(Method("counting_dgl", "dgl that counts its steps", make_step, init_extra=init_extra,
                           validate=validate))  # fmt: skip
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_method(METHODS["counting_dgl"])
        with pytest.raises(ValueError, match="needs method option 'tag'"):
            Trainer(TrainConfig(method="counting_dgl"), dataset=small)
        config = dataclasses.replace(dgl_trainer.config, method="counting_dgl", epochs=1, method_options={"tag": "x"})
        trainer = Trainer(config, dataset=small, log=lambda s: None)
        state = dgl_trainer.init_state()._replace(extra=trainer.method.init_extra())
        events = list(trainer.fit(state))
        assert int(events[-1].state.extra["count"]) == 9 and calls == ["x"]
        assert np.isfinite(events[0].train["extra"])
        assert events[-1].eval is not None and len(events[-1].eval["accuracy"]) == 3
    finally:
        METHODS.pop("counting_dgl", None)


def test_config_roundtrip_and_validation(small):
    c = TrainConfig(split=(1, 2), decay_epochs=(3, 5), method_options={"a": 1})
    assert config_from_dict(config_to_dict(c)) == c
    with pytest.raises(ValueError, match="unknown config keys"):
        config_from_dict({"nope": 1})
    for bad, match in [
        (dict(method="magic"), "method 'magic'.*dgl"),
        (dict(lr=-0.1), "learning rate -0.1"),
        (dict(batch_size=601), "batch size 601 is larger than the 600"),
        (dict(split=9), "K=9 stages requested but the model has 3 units"),
        (dict(loop="threads"), "loop 'threads'"),
    ]:
        with pytest.raises(ValueError, match=match):
            Trainer(dataclasses.replace(TrainConfig(), **bad), dataset=small)
