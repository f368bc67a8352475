"""The stage contract: PRNG keys reach stochastic layers (per step and per stage), any local loss, pytree
messages through every executor, codecs checked at init, and one-line errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_until

import dgl_jax
from dgl_jax import Stage, dgl_step, greedy_loss, init_stage_states, with_codec
from dgl_jax.codecs import Codec, cast, vq

X = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
Y = jax.random.randint(jax.random.key(2), (16,), 0, 10)


class Noise(nn.Module):
    """Train mode: uniform noise from the 'dropout' stream (so the key each stage gets is visible)."""

    @nn.compact
    def __call__(self, x, train):
        h = nn.Conv(4, (3, 3))(x)
        return jax.random.uniform(self.make_rng("dropout"), h.shape) if train else h


class DropBlock(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3))(x)))
        return nn.Dropout(0.3, deterministic=not train)(x)


class Head(nn.Module):
    out: int = 10

    @nn.compact
    def __call__(self, x, train):
        x = x["feat"] if isinstance(x, dict) else x
        return nn.Dense(self.out)(jnp.mean(x, axis=(1, 2)))


class DictBlock(nn.Module):
    """A block whose message is a pytree: ``{'feat': [B, H, W, C], 'pooled': [B, C]}``."""

    width: int = 8

    @nn.compact
    def __call__(self, x, train):
        if isinstance(x, dict):
            x = x["feat"] + nn.Dense(x["feat"].shape[-1])(x["pooled"])[:, None, None, :]
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        return {"feat": h, "pooled": jnp.mean(h, axis=(1, 2))}


def sgd():
    return optax.sgd(0.05, momentum=0.9)


def test_key_reaches_each_stage_and_differs_per_stage():
    stages = [Stage(Noise(), Head(), tx=sgd()), Stage(Noise(), Head(), tx=sgd())]
    states = init_stage_states(stages, jax.random.key(0), X)
    ms = [s.model_state for s in states]
    _, outs = greedy_loss(stages, [s.params for s in states], ms, X, Y, key=jax.random.key(5))
    _, again = greedy_loss(stages, [s.params for s in states], ms, X, Y, key=jax.random.key(5))
    _, other = greedy_loss(stages, [s.params for s in states], ms, X, Y, key=jax.random.key(6))
    f0, f1 = outs[0].out.features, outs[1].out.features
    assert not np.allclose(f0, f1), "both stages drew the same random numbers"
    np.testing.assert_array_equal(f0, again[0].out.features)
    assert not np.allclose(f0, other[0].out.features)
    with pytest.raises(ValueError, match="pass key") as e:
        greedy_loss(stages, [s.params for s in states], ms, X, Y)
    assert "\n" not in str(e.value)


def test_dropout_model_through_dgl_step():
    stages = [Stage(DropBlock(), Head(), tx=sgd()), Stage(DropBlock(), Head(), tx=sgd())]
    states = init_stage_states(stages, jax.random.key(0), X)
    step = jax.jit(functools.partial(dgl_step, stages))
    a, ma = step(states, X, Y, jax.random.key(1))
    b, mb = step(states, X, Y, jax.random.key(1))
    c, mc = step(states, X, Y, jax.random.key(2))
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(ma["loss"], mc["loss"])  # a different step key: other dropout masks
    # stage j's update equals the local update with fold_in(key, j): per-stage keys
    st0, _, m0 = dgl_jax.stage_step(stages[0], states[0], X, Y, jax.random.fold_in(jax.random.key(1), 0))
    np.testing.assert_allclose(m0["loss"], ma["loss"][0], rtol=1e-6)
    chex.assert_trees_all_close(st0.params, a[0].params, rtol=1e-6, atol=1e-7)


def test_dropout_model_in_the_trainer_resumes_bit_identically(small):
    from dgl_jax.models import MODELS, register_model
    from dgl_jax.trainer import TrainConfig, Trainer

    def build(num_classes=10, dtype=jnp.float32, **_):
        return [Stage(DropBlock(), Head(num_classes), layers=("a",)), Stage(DropBlock(16), Head(num_classes))]

    register_model("test_dropout_cnn", build)
    try:
        trainer = Trainer(TrainConfig(model="test_dropout_cnn", epochs=2, chunk_steps=4), dataset=small,
                          log=lambda s: None)  # fmt: skip
        straight = run_until(trainer, trainer.init_state())
        stopped = run_until(trainer, trainer.init_state(), stop_after_chunks=3)
        resumed = run_until(trainer, stopped)
        chex.assert_trees_all_equal(resumed.stages, straight.stages)
        with pytest.raises(AssertionError):  # and training changed the parameters
            chex.assert_trees_all_equal(straight.stages[0].params, trainer.init_state().stages[0].params)
    finally:
        MODELS.pop("test_dropout_cnn", None)


def test_custom_loss_regression_targets():
    def mse_head(out, targets):
        return dgl_jax.mse(out, targets["y"])

    stages = [Stage(DropBlock(), Head(3), tx=sgd(), loss_fn=mse_head), Stage(DropBlock(), Head(3), tx=sgd(),
              loss_fn=mse_head)]  # fmt: skip
    targets = {"y": jax.random.normal(jax.random.key(3), (16, 3))}
    states = init_stage_states(stages, jax.random.key(0), X)
    step = jax.jit(functools.partial(dgl_step, stages))
    first = None
    for i in range(30):
        states, m = step(states, X, targets, jax.random.key(i))
        first = m["loss"] if first is None else first
    assert np.isnan(m["accuracy"]).all()  # not a classifier
    assert (m["loss"] < first).all()
    out = dgl_jax.evaluate_batch(stages, states, X, targets)
    assert np.isfinite(out.loss).all()


def test_non_scalar_loss_is_one_line_naming_the_stage():
    stages = [Stage(DropBlock(), Head(), tx=sgd()), Stage(DropBlock(), Head(), tx=sgd(), loss_fn=lambda o, t: o)]
    states = init_stage_states(stages, jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"stage 1: loss_fn .* must be a scalar") as e:
        dgl_step(stages, states, X, Y, jax.random.key(0))
    assert "\n" not in str(e.value)


def test_codec_decoding_to_another_shape_is_one_line_naming_the_boundary():
    bad = Codec(lambda m, key=None: (), lambda s, m, key=None: (s, m[..., :2]), lambda w: w, "truncating")
    stages = with_codec([Stage(DropBlock(), Head()), Stage(DropBlock(), Head())], bad)
    with pytest.raises(ValueError, match="boundary 0 -> 1: codec truncating decodes to") as e:
        init_stage_states(stages, jax.random.key(0), X)
    assert "\n" not in str(e.value)


def test_init_needs_no_optimizer_and_takes_shape_structs():
    stages = [Stage(DictBlock(), Head()), Stage(DictBlock(), Head())]
    spec = jax.ShapeDtypeStruct(X.shape, X.dtype)
    states = init_stage_states(stages, jax.random.key(0), spec)
    assert states[0].opt_state == () and isinstance(dgl_jax.message_specs(stages, states, spec)[0], dict)


def _pytree_setup(codec=None):
    stages = [Stage(DictBlock(), Head(), tx=sgd()) for _ in range(3)]
    if codec is not None:
        stages = with_codec(stages, codec)
    return stages, init_stage_states(stages, jax.random.key(0), X)


@pytest.mark.parametrize("codec", [None, "bfloat16"], ids=["float32", "bfloat16"])
def test_pytree_message_through_pipelined_and_spmd_equals_dgl_step(codec):
    from dgl_jax.parallel import PipelinedDGL, SpmdPipeline, make_placement

    stages, states = _pytree_setup(cast() if codec else None)
    batches = [(X, Y), (X * 0.5, (Y + 1) % 10), (-X, Y)]
    key = jax.random.key(7)

    def trained(stages, states):  # dgl_step over the batches, batch t with fold_in(key, t)
        step = jax.jit(functools.partial(dgl_step, stages))
        for t, (x, y) in enumerate(batches):
            states, _ = step(states, x, y, jax.random.fold_in(key, t))
        return states

    ref = trained(stages, states)

    # float32: reassociation only. bfloat16: an executor's float32 rounding (1e-7) can move a message element
    # across a bfloat16 rounding boundary, one bfloat16 ulp (2^-8 relative), which the next stage's gradient
    # carries (up to 3e-4 relative seen on an AMD EPYC); dropping the codec moves leaves by far more (checked)
    tol = {"rtol": 1e-5, "atol": 1e-6} if codec is None else {"rtol": 2e-3, "atol": 1e-5}
    if codec is not None:  # the looser tolerance still tells the codec from float32 messages
        plain = trained(*_pytree_setup())
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(jax.device_get(plain), jax.device_get(ref), **tol)
    pipe = PipelinedDGL(stages, make_placement(3, jax.devices()[:3]))
    placed = pipe.place(states)
    pipe.compile(placed, X, Y)
    got, metrics = pipe.run(placed, batches, key)
    assert metrics["loss"].shape == (3, 3)
    chex.assert_trees_all_close(jax.device_get(got), jax.device_get(ref), **tol)

    mesh = jax.make_mesh((3,), ("stage",), devices=jax.devices()[:3])
    spmd = SpmdPipeline(stages, mesh, states, X, Y)
    st, _ = spmd.run(spmd.init(states), batches, key)
    chex.assert_trees_all_close(spmd.unpack(st), jax.device_get(ref), **tol)


def test_packed_vq_codes_cross_the_spmd_wire_as_uint8_and_match_dgl_step():
    from dgl_jax.parallel import SpmdPipeline

    stages = with_codec([Stage(_Plain(), Head(), tx=sgd()) for _ in range(2)], vq(16, code_dim=4, packed=True))
    states = init_stage_states(stages, jax.random.key(0), X)
    batches = [(X, Y), (X * 0.5, Y)]
    key = jax.random.key(3)
    ref = states
    for t, (x, y) in enumerate(batches):
        ref, _ = dgl_step(stages, ref, x, y, jax.random.fold_in(key, t))
    mesh = jax.make_mesh((2,), ("stage",), devices=jax.devices()[:2])
    spmd = SpmdPipeline(stages, mesh, states, X, Y)
    wire = spmd.wire_specs[0]
    assert wire.codes.data.dtype == jnp.uint8  # packed 4-bit codes, not float32
    st, _ = spmd.run(spmd.init(states), batches, key)
    assert st.inbox[0][0].codes.data.dtype == jnp.uint8
    chex.assert_trees_all_close(spmd.unpack(st), jax.device_get(ref), rtol=1e-5, atol=1e-6)
    from dgl_jax.accounting import nbytes

    assert spmd.wire_bytes()[0] == nbytes(wire) + nbytes(Y) + nbytes(jax.random.key_data(key)) + 1  # + valid flag
    assert spmd.measured_wire_bytes(st) == spmd.wire_bytes()[0]  # from the compiled program's collective-permutes


class _Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.relu(nn.Conv(8, (3, 3))(x))


# ----------------------------------------------------------------------------------------------------------
# A head that reads its stage's wire (Stage.head_reads_wire)
# ----------------------------------------------------------------------------------------------------------
def _wire_reading_setup(reads: bool = True):
    import dataclasses

    stages = with_codec([Stage(_Plain(), Head(), tx=sgd()) for _ in range(2)], vq(16, code_dim=4, packed=True))
    stages = [dataclasses.replace(s, head_reads_wire=reads) for s in stages]
    return stages, init_stage_states(stages, jax.random.key(0), X)


def test_a_head_reading_its_wire_trains_on_the_decoded_wire_straight_through_to_its_block():
    """Stage 0's loss is its head on decode(wire); the head's gradient is taken there, and the block's is that
    gradient (w.r.t. the head's input) pulled back through the block, as if the quantizer were the identity."""
    from dgl_jax.objective import split_key, stage_key

    stages, states = _wire_reading_setup()
    params, ms, cs = [s.params for s in states], [s.model_state for s in states], [s.codec for s in states]
    key = jax.random.key(4)
    grads, outs = jax.grad(lambda p: greedy_loss(stages, p, ms, X, Y, True, cs, key), has_aux=True)(params)

    # by hand: the block's features, the wire the codec sends, the head's loss at the decoded wire
    k_layers, k_codec = split_key(stage_key(key, 0))
    block = lambda pb: _Plain().apply({"params": pb}, X, True)  # noqa: E731
    feats = block(params[0]["block"])
    _, wire = stages[0].codec.encode(cs[0], feats, k_codec)
    q = stages[0].codec.decode(wire)
    head_loss = lambda ph, h: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        Head().apply({"params": ph}, h, True), Y
    ).mean()
    loss, (g_head, g_q) = jax.value_and_grad(head_loss, argnums=(0, 1))(params[0]["head"], q)
    g_block = jax.vjp(block, params[0]["block"])[1](g_q)[0]
    np.testing.assert_allclose(outs[0].loss, loss, rtol=1e-6)
    chex.assert_trees_all_close(grads[0]["head"], g_head, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads[0]["block"], g_block, rtol=1e-5, atol=1e-7)
    assert not np.allclose(q, feats, atol=1e-3)  # the quantizer does change what the head reads
    chex.assert_trees_all_equal(outs[0].wire, wire)  # what it reads is what it sends
    # the float head reads the features instead: another loss and other gradients
    plain_stages, _ = _wire_reading_setup(reads=False)
    plain, outs_plain = jax.grad(lambda p: greedy_loss(plain_stages, p, ms, X, Y, True, cs, key), has_aux=True)(params)
    assert not np.allclose(outs_plain[0].loss, loss)
    assert not np.allclose(plain[0]["block"]["Conv_0"]["kernel"], g_block["Conv_0"]["kernel"])
    chex.assert_trees_all_equal(plain[1], grads[1])  # the last stage sends nothing: unchanged
    chex.assert_trees_all_equal(outs_plain[0].wire, wire)  # the same wire either way (pre-update params)


