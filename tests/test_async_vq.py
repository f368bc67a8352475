"""Asynchronous DGL with a VQ codec on the stages (dgl_jax.asynchronous + dgl_jax.codecs.vq): the replay buffers
hold packed codes plus the codebook they refer to, and their bytes (dgl_jax.accounting) are what they hold."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import accounting, codecs, init_stage_states, make_optimizer, vq, with_codec, with_optimizer
from dgl_jax import asynchronous as A
from dgl_jax.models import cifar_cnn
from dgl_jax.steps import local_update, stage_step

B = 16
CODEC = codecs.vq(16, code_dim=4, packed=True)  # stage 0 sends [B, 8, 8, 8]: 2 groups of 4 channels, 4 bits
PACKED = 8 * 8 * 2 * 4 // 8  # bytes of one example's codes
BOOK = 2 * 16 * 4 * 4  # float32 codebook [G, K, d]


@pytest.fixture(scope="module")
def data(digits):
    x = jnp.asarray(digits.train_images[: 4 * B])  # [64, 8, 8, 1]
    y = jnp.asarray(digits.train_labels[: 4 * B])
    return x, y


@pytest.fixture(scope="module")
def model(data):
    # 2 stages: conv 8 (8x8) | maxpool, conv 16 (4x4); linear heads: one small program per run length
    stages = cifar_cnn((8, 16), (1,), split=2, head="linear", last_head_depth=0)
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", 0.1, steps_per_epoch=100))
    stages = with_codec(stages, CODEC)
    return stages, init_stage_states(stages, jax.random.key(0), data[0][:B])


def fresh(states):
    return jax.tree.map(jnp.copy, states)


def test_buffers_hold_packed_codes_and_the_receiver_trains_on_their_decoding(model, data):
    stages, states = model
    x, y = data
    assert isinstance(states[0].codec, vq.VQState) and states[1].codec == ()
    cfg = A.AsyncConfig(capacity=3, warmup_rounds=0)
    st = A.init_async(stages, fresh(states), x[:B], y[:B], cfg, jax.random.key(1))
    wires, labels_buf = st.buffers[0].items
    assert isinstance(wires, codecs.VQWire) and isinstance(wires.codes, codecs.PackedBits)
    assert wires.codes.data.dtype == jnp.uint8 and wires.codes.data.shape == (3, B, PACKED)
    assert wires.codebook.dtype == jnp.float32 and wires.codebook.shape == (3, 2, 16, 4)
    assert labels_buf.dtype == y.dtype and labels_buf.shape == (3, B)
    run = A.make_async_run(stages, cfg, lambda n: (x[:B], y[:B]), 2)
    schedule = A.RoundRobin(2)
    assert "stablehlo.while" in run.lower(st, schedule).as_text()  # the ticks are one lax.scan in one program
    # tick 0: stage 0 steps and pushes its wire; tick 1: stage 1 samples it, decodes, steps
    st, rec = run(st, schedule)
    assert np.asarray(rec.updated).tolist() == [[True, False], [False, True]]
    assert int(st.buffers[0].size) == 1 and int(rec.staleness[1, 1]) == 1
    wire, labels = jax.tree.map(lambda a: a[0], st.buffers[0].items)
    assert wire.codes.data.dtype == jnp.uint8 and int(codecs.unpack_bits(wire.codes).max()) < 16
    np.testing.assert_array_equal(labels, y[:B])
    assert int(st.states[0].codec.step) == 1  # seeded from the first message and updated once
    # the stored codebook is the one the codes were encoded with (seeded on the data, not the random init)
    feats = local_update(stages[0], states[0], x[:B], y[:B])[1]
    decoded = CODEC.decode(wire)
    assert 0.0 < float(vq.distortion(feats, decoded)) < 0.5
    assert not np.array_equal(wire.codebook, states[0].codec.codebook)
    # what stage 1 consumed is the decoding of the stored wire
    step = jax.jit(lambda s, xx, yy: stage_step(stages[1], s, xx, yy))
    ref_state, _, ref_m = step(states[1], decoded, labels)
    np.testing.assert_allclose(float(rec.loss[1, 1]), float(ref_m["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(st.states[1].params, ref_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(st.states[1].model_state, ref_state.model_state, rtol=1e-5, atol=1e-6)
    # the check can fail: a step on the float features (what plain async DGL sends) lands elsewhere
    float_state = step(states[1], feats, labels)[0]
    diff = jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))), float_state.params, ref_state.params)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_async_simulation_with_codes_learns(model, data):
    """A jitted run on a slowed paper schedule: the receiver, which only ever sees decoded codes, learns."""
    stages, states = model
    x, y = data
    cfg = A.AsyncConfig(capacity=2)
    input_fn = A.epoch_input_fn(x, y, B, jax.random.key(3))
    run = A.make_async_run(stages, cfg, input_fn, 100)
    st = A.init_async(stages, fresh(states), x[:B], y[:B], cfg, jax.random.key(4))
    st, rec = run(st, A.paper_schedule(2, slow_stage=0, slowdown=1.5))
    upd = np.asarray(rec.updated)
    assert upd[:, 1].sum() > upd[:, 0].sum() > 25  # stage 1 reuses buffered wires while stage 0 is slower
    loss = np.asarray(rec.loss)[upd[:, 1], 1]
    assert np.isfinite(loss).all()
    assert loss[-10:].mean() < loss[:10].mean() - 0.3, loss
    assert int(st.states[0].codec.step) == upd[:, 0].sum()  # one codebook update per send
    assert st.buffers[0].items[0].codes.data.dtype == jnp.uint8


def test_buffer_memory_is_the_nbytes_of_the_stored_items(model, data):
    stages, states = model
    x, y = data
    m = 5
    st = A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(capacity=m), jax.random.key(4))
    (mem,) = accounting.buffer_memory(stages, st.buffers)
    assert mem["stored_bytes"] == accounting.nbytes(st.buffers[0].items)
    assert mem["stored_bytes"] == m * (B * PACKED + BOOK + B * 4)  # packed codes, codebook, int32 labels
    assert mem["float32_bytes"] == m * (B * 8 * 8 * 8 * 4 + B * 4)
    assert mem["stored_bytes"] < mem["float32_bytes"] / 20
    float_stages = with_codec(stages, None)
    float_states = [s._replace(codec=()) for s in states]
    fs = A.init_async(float_stages, float_states, x[:B], y[:B], A.AsyncConfig(capacity=m), jax.random.key(4))
    (fmem,) = accounting.buffer_memory(float_stages, fs.buffers)
    assert fmem["stored_bytes"] == fmem["float32_bytes"] == mem["float32_bytes"]
    delayed = A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(delay=2), jax.random.key(0))
    line = delayed.lines[0].items[0]
    assert line.codes.data.dtype == jnp.uint8 and line.codes.data.shape == (2, B, PACKED)  # wires in flight too


def test_bad_codec_settings_raise_clear_errors(model, data):
    stages, _ = model
    x, _ = data
    with pytest.raises(ValueError, match="code_dim 3 does not divide the 8 channels"):
        init_stage_states(with_codec(stages, codecs.vq(16, code_dim=3)), jax.random.key(0), x[:B])
    with pytest.raises(ValueError, match="seeds 2048 codes .* has only 1024"):
        init_stage_states(with_codec(stages, codecs.vq(2048, code_dim=4)), jax.random.key(0), x[:B])


def test_trainer_async_method_with_a_packed_vq_codec(digits):
    """``--method async --codec vq-packed:16:4``: the buffers hold packed codes, the run trains and evaluates,
    and the logged buffer memory is the bytes of what the buffers hold."""
    from dgl_jax.data import Dataset
    from dgl_jax.trainer import TrainConfig, Trainer

    ds = Dataset("digits", digits.train_images[:64], digits.train_labels[:64], digits.test_images[:100],
                 digits.test_labels[:100], 10)  # fmt: skip
    cfg = TrainConfig(epochs=1, batch_size=32, chunk_steps=2, head="linear", method="async",
                      codec="vq-packed:16:4", method_options={"capacity": 2}, split=2,
                      model_options={"width_mult": 0.25})  # fmt: skip
    trainer = Trainer(cfg, dataset=ds, log=lambda s: None)
    assert [s.codec.name for s in trainer.stages[:-1]] == ["vq-packed:16:4"] * (len(trainer.stages) - 1)
    init = trainer.init_state()
    for buf in init.extra["buffers"]:
        wire, labels = buf.items
        assert wire.codes.data.dtype == jnp.uint8 and wire.codebook.dtype == jnp.float32
        assert labels.dtype == jnp.int32
    (event,) = list(trainer.fit(init))
    assert np.isfinite(np.asarray(event.train["loss"], float)).all()
    mem = accounting.buffer_memory(trainer.stages, event.state.extra["buffers"])
    got = np.asarray(event.train["buffer_mib"])[1:] * 2**20
    np.testing.assert_allclose(got, [accounting.nbytes(b.items) for b in event.state.extra["buffers"]], rtol=1e-6)
    np.testing.assert_allclose(got, [m["stored_bytes"] for m in mem], rtol=1e-6)
    assert (got < np.asarray(event.train["buffer_mib_fp32"])[1:] * 2**20).all()
    assert event.eval is not None and len(event.eval["accuracy"]) == len(trainer.stages)
