import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgl_jax import (
    backprop_step,
    dgl_step,
    drop_aux_heads,
    evaluate_batch,
    forward_features,
    get_model,
    greedy_loss,
    init_stage_states,
    make_optimizer,
    sequential_step,
    stage_apply,
    stage_loss,
    with_optimizer,
)

X = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
Y = jax.random.randint(jax.random.key(2), (16,), 0, 10)


def build(method="dgl", lr=0.05, dtype=jnp.float32, model="small_cnn", key=0, steps_per_epoch=10):
    stages = get_model(model, dtype=dtype)
    if method == "backprop":
        stages = drop_aux_heads(stages)
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", lr, steps_per_epoch=steps_per_epoch))
    return stages, init_stage_states(stages, jax.random.key(key), X)


def test_no_gradient_crosses_a_stage():
    stages, states = build()
    params = [s.params for s in states]
    stats = [s.model_state for s in states]

    def losses(params):  # [K]: every stage's own loss
        return jnp.stack([out[0] for out in greedy_loss(stages, params, stats, X, Y)[1]])

    jac = jax.jit(jax.jacrev(losses))(params)  # per stage i, leaves [K, *param_shape]: d loss_j / d params_i
    for i, g in enumerate(jac):
        norms = np.max(np.stack([np.abs(np.asarray(x)).reshape(len(stages), -1).max(1) for x in jax.tree.leaves(g)]), 0)
        for j in range(len(stages)):
            if i == j:
                assert norms[j] > 0, f"stage {j} gets no gradient from its own loss"
            else:
                assert norms[j] == 0.0, f"stage {j}'s loss reaches stage {i}'s params"


def test_greedy_loss_gradient_is_the_list_of_local_gradients():
    stages, states = build()
    params = [s.params for s in states]
    stats = [s.model_state for s in states]
    total_grads = jax.jit(jax.grad(lambda p: greedy_loss(stages, p, stats, X, Y)[0]))(params)
    x = X
    for j, stage in enumerate(stages):
        g = jax.jit(jax.grad(lambda p, x, stage=stage, j=j: stage_loss(stage, p, stats[j], x, Y)[0]))(params[j], x)
        # two compiled programs: equal up to float reassociation (~2e-7 absolute), never across stages
        chex.assert_trees_all_close(total_grads[j], g, rtol=1e-5, atol=1e-6)
        x = jax.jit(lambda p, s, x, stage=stage: stage_apply(stage, p, s, x).features)(params[j], stats[j], x)


def test_dgl_step_equals_independent_per_stage_updates():
    stages, states = build()
    new_states, metrics = jax.jit(functools.partial(dgl_step, stages))(states, X, Y)
    # Reference: stage j's input is computed from the *pre-update* params of stages < j, then each stage is
    # updated on its own with plain optax calls.
    x = X
    for j, (stage, st) in enumerate(zip(stages, states)):
        (loss, out), g = jax.value_and_grad(stage_loss, argnums=1, has_aux=True)(stage, st.params, st.model_state, x, Y)
        upd, opt = stage.tx.update(g, st.opt_state, st.params)
        # jitted vs eager rounding: gradients agree to ~1e-6 absolute (both ~1.5e-7 of scale from float64)
        chex.assert_trees_all_close(new_states[j].params, optax.apply_updates(st.params, upd), rtol=1e-5, atol=5e-6)
        chex.assert_trees_all_close(new_states[j].opt_state, opt, rtol=1e-5, atol=5e-6)
        chex.assert_trees_all_close(new_states[j].model_state, out.model_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"][j], loss, rtol=1e-5)
        assert int(new_states[j].step) == 1
        x = stage_apply(stage, st.params, st.model_state, x).features
    chex.assert_shape((metrics["loss"], metrics["accuracy"]), (len(stages),))


def test_backprop_step_reaches_every_stage_and_refuses_aux_heads():
    stages, states = build("backprop")
    new_states, metrics = jax.jit(functools.partial(backprop_step, stages))(states, X, Y)
    for old, new in zip(states, new_states):
        assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old.params, new.params)))
    assert np.isnan(metrics["loss"][:-1]).all() and np.isfinite(metrics["loss"][-1])
    dgl_stages, dgl_states = build()
    with pytest.raises(ValueError, match="drop_aux_heads"):
        backprop_step(dgl_stages, dgl_states, X, Y)


def test_sequential_step_freezes_lower_stages_and_cached_features_agree():
    stages, states = build()
    step = jax.jit(functools.partial(sequential_step, stages), static_argnums=1, static_argnames="features")
    new_states, metrics = step(states, 1, X, Y)
    chex.assert_trees_all_equal(new_states[0], states[0])
    chex.assert_trees_all_equal(new_states[2], states[2])
    assert int(new_states[1].step) == 1 and np.isnan(metrics["loss"][0]) and np.isfinite(metrics["loss"][1])
    cached = forward_features(stages[:1], states[:1], X)
    from_cache, _ = step(states, 1, cached, Y, features=True)
    chex.assert_trees_all_close(from_cache[1], new_states[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="stage_index 3 out of range"):
        sequential_step(stages, states, 3, X, Y)


def test_evaluate_batch_one_pass_matches_per_head_reruns():
    stages, states = build()
    out = jax.jit(functools.partial(evaluate_batch, stages))(states, X, Y)
    for j in range(len(stages)):
        h = forward_features(stages[:j], states[:j], X)
        logits = stage_apply(stages[j], states[j].params, states[j].model_state, h, train=False).output
        assert int(out.per_head[j]) == int(jnp.sum(jnp.argmax(logits, -1) == Y))
    assert 0 <= int(out.ensemble) <= X.shape[0]


def test_lr_schedule_decays_without_losing_momentum():
    tx, schedule = make_optimizer("sgd", 0.1, steps_per_epoch=10, decay_epochs=15, decay_factor=0.2)
    assert float(schedule(149)) == pytest.approx(0.1) and float(schedule(150)) == pytest.approx(0.02)
    tx2, schedule2 = make_optimizer("sgd", 0.1, steps_per_epoch=10, decay_epochs=[150, 225], decay_factor=0.1)
    assert float(schedule2(2250)) == pytest.approx(0.001)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(151):  # crossing the drop keeps the same optimizer state (momentum trace)
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert float(state[1][0].trace["w"][0]) > 1.0


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"learning_rate": -0.1}, "learning_rate must be > 0"),
        ({"name": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
    ],
)
def test_bad_optimizer_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_optimizer(**kwargs)


def test_bfloat16_compute_keeps_float32_params():
    stages, states = build(dtype=jnp.bfloat16)
    new_states, metrics = jax.jit(functools.partial(dgl_step, stages))(states, X, Y)
    chex.assert_trees_all_equal_dtypes(new_states[0].params, states[0].params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_states[1].params))
    assert np.isfinite(np.asarray(metrics["loss"])).all()


def test_same_seed_same_result_bit_for_bit():
    stages, _ = build(key=3)
    step = jax.jit(functools.partial(dgl_step, stages))
    runs = []
    for _ in range(2):  # two independent initialisations and runs from the same seed
        _, states = build(key=3)
        for _ in range(3):
            states, _ = step(states, X, Y)
        runs.append(states)
    chex.assert_trees_all_equal(runs[0], runs[1])
    _, other = build(key=4)
    assert not all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), runs[0][0].params, other[0].params))
    )


def test_mismatched_states_are_rejected():
    stages, states = build()
    with pytest.raises(ValueError, match="3 stages but 2 states"):
        dgl_step(stages, states[:2], X, Y)
