import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import codecs, vq

X = jax.random.normal(jax.random.key(1), (8, 4, 4, 32))  # 128 pixel vectors of 32 channels


def leaves_nbytes(tree):
    return sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------
# identity / cast
# ----------------------------------------------------------------------------------------------------------
def test_identity_is_the_message():
    c = codecs.identity()
    assert c.name == "identity"
    msg = {"a": X, "b": jnp.arange(6, dtype=jnp.int32).reshape(2, 3)}
    s = c.init(msg)
    assert s == ()
    s2, wire = c.encode(s, msg)
    assert s2 == () and wire is msg and wire["a"] is X
    assert c.decode(wire) is msg
    s3, wire_j = jax.jit(c.encode)(s, msg)
    out = jax.jit(c.decode)(wire_j)
    chex.assert_trees_all_equal(out, msg)
    chex.assert_trees_all_equal_dtypes(out, msg)


def test_cast_bfloat16():
    c = codecs.cast()
    assert c.name == "bfloat16"
    assert codecs.cast(jnp.float16).name == "float16"
    msg = {"x": X, "y": jnp.arange(8, dtype=jnp.int32)}
    _, wire = jax.jit(c.encode)(c.init(msg), msg)
    assert wire["x"].dtype == jnp.bfloat16 and wire["y"].dtype == jnp.int32
    out = jax.jit(c.decode)(wire)
    assert out["x"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(X.astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(out["y"]), np.arange(8))
    assert codecs.wire_bytes(wire) == X.size * 2 + 8 * 4


# ----------------------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 3, 1), (4,)])
def test_pack_unpack_round_trip(shape):
    n = math.prod(shape[1:])
    all_bits = range(1, 17)
    codes = [
        jax.random.randint(jax.random.key(b), shape, 0, 2**b, jnp.int32).astype(jnp.uint8 if b <= 8 else jnp.uint16)
        for b in all_bits
    ]

    @jax.jit
    def round_trip(codes):  # one program for the 16 widths
        packed = [codecs.pack_bits(c, b) for c, b in zip(codes, all_bits)]
        return packed, [codecs.unpack_bits(p) for p in packed]

    packed, back = round_trip(codes)
    for bits, c, p, b in zip(all_bits, codes, packed, back):
        assert p.data.dtype == jnp.uint8
        assert p.data.shape == (shape[0], math.ceil(n * bits / 8))
        assert p.data.nbytes == shape[0] * math.ceil(n * bits / 8)
        assert (p.bits, p.shape, p.dtype) == (bits, tuple(shape[1:]), c.dtype.name)
        assert b.dtype == c.dtype and b.shape == shape
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_pack_layout_little_endian():
    codes = jnp.array([[1, 2, 15, 0, 7]], jnp.uint8)  # 4-bit: two per byte, first in the low nibble
    p = codecs.pack_bits(codes, 4)
    np.testing.assert_array_equal(np.asarray(p.data), [[0x21, 0x0F, 0x07]])
    p5 = codecs.pack_bits(jnp.full((2, 8), 31, jnp.uint8), 5)  # 8 codes of 5 bits: 5 bytes
    assert p5.data.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(p5.data), 255)


def test_pack_bits_rejects_bad_bits():
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            codecs.pack_bits(jnp.zeros((2, 3), jnp.uint8), bits)


# ----------------------------------------------------------------------------------------------------------
# VQ
# ----------------------------------------------------------------------------------------------------------
def test_vq_packed_decodes_like_unpacked():
    unpacked, packed = codecs.vq(16, code_dim=4), codecs.vq(16, code_dim=4, packed=True)
    assert (unpacked.name, packed.name) == ("vq:16:4", "vq-packed:16:4")
    s_u = unpacked.init(X, jax.random.key(2))
    s_p = packed.init(X, jax.random.key(2))
    chex.assert_trees_all_equal(s_u, s_p)
    both = jax.jit(lambda s_u, s_p, key: (unpacked.encode(s_u, X, key), packed.encode(s_p, X, key)))
    for i in range(2):
        (s_u, w_u), (s_p, w_p) = both(s_u, s_p, jax.random.key(10 + i))
        assert isinstance(w_p.codes, codecs.PackedBits) and w_p.codes.bits == 4
        np.testing.assert_array_equal(np.asarray(codecs.unpack_bits(w_p.codes)), np.asarray(w_u.codes))
        assert jnp.array_equal(packed.decode(w_p), unpacked.decode(w_u))
        chex.assert_trees_all_equal(s_u, s_p)


