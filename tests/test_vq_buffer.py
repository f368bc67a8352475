"""Replay buffers (dgl_jax.buffer) holding VQ wires (dgl_jax.codecs.vq): stored bit for bit, self-contained,
and their bytes (dgl_jax.accounting) are the nbytes of what they hold."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import accounting, buffer, codecs

FEATS = [jax.random.normal(jax.random.key(20 + i), (8, 4, 4, 8)) for i in range(3)]  # 128 vectors each
LABELS = [jnp.full((8,), i, jnp.int32) for i in range(3)]


@pytest.mark.parametrize(
    "num_codes, packed, code_leaf",
    [(16, True, (jnp.uint8, (8, 4 * 4 * 2 * 4 // 8))), (300, False, (jnp.uint16, (8, 4, 4, 2)))],
)
def test_replay_buffer_stores_vq_wires_unchanged_and_decodes_them(num_codes, packed, code_leaf):
    codec = codecs.vq(num_codes, code_dim=4, packed=packed)  # 2 groups of 4 channels

    @jax.jit
    def send(state, x, key):  # the sender: its codebook moves with every message
        return codec.encode(state, x, key)

    state = codec.init(jnp.concatenate(FEATS * 3), jax.random.key(8))
    wires = []
    for i, f in enumerate(FEATS):
        state, w = send(state, jnp.concatenate([f] * 3), jax.random.key(i))  # 384 vectors >= 300 codes
        wires.append(jax.tree.map(lambda a: a[:8] if a.shape[0] == 24 else a, w))  # one batch of 8 per slot
    # the codebook moves between sends: an item must carry the one its codes refer to
    assert not np.array_equal(wires[1].codebook, wires[2].codebook)

    buf = buffer.init(2, (wires[0], LABELS[0]))
    dtype, shape = code_leaf
    codes_leaf = buf.items[0].codes.data if packed else buf.items[0].codes
    assert codes_leaf.dtype == dtype and codes_leaf.shape == (2, *shape)
    assert buf.items[0].codebook.dtype == jnp.float32 and buf.items[0].codebook.shape == (2, 2, num_codes, 4)
    push = jax.jit(buffer.push)
    for w, y in zip(wires, LABELS, strict=True):  # 3 pushes into 2 slots: the first batch is overwritten
        buf = push(buf, (w, y))

    (raw, y), valid, _ = jax.jit(functools.partial(buffer.sample, policy="fifo"))(buf)
    assert bool(valid)
    for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(wires[1]), strict=True):  # the oldest survivor, exactly
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(y, LABELS[1])
    np.testing.assert_array_equal(codec.decode(raw), codec.decode(wires[1]))

    (raw, y), valid, buf = jax.jit(functools.partial(buffer.sample, policy="lifo"))(buf)
    decoded = jax.jit(codec.decode)(raw)
    assert bool(valid) and decoded.dtype == jnp.float32 and decoded.shape == (8, 4, 4, 8)
    np.testing.assert_array_equal(decoded, codec.decode(wires[2]))  # with the codebook it was sent with
    np.testing.assert_array_equal(y, LABELS[2])
    assert int(buf.uses.sum()) == 1

    # uniform sampling: the key is the last (keyword) parameter
    (raw, _), valid, _ = buffer.sample(buf, policy="uniform", key=jax.random.key(0))
    assert bool(valid) and any(np.array_equal(codec.decode(raw), codec.decode(w)) for w in wires[1:])

    # bytes: the nbytes of the stored arrays, codebook included: 16 codes pay off on a batch of 8, 300 do not
    item_bytes = accounting.nbytes((wires[0], LABELS[0]))
    assert accounting.nbytes(buf.items) == 2 * item_bytes
    codebook = 2 * num_codes * 4 * 4
    assert item_bytes == np.prod(shape) * np.dtype(dtype).itemsize + codebook + 8 * 4
    assert (item_bytes < accounting.nbytes((FEATS[0], LABELS[0]))) == (num_codes == 16)


def test_packed_wire_bytes():
    codec = codecs.vq(16, code_dim=4, packed=True)
    state = codec.init(FEATS[0])
    wire = jax.eval_shape(lambda s, x: codec.encode(s, x)[1], state, FEATS[0])
    codes = 8 * (4 * 4 * 2 * 4 // 8)  # 32 codes of 4 bits per example
    book = 2 * 16 * 4 * 4  # float32 [G, K, d]
    assert accounting.nbytes(wire) == codes + book == codecs.wire_bytes(wire)
    assert accounting.float32_bytes(FEATS[0]) == FEATS[0].size * 4
