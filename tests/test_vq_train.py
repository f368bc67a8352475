"""dgl_jax.vq_train: DGL with VQ boundary codecs (sender/receiver codebooks), sweeps, and their byte accounting."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import accounting, dgl_step, evaluate_batch, init_stage_states, make_optimizer, vq, with_optimizer
from dgl_jax import vq_train as vt
from dgl_jax.models import cifar_cnn
from dgl_jax.objective import split_key
from dgl_jax.stage import message_specs, with_codec
from dgl_jax.steps import local_update

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
    ref_states, ref = jax.jit(functools.partial(dgl_step, STAGES))(states, X, Y, KEY)
    new_states, m = jax.jit(functools.partial(vt.vq_dgl_step, STAGES, None))(states, X, Y, KEY)
    for a, b in zip(jax.tree.leaves(new_states), jax.tree.leaves(ref_states), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m["loss"], ref["loss"])
    np.testing.assert_array_equal(m["accuracy"], ref["accuracy"])
    assert np.all(np.isnan(m["distortion"])) and m["distortion"].shape == (3,)


@pytest.fixture(scope="module")
def seeded(states):
    """States whose boundaries hold codebooks seeded from the first batch (the codec states)."""
    return vt.init_vq(STAGES, states, CFG, jax.random.key(5), X)


def test_init_vq_puts_the_boundaries_in_the_codec_states(states, seeded):
    assert [type(s.codec).__name__ for s in seeded] == ["Boundary", "Boundary", "tuple"]
    assert seeded[0].codec.sender.codebook.shape == (1, 16, 8) and seeded[1].codec.receiver.shape == (2, 16, 8)
    np.testing.assert_array_equal(seeded[0].codec.receiver, seeded[0].codec.sender.codebook)
    chex.assert_trees_all_equal([s.params for s in seeded], [s.params for s in states])


@jax.jit
def manual_reference(states):
    """The quantized step rebuilt from local_update and the vq functions, one boundary at a time."""
    x, out = X, []
    for j, (stage, st) in enumerate(zip(STAGES, states)):
        k_layers, k_codec = split_key(jax.random.fold_in(KEY, j))
        ref_state, feats, m = local_update(stage, st, x, Y, k_layers)
        if j == len(STAGES) - 1:
            out.append((ref_state, m["loss"], None, None, None))
            break
        b = st.codec
        codes = vq.encode(b.sender, feats)
        sender = vq.update(b.sender, feats, codes, key=k_codec, restart_threshold=1e-2)
        x = vq.decode(b.receiver, codes)  # the receiver trains on decoded codes
        out.append((ref_state, m["loss"], codes, sender, vq.distortion(feats, x)))
    return out


def test_quantized_step_matches_a_manual_sender_receiver_reference(seeded, vq_step):
    new_states, m = vq_step(seeded, X, Y, KEY)
    for j, (ref_state, loss, codes, sender, dist) in enumerate(manual_reference(seeded)):
        chex.assert_trees_all_close(new_states[j].params, ref_state.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(new_states[j].model_state, ref_state.model_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["loss"][j], loss, rtol=1e-5)
        if codes is None:
            assert np.isnan(m["distortion"][j])
            continue
        assert codes.dtype == jnp.uint8 and codes.shape == (*message_specs(STAGES, seeded, X)[j].shape[:3], 2**j)
        b = new_states[j].codec
        chex.assert_trees_all_close(b.sender, sender, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(b.receiver, b.sender.codebook)  # sync_every=1: copies equal after the step
        np.testing.assert_allclose(m["distortion"][j], dist, rtol=1e-4)
    assert not bool(m["nonfinite"].any())


def test_sync_every_keeps_the_receiver_copy_stale_between_syncs():
    # the sync logic lives in the boundary codec: test it on fixed features, without a network to compile
    cfg = vt.VQConfig(num_codes=16, code_dim=4, sync_every=3)
    codec = vt.boundary_codec(cfg)
    feats = jax.random.normal(jax.random.key(7), (16, 4, 4, 8))
    s = vt._seed_codebook(jax.random.key(8), feats, 16, 4, 2, None, "sample")
    b = vt.Boundary(s, jnp.copy(s.codebook))
    first = b.receiver

    @jax.jit
    def step(b, f, key):  # one boundary step, and what decoding with the initial copy would give
        new, wire = codec.encode(b, f, key)
        return new, codec.decode(wire), vq.decode(first, vq.encode(s._replace(codebook=first), f))

    for i in range(3):
        b, x_hat, stale = step(b, feats + 0.1 * i, jax.random.fold_in(KEY, i))
        np.testing.assert_array_equal(x_hat, stale)  # the receiver decodes with the copy it held
        if i < 2:
            np.testing.assert_array_equal(b.receiver, first)
            assert not np.array_equal(b.sender.codebook, first)
    np.testing.assert_array_equal(b.receiver, b.sender.codebook)  # synced at step 3


def test_boundary_codec_sends_what_the_library_vq_codec_sends():
    """sync_every=1, no padding: the sweep's codec and VQConfig.codec() send the same codes and codebook."""
    feats = jax.random.normal(jax.random.key(9), (8, 4, 4, 8))
    s = vt._seed_codebook(jax.random.key(8), feats, 16, 4, 2, None, "sample")
    s = s._replace(step=jnp.ones((), jnp.int32))  # already seeded: the library codec does not re-seed
    sweep, lib = vt.boundary_codec(vt.VQConfig(16, code_dim=4)), vt.VQConfig(16, code_dim=4).codec(packed=True)
    assert lib.name == "vq-packed:16:4"

    @jax.jit
    def both(s, f):
        (b, w_sweep), (s_lib, w_lib) = sweep.encode(vt.Boundary(s, s.codebook), f), lib.encode(s, f)
        return w_sweep, sweep.decode(w_sweep), w_lib, lib.decode(w_lib), b.sender, s_lib

    w_sweep, x_sweep, w_lib, x_lib, sender, s_lib = both(s, feats)
    assert w_lib.codes.data.dtype == jnp.uint8 and w_lib.codes.bits == 4
    np.testing.assert_array_equal(w_sweep.codes.reshape(8, -1), vq.encode(s, feats).reshape(8, -1))
    np.testing.assert_array_equal(w_sweep.codebook, w_lib.codebook)
    np.testing.assert_array_equal(x_sweep, x_lib)
    chex.assert_trees_all_close(sender, s_lib, rtol=1e-6)  # the same EMA update (no restarts without a key)


