import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import drop_aux_heads, get_model, make_optimizer, with_optimizer
from dgl_jax.dni import dni_step, init_dni, synthesizer_stages

X = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
Y = jax.random.randint(jax.random.key(2), (16,), 0, 10)


def build(conditional, lr=1e-3):
    stages = with_optimizer(drop_aux_heads(get_model("small_cnn")), lambda j: make_optimizer("sgd", 0.05))
    synths = synthesizer_stages(len(stages) - 1, conditional=conditional, learning_rate=lr, width=16, kernel=3)
    states, synth_states = init_dni(stages, synths, jax.random.key(0), X)
    step = jax.jit(functools.partial(dni_step, stages, synths))
    return stages, synths, states, synth_states, step


@pytest.mark.parametrize("conditional", [False, True])
def test_synthesizer_learns_on_a_fixed_problem(conditional):
    _, _, states, synth_states, step = build(conditional)
    losses = []
    for _ in range(40):
        states, synth_states, m = step(states, synth_states, X, Y)
        losses.append(np.asarray(m["synth_loss"])[:-1])
    losses = np.stack(losses)
    assert np.isfinite(losses).all()
    # Regression error of each synthesizer falls (first steps: zero prediction vs the true gradient).
    assert (losses[-5:].mean(0) < 0.5 * losses[1:4].mean(0)).all(), losses[[1, 2, 3, -3, -2, -1]]
    assert float(m["loss"][-1]) < 2.3


def test_synthetic_gradients_move_the_lower_blocks():
    stages = with_optimizer(
        drop_aux_heads(get_model("small_cnn")), lambda j: make_optimizer("sgd", 0.05, weight_decay=0.0)
    )
    synths = synthesizer_stages(2, learning_rate=1e-3, width=16, kernel=3)
    states, synth_states = init_dni(stages, synths, jax.random.key(0), X)
    step = jax.jit(functools.partial(dni_step, stages, synths))
    first, synth_states, _ = step(states, synth_states, X, Y)
    # Zero-initialised synthesizers give zero gradients: without weight decay block 0 does not move...
    chex.assert_trees_all_equal(first[0].params, states[0].params)
    # ...the last stage, trained on the true loss, does; and once the synthesizers have learned, block 0 too.
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), first[2].params, states[2].params)))
    later = first
    for _ in range(3):
        later, synth_states, _ = step(later, synth_states, X, Y)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), later[0].params, states[0].params)
    assert max(jax.tree.leaves(moved)) > 0


def test_cdni_uses_labels():
    _, synths, states, synth_states, step = build(True)
    for _ in range(5):
        states, synth_states, _ = step(states, synth_states, X, Y)
    h = jax.random.normal(jax.random.key(5), (16, 8, 8, 32))
    a = synths[0].block.apply({"params": synth_states[0].params}, h, Y)
    b = synths[0].block.apply({"params": synth_states[0].params}, h, (Y + 1) % 10)
    assert float(jnp.abs(a - b).max()) > 0
    chex.assert_shape(a, h.shape)


def test_dni_refuses_aux_heads_and_wrong_synth_count():
    stages = with_optimizer(get_model("small_cnn"), lambda j: make_optimizer("sgd", 0.05))
    synths = synthesizer_stages(2, width=8, kernel=3)
    with pytest.raises(ValueError, match="one synthesizer per boundary: 2, got 1"):
        init_dni(stages, synths[:1], jax.random.key(0), X)
    states, ss = init_dni(stages, synths, jax.random.key(0), X)
    with pytest.raises(ValueError, match="drop_aux_heads"):
        dni_step(stages, synths, states, ss, X, Y)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_methods_train_through_the_trainer(method):
    from dgl_jax.trainer import TrainConfig, Trainer

    config = TrainConfig(method=method, epochs=1, method_options={"synth_width": 8, "synth_kernel": 3})
    trainer = Trainer(config, log=lambda s: None)
    event = list(trainer.fit(trainer.init_state()))[-1]
    assert len(event.state.extra["synth"]) == 2
    assert np.isfinite(event.train["loss"][-1]) and np.isnan(event.train["loss"][0])
    assert event.eval["accuracy"][-1] > 0.3  # one epoch on digits; chance is 0.1
    with pytest.raises(ValueError, match=r"unknown dni options \['bogus'\]"):
        Trainer(TrainConfig(method="dni", method_options={"bogus": 1}))
