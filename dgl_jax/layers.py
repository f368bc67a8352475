"""Flax linen building blocks (NHWC): conv-BN-ReLU units, downsamplers, adaptive pooling, auxiliary heads.

Every module takes ``dtype`` (the compute dtype) and keeps its parameters in float32, so bfloat16 compute
is a matter of passing ``dtype=jnp.bfloat16``. BatchNorm follows PyTorch's defaults (momentum 0.1, which is
Flax ``momentum=0.9``; eps 1e-5) and its gradient is written out (:func:`batch_norm`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax.conv import Conv, conv_general_dilated  # noqa: F401  (re-exported: the layers' convolution)

Dtype = Any

DOWNSAMPLERS = ("maxpool", "avgpool", "stride", "space_to_depth")
HEADS = ("mlp_sr", "mlp", "cnn", "linear", "dni", "gap_linear")


# ----------------------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------------------
def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature ``mean`` and biased ``var`` ``[C]`` (float32) of ``x: [..., C]`` over all other axes, the
    variance as ``max(E[x^2] - E[x]^2, 0)`` (Flax's ``use_fast_variance``)."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axes)
    return mean, jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """Training-mode batch normalisation of ``x: [..., C]`` with its own batch statistics (:func:`batch_stats`):
    ``(x - mean) * rsqrt(var + epsilon) * scale + bias``, ``scale``/``bias`` ``[C]``, computed in float32 and
    returned in ``x.dtype``. Its gradient is the closed form ``scale * inv * (dy - mean(dy) - xhat *
    mean(dy * xhat))`` (``inv = rsqrt(var + epsilon)``, ``xhat = (x - mean) * inv``), two reductions and one
    elementwise pass, where autodiff of the formula needs more passes."""
    return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _normalize(x, mean, inv, scale, bias):
    """``(x - mean) * (inv * scale) + bias`` in float32 (flax's order of operations)."""
    return (x.astype(jnp.float32) - mean) * (inv * scale) + bias


def _batch_norm_fwd(x, scale, bias, epsilon):
    mean, var = batch_stats(x)
    inv = jax.lax.rsqrt(var + epsilon)
    return _normalize(x, mean, inv, scale, bias).astype(x.dtype), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, res, dy):
    del epsilon
    x, mean, inv, scale = res
    axes = tuple(range(x.ndim - 1))
    dy = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * inv
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    n = math.prod(x.shape[:-1])
    dx = (scale * inv) * (dy - dbias / n - xhat * (dscale / n))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis of ``[..., C]`` with PyTorch's defaults (momentum 0.1 on the running
    statistics, which is Flax ``momentum=0.9``; ``epsilon`` 1e-5). Same variables and values as
    ``flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5)`` (``params``: ``scale``, ``bias``; ``batch_stats``:
    ``mean``, ``var``); in training mode it normalises through :func:`batch_norm` (closed-form gradient)."""

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        dtype = self.dtype or jnp.result_type(x, jnp.float32)
        if self.use_running_average:
            return _normalize(x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon), scale, bias).astype(dtype)
        if not self.is_initializing():
            # the same reductions as inside batch_norm: XLA's CSE computes them once (checked in the HLO)
            mean, var = jax.lax.stop_gradient(batch_stats(x))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return batch_norm(x.astype(dtype), scale, bias, self.epsilon)


# ----------------------------------------------------------------------------------------------------------
# Pooling helpers (pure functions)
# ----------------------------------------------------------------------------------------------------------
class InputTooSmallError(ValueError):
    """A downsampling layer given fewer pixels than its window (a model too deep for the image size)."""


def adaptive_bins(n: int, m: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pool bins: output ``i`` of ``m`` averages input ``[floor(i*n/m), ceil((i+1)*n/m))``."""
    if n < 1 or m < 1:
        raise ValueError(f"adaptive pooling needs positive sizes, got input {n} and output {m}")
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


