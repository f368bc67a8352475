import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import dgl_step, init_stage_states, make_optimizer, stage_step, vq, with_optimizer
from dgl_jax import vq_train as vt
from dgl_jax.models import cifar_cnn

X = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
Y = jax.random.randint(jax.random.key(2), (16,), 0, 10)
KEY = jax.random.key(3)
# A tiny 3-stage CNN (widths 8-16-16, GAP+linear aux heads) keeps compilation short.
TINY = cifar_cnn((8, 16, 16), (1, 2), head="gap_linear", last_head_depth=1)
STAGES = with_optimizer(TINY, lambda j: make_optimizer("sgd", 0.05, steps_per_epoch=10))
CFG = vt.VQConfig(num_codes=16, code_dim=8)


@pytest.fixture(scope="module")
def states():
    return init_stage_states(STAGES, jax.random.key(0), X)


@pytest.fixture(scope="module")
def vq_step():
    return jax.jit(functools.partial(vt.vq_dgl_step, STAGES, CFG))


def test_vq_off_is_bit_identical_to_dgl_step(states):
    ref_states, ref = jax.jit(functools.partial(dgl_step, STAGES))(states, X, Y)
    new_states, bounds, m = jax.jit(functools.partial(vt.vq_dgl_step, STAGES, None))(states, [None, None], X, Y, KEY)
    assert bounds == [None, None]
    for a, b in zip(jax.tree.leaves(new_states), jax.tree.leaves(ref_states), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.loss, ref.loss)
    np.testing.assert_array_equal(m.accuracy, ref.accuracy)
    assert np.all(np.isnan(m.distortion))


@pytest.fixture(scope="module")
def bounds(states):
    return vt.init_vq(STAGES, states, CFG, jax.random.key(5), X)


@jax.jit
def manual_reference(states, bounds):
    """The quantized step rebuilt from the core stage_step and the vq functions, one boundary at a time."""
    x, out = X, []
    for j, (stage, st) in enumerate(zip(STAGES, states)):
        ref_state, feats, loss, _ = stage_step(stage, st, x, Y)
        if j == len(STAGES) - 1:
            out.append((ref_state, loss, None, None, None))
            break
        b = bounds[j]
        codes = vq.encode(b.sender, feats)
        sender = vq.update(b.sender, feats, codes, key=jax.random.fold_in(KEY, j), restart_threshold=1e-2)
        x = vq.decode(b.receiver, codes)  # the receiver trains on decoded codes
        out.append((ref_state, loss, codes, sender, vq.distortion(feats, x)))
    return out


def test_quantized_step_matches_a_manual_sender_receiver_reference(states, bounds, vq_step):
    new_states, new_bounds, m = vq_step(states, bounds, X, Y, KEY)
    for j, (ref_state, loss, codes, sender, dist) in enumerate(manual_reference(states, bounds)):
        chex.assert_trees_all_close(new_states[j], ref_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.loss[j], loss, rtol=1e-5)
        if codes is None:
            continue
        assert codes.dtype == jnp.uint8 and codes.shape == (16, *vt.boundary_shapes(STAGES, states, X)[j][:2], 2**j)
        chex.assert_trees_all_close(new_bounds[j].sender, sender, rtol=1e-4, atol=1e-5)
        # sync_every=1: the receiver's copy is the sender's codebook after the update
        np.testing.assert_array_equal(new_bounds[j].receiver, new_bounds[j].sender.codebook)
        np.testing.assert_allclose(m.distortion[j], dist, rtol=1e-4)
    assert not bool(m.nonfinite.any())


def test_sync_every_keeps_the_receiver_copy_stale_between_syncs():
    # the sync logic lives in quantize_boundary: test it on fixed features, without a network to compile
    cfg = vt.VQConfig(num_codes=16, code_dim=4, sync_every=3)
    feats = jax.random.normal(jax.random.key(7), (16, 4, 4, 8))
    s = vt._seed_codebook(jax.random.key(8), feats, 16, 4, 2, None, "sample")
    b = vt.Boundary(s, jnp.copy(s.codebook))
    first = b.receiver

    @jax.jit
    def step(b, f, key):  # one boundary step, and what decoding with the initial copy would give
        return vt.quantize_boundary(cfg, b, f, key), vq.decode(first, vq.encode(s._replace(codebook=first), f))

    for i in range(3):
        (b, x_hat, _, _), stale = step(b, feats + 0.1 * i, jax.random.fold_in(KEY, i))
        np.testing.assert_array_equal(x_hat, stale)  # the receiver decodes with the copy it held
        if i < 2:
            np.testing.assert_array_equal(b.receiver, first)
            assert not np.array_equal(b.sender.codebook, first)
    np.testing.assert_array_equal(b.receiver, b.sender.codebook)  # synced at step 3


