"""Learning actually happens: the 3-stage DGL CNN, its backprop baseline and sequential greedy training all
reach >= 95% test accuracy on scikit-learn's real digits within a CI-sized budget."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import (
    backprop_step,
    dgl_step,
    drop_aux_heads,
    evaluate_batch,
    get_model,
    init_stage_states,
    make_optimizer,
    sequential_step,
    with_optimizer,
)

EPOCHS, BATCH = 12, 64


def batches(n, epoch):
    perm = np.random.default_rng(epoch).permutation(n)
    return [perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]


@pytest.mark.parametrize("method", ["dgl", "backprop", "sequential"])
def test_three_stage_cnn_learns_digits(digits, method):
    steps = len(digits.train_labels) // BATCH
    stages = get_model("small_cnn")
    stages = drop_aux_heads(stages) if method == "backprop" else stages
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", 0.05, steps_per_epoch=steps, decay_epochs=8))
    states = init_stage_states(stages, jax.random.key(0), jnp.asarray(digits.train_images[:1]))
    x, y = jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels)
    if method == "sequential":
        step = jax.jit(functools.partial(sequential_step, stages), static_argnums=1)
        schedule = [(j, e) for j in range(len(stages)) for e in range(EPOCHS)]
    else:
        fn = dgl_step if method == "dgl" else backprop_step
        step = jax.jit(functools.partial(fn, stages))
        schedule = [(None, e) for e in range(EPOCHS)]
    for j, epoch in schedule:
        for idx in batches(len(y), epoch):
            args = (states, x[idx], y[idx]) if j is None else (states, j, x[idx], y[idx])
            states, metrics = step(*args)
    assert np.isfinite(np.asarray(metrics["loss"])).any()
    out = jax.jit(functools.partial(evaluate_batch, stages))(
        states, jnp.asarray(digits.test_images), jnp.asarray(digits.test_labels)
    )
    acc = np.asarray(out.per_head) / len(digits.test_labels)
    print(method, "test accuracy per head", acc, "ensemble", int(out.ensemble) / len(digits.test_labels))
    assert acc[-1] >= 0.95
    if method != "backprop":
        assert (acc >= 0.85).all()  # every auxiliary head is a real classifier too