def test_a_head_reading_its_wire_is_the_same_step_in_dgl_step_greedy_loss_spmd_and_the_sweep():
    from dgl_jax.parallel import SpmdPipeline
    from dgl_jax.steps import apply_updates
    from dgl_jax.vq_train import VQConfig, boundary_codec, init_vq, vq_dgl_step

    stages, states = _wire_reading_setup()
    key = jax.random.key(3)
    ref, _ = dgl_step(stages, states, X, Y, key)
    # greedy_loss's gradients, applied, give dgl_step's states
    params, ms, cs = [s.params for s in states], [s.model_state for s in states], [s.codec for s in states]
    grads, outs = jax.grad(lambda p: greedy_loss(stages, p, ms, X, Y, True, cs, key), has_aux=True)(params)
    for j in range(2):
        st = apply_updates(stages[j], states[j], grads[j], outs[j].out.model_state)
        chex.assert_trees_all_close(st.params, ref[j].params, rtol=1e-6, atol=1e-7)
    # the SPMD pipeline runs the same stage step
    mesh = jax.make_mesh((2,), ("stage",), devices=jax.devices()[:2])
    spmd = SpmdPipeline(stages, mesh, states, X, Y)
    st, _ = spmd.run(spmd.init(states), [(X, Y)], key)
    want, _ = dgl_step(stages, states, X, Y, jax.random.fold_in(key, 0))
    chex.assert_trees_all_close(spmd.unpack(st), jax.device_get(want), rtol=1e-5, atol=1e-6)
    # the sweep's step (vq_train) trains the head on its wire too: same params as dgl_step on its codec
    cfg = VQConfig(num_codes=16, code_dim=4)
    plain = [Stage(s.block, s.head, tx=s.tx, head_reads_wire=True) for s in stages]
    sweep_states = init_vq(plain, [s._replace(codec=()) for s in states], cfg, jax.random.key(9), X)
    got, _ = vq_dgl_step(plain, cfg, sweep_states, X, Y, key)
    coded = with_codec(plain, boundary_codec(cfg))
    want, _ = dgl_step(coded, sweep_states, X, Y, key)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    flat, _ = vq_dgl_step([Stage(s.block, s.head, tx=s.tx) for s in plain], cfg, sweep_states, X, Y, key)
    assert not np.allclose(flat[0].params["block"]["Conv_0"]["kernel"], got[0].params["block"]["Conv_0"]["kernel"])


