import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import vq

X = jax.random.normal(jax.random.key(1), (4, 5, 5, 12))  # 100 pixel vectors of 12 channels


def seeded(num_codes=16, code_dim=4, groups=3, max_codes=None, key=0):
    s = vq.init(num_codes, code_dim, groups, max_codes=max_codes, key=jax.random.key(key))
    return vq.init_from_data(s, X, key=jax.random.key(key + 7))


def brute_force_codes(codebook: np.ndarray, x: np.ndarray, num_codes: int) -> np.ndarray:
    g, _, d = codebook.shape
    flat = x.reshape(-1, g, d).astype(np.float64)
    cb = codebook[:, :num_codes].astype(np.float64)
    dist = ((flat[:, :, None, :] - cb[None]) ** 2).sum(-1)  # [N, G, K]
    return dist.argmin(-1).reshape(*x.shape[:-1], g)


@pytest.mark.parametrize("num_codes,max_codes", [(16, None), (10, 32)])
def test_encode_equals_numpy_nearest_neighbour(num_codes, max_codes):
    s = vq.init(num_codes, 4, 3, max_codes=max_codes, key=jax.random.key(3))  # random codebook: no data ties
    codes = vq.encode(s, X)
    chex.assert_shape(codes, (4, 5, 5, 3))
    np.testing.assert_array_equal(
        np.asarray(codes), brute_force_codes(np.asarray(s.codebook), np.asarray(X), num_codes)
    )
    assert int(codes.max()) < num_codes  # padding codes are never chosen


def test_blocked_nearest_search_equals_numpy_with_a_partial_last_block(monkeypatch):
    s = vq.init(16, 4, 3, key=jax.random.key(5))
    x = jax.random.normal(jax.random.key(6), (10, 10, 10, 12))  # 1000 rows: 7 blocks of 128 and 104 rows
    assert vq.block_rows(1000, 3, 16, "cpu") == 1000 and vq.block_rows(1000, 3, 16, "gpu") == 1000
    monkeypatch.setattr(vq, "BLOCK_SCORES", 3 * 16 * 128)
    assert vq.block_rows(1000, 3, 16, "cpu") == 128 and vq.block_rows(1000, 3, 16, "tpu") == 1000
    expected = brute_force_codes(np.asarray(s.codebook), np.asarray(x), 16)
    np.testing.assert_array_equal(np.asarray(jax.jit(vq.encode)(s, x)), expected)
    np.testing.assert_array_equal(np.asarray(vq.encode(s, x)), expected)


def test_decode_of_encode_is_a_centroid():
    s = seeded()
    codes = vq.encode(s, X)
    x_hat = np.asarray(vq.decode(s, codes)).reshape(-1, 3, 4)
    cb = np.asarray(s.codebook)
    c = np.asarray(codes).reshape(-1, 3)
    for g in range(3):
        np.testing.assert_array_equal(x_hat[:, g], cb[g, c[:, g]])
    # and it is the nearest one: no centroid is closer
    d_chosen = ((np.asarray(X).reshape(-1, 3, 4) - x_hat) ** 2).sum(-1)
    d_all = ((np.asarray(X).reshape(-1, 3, 1, 4) - cb[None]) ** 2).sum(-1)
    assert np.all(d_chosen <= d_all.min(-1) + 1e-5)
    # a bare codebook decodes the same way (the receiver's copy)
    np.testing.assert_array_equal(np.asarray(vq.decode(s.codebook, codes)), np.asarray(vq.decode(s, codes)))


