"""The zoo's 2-D convolution: ``jax.lax.conv_general_dilated``'s values, computed faster on CPU.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature and picks, from the shapes alone
(:func:`conv_algorithm`), how an NHWC/HWIO convolution is computed:

* ``"winograd"``: 3x3, unit stride, float32, at least :data:`WINOGRAD_MIN_CHANNELS` input channels and
  :data:`WINOGRAD_MIN_MACS` multiply-adds (a direct convolution's):
  Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016), with ``m = 4`` when both output sides
  are at least 4, else ``m = 2``. Input tiles, kernel and products are transformed with small constant
  matrices and the convolution becomes ``(m+2)^2`` independent matmuls ``[tiles, C_in] @ [C_in, C_out]``:
  2.25x (m=2) or 4x (m=4) fewer multiplications than a direct convolution. Its gradient (:func:`winograd_conv`)
  is the same kind of matmuls on the stored transformed input. CPU only: on other backends the same call
  runs XLA's convolution (``lax.platform_dependent``), whose libraries choose their own algorithms.
  Rounding differs from a direct convolution by about 1e-5 (m=4) or 1e-6 (m=2) of the output's scale.
* ``"direct"``: any other unit-stride, undilated, ungrouped case with ``0 <= padding <= k - 1``: XLA's
  forward convolution, the input gradient as a plain convolution and, on CPU, the kernel gradient as matmuls
  over the ``B*Ho*Wo`` positions (:func:`direct_conv`); XLA:CPU's own kernel gradient (a batch-contracting
  convolution) runs at a fraction of its forward speed.
* ``"xla"``: everything else: ``lax.conv_general_dilated`` and its own gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_NHWC = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]

WINOGRAD_MIN_CHANNELS = 16
"""Fewest input channels for which :func:`conv_algorithm` picks Winograd (below it the tile transforms,
which cost ``O(C_in)`` per tile, outweigh the saved multiplications)."""

WINOGRAD_MIN_MACS = 2**27
"""Fewest multiply-adds of the direct convolution (``B*Ho*Wo*9*C_in*C_out``) for which :func:`conv_algorithm`
picks Winograd: below it the saving is a few milliseconds and does not pay for Winograd's longer compile
(it lengthens the compilation of each training step program: see the README's Speed section)."""

# Winograd F(m, 3) matrices (Lavin & Gray 2016): input transform B^T [a, a], kernel transform G [a, 3],
# output transform A^T [m, a], a = m + 2; for correlation (what CNNs call convolution).
_WINOGRAD = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            np.float64,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            np.float64,
        ),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Direct convolution with a CPU-friendly kernel gradient