def test_wire_bytes_concrete_and_abstract():
    c = codecs.parse_codec("vq-packed:16:4")
    s = c.init(X)
    _, wire = c.encode(s, X)
    codes_bytes = 8 * math.ceil(4 * 4 * 8 * 4 / 8)
    book_bytes = 8 * 16 * 4 * 4
    assert wire.codes.data.nbytes == codes_bytes and wire.codebook.nbytes == book_bytes
    assert codecs.wire_bytes(wire) == leaves_nbytes(wire) == codes_bytes + book_bytes
    abstract = jax.eval_shape(c.encode, s, jax.ShapeDtypeStruct(X.shape, X.dtype))[1]
    assert isinstance(codecs.wire_bytes(abstract), int)
    assert codecs.wire_bytes(abstract) == codecs.wire_bytes(wire)
    for spec in ("identity", "bfloat16", "vq:16:4"):
        c = codecs.parse_codec(spec)
        s = c.init(X)
        _, w = c.encode(s, X)
        assert codecs.wire_bytes(w) == leaves_nbytes(w)
        assert codecs.wire_bytes(jax.eval_shape(c.encode, s, X)[1]) == codecs.wire_bytes(w)
    assert codecs.wire_bytes(codecs.identity().encode((), X)[1]) == X.size * 4


def test_vq_seeds_from_data_and_learns():
    c = codecs.vq(16, code_dim=4)
    s = c.init(jax.ShapeDtypeStruct(X.shape, X.dtype), jax.random.key(0))
    assert int(s.step) == 0
    encode = jax.jit(c.encode)
    s1, w = encode(s, X, jax.random.key(1))
    assert int(s1.step) == 1
    assert w.codes.dtype == jnp.uint8 and w.codes.shape == (8, 4, 4, 8)
    chex.assert_shape(w.codebook, (8, 16, 4))
    # the codebook sent with the first message is made of vectors of that message
    vecs = np.asarray(X).reshape(-1, 8, 4)
    book = np.asarray(w.codebook)
    for g in range(8):
        dist = ((book[g][:, None, :] - vecs[:, g][None]) ** 2).sum(-1)
        np.testing.assert_allclose(dist.min(-1), 0.0, atol=1e-10)
    s_t = s1
    for i in range(4):
        s_t, w = encode(s_t, X, jax.random.key(2 + i))
    assert int(s_t.step) == 5
    d = float(vq.distortion(X, jax.jit(c.decode)(w)))
    assert np.isfinite(d) and d < 1.0


def test_vq_code_dtypes_and_groups():
    x = jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.float32)  # 512 vectors
    for k, dtype in ((2, jnp.uint8), (256, jnp.uint8), (512, jnp.uint16)):
        c = codecs.vq(k, groups=2)
        wire = jax.eval_shape(c.encode, c.init(x), x)[1]
        assert wire.codes.dtype == dtype and wire.codes.shape == (2, 16, 16, 2)
        assert wire.codebook.shape == (2, k, 2) and wire.codebook.dtype == jnp.float32
    cp = codecs.vq(512, groups=2, packed=True)
    assert cp.name == "vq-packed:512:g2"
    xs = jax.random.normal(jax.random.key(3), x.shape)
    _, wp = jax.jit(cp.encode)(cp.init(xs), xs)
    assert wp.codes.bits == 9 and wp.codes.dtype == "uint16"
    assert wp.codes.data.shape == (2, math.ceil(16 * 16 * 2 * 9 / 8))
    codes = codecs.unpack_bits(wp.codes)
    assert codes.dtype == jnp.uint16 and int(codes.max()) < 512
    chex.assert_shape(jax.jit(cp.decode)(wp), x.shape)


def test_vq_jit_and_vmap_over_states():
    c = codecs.vq(16, code_dim=8, packed=True)
    keys = jax.random.split(jax.random.key(4), 2)
    states = jax.vmap(c.init, in_axes=(None, 0))(X, keys)
    step = jax.jit(jax.vmap(lambda s, k: c.encode(s, X, k)))
    enc_keys = jax.random.split(jax.random.key(5), 2)
    states, wires = step(states, enc_keys)
    states, wires = step(states, jax.random.split(jax.random.key(6), 2))
    chex.assert_shape(wires.codebook, (2, 4, 16, 8))
    assert wires.codes.data.shape == (2, 8, math.ceil(4 * 4 * 4 * 4 / 8))
    out = jax.jit(jax.vmap(c.decode))(wires)
    chex.assert_shape(out, (2, *X.shape))
    assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))  # different keys, different codebooks
    np.testing.assert_array_equal(np.asarray(states.step), [2, 2])
    # each vmapped lane equals the unbatched computation
    encode = jax.jit(c.encode)
    s0 = c.init(X, keys[0])
    s0, _ = encode(s0, X, enc_keys[0])
    s0, w0 = encode(s0, X, jax.random.split(jax.random.key(6), 2)[0])
    np.testing.assert_allclose(np.asarray(jax.jit(c.decode)(w0)), np.asarray(out[0]), rtol=1e-6, atol=1e-6)