@pytest.mark.parametrize(
    "num_codes,dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_code_dtype(num_codes, dtype):
    assert vq.code_dtype(num_codes) == dtype


def test_codes_use_the_smallest_dtype():
    assert vq.encode(vq.init(256, 12, 1, key=jax.random.key(0)), X).dtype == jnp.uint8
    assert vq.encode(vq.init(300, 12, 1, key=jax.random.key(0)), X).dtype == jnp.uint16


def numpy_ema_update(s: vq.VQState, x, codes, decay, eps):
    g, k, d = s.codebook.shape
    flat = np.asarray(x, np.float64).reshape(-1, g, d)
    c = np.asarray(codes).reshape(-1, g)
    active = np.arange(k) < int(s.num_codes)
    counts = np.zeros((g, k))
    sums = np.zeros((g, k, d))
    for n in range(flat.shape[0]):
        for gi in range(g):
            counts[gi, c[n, gi]] += 1
            sums[gi, c[n, gi]] += flat[n, gi]
    ema_count = np.where(active, decay * np.asarray(s.ema_count) + (1 - decay) * counts, 0)
    ema_sum = np.where(active[:, None], decay * np.asarray(s.ema_sum) + (1 - decay) * sums, 0)
    total = ema_count.sum(-1, keepdims=True)
    smoothed = (ema_count + eps) / (total + int(s.num_codes) * eps) * total
    codebook = np.where(active[:, None], ema_sum / smoothed[..., None], np.asarray(s.codebook))
    return ema_count, ema_sum, codebook


@pytest.mark.parametrize("max_codes", [None, 24])
def test_one_ema_update_equals_numpy_reference(max_codes):
    s = seeded(max_codes=max_codes)
    # make the state non-trivial: one update first, then check the second one
    s = vq.update(s, X, vq.encode(s, X), decay=0.9, eps=1e-3)
    x2 = X * 0.5 + 0.3
    codes = vq.encode(s, x2)
    new = jax.jit(functools.partial(vq.update, decay=0.8, eps=1e-3))(s, x2, codes)
    ema_count, ema_sum, codebook = numpy_ema_update(s, x2, codes, 0.8, 1e-3)
    np.testing.assert_allclose(new.ema_count, ema_count, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.ema_sum, ema_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.codebook, codebook, rtol=1e-4, atol=1e-5)
    assert int(new.step) == int(s.step) + 1


def test_laplace_smoothing_keeps_unused_codes_finite():
    s = seeded()
    codes = jnp.zeros((4, 5, 5, 3), jnp.uint8)  # everything on code 0
    for _ in range(30):
        s = vq.update(s, X, codes, decay=0.5, eps=1e-5)
    assert np.all(np.isfinite(np.asarray(s.codebook)))
    assert float(s.ema_count[0, 5]) < 1e-8  # code 5 unused: its count decays to ~0


def test_dead_codes_are_restarted_after_the_ema_update():
    s = seeded()
    codes = jnp.zeros((4, 5, 5, 3), jnp.uint8)  # only code 0 is used
    new = vq.update(s, X, codes, decay=0.5, eps=1e-5, key=jax.random.key(4), restart_threshold=0.6)
    # after the EMA update every unused code has count 0.5 < 0.6: all restarted on current vectors ...
    flat = np.asarray(X).reshape(-1, 3, 4)
    cb = np.asarray(new.codebook)
    for g in range(3):
        for i in range(1, 16):
            assert np.min(np.abs(flat[:, g] - cb[g, i]).sum(-1)) < 1e-6, (g, i)
    # ... with the mean count, so that the next update does not kill them again
    assert np.all(np.asarray(new.ema_count)[:, 1:] >= 0.6)
    np.testing.assert_allclose(new.ema_sum[:, 1:], new.codebook[:, 1:] * new.ema_count[:, 1:, None], rtol=1e-6)
    # code 0 was used: not restarted
    ref = vq.update(s, X, codes, decay=0.5, eps=1e-5)
    np.testing.assert_allclose(new.codebook[:, 0], ref.codebook[:, 0])
    # no restart without a key or with threshold 0
    np.testing.assert_array_equal(
        vq.update(s, X, codes, decay=0.5, key=jax.random.key(4), restart_threshold=0.0).codebook,
        vq.update(s, X, codes, decay=0.5).codebook,
    )


def test_padding_codes_are_never_touched_and_padding_gives_the_same_codes():
    small = seeded(num_codes=16)
    padded = seeded(num_codes=16, max_codes=40)
    np.testing.assert_array_equal(small.codebook, padded.codebook[:, :16])
    np.testing.assert_array_equal(vq.encode(small, X), vq.encode(padded, X))
    key = jax.random.key(5)
    a = vq.update(small, X, vq.encode(small, X), key=key, restart_threshold=2.0)
    b = vq.update(padded, X, vq.encode(padded, X), key=key, restart_threshold=2.0)
    np.testing.assert_allclose(a.codebook, b.codebook[:, :16], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b.codebook[:, 16:], padded.codebook[:, 16:])
    assert float(jnp.abs(b.ema_count[:, 16:]).max()) == 0.0


def test_kmeans_pp_init_gives_distinct_data_centroids():
    s = vq.init_from_data(vq.init(8, 4, 3, key=jax.random.key(0)), X, "kmeans++", key=jax.random.key(1))
    flat = np.asarray(X).reshape(-1, 3, 4)
    cb = np.asarray(s.codebook)
    for g in range(3):
        assert len({tuple(r) for r in cb[g]}) == 8
        for i in range(8):
            assert np.min(np.abs(flat[:, g] - cb[g, i]).sum(-1)) < 1e-6
    # the first batch: distinct vectors too
    s2 = seeded(num_codes=16)
    assert all(len({tuple(r) for r in np.asarray(s2.codebook)[g]}) == 16 for g in range(3))


def test_stats_coverage_and_perplexity():
    s = seeded(num_codes=4, code_dim=12, groups=1)
    codes = jnp.array([0, 1, 2, 3] * 25, jnp.uint8).reshape(4, 5, 5, 1)
    st = vq.stats(s, codes)
    np.testing.assert_allclose(st.coverage, 1.0)
    np.testing.assert_allclose(st.perplexity, 4.0, rtol=1e-5)
    np.testing.assert_allclose(st.max_ratio, 1.0, rtol=1e-6)
    st = vq.stats(s, jnp.zeros_like(codes))
    np.testing.assert_allclose(st.coverage, 0.25)
    np.testing.assert_allclose(st.perplexity, 1.0, rtol=1e-6)
    np.testing.assert_allclose(st.max_ratio, 4.0, rtol=1e-6)


def test_jit_scan_and_vmap():
    s = seeded()
    key = jax.random.key(9)

    def body(s, i):
        x = X + 0.1 * i
        codes = vq.encode(s, x)
        s = vq.update(s, x, codes, key=jax.random.fold_in(key, i), restart_threshold=0.05)
        return s, vq.distortion(x, vq.decode(s, codes))

    scanned, dist = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(5)))(s)
    ref = s
    for i in range(5):
        ref, _ = body(ref, i)
    chex.assert_trees_all_close(scanned, ref, rtol=1e-5, atol=1e-6)
    chex.assert_shape(dist, (5,))
    # vmap over states of different sizes, padded to a common max
    states = [seeded(num_codes=k, max_codes=32) for k in (4, 16, 32)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    codes = jax.jit(jax.vmap(vq.encode, in_axes=(0, None)))(stacked, X)
    for i, st in enumerate(states):
        np.testing.assert_array_equal(codes[i], vq.encode(st, X))
    assert int(codes[0].max()) < 4


def test_index_bits_of_the_packed_format():
    assert vq.index_bits(2) == 1 and vq.index_bits(256) == 8 and vq.index_bits(257) == 9 and vq.index_bits(1000) == 10


def test_errors():
    with pytest.raises(ValueError, match="num_codes must be an integer >= 2"):
        vq.init(1, 4, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="does not divide the 12 channels"):
        vq.resolve_groups(12, code_dim=5)
    with pytest.raises(ValueError, match="does not divide the 12 channels"):
        vq.resolve_groups(12, groups=5)
    assert vq.resolve_groups(12, code_dim=4) == (3, 4)
    with pytest.raises(ValueError, match="expects groups \\* code_dim = 2 \\* 4 = 8"):
        vq.encode(vq.init(4, 4, 2, key=jax.random.key(0)), X)
    bad = X.at[0, 1, 2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or inf.*stage 2"):
        vq.encode(seeded(), bad, stage=2)
    with pytest.raises(ValueError, match="unknown init method"):
        vq.init_from_data(seeded(), X, "kmeans", key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_codes 8 must be >= num_codes 16"):
        vq.init(16, 4, 3, max_codes=8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="decay"):
        vq.update(seeded(), X, vq.encode(seeded(), X), decay=1.0)