def test_nan_features_name_the_stage(states, bounds, vq_step):
    bad = list(states)
    # NaN weights in stage 1's block: stage 0 is fine, stage 1 (and what follows) is not
    bad[1] = bad[1]._replace(params=jax.tree.map(lambda a: a * jnp.nan, bad[1].params))
    _, _, m = vq_step(bad, bounds, X, Y, KEY)
    assert not bool(m.nonfinite[0]) and bool(m.nonfinite[1])
    with pytest.raises(ValueError, match="output of stage 1"):
        vt.check_metrics(m)
    with pytest.raises(ValueError, match="output of stage 0"):
        vt.init_vq(STAGES, states, CFG, KEY, X.at[0, 0, 0, 0].set(jnp.nan))


def test_config_and_layout_errors(states):
    with pytest.raises(ValueError, match="num_codes must be an integer >= 2"):
        vt.VQConfig(num_codes=1)
    with pytest.raises(ValueError, match="exactly one of code_dim or groups"):
        vt.VQConfig(code_dim=8, groups=2)
    with pytest.raises(ValueError, match="sync_every"):
        vt.VQConfig(sync_every=0)
    with pytest.raises(ValueError, match="code_dim 5 does not divide the 8 channels"):
        vt.init_vq(STAGES, states, vt.VQConfig(num_codes=16, code_dim=5), KEY, X)
    with pytest.raises(ValueError, match="one VQ config"):
        vt.as_plan([CFG], 3)


def test_boundary_traffic(states):
    shapes = vt.boundary_shapes(STAGES, states, X)
    assert shapes == [(8, 8, 8), (4, 4, 16)]
    t = vt.boundary_traffic([vt.VQConfig(num_codes=16, code_dim=4), None], shapes, batch_size=16)
    assert t.codes[0] == 8 * 8 * 2 * 4  # 2 groups of 4 channels, 4 bits each
    assert t.sync[0] == 2 * 16 * 4 * 32 / 16  # codebook [2, 16, 4] float32 every step, per sample
    assert t.total[1] == t.float32[1] == 4 * 4 * 16 * 32
    assert t.ratio_fp32[0] == pytest.approx(t.float32[0] / (t.codes[0] + t.sync[0]))
    assert t.ratio_bf16[0] == pytest.approx(t.ratio_fp32[0] / 2)


@pytest.fixture(scope="module")
def alone(states, bounds, vq_step):
    """CFG trained alone for 2 steps (same initial weights, codebook seed, batches and keys as the sweeps)."""
    s, b = states, bounds
    for i in range(2):
        s, b, m = vq_step(s, b, X * (1 + 0.1 * i), Y, jax.random.fold_in(KEY, i))
    return s, b, m, jax.jit(functools.partial(vt.vq_evaluate_batch, STAGES, CFG))(s, b, X, Y)


# vmap: CFG shares a padded class with a 64-code config; loop: CFG next to unquantized DGL.
@pytest.mark.parametrize("mode, other", [("vmap", vt.VQConfig(num_codes=64, code_dim=8)), ("loop", None)])
def test_sweep_member_equals_the_configuration_run_alone(states, alone, mode, other):
    sweep = vt.make_sweep(STAGES, [CFG, other], mode=mode)
    carry = sweep.init(states, jax.random.key(5), X)
    step = jax.jit(sweep.step)
    for i in range(2):
        carry, metrics = step(carry, X * (1 + 0.1 * i), Y, jax.random.fold_in(KEY, i))
    s_alone, b_alone, m_alone, counts_alone = alone
    s_sw, b_sw = sweep.select(carry, 0)
    tol = dict(rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(s_sw, s_alone, **tol)
    for a, b in zip(b_sw, b_alone, strict=True):
        k = b.sender.codebook.shape[1]  # the swept copy may be padded (vmap mode)
        assert a.sender.codebook.shape[1] == (64 if mode == "vmap" else 16)
        chex.assert_trees_all_close(a.sender.codebook[:, :k], b.sender.codebook, **tol)
        chex.assert_trees_all_close(a.sender.ema_count[:, :k], b.sender.ema_count, **tol)
        np.testing.assert_array_equal(a.sender.ema_count[:, k:], 0.0)  # padding codes never updated
        assert int(a.sender.num_codes) == 16
    np.testing.assert_allclose(metrics[0].loss, m_alone.loss, **tol)
    if other is None:  # the unquantized member is plain DGL
        assert np.all(np.isnan(np.asarray(metrics[1].distortion)))
    else:  # the 64-code member is its own configuration
        assert float(metrics[1].distortion[0]) < float(metrics[0].distortion[0])
    counts = jax.jit(sweep.evaluate)(carry, X, Y)
    chex.assert_shape(counts, (2, 3))
    np.testing.assert_array_equal(counts[0], counts_alone)


def test_sweep_errors():
    with pytest.raises(ValueError, match="mode 'pmap' is not valid"):
        vt.make_sweep(STAGES, [CFG], mode="pmap")
    with pytest.raises(ValueError, match="at least one configuration"):
        vt.make_sweep(STAGES, [])