def test_nan_features_name_the_stage(seeded, vq_step, states):
    bad = list(seeded)
    # NaN weights in stage 1's block: stage 0 is fine, stage 1 (and what follows) is not
    bad[1] = bad[1]._replace(params=jax.tree.map(lambda a: a * jnp.nan, bad[1].params))
    _, m = vq_step(bad, X, Y, KEY)
    assert not bool(m["nonfinite"][0]) and bool(m["nonfinite"][1])
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


def test_traffic_is_the_nbytes_of_the_library_codec_wires(states):
    """Bytes come from dgl_jax.accounting on the stages carrying the codecs the configs stand for."""
    plan = [vt.VQConfig(num_codes=16, code_dim=4), None]
    coded = with_codec(STAGES, vt.as_codecs(plan, 3))
    assert [None if s.codec is None else s.codec.name for s in coded] == ["vq-packed:16:4", None, None]
    abstract = jax.eval_shape(lambda: init_stage_states(coded, jax.random.key(0), X))
    t = accounting.boundary_traffic(coded, abstract, X)
    codes = 16 * (8 * 8 * 2 * 4 // 8)  # [16, 8, 8] pixels x 2 groups x 4 bits, packed per example
    book = 2 * 16 * 4 * 4  # float32 [G, K, d], sent with every wire
    assert t[0]["wire_bytes"] == codes + book and t[0]["float32_bytes"] == 16 * 8 * 8 * 8 * 4
    assert t[1]["wire_bytes"] == t[1]["float32_bytes"] == 16 * 4 * 4 * 16 * 4 and t[1]["ratio"] == 1.0
    unpacked = with_codec(STAGES, vt.as_codecs(plan, 3, packed=False))
    t_u = accounting.boundary_traffic(unpacked, jax.eval_shape(lambda: init_stage_states(unpacked, KEY, X)), X)
    assert t_u[0]["wire_bytes"] == 16 * 8 * 8 * 2 + book  # one uint8 per code


@pytest.fixture(scope="module")
def alone(seeded):
    """CFG trained alone for 2 steps (same initial weights, codebook seed, batches and keys as the sweeps) by
    the library's dgl_step on the stages carrying the boundary codecs, and evaluated by evaluate_batch."""
    coded = vt.vq_stages(STAGES, CFG)
    step = jax.jit(functools.partial(dgl_step, coded))
    s = seeded
    for i in range(2):
        s, m = step(s, X * (1 + 0.1 * i), Y, jax.random.fold_in(KEY, i))
    return s, m, jax.jit(lambda s: evaluate_batch(coded, s, X, Y).per_head)(s)


# vmap: CFG shares a padded class with a 64-code config; loop: CFG next to unquantized DGL. The sweep steps are
# vq_dgl_step: this also checks that vq_dgl_step is dgl_step on vt.vq_stages.
@pytest.mark.parametrize("mode, other", [("vmap", vt.VQConfig(num_codes=64, code_dim=8)), ("loop", None)])
def test_sweep_member_equals_the_configuration_run_alone(states, alone, mode, other):
    sweep = vt.make_sweep(STAGES, [CFG, other], mode=mode)
    carry = sweep.init(states, jax.random.key(5), X)
    step = jax.jit(sweep.step)
    for i in range(2):
        carry, metrics = step(carry, X * (1 + 0.1 * i), Y, jax.random.fold_in(KEY, i))
    s_alone, m_alone, counts_alone = alone
    s_sw = sweep.select(carry, 0)
    tol = dict(rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close([s.params for s in s_sw], [s.params for s in s_alone], **tol)
    for a, b in zip([s.codec for s in s_sw[:2]], [s.codec for s in s_alone[:2]], strict=True):
        k = b.sender.codebook.shape[1]  # the swept copy may be padded (vmap mode)
        assert a.sender.codebook.shape[1] == (64 if mode == "vmap" else 16)
        chex.assert_trees_all_close(a.sender.codebook[:, :k], b.sender.codebook, **tol)
        chex.assert_trees_all_close(a.sender.ema_count[:, :k], b.sender.ema_count, **tol)
        np.testing.assert_array_equal(a.sender.ema_count[:, k:], 0.0)  # padding codes never updated
        assert int(a.sender.num_codes) == 16
    np.testing.assert_allclose(metrics[0]["loss"], m_alone["loss"], **tol)
    if other is None:  # the unquantized member is plain DGL
        assert np.all(np.isnan(np.asarray(metrics[1]["distortion"])))
    else:  # the 64-code member is its own configuration
        assert float(metrics[1]["distortion"][0]) < float(metrics[0]["distortion"][0])
    counts = jax.jit(sweep.evaluate)(carry, X, Y)
    chex.assert_shape(counts, (2, 3))
    np.testing.assert_array_equal(counts[0], counts_alone)


def test_sweep_errors():
    with pytest.raises(ValueError, match="mode 'pmap' is not valid"):
        vt.make_sweep(STAGES, [CFG], mode="pmap")
    with pytest.raises(ValueError, match="at least one configuration"):
        vt.make_sweep(STAGES, [])