def test_a_head_reading_its_wire_is_scored_on_the_decoded_wire():
    from dgl_jax.steps import evaluate_batch

    stages, states = _wire_reading_setup()
    states, _ = dgl_step(stages, states, X, Y, jax.random.key(1))  # a seeded codebook
    feats = _Plain().apply({"params": states[0].params["block"]}, X, False)
    sent = stages[0].codec.decode(stages[0].codec.encode(states[0].codec, feats)[1])
    logits = {"sent": Head().apply({"params": states[0].params["head"]}, sent, False),
              "feats": Head().apply({"params": states[0].params["head"]}, feats, False)}  # fmt: skip
    hits = {k: int(jnp.sum(jnp.argmax(v, -1) == Y)) for k, v in logits.items()}
    got = evaluate_batch(stages, states, X, Y)
    plain = evaluate_batch(_wire_reading_setup(reads=False)[0], states, X, Y)
    assert int(got.per_head[0]) == hits["sent"] and int(plain.per_head[0]) == hits["feats"]
    np.testing.assert_allclose(
        got.loss[0], optax.softmax_cross_entropy_with_integer_labels(logits["sent"], Y).sum(), rtol=1e-5
    )
    assert not np.allclose(got.loss[0], plain.loss[0])
    assert int(got.per_head[1]) == int(plain.per_head[1])  # the last head reads the same decoded message
