"""dgl_jax.conv: Winograd and direct convolutions against lax.conv_general_dilated, and the algorithm choice."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import conv

DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN, precision="highest")


def close(ours, ref, tol):
    """Every leaf within ``tol`` of the reference's largest magnitude (Winograd's rounding scales with it)."""
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        chex.assert_equal_shape((a, b))
        err, scale = float(jnp.max(jnp.abs(a - b))), float(jnp.max(jnp.abs(b)))
        assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


def normal(seed, shape):  # NumPy draws: jax.random would compile a sampler for every new shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def operands(xs, ws):
    return normal(0, xs), normal(1, ws) / np.sqrt(9 * ws[2])


WINOGRAD_CASES = [  # x shape, C_out, padding, tile
    ((2, 8, 8, 16), 8, ((1, 1), (1, 1)), 4),
    ((2, 7, 5, 16), 4, ((1, 1), (1, 1)), 4),  # output sides not multiples of the tile
    ((2, 6, 9, 16), 4, ((0, 2), (2, 1)), 4),  # asymmetric padding
    ((1, 6, 6, 16), 8, ((0, 0), (0, 0)), 4),  # VALID
    ((3, 4, 4, 24), 8, ((1, 1), (1, 1)), 4),
    ((2, 7, 5, 16), 4, ((1, 1), (1, 1)), 2),
    ((2, 6, 9, 16), 4, ((0, 2), (2, 1)), 2),
]


@pytest.mark.parametrize("xs, cout, padding, tile", WINOGRAD_CASES)
def test_winograd_equals_lax_values_and_gradients(xs, cout, padding, tile):
    x, w = operands(xs, (3, 3, xs[-1], cout))
    r = normal(2, lax_conv(x, w, padding).shape)

    def loss(f, x, w):  # a nonlinear use of the output, so that the forward value is needed
        y = f(x, w)
        return jnp.sum(jnp.sin(y) * r), y

    ours = jax.jit(
        jax.value_and_grad(
            lambda x, w: loss(lambda x, w: conv.winograd_conv(x, w, padding, tile), x, w), (0, 1), has_aux=True
        )
    )(x, w)
    ref = jax.value_and_grad(lambda x, w: loss(lambda x, w: lax_conv(x, w, padding), x, w), (0, 1), has_aux=True)(x, w)
    tol = 3e-5 if tile == 4 else 3e-6
    close(ours[0][1], ref[0][1], tol)  # values
    close(ours[1], ref[1], tol)  # input and kernel gradients


def test_winograd_under_vmap():
    x, w = operands((3, 2, 6, 6, 16), (3, 3, 3, 16, 4))
    w = w[0]
    pads = ((1, 1), (1, 1))

    def grads(f, x):
        return jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)

    ours = jax.jit(jax.vmap(lambda x: grads(lambda x, w: conv.winograd_conv(x, w, pads), x)))(x)
    ref = jax.vmap(lambda x: grads(lambda x, w: lax_conv(x, w, pads), x))(x)
    close(ours, ref, 3e-5)


@pytest.mark.parametrize("xs, algorithm", [((32, 16, 16, 32), "winograd"), ((4, 16, 16, 32), "direct")])
def test_conv_general_dilated_lowers_the_chosen_algorithm_on_cpu(xs, algorithm):
    x, w = jax.ShapeDtypeStruct(xs, jnp.float32), jax.ShapeDtypeStruct((3, 3, 32, 64), jnp.float32)
    assert conv.conv_algorithm(x.shape, w.shape, x.dtype, ((1, 1), (1, 1)))[0] == algorithm

    def loss(x, w):
        return jnp.sum(jnp.sin(conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)))

    forward = jax.jit(loss).lower(x, w).as_text()
    backward = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
    if algorithm == "winograd":  # batched matmuls of the transformed tiles, no convolution at all
        assert "convolution" not in forward + backward and "dot_general" in forward
    else:  # XLA's convolution forward and for the input gradient, matmuls for the kernel gradient
        assert "convolution" in forward and "dot_general" in backward


@pytest.mark.parametrize(
    "xs, ws, dtype, padding, expected",
    [
        ((128, 16, 16, 64), (3, 3, 64, 128), jnp.float32, "SAME", ("winograd", 4)),
        ((128, 8, 8, 128), (3, 3, 128, 256), jnp.float32, "SAME", ("winograd", 4)),
        ((128, 3, 3, 256), (3, 3, 256, 256), jnp.float32, "SAME", ("winograd", 2)),
        ((128, 1, 1, 256), (3, 3, 256, 256), jnp.float32, "SAME", ("direct", None)),  # a 1x1 output
        ((4, 8, 8, 64), (3, 3, 64, 64), jnp.float32, "SAME", ("direct", None)),  # 9.4M multiply-adds
        ((128, 32, 32, 3), (3, 3, 3, 64), jnp.float32, "SAME", ("direct", None)),  # narrow input
        ((8, 16, 16, 64), (3, 3, 64, 64), jnp.bfloat16, "SAME", ("direct", None)),
        ((8, 16, 16, 64), (5, 5, 64, 64), jnp.float32, "SAME", ("direct", None)),
        ((8, 16, 16, 64), (1, 1, 64, 64), jnp.float32, "SAME", ("direct", None)),
        ((8, 16, 16, 64), (3, 3, 64, 64), jnp.float32, ((3, 3), (1, 1)), ("xla", None)),  # padding > k - 1
    ],
)
def test_conv_algorithm(xs, ws, dtype, padding, expected):
    x, w = jax.ShapeDtypeStruct(xs, dtype), jax.ShapeDtypeStruct(ws, dtype)
    pads = conv._nhwc_unit_pads(x, w, (1, 1), padding, None, None, DN, 1)
    assert conv.conv_algorithm(xs, ws, dtype, pads) == expected


def test_strided_grouped_and_dilated_convolutions_are_xla_own():
    x, w = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32), jax.ShapeDtypeStruct((3, 3, 16, 8), jnp.float32)
    assert conv._nhwc_unit_pads(x, w, (2, 2), "SAME", None, None, DN, 1) is None
    assert conv._nhwc_unit_pads(x, w, (1, 1), "SAME", None, (2, 2), DN, 1) is None
    assert conv._nhwc_unit_pads(x, w, (1, 1), "SAME", None, None, DN, 2) is None
    nchw = jax.ShapeDtypeStruct((2, 16, 8, 8), jnp.float32)
    assert conv._nhwc_unit_pads(nchw, w, (1, 1), "SAME", None, None, ("NCHW", "HWIO", "NCHW"), 1) is None


# the direct path (shapes below the Winograd size, or not 3x3)
CONV_CASES = [  # x shape, kernel shape, padding (kh*kw*C_in <= 32: patches kernel gradient, else per tap)
    ((2, 6, 6, 3), (3, 3, 3, 4), ((1, 1), (1, 1))),
    ((2, 6, 6, 8), (3, 3, 8, 4), ((1, 1), (1, 1))),
    ((2, 5, 6, 8), (3, 3, 8, 4), ((0, 2), (2, 1))),
    ((2, 5, 5, 6), (1, 1, 6, 4), ((0, 0), (0, 0))),
    ((2, 5, 5, 6), (1, 1, 6, 4), "SAME"),
    ((2, 7, 5, 4), (5, 5, 4, 3), ((2, 2), (2, 2))),
    ((1, 6, 6, 2), (3, 3, 2, 5), ((0, 2), (1, 0))),
    ((2, 6, 6, 3), (3, 3, 3, 4), "SAME"),
    ((2, 6, 6, 3), (3, 3, 3, 4), "VALID"),
]


@pytest.mark.parametrize("xs, ws, padding", CONV_CASES)
def test_conv_general_dilated_equals_lax_values_and_gradients(xs, ws, padding):
    x, w = normal(0, xs), normal(1, ws)
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(f, x, w):
        y = f(x, w, (1, 1), padding, dimension_numbers=dn)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.jit(
        jax.value_and_grad(lambda x, w: loss(conv.conv_general_dilated, x, w), (0, 1), has_aux=True)
    )(x, w)
    (_, y_ref), grads_ref = jax.value_and_grad(
        lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1), has_aux=True
    )(x, w)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-5)


def test_conv_general_dilated_under_vmap_and_bfloat16():
    x, w = normal(0, (3, 2, 6, 6, 4)), normal(1, (3, 3, 3, 4, 8))
    dn = ("NHWC", "HWIO", "NHWC")

    def grads(f, x, w):
        return jax.grad(lambda x, w: jnp.sum(f(x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2), (0, 1))(x, w)

    batched = jax.jit(jax.vmap(lambda x, w: grads(conv.conv_general_dilated, x, w)))(x, w)
    chex.assert_trees_all_close(
        batched, jax.vmap(lambda x, w: grads(jax.lax.conv_general_dilated, x, w))(x, w), rtol=1e-5, atol=1e-4
    )
    xb, wb = x[0].astype(jnp.bfloat16), w[0].astype(jnp.bfloat16)
    gb = grads(conv.conv_general_dilated, xb, wb)
    chex.assert_trees_all_equal_dtypes(gb, (xb, wb))
    # bfloat16 inputs and products: errors scale with the gradient's magnitude (1% of its largest entry).
    for got, want in zip(gb, grads(jax.lax.conv_general_dilated, x[0], w[0]), strict=True):
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.01 * float(jnp.abs(want).max()))


def test_conv_module_has_flax_conv_parameters():
    x = jnp.ones((1, 5, 5, 3))
    ours = conv.Conv(4, (3, 3), padding=1).init(jax.random.key(0), x)
    theirs = nn.Conv(4, (3, 3), padding=1).init(jax.random.key(0), x)
    chex.assert_trees_all_equal(ours, theirs)
    y = conv.Conv(4, (3, 3), strides=2, padding=1).apply(ours, x)  # strided: lax's own path
    chex.assert_shape(y, (1, 3, 3, 4))
