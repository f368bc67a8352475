"""Online vector quantization of feature maps: grouped codebooks learned by EMA k-means.

Optax-style pure functions over a :class:`VQState` (a NamedTuple, so it composes with ``jit``, ``scan``
and ``vmap``; a codebook-size sweep is a ``vmap`` over states padded to a common size, see
``num_codes``/``max_codes`` below).

Each pixel's channel vector of ``x: [batch, H, W, C]`` is split into ``G`` groups of ``d = C / G``
channels; group ``g`` has its own codebook of ``K`` centroids (``codebook: [G, K, d]``), so a pixel is
sent as ``G`` indices (product quantization). Codes are ``[batch, H, W, G]`` in the smallest unsigned
dtype holding ``K`` codes (:func:`code_dtype`).

* :func:`init` (random codebook) and :func:`init_from_data` (random distinct vectors of a batch, or
  k-means++ seeding);
* :func:`encode` (nearest centroid, squared Euclidean distance), :func:`decode` (centroid lookup);
* :func:`update`: one online k-means step with separate EMAs of counts and of sums (the centroid is their
  ratio, with Laplace-smoothed counts), then the restart of dead codes (EMA count below a threshold) from
  random current vectors, *after* the EMA update so that restarted codes are not killed by stale counts;
* :func:`stats`: coverage (fraction of codes used by a batch), perplexity, max-count ratio;
* :func:`index_bits`: the bits one packed code takes (``dgl_jax.codecs`` packs them); every byte figure
  is the ``nbytes`` of a wire (:mod:`dgl_jax.accounting`).

Padding: a state may hold ``max_codes >= num_codes`` centroids; entries ``>= num_codes`` are masked out
everywhere (never chosen, never updated, never restarted) and ``num_codes`` is a traced int32 leaf, so
states of different sizes stack and ``vmap``. All random draws are per code index (``fold_in``), so a
padded state gives the same codes as an unpadded one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(ValueError):
    """Features to quantize hold NaN or inf (training diverged): there is nothing to encode."""


class VQState(NamedTuple):
    """State of a grouped quantizer (``G`` groups, ``K`` = max codes, ``d`` = code dim).

    ``codebook``: ``[G, K, d]`` float32 centroids used by :func:`encode`/:func:`decode`; ``ema_count``:
    ``[G, K]`` EMA of the per-batch assignment counts; ``ema_sum``: ``[G, K, d]`` EMA of the per-batch sums of
    assigned vectors; ``num_codes``: int32 scalar, codes ``>= num_codes`` are padding; ``step``: int32,
    number of updates.
    """

    codebook: jax.Array
    ema_count: jax.Array
    ema_sum: jax.Array
    num_codes: jax.Array
    step: jax.Array


class VQStats(NamedTuple):
    """Codebook health on one batch, averaged over groups: ``coverage`` (fraction of the active codes used
    at least once), ``perplexity`` (``exp`` of the entropy of the code histogram; ``K`` at best),
    ``max_ratio`` (largest count / mean count over active codes; 1 at best)."""

    coverage: jax.Array
    perplexity: jax.Array
    max_ratio: jax.Array


# ----------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------
def code_dtype(num_codes: int) -> jnp.dtype:
    """Smallest unsigned integer dtype holding indices ``0..num_codes-1``: uint8 up to 256 codes, uint16 up
    to 65536, else uint32."""
    _check_num_codes(num_codes)
    if num_codes <= 256:
        return jnp.dtype(jnp.uint8)
    if num_codes <= 65536:
        return jnp.dtype(jnp.uint16)
    return jnp.dtype(jnp.uint32)


def _check_num_codes(num_codes: int) -> None:
    if not isinstance(num_codes, (int, np.integer)) or num_codes < 2:
        raise ValueError(f"num_codes must be an integer >= 2, got {num_codes!r}")
    if num_codes > 2**32:
        raise ValueError(f"num_codes must be <= 2**32, got {num_codes}")


def resolve_groups(channels: int, code_dim: int | None = None, groups: int | None = None) -> tuple[int, int]:
    """``(groups, code_dim)`` for ``channels`` from exactly one of ``code_dim`` or ``groups``; raises
    ``ValueError`` when it does not divide ``channels``."""
    if (code_dim is None) == (groups is None):
        raise ValueError(f"give exactly one of code_dim or groups, got code_dim={code_dim}, groups={groups}")
    if code_dim is not None:
        if code_dim < 1 or channels % code_dim:
            raise ValueError(
                f"code_dim {code_dim} does not divide the {channels} channels; accepted: "
                f"{[d for d in range(1, channels + 1) if channels % d == 0]}"
            )
        return channels // code_dim, code_dim
    if groups < 1 or channels % groups:
        raise ValueError(
            f"groups {groups} does not divide the {channels} channels; accepted: "
            f"{[g for g in range(1, channels + 1) if channels % g == 0]}"
        )
    return groups, channels // groups


def init(
    num_codes: int,
    code_dim: int,
    groups: int = 1,
    *,
    max_codes: int | None = None,
    scale: float = 1.0,
    key: jax.Array,
) -> VQState:
    """A quantizer with ``groups`` codebooks of ``num_codes`` random normal centroids (std ``scale``) of
    dimension ``code_dim``, padded to ``max_codes`` entries (default ``num_codes``). EMA counts start at 1
    and EMA sums at the centroids. Prefer :func:`init_from_data` for real features."""
    _check_num_codes(num_codes)
    max_codes = num_codes if max_codes is None else max_codes
    if max_codes < num_codes:
        raise ValueError(f"max_codes {max_codes} must be >= num_codes {num_codes}")
    if code_dim < 1 or groups < 1:
        raise ValueError(f"code_dim and groups must be >= 1, got code_dim={code_dim}, groups={groups}")
    codebook = scale * jax.random.normal(key, (groups, max_codes, code_dim), jnp.float32)
    active = _mask(max_codes, num_codes)
    count = jnp.where(active, 1.0, 0.0) * jnp.ones((groups, 1), jnp.float32)
    return VQState(
        codebook, count, codebook * count[..., None], jnp.asarray(num_codes, jnp.int32), jnp.zeros((), jnp.int32)
    )


def _mask(max_codes: int, num_codes: jax.Array | int) -> jax.Array:
    return jnp.arange(max_codes) < num_codes


def _active(state: VQState) -> jax.Array:
    return _mask(state.codebook.shape[1], state.num_codes)


def _flatten(state: VQState, x: jax.Array, stage: str | int | None = None) -> jax.Array:
    """``x: [..., C]`` -> ``[N, G, d]`` float32, checking that ``C == G * d`` (and, outside ``jit``, that
    ``x`` is finite)."""
    g, _, d = state.codebook.shape
    if x.shape[-1] != g * d:
        raise ValueError(
            f"features have {x.shape[-1]} channels but the quantizer expects groups * code_dim = {g} * {d} = {g * d}"
        )
    check_finite(x, stage)
    return x.reshape(-1, g, d).astype(jnp.float32)


def check_finite(x: jax.Array, stage: str | int | None = None) -> None:
    """Raises :class:`NonFiniteError` naming ``stage`` if the concrete array ``x`` holds NaN or inf; does nothing on
    tracers (inside ``jit`` use the ``nonfinite`` metric of :mod:`dgl_jax.vq_train` instead)."""
    if isinstance(x, jax.core.Tracer):
        return
    if not np.all(np.isfinite(np.asarray(x, np.float32))):
        where = "" if stage is None else f" at the output of stage {stage}"
        raise NonFiniteError(f"non-finite (NaN or inf) features{where}: cannot quantize them")


def init_from_data(
    state: VQState,
    x: jax.Array,
    method: str = "sample",
    *,
    max_points: int = 4096,
    key: jax.Array,
) -> VQState:
    """Re-seeds ``state``'s centroids from the vectors of ``x: [batch, H, W, C]`` (or ``[N, C]``).

    ``method="sample"``: code ``i`` of group ``g`` is row ``perm_g[i]`` of a random permutation (distinct
    vectors; needs ``N >= max_codes``). ``method="kmeans++"``: k-means++ seeding (D^2 sampling) on at most
    ``max_points`` random rows per group. EMA counts are reset to 1 and sums to the centroids.
    """
    if method not in ("sample", "kmeans++"):
        raise ValueError(f"unknown init method {method!r}; expected one of ('sample', 'kmeans++')")
    flat = _flatten(state, x)
    n, g, _ = flat.shape
    k = state.codebook.shape[1]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(g))
    if method == "sample":
        if n < k:
            raise ValueError(f"init_from_data('sample') needs at least {k} vectors, got {n}")
        codebook = jax.vmap(lambda kk, xg: xg[jax.random.permutation(kk, n)[:k]], in_axes=(0, 1))(keys, flat)
    else:
        codebook = jax.vmap(lambda kk, xg: _kmeans_pp(kk, xg, k, max_points), in_axes=(0, 1))(keys, flat)
    active = _active(state)
    codebook = jnp.where(active[None, :, None], codebook, state.codebook)
    count = jnp.where(active, 1.0, 0.0) * jnp.ones((g, 1), jnp.float32)
    return state._replace(codebook=codebook, ema_count=count, ema_sum=codebook * count[..., None])


def _kmeans_pp(key: jax.Array, x: jax.Array, k: int, max_points: int) -> jax.Array:
    """k-means++ seeds ``[k, d]`` from ``x: [N, d]``; the draw for centroid ``i`` uses ``fold_in(key, i)``."""
    sub = jax.random.permutation(jax.random.fold_in(key, 2**31), x.shape[0])[: min(max_points, x.shape[0])]
    x = x[sub]
    first = x[jax.random.randint(jax.random.fold_in(key, 0), (), 0, x.shape[0])]
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum((x - first) ** 2, -1)

    def body(i, carry):
        centers, d2 = carry
        logits = jnp.where(d2 > 0, jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
        # All points coincide with a centre: fall back to a uniform draw.
        logits = jnp.where(jnp.all(d2 <= 0), 0.0, logits)
        c = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]
        return centers.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, -1))

    centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
    return centers


# ----------------------------------------------------------------------------------------------------------
# Encode / decode / update
# ----------------------------------------------------------------------------------------------------------
def _scores(state: VQState, flat: jax.Array) -> jax.Array:
    """``||c_k||^2 - 2 x.c_k`` ``[G, N, K]`` for ``flat: [N, G, d]`` (the squared distance minus ``||x||^2``,
    which does not change the argmin; padding codes: +inf). The ``[G, N, K]`` layout is the faster one on CPU."""
    c = state.codebook
    dots = jnp.einsum("ngd,gkd->gnk", flat, c, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.sum(c**2, -1)[:, None, :] - 2.0 * dots
    return jnp.where(_active(state)[None, None], scores, jnp.inf)


BLOCK_SCORES = 2**18
"""On CPU, :func:`encode` searches the nearest centroids in blocks of rows whose ``[G, rows, K]`` scores hold
about this many float32 values (1 MiB, cache-sized) instead of materialising ``[G, N, K]`` at once."""


def block_rows(n: int, groups: int, max_codes: int, platform: str | None = None) -> int:
    """Rows per block of :func:`encode`'s nearest-centroid search for ``n`` rows of ``groups`` groups and
    ``max_codes`` centroids: on ``platform`` ``"cpu"`` (default: ``jax.default_backend()``) a power of two in
    ``128..8192`` near ``BLOCK_SCORES / (groups * max_codes)``, at most ``n``; elsewhere ``n`` (one block)."""
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu":
        return n
    target = max(1, BLOCK_SCORES // (groups * max_codes))
    return min(n, 8192, max(128, 1 << (target.bit_length() - 1)))


def _nearest(state: VQState, flat: jax.Array, rows: int | None = None) -> jax.Array:
    """Index ``[N, G]`` int32 of the nearest active centroid of each row of ``flat: [N, G, d]`` (first on ties),
    in blocks of ``rows`` rows (default :func:`block_rows`; zero-padded rows at the end are dropped)."""
    n, g, d = flat.shape
    rows = block_rows(n, g, state.codebook.shape[1]) if rows is None else rows
    if rows >= n:
        return jnp.argmin(_scores(state, flat), -1).T
    blocks = jnp.pad(flat, ((0, -n % rows), (0, 0), (0, 0))).reshape(-1, rows, g, d)
    codes = jax.lax.map(lambda b: jnp.argmin(_scores(state, b), -1), blocks)  # [blocks, G, rows]
    return jnp.swapaxes(codes, 1, 2).reshape(-1, g)[:n]


def encode(state: VQState, x: jax.Array, stage: str | int | None = None) -> jax.Array:
    """Nearest-centroid codes ``[batch, H, W, G]`` (dtype :func:`code_dtype` of the max codes) of
    ``x: [batch, H, W, G * d]``; ``stage`` only names the stage in error messages. The search runs in blocks of
    :func:`block_rows` rows; the codes do not depend on the block size."""
    flat = _flatten(state, x, stage)
    codes = _nearest(state, flat)  # [N, G]
    return codes.astype(code_dtype(state.codebook.shape[1])).reshape(*x.shape[:-1], state.codebook.shape[0])


def decode(state: VQState | jax.Array, codes: jax.Array) -> jax.Array:
    """Centroids ``[batch, H, W, G * d]`` float32 of ``codes: [batch, H, W, G]``. ``state`` may be a
    :class:`VQState` or a bare codebook ``[G, K, d]`` (the receiver's copy)."""
    codebook = state.codebook if isinstance(state, VQState) else state
    g, _, d = codebook.shape
    vecs = codebook[jnp.arange(g), codes.astype(jnp.int32)]  # [..., G, d]
    return vecs.reshape(*codes.shape[:-1], g * d)


def assignment_counts(state: VQState, codes: jax.Array) -> jax.Array:
    """Histogram ``[G, K]`` float32 of ``codes: [..., G]``."""
    g, k, _ = state.codebook.shape
    c = codes.reshape(-1, g).astype(jnp.int32)
    return jnp.zeros((g, k), jnp.float32).at[jnp.arange(g)[None], c].add(1.0)


def update(
    state: VQState,
    x: jax.Array,
    codes: jax.Array,
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    restart_threshold: float = 0.0,
    key: jax.Array | None = None,
) -> VQState:
    """One online k-means step on ``x: [batch, H, W, C]`` assigned to ``codes: [batch, H, W, G]``.

    ``ema_count <- decay * ema_count + (1 - decay) * counts``, ``ema_sum <- decay * ema_sum + (1 - decay) *
    sums``; centroid ``= ema_sum / n~`` with Laplace-smoothed counts ``n~_i = (n_i + eps) / (n + K eps) * n``
    (``n = sum_i n_i``, ``K`` = active codes). Then, if ``key`` is given and ``restart_threshold > 0``,
    every active code whose EMA count is below ``restart_threshold`` is restarted on a random current
    vector with the mean EMA count (draw per code index: ``fold_in(fold_in(key, g), i)``).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    flat = _flatten(state, x)
    n, g, d = flat.shape
    k = state.codebook.shape[1]
    c = codes.reshape(-1, g).astype(jnp.int32)
    gidx = jnp.arange(g)[None]
    counts = jnp.zeros((g, k), jnp.float32).at[gidx, c].add(1.0)
    sums = jnp.zeros((g, k, d), jnp.float32).at[gidx, c].add(flat)
    active = _active(state)
    ema_count = jnp.where(active, decay * state.ema_count + (1.0 - decay) * counts, 0.0)
    ema_sum = jnp.where(active[:, None], decay * state.ema_sum + (1.0 - decay) * sums, 0.0)
    total = jnp.sum(ema_count, -1, keepdims=True)
    smoothed = (ema_count + eps) / (total + state.num_codes.astype(jnp.float32) * eps) * total
    codebook = jnp.where(active[:, None], ema_sum / jnp.maximum(smoothed, 1e-12)[..., None], state.codebook)
    new = VQState(codebook, ema_count, ema_sum, state.num_codes, state.step + 1)
    if key is not None and restart_threshold > 0:
        new = restart_dead(new, flat, restart_threshold, key)
    return new


def restart_dead(state: VQState, x: jax.Array, threshold: float, key: jax.Array) -> VQState:
    """Restarts active codes with ``ema_count < threshold`` on random rows of ``x`` (``[N, G, d]`` or
    ``[batch, H, W, C]``), giving them the group's mean EMA count. Shape-static: jit/scan/vmap friendly."""
    flat = x if x.ndim == 3 else _flatten(state, x)
    n, g, _ = flat.shape
    k = state.codebook.shape[1]
    rows = jax.vmap(
        lambda gi: jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, gi), i), (), 0, n))(
            jnp.arange(k)
        )
    )(jnp.arange(g))  # [G, K]
    fresh = flat[rows, jnp.arange(g)[:, None]]  # [G, K, d]
    active = _active(state)
    dead = active & (state.ema_count < threshold)
    mean = jnp.sum(state.ema_count, -1, keepdims=True) / state.num_codes.astype(jnp.float32)
    count = jnp.where(dead, mean, state.ema_count)
    return state._replace(
        codebook=jnp.where(dead[..., None], fresh, state.codebook),
        ema_count=count,
        ema_sum=jnp.where(dead[..., None], fresh * count[..., None], state.ema_sum),
    )


