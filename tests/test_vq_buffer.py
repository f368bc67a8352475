"""Async-DGL replay buffers holding VQ codes (dgl_jax.buffer + dgl_jax.vq_train), and their memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import buffer, vq
from dgl_jax import vq_train as vt


@pytest.mark.parametrize("num_codes, dtype", [(16, jnp.uint8), (300, jnp.uint16)])
def test_replay_buffer_stores_codes_unchanged_and_decodes_them(num_codes, dtype):
    feats = [jax.random.normal(jax.random.key(20 + i), (8, 4, 4, 8)) for i in range(3)]
    labels = [jnp.full((8,), i, jnp.int32) for i in range(3)]
    s = vt._seed_codebook(jax.random.key(8), jnp.concatenate(feats * 4), num_codes, 4, 2, None, "sample")
    b = vt.Boundary(s, jnp.copy(s.codebook))
    buf = vt.init_code_buffer(2, b, (4, 4, 8), 8)
    assert buf.items[0].dtype == dtype and buf.items[0].shape == (2, 8, 4, 4, 2)
    push = jax.jit(vt.push_codes)
    pushed = []
    for f, y in zip(feats, labels):  # 3 pushes into 2 slots: the first batch is overwritten
        buf, codes = push(buf, b, f, y)
        assert codes.dtype == dtype
        pushed.append(codes)
    np.testing.assert_array_equal(pushed[0], vq.encode(s, feats[0]))  # receiver copy == sender codebook here
    (raw, y), valid, _ = jax.jit(functools.partial(buffer.sample, policy="fifo"))(buf)
    assert bool(valid) and raw.dtype == dtype
    np.testing.assert_array_equal(raw, pushed[1])  # the oldest surviving batch, bit for bit
    np.testing.assert_array_equal(y, labels[1])
    (x_hat, y), valid, buf = jax.jit(functools.partial(vt.sample_codes, policy="lifo"))(buf, b)
    assert bool(valid) and x_hat.dtype == jnp.float32
    np.testing.assert_array_equal(x_hat, vq.decode(b.receiver, pushed[2]))
    np.testing.assert_array_equal(y, labels[2])
    assert int(buf.uses.sum()) == 1


def test_buffer_memory_of_codes_vs_float32():
    shapes = [(8, 8, 32), (4, 4, 64)]
    cfg = vt.VQConfig(num_codes=256, code_dim=16)
    m = vt.buffer_memory([cfg, cfg], shapes, num_batches=10, batch_size=32)
    assert m.float32 == 10 * 32 * (8 * 8 * 32 + 4 * 4 * 64) * 4
    assert m.codes == 10 * 32 * (8 * 8 * 2 + 4 * 4 * 4)  # one uint8 per group per pixel
    assert m.codebook == (2 + 4) * 256 * 16 * 4
    assert m.factor == pytest.approx(m.float32 / (m.codes + m.codebook))
    assert m.float32 / m.codes == 64  # 16 float32 channels (64 bytes) -> one byte
    half = vt.buffer_memory([None, cfg], shapes, num_batches=10, batch_size=32)
    assert half.codes == 10 * 32 * (8 * 8 * 32 * 4 + 4 * 4 * 4) and half.codebook == 4 * 256 * 16 * 4
    wide = vt.buffer_memory([vt.VQConfig(num_codes=1024, code_dim=16)] * 2, shapes, 10, 32)
    assert wide.codes == 2 * m.codes  # uint16 codes
    with pytest.raises(ValueError, match="2 boundaries"):
        vt.buffer_memory([cfg], shapes, 10, 32)