def test_vq_scan():
    c = codecs.vq(16, code_dim=4)
    xs = jnp.stack([X, X * 0.5, X])

    def body(s, x):
        s, w = c.encode(s, x)
        return s, vq.distortion(x, c.decode(w))

    s, dists = jax.jit(lambda s: jax.lax.scan(body, s, xs))(c.init(X))
    assert int(s.step) == 3 and np.all(np.isfinite(np.asarray(dists)))


def test_vq_rejects_bad_messages():
    c = codecs.vq(16, code_dim=5)
    with pytest.raises(ValueError) as e:
        c.init(X)
    assert "32 channels" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="single-array message, got 2 leaves") as e:
        codecs.vq(16, code_dim=4).init({"a": X, "b": X})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="at least|only") as e:
        codecs.vq(256, code_dim=4).init(X)  # 128 vectors < 256 codes
    assert "\n" not in str(e.value)
    for kwargs in ({}, {"code_dim": 4, "groups": 8}):
        with pytest.raises(ValueError, match="exactly one"):
            codecs.vq(16, **kwargs)
    with pytest.raises(ValueError, match=">= 2"):
        codecs.vq(1, code_dim=4)


# ----------------------------------------------------------------------------------------------------------
# parse_codec / check_decoded
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,name",
    [
        ("identity", "identity"),
        ("float32", "identity"),
        ("none", "identity"),
        ("bfloat16", "bfloat16"),
        ("vq:256:16", "vq:256:16"),
        ("vq-packed:16:4", "vq-packed:16:4"),
        ("vq:16:g8", "vq:16:g8"),
        ("vq-packed:64:16:init=kmeans++:decay=0.95:restart=0", "vq-packed:64:16:init=kmeans++:decay=0.95:restart=0"),
        ("vq:16:4:decay=0.99:init=sample", "vq:16:4"),  # defaults are left out of the name
        ("vq:16:g2:restart=0.001", "vq:16:g2:restart=0.001"),
        ("vq-packed:16:4:levels=2", "vq-packed:16:4:levels=2"),
        ("vq:16:4:levels=1", "vq:16:4"),
    ],
)
def test_parse_codec(spec, name):
    c = codecs.parse_codec(spec)
    assert isinstance(c, codecs.Codec) and c.name == name
    assert codecs.parse_codec(c.name).name == name


@pytest.mark.parametrize(
    "spec",
    ["", "vq", "vq:16", "vq:x:4", "vq:16:4:2", "fp8", "vq-packed:16:0", "vq:1:4", "vq:16:4:foo=1",
     "vq:16:4:decay=x", "vq:16:4:decay=1.5", "vq:16:4:init=zz", "vq:16:4:restart=-1", "vq:16:4:levels=0",
     "vq:16:4:levels=5", "vq:16:4:levels=2.0"],
)  # fmt: skip
def test_parse_codec_bad_specs(spec):
    with pytest.raises(ValueError) as e:
        codecs.parse_codec(spec)
    assert "\n" not in str(e.value) and repr(spec) in str(e.value)
    assert codecs.CODEC_SYNTAX in str(e.value)


def test_parse_codec_num_codes_below_two():
    with pytest.raises(ValueError, match="must be >= 2") as e:
        codecs.parse_codec("vq:1:4")
    assert "\n" not in str(e.value)


def test_check_decoded():
    ex = jax.ShapeDtypeStruct(X.shape, X.dtype)
    for spec in ("identity", "bfloat16", "vq:16:4", "vq-packed:16:4"):
        codecs.check_decoded(codecs.parse_codec(spec), ex, ex, "boundary 0")
    wrong = jax.ShapeDtypeStruct((8, 4, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match="boundary 1: codec vq:16:4 decodes to float32") as e:
        codecs.check_decoded(codecs.parse_codec("vq:16:4"), ex, wrong, "boundary 1")
    assert "\n" not in str(e.value) and "[8, 4, 4, 16]" in str(e.value)
    with pytest.raises(ValueError, match="boundary 2") as e:  # dtype differs
        codecs.check_decoded(codecs.identity(), ex, jax.ShapeDtypeStruct(X.shape, jnp.bfloat16), "boundary 2")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="boundary 3") as e:  # the codec rejects the message
        codecs.check_decoded(codecs.parse_codec("vq:16:5"), ex, ex, "boundary 3")
    assert "\n" not in str(e.value) and "32 channels" in str(e.value)