def stats(state: VQState, codes: jax.Array) -> VQStats:
    """:class:`VQStats` of a batch of ``codes: [..., G]`` (padding codes excluded)."""
    counts = assignment_counts(state, codes)
    active = _active(state)
    k = state.num_codes.astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts, -1, keepdims=True), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    coverage = jnp.sum((counts > 0) & active, -1) / k
    max_ratio = jnp.max(counts, -1) / jnp.maximum(jnp.sum(counts, -1) / k, 1e-12)
    return VQStats(jnp.mean(coverage), jnp.mean(jnp.exp(entropy)), jnp.mean(max_ratio))


def distortion(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Relative squared error ``||x - x_hat||^2 / ||x||^2`` (scalar)."""
    x = x.astype(jnp.float32)
    return jnp.sum((x - x_hat) ** 2) / jnp.maximum(jnp.sum(x**2), 1e-12)


# ----------------------------------------------------------------------------------------------------------
# The packed code format (bytes of wires: dgl_jax.accounting)
# ----------------------------------------------------------------------------------------------------------
def index_bits(num_codes: int) -> int:
    """Bits of one packed code (``dgl_jax.codecs.vq(..., packed=True)``): ``ceil(log2 num_codes)``."""
    _check_num_codes(num_codes)
    return math.ceil(math.log2(num_codes))
