"""Asynchronous DGL whose replay buffers hold VQ codes (dgl_jax.asynchronous with AsyncConfig.vq)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import asynchronous as A
from dgl_jax import init_stage_states, make_optimizer, vq, with_optimizer
from dgl_jax import vq_train as vt
from dgl_jax.models import cifar_cnn
from dgl_jax.objective import stage_apply
from dgl_jax.train import evaluate_batch, stage_step

B = 16
CFG = vt.VQConfig(num_codes=16, code_dim=4)  # stage 0 sends [B, 8, 8, 8]: 2 groups of 4 channels


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
    return stages, init_stage_states(stages, jax.random.key(0), data[0][:B])


def fresh(states):
    return jax.tree.map(jnp.copy, states)


def test_buffers_hold_codes_and_the_receiver_trains_on_their_decoding(model, data):
    stages, states = model
    x, y = data
    cfg = A.AsyncConfig(capacity=3, warmup_rounds=0, vq=CFG)
    st = A.init_async(stages, fresh(states), x[:B], y[:B], cfg, jax.random.key(1))
    codes_buf, labels_buf = st.buffers[0].items
    assert codes_buf.dtype == jnp.uint8 and codes_buf.shape == (3, B, 8, 8, 2)
    assert labels_buf.dtype == y.dtype and labels_buf.shape == (3, B)
    run = A.make_async_run(stages, cfg, lambda n: (x[:B], y[:B]), 2)
    schedule = A.RoundRobin(2)
    assert "stablehlo.while" in run.lower(st, schedule).as_text()  # the ticks are one lax.scan in one program
    # tick 0: stage 0 steps, encodes its output, pushes codes; tick 1: stage 1 samples them, decodes, steps
    st, rec = run(st, schedule)
    assert np.asarray(rec.updated).tolist() == [[True, False], [False, True]]
    assert int(st.buffers[0].size) == 1 and int(rec.staleness[1, 1]) == 1
    codes, labels = st.buffers[0].items[0][0], st.buffers[0].items[1][0]
    assert codes.dtype == jnp.uint8 and int(codes.max()) < CFG.num_codes
    np.testing.assert_array_equal(labels, y[:B])
    b = st.boundaries[0]
    assert int(b.sender.step) == 1  # seeded from data and updated once
    np.testing.assert_array_equal(b.receiver, b.sender.codebook)  # sync_every=1
    assert 0.0 < float(rec.distortion[0, 0]) < 0.5  # seeded on the data, not on the random placeholder
    assert np.isnan(np.asarray(rec.distortion)[:, 1]).all()  # the last stage sends nothing
    # what stage 1 consumed must be the receiver's decoding of the pushed codes
    step = jax.jit(lambda j, s, xx, yy: stage_step(stages[j], s, xx, yy), static_argnums=0)
    ref_state, _, ref_loss, _ = step(1, states[1], vq.decode(b.receiver, codes), labels)
    np.testing.assert_allclose(float(rec.loss[1, 1]), float(ref_loss), rtol=1e-5)
    chex.assert_trees_all_close(st.states[1].params, ref_state.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(st.states[1].batch_stats, ref_state.batch_stats, rtol=1e-5, atol=1e-6)
    # the check can fail: a step on the float features (what plain async DGL sends) lands elsewhere
    feats = step(0, states[0], x[:B], y[:B])[1]
    float_state = step(1, states[1], feats, labels)[0]
    diff = jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))), float_state.params, ref_state.params)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_async_method_with_codes_trains_and_logs_buffer_memory(model, data):
    """``--method async`` with ``vq_*`` options (the registered hooks, jitted as the trainer does): codebooks
    seeded inside the first step (``init_extra`` only sees zeros), codes carried in the buffers, loss going
    down, per-stage memory and VQ health in the metrics."""
    from dgl_jax.trainer import METHODS, TrainConfig

    A.register_methods()
    stages, states = model
    x, y = data
    opts = {"capacity": 3, "slow_stage": 0, "slowdown": 1.5, "vq_num_codes": 16, "vq_code_dim": 4}
    cfg = TrainConfig(method="async", batch_size=B, method_options=opts)
    method = METHODS["async"]
    extra = method.init_extra(stages, fresh(states), cfg, jax.random.key(2), x[:1])
    assert extra["buffers"][0].items[0].dtype == jnp.uint8 and extra["vq"][0].receiver.shape == (2, 16, 4)
    step = jax.jit(method.make_step(stages, cfg, 0, False))
    sts, losses, updates = fresh(states), [], np.zeros(2)
    for i in range(40):  # one step = K = 2 ticks of the paper's schedule
        j = i % 4
        sts, extra, m = step(sts, extra, x[j * B : (j + 1) * B], y[j * B : (j + 1) * B], jax.random.key(10 + i))
        losses.append(np.asarray(m["loss"]))
        updates += np.asarray(m["updates"])
    loss = np.stack(losses)[:, 1]  # the receiver, trained only on decoded codes
    loss = loss[np.isfinite(loss)]
    assert len(loss) >= 25
    assert loss[-8:].mean() < loss[:8].mean() - 0.3, loss
    assert int(extra["vq"][0].sender.step) == updates[0]  # one codebook update per send
    assert 0 < float(m["vq_coverage"][0]) <= 1 or np.isnan(m["vq_coverage"][0])  # NaN: stage 0 idle this step
    assert np.isnan(np.asarray(m["vq_distortion"][1]))
    codes = 3 * B * 8 * 8 * 2  # 3 slots of [B, 8, 8, 2] uint8 codes
    book = 2 * 16 * 4 * 4  # [G, K, d] float32
    fp32 = 3 * B * 8 * 8 * 8 * 4
    np.testing.assert_allclose(m["buffer_mib"], [0, (codes + book) / 2**20], rtol=1e-6)
    np.testing.assert_allclose(m["buffer_mib_fp32"], [0, fp32 / 2**20], rtol=1e-6)

    # evaluation (Trainer.evaluate, `python -m dgl_jax eval`) goes through the receiver's codebook
    out0 = stage_apply(stages[0], sts[0].params, sts[0].batch_stats, x, train=False)
    shared = extra["vq"][0].sender._replace(codebook=extra["vq"][0].receiver)
    decoded = vq.decode(shared, vq.encode(shared, out0.features))
    assert not np.allclose(decoded, out0.features)  # a float pass would give other logits
    out1 = stage_apply(stages[1], sts[1].params, sts[1].batch_stats, decoded, train=False)
    expected = [jnp.sum(jnp.argmax(o.logits, -1) == y) for o in (out0, out1)]
    got = evaluate_batch(stages, sts, x, y, messages=method.eval_messages(extra)).per_head
    chex.assert_trees_all_equal(got, jnp.stack(expected))
    assert method.eval_messages({k: v for k, v in extra.items() if k != "vq"}) is None  # float buffers


def test_buffer_memory_is_the_arithmetic(model, data):
    stages, states = model
    x, y = data
    m = 5
    plans = {"codes": CFG, "uint16": vt.VQConfig(num_codes=300, code_dim=8), "float": None}
    mem = {}
    for name, plan in plans.items():
        st = A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(capacity=m, vq=plan), jax.random.key(4))
        mem[name] = A.buffer_memory(st)
        shapes = [tuple(b.items[0].shape[2:4]) + (8,) for b in st.buffers]
        assert shapes == vt.boundary_shapes(stages, states, x[:B])
        ref = vt.buffer_memory(vt.as_plan(plan, 2), shapes, m, B)
        got = mem[name]
        assert got["buffer_bytes"][1] == ref.codes and got["codebook_bytes"][1] == ref.codebook
        assert got["buffer_bytes_fp32"][1] == ref.float32
        assert got["buffer_bytes"][0] == got["codebook_bytes"][0] == got["buffer_bytes_fp32"][0] == 0
    fp32 = m * B * 8 * 8 * 8 * 4  # M batches of [B, 8, 8, 8] float32
    assert mem["float"]["buffer_bytes"][1] == mem["float"]["buffer_bytes_fp32"][1] == fp32
    assert mem["codes"]["buffer_bytes_fp32"][1] == fp32
    assert mem["codes"]["buffer_bytes"][1] == m * B * 8 * 8 * 2 * 1  # 2 groups, one uint8 each
    assert mem["codes"]["codebook_bytes"][1] == 2 * 16 * 4 * 4  # [G, K, d] float32
    assert mem["uint16"]["buffer_bytes"][1] == m * B * 8 * 8 * 1 * 2  # 1 group of 8, uint16
    assert fp32 / mem["codes"]["buffer_bytes"][1] == 16  # 4 channels x 4 bytes -> 1 byte


def test_bad_vq_settings_raise_clear_errors(model, data):
    stages, states = model
    x, y = data
    with pytest.raises(ValueError, match="stage 0.*code_dim 3 does not divide the 8 channels"):
        A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(vq=vt.VQConfig(16, code_dim=3)), jax.random.key(0))
    with pytest.raises(ValueError, match="at least 2048 vectors.*has 1024"):
        A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(vq=vt.VQConfig(2048, 4)), jax.random.key(0))
    with pytest.raises(ValueError, match="one VQ config .* per boundary: 1, got 2"):
        A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(vq=[CFG, CFG]), jax.random.key(0))
    with pytest.raises(ValueError, match="vq must be None, a VQConfig"):
        A.AsyncConfig(vq=16)
    delayed = A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(delay=2, vq=CFG), jax.random.key(0))
    assert delayed.lines[0].items[0].dtype == jnp.uint8 and delayed.lines[0].items[0].shape == (2, B, 8, 8, 2)
    float_state = A.init_async(stages, states, x[:B], y[:B], A.AsyncConfig(), jax.random.key(0))
    with pytest.raises(ValueError, match="no codebooks"):
        A.async_ticks(stages, A.AsyncConfig(vq=CFG), lambda n: (x[:B], y[:B]), float_state, A.RoundRobin(2), 1)

    class Cfg:  # the trainer's view: TrainConfig.method_options
        def __init__(self, **o):
            self.method_options = o

    assert A._async_options(Cfg(vq_num_codes=64, vq_code_dim=8))[0].vq == vt.VQConfig(64, 8)
    assert A._async_options(Cfg(vq_num_codes=64, vq_groups=2))[0].vq == vt.VQConfig(64, None, groups=2)
    assert A._async_options(Cfg(vq_num_codes=64))[0].vq == vt.VQConfig(64, 16)
    with pytest.raises(ValueError, match=r"\['vq_code_dim'\] need vq_num_codes"):
        A._async_options(Cfg(vq_code_dim=8))
    with pytest.raises(ValueError, match="async VQ options: num_codes must be an integer >= 2, got 1"):
        A._async_options(Cfg(vq_num_codes=1))
    with pytest.raises(ValueError, match="async VQ options: give exactly one of code_dim or groups"):
        A._async_options(Cfg(vq_num_codes=64, vq_code_dim=8, vq_groups=2))
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        A._async_options(Cfg(vq_num_codes=64, vq_sync_every=0))