# ----------------------------------------------------------------------------------------------------------
def _kernel_grad_dots(x: jax.Array, dy: jax.Array, kernel: tuple[int, int], padding: Pads) -> jax.Array:
    """Kernel gradient ``[kh, kw, C_in, C_out]`` of a unit-stride NHWC convolution as matmuls contracting the
    ``B*Ho*Wo`` positions (float32 accumulation): one matmul of the ``[B*Ho*Wo, kh*kw*C_in]`` patches when
    they are narrow (``kh*kw*C_in <= 32``, e.g. a first layer on RGB input), otherwise one
    ``[C_in, B*Ho*Wo] @ [B*Ho*Wo, C_out]`` matmul per kernel tap in a ``lax.scan``, so that only one shifted
    copy of the input is alive at a time."""
    kh, kw = kernel
    b, ho, wo, d = dy.shape
    c = x.shape[-1]
    dyf = dy.reshape(-1, d)
    if kh * kw == 1:
        return jnp.dot(x.reshape(-1, c).T, dyf, preferred_element_type=jnp.float32).reshape(1, 1, c, d)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    if kh * kw * c <= 32:
        taps = [xp[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
        patches = jnp.concatenate(taps, axis=-1).reshape(dyf.shape[0], -1)
        return jnp.dot(patches.T, dyf, preferred_element_type=jnp.float32).reshape(kh, kw, c, d)

    def tap(_, k):
        shifted = jax.lax.dynamic_slice(xp, (0, k // kw, k % kw, 0), (b, ho, wo, c)).reshape(-1, c)
        return None, jnp.dot(shifted.T, dyf, preferred_element_type=jnp.float32)

    return jax.lax.scan(tap, None, jnp.arange(kh * kw))[1].reshape(kh, kw, c, d)


def _conv(x: jax.Array, w: jax.Array, padding: Pads) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def direct_conv(x: jax.Array, w: jax.Array, padding: Pads) -> jax.Array:
    """Unit-stride convolution ``[B, H, W, C_in] x [kh, kw, C_in, C_out] -> [B, Ho, Wo, C_out]`` with
    ``padding = ((top, bottom), (left, right))``, each in ``[0, k - 1]``: XLA's forward convolution; gradient:
    the input gradient as a plain convolution, the kernel gradient as matmuls on CPU (XLA's elsewhere)."""
    return _conv(x, w, padding)


def _direct_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _direct_bwd(padding, res, dy):
    x, w = res
    kh, kw = w.shape[:2]
    # input gradient: the same kind of convolution as the forward one (flipped kernel, in/out swapped)
    dx_pad = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]), (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    dx = _conv(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), dx_pad)
    dw = jax.lax.platform_dependent(
        x,
        dy,
        cpu=lambda x, dy: _kernel_grad_dots(x, dy, (kh, kw), padding).astype(w.dtype),
        default=lambda x, dy: jax.vjp(lambda w: _conv(x, w, padding), w)[1](dy)[0],
    )
    return dx, dw


direct_conv.defvjp(_direct_fwd, _direct_bwd)


# ----------------------------------------------------------------------------------------------------------
# Winograd F(m x m, 3 x 3)
# ----------------------------------------------------------------------------------------------------------
def _combine(matrix: np.ndarray, parts: Sequence[jax.Array]) -> list[jax.Array]:
    """``[sum_i matrix[r, i] * parts[i] for r]`` with the zero terms left out (an elementwise fusion)."""
    out = []
    for row in matrix:
        acc = None
        for coef, part in zip(row, parts, strict=True):
            if coef == 0:
                continue
            term = part if coef == 1 else -part if coef == -1 else part * np.float32(coef)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


class _Tiling(NamedTuple):
    out: tuple[int, int]  # Ho, Wo
    tiles: tuple[int, int]  # Th, Tw: output tiles of m x m
    pads: tuple[tuple[int, int], tuple[int, int]]  # input padding to (m*Th + 2, m*Tw + 2)


def _tiling(shape: tuple[int, ...], padding: Pads, m: int) -> _Tiling:
    _, h, w, _ = shape
    ho, wo = h + sum(padding[0]) - 2, w + sum(padding[1]) - 2
    th, tw = -(-ho // m), -(-wo // m)
    pads = ((padding[0][0], m * th + 2 - h - padding[0][0]), (padding[1][0], m * tw + 2 - w - padding[1][0]))
    return _Tiling((ho, wo), (th, tw), pads)


def _input_transform(xp: jax.Array, m: int, th: int, tw: int) -> jax.Array:
    """``[B, m*Th+2, m*Tw+2, C]`` padded input -> ``[(m+2)^2, B*Th*Tw, C]``: ``B^T d B`` of every tile ``d``."""
    bt = _WINOGRAD[m][0]
    a, b, c = m + 2, xp.shape[0], xp.shape[-1]
    rows = [jax.lax.slice_in_dim(xp, i, i + m * (th - 1) + 1, m, 1) for i in range(a)]  # a x [B, Th, Wp, C]
    v = jnp.stack(_combine(bt, rows))  # [a, B, Th, Wp, C]
    cols = [jax.lax.slice_in_dim(v, j, j + m * (tw - 1) + 1, m, 3) for j in range(a)]  # a x [a, B, Th, Tw, C]
    return jnp.stack(_combine(bt, cols), 1).reshape(a * a, b * th * tw, c)


def _overlap_add(parts: Sequence[jax.Array], axis: int, m: int) -> jax.Array:
    """``out[m*t + i] = sum of parts[i][t]`` along ``axis`` (tile ``t`` of size ``m + 2`` at stride ``m``): the
    ``m + 2`` arrays ``[..., T, ...]`` -> one ``[..., m*T + 2, ...]``, as two stacked, shifted halves."""
    t = parts[0].shape[axis]
    pad = lambda z, lo, hi, ax: jnp.pad(z, [(lo, hi) if k == ax else (0, 0) for k in range(z.ndim)])  # noqa: E731
    head = pad(jnp.stack(parts[:m], axis + 1), 0, 1, axis)  # [..., T+1, m, ...]: offsets 0..m-1 of tile t
    tail = pad(pad(jnp.stack(parts[m:], axis + 1), 1, 0, axis), 0, m - 2, axis + 1)  # offsets m, m+1 of t-1
    out = (head + tail).reshape(*head.shape[:axis], (t + 1) * m, *head.shape[axis + 2 :])
    return jax.lax.slice_in_dim(out, 0, m * t + 2, axis=axis)


def _input_transform_t(dv: jax.Array, m: int, th: int, tw: int) -> jax.Array:
    """Transpose of :func:`_input_transform`: ``[(m+2)^2, B*Th*Tw, C]`` -> ``[B, m*Th+2, m*Tw+2, C]``
    (overlapping tiles summed)."""
    bt = _WINOGRAD[m][0]
    a = m + 2
    dv = dv.reshape(a, a, -1, th, tw, dv.shape[-1])
    rows = _combine(bt.T, [dv[r] for r in range(a)])  # a(i) x [a, B, Th, Tw, C]
    rows = [_overlap_add(_combine(bt.T, [g[s] for s in range(a)]), 2, m) for g in rows]  # a x [B, Th, Wp, C]
    return _overlap_add(rows, 1, m)


def _output_transform(prod: jax.Array, m: int, b: int, th: int, tw: int) -> jax.Array:
    """``[(m+2)^2, B*Th*Tw, D]`` -> ``[B, m*Th, m*Tw, D]``: ``A^T M A`` of every tile's products ``M``."""
    at = _WINOGRAD[m][2]
    a, d = m + 2, prod.shape[-1]
    prod = prod.reshape(a, a, b, th, tw, d)
    ys = _combine(at, [prod[i] for i in range(a)])  # m x [a, B, Th, Tw, D]
    ys = [jnp.stack(_combine(at, [y[j] for j in range(a)]), 3) for y in ys]  # m x [B, Th, Tw, m, D]
    return jnp.stack(ys, 2).reshape(b, m * th, m * tw, d)


def _output_transform_t(dy: jax.Array, m: int, th: int, tw: int) -> jax.Array:
    """Transpose of :func:`_output_transform`: ``[B, m*Th, m*Tw, D]`` -> ``[(m+2)^2, B*Th*Tw, D]``."""
    at = _WINOGRAD[m][2]
    a, b, d = m + 2, dy.shape[0], dy.shape[-1]
    r = dy.reshape(b, th, m, tw, m, d)
    t = _combine(at.T, [r[:, :, p] for p in range(m)])  # a x [B, Th, Tw, m, D]
    prod = jnp.stack([jnp.stack(_combine(at.T, [ti[:, :, :, q] for q in range(m)])) for ti in t])
    return prod.reshape(a * a, b * th * tw, d)


def _kernel_transform(w: jax.Array, m: int) -> jax.Array:
    """``[3, 3, C_in, C_out]`` -> ``[(m+2)^2, C_in, C_out]``: ``G g G^T`` per channel pair."""
    g = jnp.asarray(_WINOGRAD[m][1], jnp.float32)
    return jnp.einsum("ai,ijcd,bj->abcd", g, w, g).reshape((m + 2) ** 2, *w.shape[2:])


def _batched_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


def _winograd_fwd(x: jax.Array, w: jax.Array, padding: Pads, m: int):
    tiling = _tiling(x.shape, padding, m)
    (ho, wo), (th, tw) = tiling.out, tiling.tiles
    v = _input_transform(jnp.pad(x, ((0, 0), *tiling.pads, (0, 0))), m, th, tw)
    u = _kernel_transform(w, m)
    y = _output_transform(_batched_dot(v, u, (2, 1)), m, x.shape[0], th, tw)[:, :ho, :wo]
    # Materialise y: fused into its consumers (BatchNorm's statistics and normalisation), XLA would compute the
    # output transform once per consumer (see the README's Speed section for the measured cost).
    return jax.lax.optimization_barrier(y), (v, u, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def winograd_conv(x: jax.Array, w: jax.Array, padding: Pads, tile: int = 4) -> jax.Array:
    """3x3 unit-stride convolution ``[B, H, W, C_in] x [3, 3, C_in, C_out] -> [B, Ho, Wo, C_out]`` by
    Winograd's F(tile x tile, 3 x 3), ``tile`` 2 or 4; ``padding = ((top, bottom), (left, right))`` in
    ``[0, 2]``. Same values as ``lax.conv_general_dilated`` up to rounding (about 1e-5 of the output scale
    for tile 4, 1e-6 for tile 2, in float32). The gradient reuses the transformed input: kernel gradient
    ``G^T (V^T dM) G`` and input gradient ``B (dM U^T) B^T`` as ``(tile+2)^2`` matmuls each."""
    return _winograd_fwd(x, w, padding, tile)[0]


def _winograd_bwd(padding: Pads, m: int, res, dy: jax.Array):
    v, u, xshape = res
    tiling = _tiling(xshape, padding, m)
    (ho, wo), (th, tw), pads = tiling.out, tiling.tiles, tiling.pads
    a = m + 2
    dprod = _output_transform_t(jnp.pad(dy, ((0, 0), (0, m * th - ho), (0, m * tw - wo), (0, 0))), m, th, tw)
    du = _batched_dot(v, dprod, (1, 1)).reshape(a, a, *u.shape[1:])  # [a, a, C_in, C_out]
    g = jnp.asarray(_WINOGRAD[m][1], jnp.float32)
    dw = jnp.einsum("ai,abcd,bj->ijcd", g, du, g)
    dxp = _input_transform_t(_batched_dot(dprod, u, (2, 2)), m, th, tw)
    dx = dxp[:, pads[0][0] : pads[0][0] + xshape[1], pads[1][0] : pads[1][0] + xshape[2]]
    return jax.lax.optimization_barrier(dx), dw


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------
def _nhwc_unit_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups):
    """The explicit paddings of a 2-D NHWC/HWIO, unit-stride, undilated, ungrouped convolution with every
    padding in ``[0, k - 1]``, or None for any other convolution."""
    if lhs.ndim != 4 or rhs.ndim != 4 or groups != 1:
        return None
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dn != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) or tuple(window_strides) != (1, 1):
        return None
    if any(tuple(d or (1, 1)) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return None
    kernel = rhs.shape[:2]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], kernel, (1, 1), padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not all(0 <= p <= k - 1 for (lo, hi), k in zip(pads, kernel, strict=True) for p in (lo, hi)):
        return None
    return pads


def conv_algorithm(
    lhs_shape: Sequence[int], rhs_shape: Sequence[int], dtype: Any = jnp.float32, pads: Pads | None = ((1, 1), (1, 1))
) -> tuple[str, int | None]:
    """How :func:`conv_general_dilated` computes a unit-stride NHWC/HWIO convolution of ``lhs_shape``
    ``[B, H, W, C_in]`` with ``rhs_shape`` ``[kh, kw, C_in, C_out]`` on CPU: ``("winograd", tile)``,
    ``("direct", None)``, or ``("xla", None)`` when ``pads`` is None (a case the others do not cover)."""
    if pads is None:
        return "xla", None
    ho, wo = lhs_shape[1] + sum(pads[0]) - 2, lhs_shape[2] + sum(pads[1]) - 2
    macs = lhs_shape[0] * ho * wo * math.prod(rhs_shape)
    if (
        tuple(rhs_shape[:2]) == (3, 3)
        and jnp.dtype(dtype) == jnp.float32
        and rhs_shape[2] >= WINOGRAD_MIN_CHANNELS
        and macs >= WINOGRAD_MIN_MACS
        and min(ho, wo) >= 2
    ):
        return "winograd", 4 if min(ho, wo) >= 4 else 2
    return "direct", None


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` (same signature, same values up to rounding), computed by the
    algorithm :func:`conv_algorithm` picks: Winograd or the direct convolution with a matmul kernel gradient
    on CPU (on other backends a Winograd case takes the direct path, with XLA's kernel gradient); XLA's own
    convolution and gradient for every case they do not cover."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    xla = lambda *_: jax.lax.conv_general_dilated(*args, precision=precision, **kwargs)  # noqa: E731
    if kwargs or precision is not None:
        return xla()
    pads = _nhwc_unit_pads(*args)
    algorithm, tile = conv_algorithm(lhs.shape, rhs.shape, jnp.result_type(lhs, rhs), pads)
    if algorithm == "winograd":
        return jax.lax.platform_dependent(
            lhs, rhs, cpu=lambda x, w: winograd_conv(x, w, pads, tile), default=lambda x, w: direct_conv(x, w, pads)
        )
    if algorithm == "direct":
        return direct_conv(lhs, rhs, pads)
    return xla()


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
"""``flax.linen.Conv`` computing through :func:`conv_general_dilated` (same parameters, same values)."""