@functools.cache
def _pool_matrix(n: int, m: int) -> np.ndarray:
    """``[m, n]`` averaging matrix of PyTorch's adaptive average pooling along one axis."""
    mat = np.zeros((m, n), np.float32)
    for i, (lo, hi) in enumerate(adaptive_bins(n, m)):
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """Torch-style adaptive average pooling of ``x: [batch, H, W, C]`` to ``[batch, oh, ow, C]``.

    Matches ``torch.nn.AdaptiveAvgPool2d`` including the overlapping bins used when the sizes do not divide
    (e.g. 7 -> 2 averages rows 0..3 and 3..6). When they divide it is a plain non-overlapping average pool.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, h, w, _ = x.shape
    if h < 1 or w < 1:
        raise InputTooSmallError(f"adaptive average pooling gets an empty {h}x{w} input")
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:
        return block_mean(x, (h // oh, w // ow))
    ph = jnp.asarray(_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw)


def block_mean(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Non-overlapping average pool of ``[batch, H, W, C]`` over ``window`` blocks -> ``[batch, H/kh, W/kw, C]``.

    Same values as ``nn.avg_pool(x, window, strides=window)``, written as a reshape and a mean so that its
    gradient is a broadcast: the gradient of XLA's reduce-window sum is a padded reduce-window, slow on CPU
    (``benchmarks/profile_step.py``).
    """
    b, h, w, c = x.shape
    kh, kw = window
    if h % kh or w % kw:
        raise ValueError(f"block_mean needs H and W divisible by the window {window}, got {h}x{w}")
    return x.reshape(b, h // kh, kh, w // kw, kw, c).mean(axis=(2, 4))


def space_to_depth(x: jax.Array, block: int = 2) -> jax.Array:
    """Invertible downsampling ``[batch, H, W, C] -> [batch, H/b, W/b, C*b*b]`` (no information lost)."""
    b, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f"space_to_depth needs H and W divisible by {block}, got {h}x{w}")
    x = x.reshape(b, h // block, block, w // block, block, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """Inverse of :func:`space_to_depth`: ``[batch, H, W, C*b*b] -> [batch, H*b, W*b, C]``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, block, block, c // (block * block))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * block, w * block, c // (block * block))


def downsample(x: jax.Array, kind: str | None, window: int = 2, stride: int | None = None) -> jax.Array:
    """Parameter-free downsampling of ``[batch, H, W, C]``: ``maxpool``, ``avgpool``, ``space_to_depth``.

    ``stride`` defaults to ``window``. ``kind=None`` or ``"stride"`` (handled by the conv) returns ``x``.
    """
    if kind in (None, "stride"):
        return x
    if kind in DOWNSAMPLERS and (x.shape[1] < window or x.shape[2] < window):
        raise InputTooSmallError(
            f"its input of {x.shape[1]}x{x.shape[2]} pixels is smaller than its {window}x{window} {kind} window"
        )
    if kind == "maxpool":
        return nn.max_pool(x, (window, window), strides=(stride or window,) * 2)
    if kind == "avgpool":
        if (stride or window) == window and x.shape[1] % window == 0 and x.shape[2] % window == 0:
            return block_mean(x, (window, window))
        return nn.avg_pool(x, (window, window), strides=(stride or window,) * 2)
    if kind == "space_to_depth":
        return space_to_depth(x, window)
    raise ValueError(f"unknown downsampler {kind!r}; expected one of {DOWNSAMPLERS}")


# ----------------------------------------------------------------------------------------------------------
# Trunk units
# ----------------------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """``[pre-downsample] -> conv(kxk) -> BN -> ReLU -> [post-pool]`` on ``[batch, H, W, C]``.

    ``pre``: downsampler applied before the conv (``maxpool``/``avgpool``/``space_to_depth``, or ``stride``
    to make the conv itself strided by 2). ``post``: optional ``(kind, window, stride)`` pool after the ReLU
    (the DNI network pools after its convs). ``bias``: conv bias (torchvision's VGG-BN keeps it).
    """

    features: int
    kernel: int = 3
    pre: str | None = None
    post: tuple[str, int, int] | None = None
    bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = downsample(x, self.pre)
        stride = 2 if self.pre == "stride" else 1
        x = Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=stride,
            padding=self.kernel // 2,
            use_bias=self.bias,
            dtype=self.dtype,
        )(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
        x = nn.relu(x)
        if self.post is not None:
            kind, window, stride = self.post
            x = downsample(x, kind, window, stride)
        return x


class Sequential(nn.Module):
    """Applies ``layers`` in order, each called as ``layer(x, train)``."""

    layers: Sequence[nn.Module]

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, train)
        return x


# ----------------------------------------------------------------------------------------------------------
# Auxiliary heads: each maps [batch, H, W, C] to logits [batch, num_classes] (float32)
# ----------------------------------------------------------------------------------------------------------
def _dense_bn_relu(x: jax.Array, width: int, train: bool, dtype: Dtype) -> jax.Array:
    x = nn.Dense(width, use_bias=False, dtype=dtype)(x)
    x = BatchNorm(use_running_average=not train, dtype=dtype)(x)
    return nn.relu(x)


def _classifier(x: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
    return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)


class MLPHead(nn.Module):
    """``mlp`` head: adaptive-avg-pool to ``pool x pool`` -> flatten -> ``depth`` x [Dense, BN, ReLU] -> Dense.

    ``width`` defaults to ``pool*pool*C`` (the paper's 4C). Also the paper's last-stage classifier
    (``depth=2``).
    """

    num_classes: int
    depth: int = 3
    width: int | None = None
    pool: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = adaptive_avg_pool(x, self.pool)
        x = x.reshape(x.shape[0], -1)
        width = self.width or x.shape[-1]
        for _ in range(self.depth):
            x = _dense_bn_relu(x, width, train, self.dtype)
        return _classifier(x, self.num_classes, self.dtype)


class MLPSRHead(nn.Module):
    """``mlp-sr`` head (the paper's default): adaptive-avg-pool to ``ceil(S/4)`` -> ``depth`` x [conv1x1 C,
    BN, ReLU] -> adaptive-avg-pool 2x2 -> flatten (4C) -> ``depth`` x [Dense 4C, BN, ReLU] -> Dense."""

    num_classes: int
    depth: int = 3
    width: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _, h, w, c = x.shape
        x = adaptive_avg_pool(x, (math.ceil(h / 4), math.ceil(w / 4)))
        width = self.width or c
        for _ in range(self.depth):
            x = Conv(width, (1, 1), use_bias=False, dtype=self.dtype)(x)
            x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
            x = nn.relu(x)
        x = adaptive_avg_pool(x, 2).reshape(x.shape[0], -1)
        for _ in range(self.depth):
            x = _dense_bn_relu(x, 4 * width, train, self.dtype)
        return _classifier(x, self.num_classes, self.dtype)


class CNNHead(nn.Module):
    """``cnn`` head: ``depth`` x [conv3x3 C, BN, ReLU] at full resolution -> adaptive-avg-pool 2x2 -> BN ->
    flatten -> Dense. Costs more than the trunk itself: the paper's case for ``mlp_sr``."""

    num_classes: int
    depth: int = 2
    width: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = self.width or x.shape[-1]
        for _ in range(self.depth):
            x = Conv(width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
            x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
            x = nn.relu(x)
        x = adaptive_avg_pool(x, 2)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
        return _classifier(x.reshape(x.shape[0], -1), self.num_classes, self.dtype)


class LinearHead(nn.Module):
    """``[batch, H, W, C]`` -> Dense: flattened (``pool=False``: the DNI network's last classifier, on its 1x1
    output) or after a global average pool (``pool=True``: the ResNets' own classifier)."""

    num_classes: int
    dtype: Dtype = jnp.float32
    pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.mean(x, axis=(1, 2)) if self.pool else x.reshape(x.shape[0], -1)
        return _classifier(x, self.num_classes, self.dtype)


def GAPLinearHead(num_classes: int, dtype: Dtype = jnp.float32) -> LinearHead:  # noqa: N802 - a head like the others
    """Global average pool -> Dense (the ResNets' own classifier)."""
    return LinearHead(num_classes, dtype, pool=True)


class DNIHead(nn.Module):
    """The DNI-comparison auxiliary head: ``depth`` x conv5x5 (ReLU between, last zero-initialised) -> global
    average pool -> Dense."""

    num_classes: int
    depth: int = 3
    width: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.depth):
            last = i == self.depth - 1
            init = nn.initializers.zeros if last else nn.linear.default_kernel_init
            x = Conv(self.width, (5, 5), padding=2, kernel_init=init, dtype=self.dtype)(x)
            if not last:
                x = nn.relu(x)
        return _classifier(jnp.mean(x, axis=(1, 2)), self.num_classes, self.dtype)


def make_head(kind: str, num_classes: int, dtype: Dtype = jnp.float32, **kwargs: Any) -> nn.Module:
    """Builds an auxiliary head by name (one of :data:`HEADS`)."""
    table = {
        "mlp_sr": MLPSRHead,
        "mlp": MLPHead,
        "cnn": CNNHead,
        "linear": LinearHead,
        "dni": DNIHead,
        "gap_linear": GAPLinearHead,
    }
    if kind not in table:
        raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")
    return table[kind](num_classes=num_classes, dtype=dtype, **kwargs)
