import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import layers


def numpy_adaptive_avg_pool(x, oh, ow):
    """Reference: PyTorch's AdaptiveAvgPool2d bins written out with loops."""
    b, h, w, c = x.shape
    out = np.zeros((b, oh, ow, c), x.dtype)
    for i in range(oh):
        h0, h1 = int(np.floor(i * h / oh)), int(np.ceil((i + 1) * h / oh))
        for j in range(ow):
            w0, w1 = int(np.floor(j * w / ow)), int(np.ceil((j + 1) * w / ow))
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("n,m", [(7, 2), (14, 4), (5, 3), (8, 2), (1, 2), (3, 1)])
def test_adaptive_avg_pool_matches_torch_bins(n, m):
    x = np.random.default_rng(0).normal(size=(2, n, n + 1, 3)).astype(np.float32)
    got = layers.adaptive_avg_pool(jnp.asarray(x), (m, m + 1) if n + 1 >= 1 else m)
    np.testing.assert_allclose(got, numpy_adaptive_avg_pool(x, m, m + 1), rtol=1e-5, atol=1e-6)


def test_adaptive_bins_overlap_when_not_dividing():
    assert layers.adaptive_bins(7, 2) == [(0, 4), (3, 7)]
    assert layers.adaptive_bins(14, 4) == [(0, 4), (3, 7), (7, 11), (10, 14)]


def test_space_to_depth_is_invertible():
    x = jax.random.normal(jax.random.key(1), (2, 8, 6, 3))
    y = layers.space_to_depth(x, 2)
    chex.assert_shape(y, (2, 4, 3, 12))
    chex.assert_trees_all_equal(layers.depth_to_space(y, 2), x)
    with pytest.raises(ValueError, match="divisible"):
        layers.space_to_depth(jnp.zeros((1, 5, 4, 1)))


@pytest.mark.parametrize(
    "kind,shape", [("maxpool", (2, 4, 4, 3)), ("avgpool", (2, 4, 4, 3)), ("space_to_depth", (2, 4, 4, 12))]
)
def test_downsamplers(kind, shape):
    x = jnp.ones((2, 8, 8, 3))
    chex.assert_shape(layers.downsample(x, kind), shape)


@pytest.mark.parametrize("window", [(2, 2), (4, 2), (1, 3)])
def test_block_mean_equals_avg_pool_values_and_gradients(window):
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))

    def loss(pool, x):
        return jnp.sum(jnp.sin(pool(x)))

    ours = jax.value_and_grad(lambda x: loss(lambda x: layers.block_mean(x, window), x))(x)
    theirs = jax.value_and_grad(lambda x: loss(lambda x: layers.nn.avg_pool(x, window, strides=window), x))(x)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by the window"):
        layers.block_mean(x, (3, 3))


def test_strided_conv_downsamples():
    m = layers.ConvBNReLU(5, pre="stride")
    x = jnp.ones((2, 8, 8, 3))
    v = m.init(jax.random.key(0), x, False)
    chex.assert_shape(m.apply(v, x, False), (2, 4, 4, 5))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown downsampler 'bogus'"):
        layers.downsample(jnp.ones((1, 4, 4, 1)), "bogus")
    with pytest.raises(ValueError, match="unknown head 'bogus'.*mlp_sr"):
        layers.make_head("bogus", 10)


@pytest.mark.parametrize("kind", layers.HEADS)
@pytest.mark.parametrize("size", [7, 8, 1])
def test_heads_give_float32_logits(kind, size):
    head = layers.make_head(kind, 10, dtype=jnp.bfloat16)
    x = jnp.ones((3, size, size, 16))
    v = head.init(jax.random.key(0), x, False)
    out = head.apply(v, x, True, mutable=["batch_stats"])[0]
    chex.assert_shape(out, (3, 10))
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_equal_dtypes(v["params"], jax.tree.map(lambda p: p.astype(jnp.float32), v["params"]))


def test_mlp_sr_widths_follow_paper():
    head = layers.MLPSRHead(10)
    v = head.init(jax.random.key(0), jnp.ones((1, 16, 16, 32)), False)
    p = v["params"]
    chex.assert_shape(p["Conv_0"]["kernel"], (1, 1, 32, 32))
    chex.assert_shape(p["Dense_0"]["kernel"], (4 * 32, 4 * 32))
    chex.assert_shape(p["Dense_3"]["kernel"], (4 * 32, 10))


@pytest.mark.parametrize(
    "shape,dtype", [((8, 5, 5, 3), jnp.float32), ((16, 7), jnp.float32), ((8, 4, 4, 6), jnp.bfloat16)]
)
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_matches_flax(shape, dtype, train):
    """Same variables, outputs, running statistics and (up to rounding) gradients as flax's BatchNorm."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)
    r = jnp.asarray(rng.normal(size=shape), jnp.float32)
    c = shape[-1]
    ours = layers.BatchNorm(use_running_average=not train, dtype=dtype)
    ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    chex.assert_trees_all_equal(ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x))
    variables = {
        "params": {"scale": jnp.linspace(0.5, 2.0, c), "bias": jnp.linspace(-1.0, 1.0, c)},
        "batch_stats": {"mean": jnp.linspace(0.0, 1.0, c), "var": jnp.linspace(1.0, 2.0, c)},
    }

    def loss(module, v, x):
        y, stats = module.apply(v, x, mutable=["batch_stats"])
        return jnp.vdot(y.astype(jnp.float32), r), (y, stats)

    (_, (y, stats)), grads = jax.value_and_grad(lambda v, x: loss(ours, v, x), (0, 1), has_aux=True)(variables, x)
    (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(lambda v, x: loss(ref, v, x), (0, 1), has_aux=True)(
        variables, x
    )
    chex.assert_trees_all_equal(y, y_ref)
    chex.assert_trees_all_equal(stats, stats_ref)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    chex.assert_trees_all_close(grads, grads_ref, rtol=tol, atol=tol)


def test_batch_norm_gradient_matches_autodiff_of_its_formula():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 5)) * 3.0 + 1.0
    scale, bias = jnp.linspace(0.5, 1.5, 5), jnp.linspace(-0.2, 0.2, 5)
    r = jax.random.normal(jax.random.key(1), x.shape)

    def formula(x, scale, bias):
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

    got = jax.grad(lambda *a: jnp.vdot(jax.nn.relu(layers.batch_norm(*a)), r), (0, 1, 2))(x, scale, bias)
    want = jax.grad(lambda *a: jnp.vdot(jax.nn.relu(formula(*a)), r), (0, 1, 2))(x, scale, bias)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, (x, scale, bias))
