"""Synchronous DGL with vector-quantized messages between stages, and jitted sweeps over VQ configurations.

At every boundary ``j -> j+1`` with a :class:`VQConfig`:

* the **sender** (stage j) runs its usual local step (the core :func:`dgl_jax.train.stage_step`), encodes
  its output with the codebook the receiver holds, and updates its own EMA k-means state
  (:func:`dgl_jax.vq.update`, dead-code restarts included);
* only the **codes** ``[batch, H, W, G]`` (uint8/uint16) cross the boundary, plus, every ``sync_every``
  steps, the sender's codebook ``[G, K, d]`` (accounted for by :func:`boundary_traffic`);
* the **receiver** (stage j+1) decodes the codes with its copy of the codebook and trains on the result.

Encoding with the receiver's copy keeps encoder and decoder consistent when ``sync_every > 1``; with
``sync_every = 1`` (default) both copies are equal at every step and this is plain EMA-VQ. Everything runs
inside one jitted step (no host round-trip). A boundary whose config is ``None`` passes float features,
so with every config ``None`` :func:`vq_dgl_step` computes exactly :func:`dgl_jax.train.dgl_step`.

NaN handling (checkify-free): the step returns ``nonfinite: [K]`` (stage j's output holds NaN/inf) in its
metrics; :func:`check_metrics` raises a ``ValueError`` naming the first such stage on the host. Outside
``jit``, :func:`dgl_jax.vq.encode` checks concrete inputs directly.

Sweeps (:func:`make_sweep`): configurations that differ only in ``num_codes`` form one *class*; a class is
padded to its largest codebook (padding codes are masked: never chosen, updated or restarted;
``num_codes`` is a traced leaf of the state) and its members, each with its own copy of the network, are
trained by one ``vmap`` of :func:`vq_dgl_step`. Classes of different group layouts are separate ``vmap``
calls inside the same jitted function, so the whole sweep is one compiled program and one dispatch per
step. Each member sees the same batches, keys and initial weights as when run alone.

Replay buffers of codes (async DGL): :func:`push_codes` encodes a batch with the receiver's codebook and
stores ``(codes uint8/uint16 [batch, H, W, G], labels [batch])`` in a :mod:`dgl_jax.buffer` ring buffer;
:func:`sample_codes` samples and decodes with the receiver's current codebook. :func:`buffer_memory`
gives the bytes such buffers take vs float32 buffers (codes plus the codebook the receiver keeps).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dgl_jax import buffer, vq
from dgl_jax.objective import stage_apply
from dgl_jax.stage import Stage, StageState
from dgl_jax.train import _check, evaluate_batch, stage_step

PyTree = Any
INIT_METHODS = ("sample", "kmeans++")


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Quantizer of one stage boundary. Exactly one of ``code_dim`` (channels per group; groups = C / d)
    and ``groups`` is set. ``decay``/``eps``: EMA decay and Laplace smoothing; ``restart_threshold``: codes
    whose EMA count (per batch) falls below it are restarted on current vectors (0 disables);
    ``sync_every``: the receiver's codebook copy is refreshed every that many steps; ``init``: seeding from
    the first batch (``sample`` or ``kmeans++``); ``max_codes``: pad the codebook (sweeps)."""

    num_codes: int = 256
    code_dim: int | None = 16
    groups: int | None = None
    decay: float = 0.99
    eps: float = 1e-5
    restart_threshold: float = 1e-2
    sync_every: int = 1
    init: str = "sample"
    max_codes: int | None = None

    def __post_init__(self):
        vq.code_dtype(self.num_codes)  # num_codes >= 2
        if (self.code_dim is None) == (self.groups is None):
            raise ValueError(f"give exactly one of code_dim or groups, got {self.code_dim}, {self.groups}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if not self.eps >= 0 or not self.restart_threshold >= 0:
            raise ValueError(f"eps and restart_threshold must be >= 0, got {self.eps}, {self.restart_threshold}")
        if not (isinstance(self.sync_every, int) and self.sync_every >= 1):
            raise ValueError(f"sync_every must be an integer >= 1, got {self.sync_every!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init {self.init!r} is not valid; expected one of {INIT_METHODS}")
        if self.max_codes is not None and self.max_codes < self.num_codes:
            raise ValueError(f"max_codes {self.max_codes} must be >= num_codes {self.num_codes}")

    def layout(self, channels: int) -> tuple[int, int]:
        """``(groups, code_dim)`` for a boundary of ``channels`` channels (``ValueError`` if it does not divide)."""
        return vq.resolve_groups(channels, self.code_dim, self.groups)


Plan = Sequence[VQConfig | None]


class Boundary(NamedTuple):
    """VQ state of one boundary: the sender's EMA k-means state and the receiver's codebook copy ``[G, K, d]``."""

    sender: vq.VQState
    receiver: jax.Array


class VQMetrics(NamedTuple):
    """Per-step metrics: ``loss``/``accuracy`` ``[K]`` (as :class:`dgl_jax.train.StepMetrics`), and per
    boundary ``[K-1]`` (NaN where not quantized): ``distortion`` (relative squared error of the decoded
    features), ``coverage`` and ``perplexity`` of the batch's codes; ``nonfinite`` ``[K]`` bool: stage j's
    output held NaN/inf."""

    loss: jax.Array
    accuracy: jax.Array
    distortion: jax.Array
    coverage: jax.Array
    perplexity: jax.Array
    nonfinite: jax.Array


def as_plan(configs: VQConfig | Plan | None, num_stages: int) -> tuple[VQConfig | None, ...]:
    """Per-boundary configs: one config (or ``None``) for all ``K-1`` boundaries, or a sequence of them."""
    if configs is None or isinstance(configs, VQConfig):
        return (configs,) * (num_stages - 1)
    plan = tuple(configs)
    if len(plan) != num_stages - 1:
        raise ValueError(f"need one VQ config (or None) per boundary: {num_stages - 1}, got {len(plan)}")
    return plan


def boundary_shapes(stages: Sequence[Stage], states: Sequence[StageState], example: jax.Array) -> list[tuple]:
    """Output shapes ``(H, W, C)`` of stages ``0..K-2`` (the messages) for inputs shaped like ``example``."""
    shapes, x = [], jax.ShapeDtypeStruct(example.shape, example.dtype)
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        x = jax.eval_shape(
            lambda p, b, x, stage=stage: stage_apply(stage, p, b, x, True).features, st.params, st.batch_stats, x
        )
        shapes.append(tuple(x.shape[1:]))
    return shapes


def message_features(stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array) -> list[jax.Array]:
    """Train-mode outputs of stages ``0..K-2`` on ``x: [batch, H, W, C]`` (the float messages; jitted, and
    compiled once per stage list and input shape)."""
    return _message_features(tuple(stages), list(states), x)


@functools.partial(jax.jit, static_argnums=0)
def _message_features(stages: tuple[Stage, ...], states: list[StageState], x: jax.Array) -> list[jax.Array]:
    out = []
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        x = stage_apply(stage, st.params, st.batch_stats, x, True).features
        out.append(x)
    return out


def init_vq(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    configs: VQConfig | Plan | None,
    key: jax.Array,
    x: jax.Array,
    features: Sequence[jax.Array] | None = None,
) -> list[Boundary | None]:
    """Codebooks of every quantized boundary, seeded (``config.init``) from the stages' train-mode outputs
    on the first batch ``x: [batch, H, W, C]`` (or from precomputed ``features``, see
    :func:`message_features`); ``None`` for unquantized boundaries. Boundary j uses ``fold_in(key, j)``."""
    _check(stages, states)
    plan = as_plan(configs, len(stages))
    features = message_features(stages, states, x) if features is None else features
    out = []
    for j, (cfg, f) in enumerate(zip(plan, features, strict=True)):
        if cfg is None:
            out.append(None)
            continue
        vq.check_finite(f, j)
        groups, code_dim = cfg.layout(f.shape[-1])
        if cfg.init == "sample" and f.size // f.shape[-1] < (cfg.max_codes or cfg.num_codes):
            raise ValueError(
                f"init_from_data('sample') needs at least {cfg.max_codes or cfg.num_codes} vectors, "
                f"got {f.size // f.shape[-1]} at the output of stage {j}"
            )
        s = _seed_codebook(jax.random.fold_in(key, j), f, cfg.num_codes, code_dim, groups, cfg.max_codes, cfg.init)
        out.append(Boundary(s, jnp.copy(s.codebook)))  # distinct buffers (donation)
    return out


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _seed_codebook(
    key: jax.Array, feats: jax.Array, num_codes: int, code_dim: int, groups: int, max_codes: int | None, method: str
) -> vq.VQState:
    k1, k2 = jax.random.split(key)
    s = vq.init(k1, num_codes, code_dim, groups, max_codes=max_codes)
    return vq.init_from_data(s, k2, feats, method)


def send_codes(cfg: VQConfig, b: Boundary, feats: jax.Array, key: jax.Array) -> tuple[Boundary, jax.Array, vq.VQStats]:
    """The sender's half of a boundary: encodes ``feats: [batch, H, W, C]`` with the receiver's codebook
    copy, updates its own EMA k-means state (``key``: dead-code restarts) and, every ``cfg.sync_every`` of
    its updates, refreshes the receiver's copy. Returns ``(new boundary, codes [batch, H, W, G], stats)``.
    Used by synchronous (:func:`quantize_boundary`) and asynchronous (:mod:`dgl_jax.asynchronous`) DGL."""
    codes = vq.encode(b.sender._replace(codebook=b.receiver), feats)  # sender, with the receiver's codebook
    sender = vq.update(
        b.sender, feats, codes, decay=cfg.decay, eps=cfg.eps, key=key, restart_threshold=cfg.restart_threshold
    )
    receiver = jnp.where(sender.step % cfg.sync_every == 0, sender.codebook, b.receiver)  # periodic sync
    return Boundary(sender, receiver), codes, vq.stats(sender, codes)


def quantize_boundary(
    cfg: VQConfig, b: Boundary, feats: jax.Array, key: jax.Array
) -> tuple[Boundary, jax.Array, jax.Array, vq.VQStats]:
    """One boundary: sender encodes ``feats`` and updates its codebook (:func:`send_codes`); receiver decodes
    with its pre-sync copy. Returns ``(new boundary, decoded features, codes, stats)``; ``codes`` is all
    that crossed (plus the sync)."""
    new, codes, st = send_codes(cfg, b, feats, key)
    x_hat = vq.decode(b.receiver, codes)  # receiver
    return new, x_hat, codes, st


def vq_dgl_step(
    stages: Sequence[Stage],
    configs: VQConfig | Plan | None,
    states: Sequence[StageState],
    boundaries: Sequence[Boundary | None],
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
) -> tuple[list[StageState], list[Boundary | None], VQMetrics]:
    """Synchronous DGL step with quantized messages on ``x: [batch, H, W, C]``, ``labels: [batch]``.

    ``stages`` and ``configs`` are static (close over them before ``jit``); ``key`` drives dead-code
    restarts (boundary j uses ``fold_in(key, j)``). Returns ``(states, boundaries, metrics)``.
    """
    _check(stages, states)
    plan = as_plan(configs, len(stages))
    nan = jnp.full((), jnp.nan, jnp.float32)
    new_states, new_bounds, losses, accs, dist, cov, ppl, bad = [], [], [], [], [], [], [], []
    for j, (stage, state) in enumerate(zip(stages, states, strict=True)):
        state, feats, loss, acc = stage_step(stage, state, x, labels)
        new_states.append(state)
        losses.append(loss)
        accs.append(acc)
        bad.append(~jnp.all(jnp.isfinite(feats)))
        if j == len(stages) - 1:
            break
        cfg = plan[j]
        if cfg is None:
            new_bounds.append(None)
            x = feats
            dist.append(nan), cov.append(nan), ppl.append(nan)
            continue
        b, x, _, st = quantize_boundary(cfg, boundaries[j], feats, jax.random.fold_in(key, j))
        new_bounds.append(b)
        dist.append(vq.distortion(feats, x)), cov.append(st.coverage), ppl.append(st.perplexity)
    stack = lambda v: jnp.stack(v) if v else jnp.zeros((0,), jnp.float32)  # noqa: E731
    metrics = VQMetrics(jnp.stack(losses), jnp.stack(accs), stack(dist), stack(cov), stack(ppl), jnp.stack(bad))
    return new_states, new_bounds, metrics


def vq_evaluate_batch(
    stages: Sequence[Stage],
    configs: VQConfig | Plan | None,
    states: Sequence[StageState],
    boundaries: Sequence[Boundary | None],
    x: jax.Array,
    labels: jax.Array,
) -> jax.Array:
    """Correct-prediction counts ``[K]`` of every head (BatchNorm in eval mode), with each quantized
    boundary encoding/decoding with the receiver's codebook, as a deployed pipeline would."""
    plan = as_plan(configs, len(stages))
    bounds = [b if c is not None else None for c, b in zip(plan, boundaries, strict=True)]
    return evaluate_batch(stages, states, x, labels, messages=eval_messages(bounds)).per_head


def eval_messages(boundaries: Sequence[Boundary | None]) -> list[Callable[[jax.Array], jax.Array] | None]:
    """For :func:`dgl_jax.train.evaluate_batch`: per boundary, ``x -> decode(encode(x))`` with the receiver's
    codebook (None for a float boundary)."""

    def roundtrip(b: Boundary) -> Callable[[jax.Array], jax.Array]:
        shared = b.sender._replace(codebook=b.receiver)
        return lambda x: vq.decode(shared, vq.encode(shared, x))

    return [None if b is None else roundtrip(b) for b in boundaries]


def check_metrics(metrics: VQMetrics) -> None:
    """Host-side check: raises ``ValueError`` naming the first stage (0-based) whose output was non-finite.
    Works on the metrics of one step or of a sweep/scan (any leading axes)."""
    bad = jnp.asarray(metrics.nonfinite)
    bad = bad.reshape(-1, bad.shape[-1]).any(0)
    if bool(bad.any()):
        j = int(jnp.argmax(bad))
        raise ValueError(f"non-finite (NaN or inf) features at the output of stage {j}: cannot quantize them")


# ----------------------------------------------------------------------------------------------------------
# Traffic accounting
# ----------------------------------------------------------------------------------------------------------
class Traffic(NamedTuple):
    """Bits per sample crossing each boundary: ``codes`` (indices), ``sync`` (codebook updates amortised
    per sample), ``total``, ``float32`` (what plain DGL sends) and the compression ``ratio_fp32`` /
    ``ratio_bf16`` of ``total`` vs float32 / bfloat16 messages. One entry per boundary."""

    codes: list[float]
    sync: list[float]
    total: list[float]
    float32: list[float]
    ratio_fp32: list[float]
    ratio_bf16: list[float]


def boundary_traffic(plan: Plan, shapes: Sequence[tuple], batch_size: int) -> Traffic:
    """:class:`Traffic` of ``plan`` for message shapes ``shapes`` (from :func:`boundary_shapes`)."""
    if len(plan) != len(shapes):
        raise ValueError(f"got {len(plan)} configs for {len(shapes)} boundaries")
    codes, sync, total, f32, r32, r16 = [], [], [], [], [], []
    for cfg, shape in zip(plan, shapes, strict=True):
        fbits = vq.bits_per_sample(shape)
        if cfg is None:
            c, s = float(fbits), 0.0
        else:
            g, d = cfg.layout(shape[-1])
            c = float(vq.bits_per_sample(shape, cfg.num_codes, g))
            s = vq.codebook_bits(cfg.num_codes, d, g) / (batch_size * cfg.sync_every)
        codes.append(c), sync.append(s), total.append(c + s), f32.append(float(fbits))
        r32.append(fbits / (c + s)), r16.append(fbits / 2 / (c + s))
    return Traffic(codes, sync, total, f32, r32, r16)


# ----------------------------------------------------------------------------------------------------------
# Sweeps: several VQ configurations in one compiled program
# ----------------------------------------------------------------------------------------------------------
class Sweep(NamedTuple):
    """A compiled-once sweep over ``plans`` (one :data:`Plan` per configuration).

    * ``init(states, vq_key, x) -> carry``: every configuration starts from copies of the same stage states
      (e.g. ``init_stage_states(stages, key, x)``) and codebooks seeded from the first batch ``x`` as
      :func:`init_vq` would (``vq_key``);
    * ``step(carry, x, labels, key) -> (carry, metrics)``: pure; jit it once. ``metrics`` is a list (one per
      configuration, in ``plans`` order) of :class:`VQMetrics`;
    * ``evaluate(carry, x, labels) -> [n_configs, K]`` correct counts (pure; jit it);
    * ``select(carry, i) -> (states, boundaries)``: configuration ``i`` as if trained alone.
    """

    plans: tuple
    init: Callable
    step: Callable
    evaluate: Callable
    select: Callable


def _class_key(plan: Plan) -> tuple:
    return tuple(None if c is None else dataclasses.replace(c, num_codes=2, max_codes=None) for c in plan)


def make_sweep(stages: Sequence[Stage], plans: Sequence[VQConfig | Plan | None], mode: str = "vmap") -> Sweep:
    """Builds a :class:`Sweep` of ``plans`` (each a config for all boundaries, a per-boundary list, or
    ``None`` = unquantized DGL).

    ``mode="vmap"``: plans equal up to ``num_codes`` share one class, padded to its largest codebook and
    trained by one ``vmap``. ``mode="loop"``: every plan is its own unpadded call inside the same jitted
    function (no padding waste; on XLA:CPU, convolutions vmapped over stacked weights were measured ~4x
    slower than the same convolutions called one after the other, so CPU runs should use ``loop``).
    """
    if mode not in ("vmap", "loop"):
        raise ValueError(f"mode {mode!r} is not valid; expected one of ('vmap', 'loop')")
    k = len(stages)
    plans = tuple(as_plan(p, k) for p in plans)
    if not plans:
        raise ValueError("need at least one configuration to sweep")
    classes: dict[Any, list[int]] = {}
    for i, p in enumerate(plans):
        classes.setdefault(_class_key(p) if mode == "vmap" else i, []).append(i)
    groups = []  # (member indices, padded codebook size per boundary)
    for members in classes.values():
        pads = []
        for j in range(k - 1):
            cfgs = [plans[i][j] for i in members]
            pads.append(None if cfgs[0] is None else max(max(c.num_codes, c.max_codes or 0) for c in cfgs))
        groups.append((members, pads))
    batched = mode == "vmap"

    def member_plan(i: int, pads: list) -> tuple:
        return tuple(
            None if c is None else dataclasses.replace(c, max_codes=m) for c, m in zip(plans[i], pads, strict=True)
        )

    padded_plans = [member_plan(members[0], pads) for members, pads in groups]
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    vmap = jax.vmap if batched else (lambda f: f)
    row = (lambda a, r: a[r]) if batched else (lambda a, r: a)

    def init(states0, vq_key, x):
        carry = []
        _check(stages, states0)
        feats = message_features(stages, states0, x)
        for members, pads in groups:
            sts, bds = [], []
            for i in members:
                sts.append(jax.tree.map(jnp.copy, states0))  # same weights, distinct buffers (donation)
                bds.append(init_vq(stages, states0, member_plan(i, pads), vq_key, x, feats))
            carry.append((stack(sts), stack(bds)) if batched else (sts[0], bds[0]))
        return carry

    def step(carry, x, labels, key):
        new, metrics = [], [None] * len(plans)
        for (members, _), plan, (sts, bds) in zip(groups, padded_plans, carry, strict=True):
            fn = lambda s, b, plan=plan: vq_dgl_step(stages, plan, s, b, x, labels, key)  # noqa: E731
            sts, bds, m = vmap(fn)(sts, bds)
            new.append((sts, bds))
            for r, i in enumerate(members):
                metrics[i] = jax.tree.map(lambda a, r=r: row(a, r), m)
        return new, metrics

    def evaluate(carry, x, labels):
        out = [None] * len(plans)
        for (members, _), plan, (sts, bds) in zip(groups, padded_plans, carry, strict=True):
            c = vmap(lambda s, b, plan=plan: vq_evaluate_batch(stages, plan, s, b, x, labels))(sts, bds)
            for r, i in enumerate(members):
                out[i] = row(c, r)
        return jnp.stack(out)

    def select(carry, i):
        for c, (members, _) in enumerate(groups):
            if i in members:
                r = members.index(i)
                return jax.tree.map(lambda a, r=r: row(a, r), carry[c])
        raise IndexError(f"configuration {i} out of range for {len(plans)} configurations")

    return Sweep(plans, init, step, evaluate, select)


# ----------------------------------------------------------------------------------------------------------
# Replay buffers holding codes (asynchronous DGL)
# ----------------------------------------------------------------------------------------------------------
def init_code_buffer(capacity: int, b: Boundary, feature_shape: Sequence[int], batch_size: int) -> buffer.BufferState:
    """An empty :mod:`dgl_jax.buffer` of ``capacity`` mini-batches of ``(codes [batch, H, W, G], labels
    [batch] int32)`` for features ``(H, W, C)``; codes in the smallest dtype for the boundary's codebook."""
    h, w, c = feature_shape
    g, _, d = b.receiver.shape
    if c != g * d:
        raise ValueError(f"features have {c} channels but the codebook holds groups * code_dim = {g} * {d}")
    dtype = vq.code_dtype(b.receiver.shape[1])
    return buffer.init(capacity, (jnp.zeros((batch_size, h, w, g), dtype), jnp.zeros((batch_size,), jnp.int32)))


def push_codes(
    buf: buffer.BufferState,
    b: Boundary,
    feats: jax.Array,
    labels: jax.Array,
    tick: jax.Array | int | None = None,
    valid: Any = True,
) -> tuple[buffer.BufferState, jax.Array]:
    """Encodes ``feats: [batch, H, W, C]`` with the receiver's codebook (the sender's padding mask) and pushes
    ``(codes, labels)``; returns ``(buffer, codes)``. Jit-, scan- and vmap-friendly."""
    codes = vq.encode(b.sender._replace(codebook=b.receiver), feats)
    return buffer.push(buf, (codes, labels), tick, valid), codes


def sample_codes(
    buf: buffer.BufferState, b: Boundary, key: jax.Array | None = None, **kwargs: Any
) -> tuple[tuple[jax.Array, jax.Array], jax.Array, buffer.BufferState]:
    """Samples a stored batch (``kwargs`` as :func:`dgl_jax.buffer.sample`) and decodes it with the receiver's
    *current* codebook: returns ``((x_hat [batch, H, W, C], labels [batch]), valid, buffer)``. Codes written
    under an older codebook decode to the current centroids of the same indices (the stored data drifts
    with the codebook, as in the paper's design where only indices are kept)."""
    (codes, labels), valid, buf = buffer.sample(buf, key, **kwargs)
    return (vq.decode(b.receiver, codes), labels), valid, buf


class BufferMemory(NamedTuple):
    """Bytes of replay buffers of ``num_batches`` mini-batches per boundary: ``codes`` (index storage),
    ``codebook`` (the receiver's float32 codebook ``[G, K, d]``, held once per boundary), ``float32`` (the
    same buffers of float32 features) and ``factor`` = ``float32 / (codes + codebook)``, summed over the
    quantized boundaries (unquantized boundaries count as float32 in both). Labels are not included."""

    codes: int
    codebook: int
    float32: int
    factor: float


def buffer_memory(plan: Plan, shapes: Sequence[tuple], num_batches: int, batch_size: int) -> BufferMemory:
    """:class:`BufferMemory` of async-DGL buffers holding ``num_batches`` batches at every boundary of
    ``plan`` (message shapes ``(H, W, C)`` from :func:`boundary_shapes`), via :func:`dgl_jax.vq.buffer_bytes`."""
    if len(plan) != len(shapes):
        raise ValueError(f"got {len(plan)} configs for {len(shapes)} boundaries")
    codes = book = f32 = 0
    for cfg, shape in zip(plan, shapes, strict=True):
        full = vq.buffer_bytes(num_batches, batch_size, shape)
        f32 += full
        if cfg is None:
            codes += full
            continue
        g, d = cfg.layout(shape[-1])
        codes += vq.buffer_bytes(num_batches, batch_size, shape, cfg.num_codes, g)
        book += vq.codebook_bits(cfg.num_codes, d, g) // 8
    return BufferMemory(codes, book, f32, f32 / (codes + book))