def test_codec_options_change_the_codec():
    """``:decay=0`` makes the EMA codebook the mean of the vectors assigned to each code after one update; the
    default decay moves it less."""
    x = jax.random.normal(jax.random.key(1), (64, 4, 4, 8))
    fast, slow = codecs.parse_codec("vq:16:8:decay=0:restart=0"), codecs.parse_codec("vq:16:8:restart=0")
    moved = []
    for c in (fast, slow):
        st = c.init(x, jax.random.key(0))
        st1, _ = c.encode(st, x)  # seeds from x, then one EMA step
        st2, _ = c.encode(st1, x)
        moved.append(float(jnp.abs(st2.codebook - st1.codebook).max()))
    assert moved[0] > 2 * moved[1] > 0  # equal if the option were ignored


# ----------------------------------------------------------------------------------------------------------
# Residual VQ (levels > 1)
# ----------------------------------------------------------------------------------------------------------
def test_residual_vq_decodes_to_the_sum_of_its_levels_and_each_level_codes_the_residual():
    c = codecs.parse_codec("vq-packed:16:4:levels=3")
    state = c.init(X, jax.random.key(0))
    assert isinstance(state, tuple) and len(state) == 3 and all(isinstance(s, vq.VQState) for s in state)
    for i in range(3):
        before = state
        state, wire = jax.jit(c.encode)(state, X + 0.1 * i, jax.random.key(i))
    codes = codecs.unpack_bits(wire.codes)
    assert codes.shape == (8, 4, 4, 3 * 8) and wire.codebook.shape == (3 * 8, 16, 4)
    # Exact: the receiver's sum of the levels' centroids, level by level from the sender's own codebooks.
    expected, residual = jnp.zeros_like(X), X + 0.2
    for level, s in enumerate(before):
        book = wire.codebook[8 * level : 8 * (level + 1)]
        np.testing.assert_array_equal(np.asarray(book), np.asarray(s.codebook))
        level_codes = codes[..., 8 * level : 8 * (level + 1)]
        np.testing.assert_array_equal(np.asarray(level_codes), np.asarray(vq.encode(s, residual)))
        q = vq.decode(book, level_codes)
        expected, residual = expected + q, residual - q
    np.testing.assert_array_equal(np.asarray(c.decode(wire)), np.asarray(expected))


def test_residual_vq_levels_cut_the_distortion_and_bytes_are_the_wire_nbytes():
    """On the same stream, each extra level lowers the distortion; the bytes are the wire's ``nbytes``: L times
    the codes and L codebooks."""
    errors = []
    for levels in (1, 2, 3):
        c = codecs.vq(16, code_dim=4, packed=True, levels=levels)
        state = c.init(X, jax.random.key(0))
        step = jax.jit(c.encode)
        for i in range(10):
            state, wire = step(state, jax.random.normal(jax.random.key(100 + i), X.shape), jax.random.key(i))
        state, wire = step(state, X, None)
        errors.append(float(vq.distortion(X, c.decode(wire))))
        codes_bytes = 8 * math.ceil(4 * 4 * 8 * levels * 4 / 8)
        assert codecs.wire_bytes(wire) == leaves_nbytes(wire) == codes_bytes + levels * 8 * 16 * 4 * 4
        assert codecs.wire_bytes(jax.eval_shape(c.encode, state, X)[1]) == codecs.wire_bytes(wire)
    assert errors[0] > errors[1] > errors[2] > 0, errors


def test_one_level_is_the_plain_codec():
    plain, one = codecs.vq(16, code_dim=4), codecs.vq(16, code_dim=4, levels=1)
    assert plain.name == one.name
    s_a, s_b = plain.init(X, jax.random.key(3)), one.init(X, jax.random.key(3))
    s_a, w_a = plain.encode(s_a, X, jax.random.key(4))
    s_b, w_b = one.encode(s_b, X, jax.random.key(4))
    chex.assert_trees_all_equal((s_a, w_a), (s_b, w_b))
