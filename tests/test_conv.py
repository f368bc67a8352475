"""dgl_jax.conv: Winograd and direct convolutions against lax.conv_general_dilated, and the algorithm choice."""

import chex
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
