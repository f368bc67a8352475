"""Asynchronous DGL with replay buffers (Algorithm 2 of the papers): simulated inside one jitted
``lax.scan``, and run for real with one thread per stage on its own device.

**Simulation.** Time is a sequence of *ticks*. A schedule (a small pure pytree object) says which stages are
active at each tick. Stage 0 reads the next fresh batch (``input_fn(n)``); stage j > 0 samples a batch from
buffer j-1 (a :mod:`dgl_jax.buffer` ring buffer of ``(features, labels)``), takes one local step
(:func:`~dgl_jax.train.stage_step`) and pushes ``stop_gradient`` of its output, computed with its pre-update
weights, into buffer j. All reads of a tick happen before its pushes, so stages active in the same tick run
"in parallel": an item sent at tick t is readable from tick ``t + 1 + delay`` (in flight, it sits in a
:class:`DelayLine`, not in the receiver's buffer). The first
``warmup_rounds * K`` ticks are the paper's ordered warm-up (stages 0, 1, ..., K-1 in turn) that fills the
buffers.

Design choice: stages have different shapes, so they cannot be stacked and ``vmap``-ed; the scan body holds
every stage and runs each one under ``lax.cond(active and input valid, step, skip)``. On CPU/GPU a ``cond``
executes only the taken branch, so a tick costs only the active stages' updates (under ``vmap`` the cond
becomes a select and every branch runs: vmap over seeds only with that cost in mind).

Schedules (pytrees: their numbers are traced, so one compiled run serves every slow-down factor):

* :func:`paper_schedule`: each tick ONE stage drawn from a categorical distribution where the slowed stage
  has weight ``1 - noise = 1/S`` and the others weight 1 (the authors' simulation).
* :func:`fixed_speed_schedule`: stage j with slow-down ``S_j`` is active at ticks where
  ``floor((t+1)/S_j) > floor(t/S_j)`` (a tick is one step of the fastest stage; several stages per tick).
* :class:`RoundRobin`: stage ``t mod K`` at tick t. With buffer capacity 1 this *is* synchronous DGL.

A communication delay of ``d`` ticks between stages is :attr:`AsyncConfig.delay`.

**Buffers of VQ codes** (:attr:`AsyncConfig.vq`, a :class:`dgl_jax.vq_train.VQConfig` for every boundary or
one per boundary). When stage j runs, it encodes its output with the codebook copy its receiver holds,
updates its own EMA k-means state and, every ``sync_every`` of its updates, refreshes the receiver's copy
(:func:`dgl_jax.vq_train.send_codes`, the same code as synchronous DGL with VQ). Only the integer codes
``[batch, H, W, G]`` (uint8/uint16) and the labels enter the delay line and buffer j; stage j+1 decodes what
it samples with its copy of the codebook *at read time* (codes written under an older codebook decode to the
current centroids of the same indices, as :func:`dgl_jax.vq_train.sample_codes`). Codebook syncs are not
delayed (they reach the receiver in the tick they are made; ``delay`` applies to codes only). Bandwidth per
boundary: the codes of every sent batch plus one codebook ``[G, K, d]`` float32 every ``sync_every`` sender
updates (:func:`dgl_jax.vq_train.boundary_traffic`). Each codebook is seeded from the first batch its sender
sends (``config.init``), inside the scan, so the trainer and the library share one path.
:func:`buffer_memory` gives per-stage bytes of the stored items vs float32.

**Real asynchrony.** :func:`run_threaded`: one Python thread per stage (the thread machinery of
:mod:`dgl_jax.parallel`: :class:`~dgl_jax.parallel.Workers`, :class:`~dgl_jax.parallel.Channel`), stage j's
state and its input buffer committed to its own device; a stage waits only when its buffer has nothing to
sample. Worker errors propagate to the caller; ``KeyboardInterrupt`` and timeouts stop every thread.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import buffer, vq
from dgl_jax import vq_train as vt
from dgl_jax.stage import Stage, StageState
from dgl_jax.train import stage_step

PyTree = Any
InputFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------
def _check_stage(stage: int | None, num_stages: int) -> None:
    if stage is not None and not 0 <= stage < num_stages:
        raise ValueError(f"stage index {stage} out of range for {num_stages} stages (expected 0..{num_stages - 1})")


def _check_slowdown(slowdown: float) -> None:
    if not float(slowdown) >= 1.0:
        raise ValueError(f"slow-down factor must be >= 1, got {slowdown}")


@flax.struct.dataclass
class RoundRobin:
    """Stage ``t mod K`` is active at tick ``t``."""

    num_stages: int = flax.struct.field(pytree_node=False)

    def __call__(self, key: jax.Array, tick: jax.Array) -> jax.Array:
        return jnp.arange(self.num_stages) == tick % self.num_stages


@flax.struct.dataclass
class CategoricalSchedule:
    """Each tick, one stage drawn with probability proportional to ``weights`` ``[K]`` (traced)."""

    weights: jax.Array

    @property
    def num_stages(self) -> int:
        return self.weights.shape[-1]

    def __call__(self, key: jax.Array, tick: jax.Array) -> jax.Array:
        j = jax.random.categorical(key, jnp.log(self.weights))
        return jnp.arange(self.num_stages) == j


@flax.struct.dataclass
class FixedSpeedSchedule:
    """Stage j (slow-down ``slowdowns[j] >= 1``, traced) is active at ticks with
    ``floor((t+1)/S_j) > floor(t/S_j)``: it runs ``1/S_j`` of the ticks, evenly spread."""

    slowdowns: jax.Array

    @property
    def num_stages(self) -> int:
        return self.slowdowns.shape[-1]

    def __call__(self, key: jax.Array, tick: jax.Array) -> jax.Array:
        t = tick.astype(jnp.float32)
        return jnp.floor((t + 1) / self.slowdowns) > jnp.floor(t / self.slowdowns)


Schedule = RoundRobin | CategoricalSchedule | FixedSpeedSchedule


def paper_schedule(num_stages: int, slow_stage: int | None = None, slowdown: float = 1.0) -> CategoricalSchedule:
    """The authors' simulation: one stage per tick, drawn from a categorical where stage ``slow_stage`` has
    weight ``1 - noise = 1/slowdown`` and the others 1 (``slowdown = S = 1/(1-noise)``)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    _check_stage(slow_stage, num_stages)
    _check_slowdown(slowdown)
    w = np.ones(num_stages, np.float32)
    if slow_stage is not None:
        w[slow_stage] = 1.0 / float(slowdown)
    return CategoricalSchedule(jnp.asarray(w))


def fixed_speed_schedule(slowdowns: Sequence[float]) -> FixedSpeedSchedule:
    """Fixed speed ratios: stage j is ``slowdowns[j]`` (>= 1) times slower than the fastest possible stage."""
    if len(slowdowns) < 1:
        raise ValueError("fixed_speed_schedule needs at least one stage")
    for s in slowdowns:
        _check_slowdown(s)
    return FixedSpeedSchedule(jnp.asarray(slowdowns, jnp.float32))


def make_schedule(
    name: str, num_stages: int, slow_stage: int | None = None, slowdown: float = 1.0
) -> CategoricalSchedule | FixedSpeedSchedule | RoundRobin:
    """A schedule by name: ``"paper"``, ``"fixed"`` (only ``slow_stage`` is slowed) or ``"round_robin"``."""
    _check_stage(slow_stage, num_stages)
    _check_slowdown(slowdown)
    if name == "paper":
        return paper_schedule(num_stages, slow_stage, slowdown)
    if name == "fixed":
        s = [1.0] * num_stages
        if slow_stage is not None:
            s[slow_stage] = float(slowdown)
        return fixed_speed_schedule(s)
    if name == "round_robin":
        if slow_stage is not None and slowdown != 1.0:
            raise ValueError(f"round_robin cannot slow a stage (slowdown {slowdown}); use 'paper' or 'fixed'")
        return RoundRobin(num_stages)
    raise ValueError(f"unknown schedule {name!r}; expected one of ('paper', 'fixed', 'round_robin')")


# ----------------------------------------------------------------------------------------------------------
# Simulated asynchrony
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """Static settings of an asynchronous run: buffer ``capacity`` M (>= 1), sampling ``policy`` (one of
    :data:`dgl_jax.buffer.POLICIES`), ``max_reuse`` (None: unlimited), communication ``delay`` (ticks >= 0)
    and ``warmup_rounds`` of ordered warm-up (None: ``capacity`` rounds, which fills every buffer). ``vq``:
    buffers hold VQ codes: one :class:`~dgl_jax.vq_train.VQConfig` for every boundary, or a sequence of K-1
    (``None`` entries keep float features on that boundary); ``None`` (default): float buffers."""

    capacity: int = 1
    policy: str = "priority_lifo"
    max_reuse: int | None = None
    delay: int = 0
    warmup_rounds: int | None = None
    vq: vt.VQConfig | tuple[vt.VQConfig | None, ...] | None = None

    def __post_init__(self):
        if self.vq is not None and not isinstance(self.vq, vt.VQConfig):
            plan = tuple(self.vq) if isinstance(self.vq, (list, tuple)) else None
            if plan is None or not all(c is None or isinstance(c, vt.VQConfig) for c in plan):
                raise ValueError(f"vq must be None, a VQConfig or a sequence of VQConfig/None, got {self.vq!r}")
            object.__setattr__(self, "vq", plan)  # hashable
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"buffer capacity must be an int >= 1, got {self.capacity!r}")
        buffer.check_policy(self.policy)
        buffer.check_max_reuse(self.max_reuse)
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0 ticks, got {self.delay}")
        if self.warmup_rounds is not None and self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {self.warmup_rounds}")

    @property
    def warmup(self) -> int:
        return self.capacity if self.warmup_rounds is None else self.warmup_rounds

    def plan(self, num_stages: int) -> tuple[vt.VQConfig | None, ...]:
        """The VQ config of each of the ``num_stages - 1`` boundaries (``None``: float features)."""
        return vt.as_plan(self.vq, num_stages)


class DelayLine(NamedTuple):
    """Messages in flight on one boundary (communication delay ``d`` ticks): ``items`` (pytree ``[d, ...]``),
    ``valid [d]`` and the tick each was sent ``ticks [d]``. Slot ``t mod d`` holds what was sent at tick
    ``t - d``; it arrives in the receiver's buffer at tick t, so the buffer only ever holds arrived items."""

    items: PyTree
    valid: jax.Array
    ticks: jax.Array


def _line_init(delay: int, example: PyTree) -> DelayLine:
    items = jax.tree.map(lambda a: jnp.zeros((delay, *a.shape), a.dtype), example)
    return DelayLine(items, jnp.zeros((delay,), bool), jnp.zeros((delay,), jnp.int32))


def _line_shift(
    line: DelayLine, t: jax.Array, item: PyTree, valid: jax.Array
) -> tuple[PyTree, jax.Array, jax.Array, DelayLine]:
    """Sends ``item`` at tick ``t``; returns what arrives at ``t`` (sent at ``t - d``): ``(item, valid, tick,
    line)``."""
    i = t % line.valid.shape[0]
    out = jax.tree.map(lambda a: a[i], line.items), line.valid[i], line.ticks[i]
    new = DelayLine(
        jax.tree.map(lambda a, x: a.at[i].set(x), line.items, item),
        line.valid.at[i].set(valid),
        line.ticks.at[i].set(t),
    )
    return (*out, new)


class AsyncState(NamedTuple):
    """Carry of the simulation: per-stage ``states``, ``buffers[j]`` (input of stage j+1, K-1 of them, items
    ``(features, labels)``, or ``(codes, labels)`` on a quantized boundary), the current ``tick``,
    ``consumed`` (fresh batches stage 0 has read), ``key``, the K-1 :class:`DelayLine` of messages in flight
    (empty list without delay) and, with VQ, the K-1 :class:`~dgl_jax.vq_train.Boundary` (sender state and
    receiver codebook; ``None`` on float boundaries; empty list without VQ)."""

    states: list[StageState]
    buffers: list[buffer.BufferState]
    tick: jax.Array
    consumed: jax.Array
    key: jax.Array
    lines: list[DelayLine]
    boundaries: tuple = ()


class AsyncRecords(NamedTuple):
    """Per tick and stage (``[T, K]``): ``updated`` (bool: the stage took a step), ``staleness`` (age in ticks
    of the consumed batch; 0 for stage 0's fresh data; -1 without update), ``reuse`` (how often the consumed
    batch had been read before; -1 without update), ``loss`` and ``accuracy`` (NaN without update), and for
    a stage that sends codes (NaN otherwise): ``distortion`` (relative squared error of its output decoded
    with the receiver's copy) and ``coverage`` (fraction of codes the batch used)."""

    updated: jax.Array
    staleness: jax.Array
    reuse: jax.Array
    loss: jax.Array
    accuracy: jax.Array
    distortion: jax.Array
    coverage: jax.Array


def message_example(
    stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array, labels: jax.Array
) -> list[tuple[jax.Array, jax.Array]]:
    """Zero-filled ``(features, labels)`` examples of the K-1 messages, for :func:`dgl_jax.buffer.init`."""
    out = []
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    for stage, state in zip(stages[:-1], states[:-1], strict=True):
        spec = jax.eval_shape(functools.partial(stage_step, stage), state, spec, labels)[1]
        out.append((jnp.zeros(spec.shape, spec.dtype), jnp.zeros(labels.shape, labels.dtype)))
    return out


def init_async(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    x: jax.Array,
    labels: jax.Array,
    config: AsyncConfig,
    key: jax.Array,
) -> AsyncState:
    """The initial :class:`AsyncState`: ``states`` and K-1 empty buffers sized for batches like
    ``x: [batch, H, W, C]`` / ``labels: [batch]``. With ``config.vq``, quantized boundaries get buffers of
    codes (:func:`dgl_jax.vq_train.init_code_buffer`) and a placeholder codebook (``fold_in(key, j)``) that
    the first send seeds from data; ``ValueError`` if a ``code_dim``/``groups`` does not divide a stage's
    channels or a batch has fewer vectors than codes for ``init='sample'``."""
    if len(stages) != len(states):
        raise ValueError(f"got {len(stages)} stages but {len(states)} states")
    examples = message_example(stages, states, x, labels)
    zero = jnp.zeros((), jnp.int32)
    if config.vq is None:
        bufs = [buffer.init(config.capacity, ex) for ex in examples]
        lines = [_line_init(config.delay, ex) for ex in examples] if config.delay else []
        return AsyncState(list(states), bufs, zero, jnp.zeros((), jnp.int32), key, lines)
    bufs, bounds = [], []
    for j, (cfg, (feat, lab)) in enumerate(zip(config.plan(len(stages)), examples, strict=True)):
        if cfg is None:
            bufs.append(buffer.init(config.capacity, (feat, lab)))
            bounds.append(None)
            continue
        try:
            groups, code_dim = cfg.layout(feat.shape[-1])
        except ValueError as e:
            raise ValueError(f"VQ at the output of stage {j} (features {tuple(feat.shape[1:])}): {e}") from None
        vectors = feat.size // feat.shape[-1]
        if cfg.init == "sample" and vectors < (cfg.max_codes or cfg.num_codes):
            raise ValueError(
                f"VQ at the output of stage {j}: init 'sample' needs at least {cfg.max_codes or cfg.num_codes} "
                f"vectors per batch, a batch has {vectors}; use fewer codes, a larger batch or init='kmeans++'"
            )
        s = vq.init(jax.random.fold_in(key, j), cfg.num_codes, code_dim, groups, max_codes=cfg.max_codes)
        b = vt.Boundary(s, jnp.copy(s.codebook))
        bufs.append(vt.init_code_buffer(config.capacity, b, feat.shape[1:], feat.shape[0]))
        if bufs[-1].items[1].dtype != lab.dtype:
            bufs[-1] = bufs[-1]._replace(items=(bufs[-1].items[0], bufs[-1].items[1].astype(lab.dtype)))
        bounds.append(b)
    item_examples = [jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), b.items) for b in bufs]
    lines = [_line_init(config.delay, ex) for ex in item_examples] if config.delay else []
    return AsyncState(list(states), bufs, zero, jnp.zeros((), jnp.int32), key, lines, list(bounds))


def _seed_on_first_send(cfg: vt.VQConfig, b: vt.Boundary, feats: jax.Array, key: jax.Array) -> vt.Boundary:
    """Before a boundary's first update (``sender.step == 0``), seeds sender and receiver codebooks from the
    sender's output ``feats: [batch, H, W, C]`` (``cfg.init``, as :func:`dgl_jax.vq_train.init_vq` does from
    the first batch); later it returns ``b`` unchanged. Traced: one ``lax.cond``."""

    def seed(b):
        s = vq.init_from_data(b.sender, key, feats, cfg.init)
        return vt.Boundary(s, s.codebook)

    return jax.lax.cond(b.sender.step == 0, seed, lambda b: b, b)


def async_ticks(
    stages: Sequence[Stage],
    config: AsyncConfig,
    input_fn: InputFn,
    state: AsyncState,
    schedule: Schedule,
    num_ticks: int,
) -> tuple[AsyncState, AsyncRecords]:
    """Runs ``num_ticks`` ticks (pure; jit it, see :func:`make_async_run`). Ticks before
    ``config.warmup * K`` (counted from tick 0 of the run) follow the ordered warm-up instead of ``schedule``.

    ``input_fn(n) -> (x [batch, H, W, C], labels [batch])`` gives stage 0's n-th fresh batch (traced ``n``).
    Returns the final state and :class:`AsyncRecords` with ``[num_ticks, K]`` arrays.
    """
    k = len(stages)
    if schedule.num_stages != k:
        raise ValueError(f"schedule is for {schedule.num_stages} stages but the model has {k}")
    plan = (None,) * (k - 1) if config.vq is None else config.plan(k)
    if any(c is not None for c in plan) and len(state.boundaries) != k - 1:
        raise ValueError("config.vq is set but the state has no codebooks: build it with init_async(..., config)")
    warm_ticks = config.warmup * k
    msg_shapes = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), b.items) for b in state.buffers]
    msg_shapes = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), m) for m in msg_shapes]
    nan = jnp.float32(jnp.nan)

    def make_branches(j):
        cfg_in = plan[j - 1] if j > 0 else None  # boundary j-1 feeds stage j
        cfg_out = plan[j] if j < k - 1 else None  # stage j sends on boundary j

        def run(st, inp, n, *q):
            if j == 0:
                x, y = input_fn(n)
            else:
                x, y = inp
                if cfg_in is not None:
                    x = vq.decode(q[0]["book"], x)  # the receiver decodes with its copy of the codebook
            st, feat, loss, acc = stage_step(stages[j], st, x, y)
            if not q:  # no VQ on either side: exactly the float path
                return st, (feat, y) if j < k - 1 else None, loss, acc
            qo = {"bound": q[0]["bound"], "distortion": nan, "coverage": nan}
            out = (feat, y) if j < k - 1 else None
            if cfg_out is not None:
                seed_key, send_key = jax.random.split(q[0]["key"])
                b = _seed_on_first_send(cfg_out, q[0]["bound"], feat, seed_key)
                b_new, codes, stats = vt.send_codes(cfg_out, b, feat, send_key)
                qo = {
                    "bound": b_new,
                    "distortion": vq.distortion(feat, vq.decode(b.receiver, codes)),
                    "coverage": stats.coverage,
                }
                out = (codes, y)
            return st, out, loss, acc, qo

        def skip(st, inp, n, *q):
            out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), msg_shapes[j]) if j < k - 1 else None
            if not q:
                return st, out, nan, nan
            return st, out, nan, nan, {"bound": q[0]["bound"], "distortion": nan, "coverage": nan}

        return run, skip, cfg_in is not None or cfg_out is not None

    branches = [make_branches(j) for j in range(k)]

    def body(carry: AsyncState, _):
        states, bufs, t, consumed, key, lines, bounds = carry
        lines = list(lines)
        new_bounds = list(bounds)
        key, sched_key, *sample_keys = jax.random.split(key, k + 1)
        active = jnp.where(t < warm_ticks, jnp.arange(k) == t % k, schedule(sched_key, t))
        new_bufs = list(bufs)
        inputs, valids, stale, reuse = [None], [active[0]], [jnp.int32(0)], [jnp.int32(0)]
        for j in range(1, k):  # all reads first (pre-tick buffers)
            b = bufs[j - 1]
            idx, ok = buffer.select(b, sample_keys[j - 1], config.policy, config.max_reuse)
            valid = active[j] & ok
            item, new_bufs[j - 1] = buffer.read(b, idx, valid)
            inputs.append(item)
            valids.append(valid)
            stale.append(t - b.ticks[idx])
            reuse.append(b.uses[idx])
        books = [None if b is None else b.receiver for b in new_bounds]  # receivers' copies before the tick
        new_states, losses, accs, dists, covs = [], [], [], [], []
        for j in range(k):
            run, skip, uses_vq = branches[j]
            ops = (states[j], inputs[j], consumed)
            if uses_vq:
                q = {
                    "book": books[j - 1] if j > 0 else None,
                    "bound": new_bounds[j] if j < k - 1 else None,
                    "key": jax.random.fold_in(sched_key, j + 1),
                }
                st, out, loss, acc, qo = jax.lax.cond(valids[j], run, skip, *ops, q)
                if j < k - 1:
                    new_bounds[j] = qo["bound"]
                dists.append(qo["distortion"])
                covs.append(qo["coverage"])
            else:
                st, out, loss, acc = jax.lax.cond(valids[j], run, skip, *ops)
                dists.append(nan)
                covs.append(nan)
            new_states.append(st)
            losses.append(loss)
            accs.append(acc)
            if j < k - 1:
                sent, sent_ok, sent_tick = out, valids[j], t
                if config.delay:  # what arrives now was sent `delay` ticks ago
                    sent, sent_ok, sent_tick, lines[j] = _line_shift(lines[j], t, out, valids[j])
                new_bufs[j] = buffer.push(new_bufs[j], sent, tick=sent_tick, valid=sent_ok)
        upd = jnp.stack(valids)
        rec = AsyncRecords(
            updated=upd,
            staleness=jnp.where(upd, jnp.stack(stale), -1),
            reuse=jnp.where(upd, jnp.stack(reuse), -1),
            loss=jnp.stack(losses),
            accuracy=jnp.stack(accs),
            distortion=jnp.stack(dists),
            coverage=jnp.stack(covs),
        )
        bounds = type(bounds)(new_bounds)
        carry = AsyncState(new_states, new_bufs, t + 1, consumed + valids[0].astype(jnp.int32), key, lines, bounds)
        return carry, rec

    return jax.lax.scan(body, state, None, length=num_ticks)


def make_async_run(
    stages: Sequence[Stage], config: AsyncConfig, input_fn: InputFn, num_ticks: int, *, donate: bool = True
) -> Callable[[AsyncState, Schedule], tuple[AsyncState, AsyncRecords]]:
    """``run(state, schedule) -> (state, records)``: :func:`async_ticks` jitted once. The schedule is an
    argument (a pytree), so changing its slow-down factor does not recompile."""
    if num_ticks < 1:
        raise ValueError(f"num_ticks must be >= 1, got {num_ticks}")
    fn = functools.partial(async_ticks, stages, config, input_fn, num_ticks=num_ticks)
    return jax.jit(lambda state, schedule: fn(state, schedule), donate_argnums=(0,) if donate else ())


def epoch_input_fn(images: jax.Array, labels: jax.Array, batch_size: int, key: jax.Array) -> InputFn:
    """``input_fn(n)``: the n-th batch of ``batch_size`` from ``images [N, H, W, C]`` / ``labels [N]``,
    reshuffled every epoch (the permutation of epoch e uses ``fold_in(key, e)``; the tail is dropped)."""
    n_data = images.shape[0]
    per_epoch = n_data // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the {n_data} examples")

    def input_fn(n):
        epoch, i = n // per_epoch, n % per_epoch
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_data)
        idx = jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))
        return images[idx], labels[idx]

    return input_fn


def buffer_memory(state: AsyncState) -> dict[str, np.ndarray]:
    """Replay-buffer memory per stage (``[K]`` int64 host arrays; entry j is stage j's input buffer, 0 for
    stage 0): ``buffer_bytes`` (the stored features or codes of all ``capacity`` slots, as allocated),
    ``codebook_bytes`` (the receiver's codebook copy ``[G, K, d]`` stage j holds to decode; 0 on float
    boundaries) and ``buffer_bytes_fp32`` (the same slots holding float32 features ``[batch, H, W, C]``).
    Labels and messages still in a delay line are not counted. Works on a state or its shapes."""
    k = len(state.states)
    out = {name: np.zeros(k, np.int64) for name in ("buffer_bytes", "codebook_bytes", "buffer_bytes_fp32")}
    for j, buf in enumerate(state.buffers):
        feats = buf.items[0]
        b = state.boundaries[j] if state.boundaries else None
        out["buffer_bytes"][j + 1] = feats.size * np.dtype(feats.dtype).itemsize
        if b is None:
            out["buffer_bytes_fp32"][j + 1] = feats.size * 4
        else:
            g, _, d = b.receiver.shape
            out["codebook_bytes"][j + 1] = b.receiver.size * np.dtype(b.receiver.dtype).itemsize
            out["buffer_bytes_fp32"][j + 1] = feats.size // g * (g * d) * 4
    return out


def summarize(records: AsyncRecords, tail: float = 0.1, state: AsyncState | None = None) -> dict[str, np.ndarray]:
    """Per-stage summary (``[K]`` host arrays): ``updates``, ``mean_staleness``, ``max_staleness``,
    ``mean_reuse``, ``max_reuse`` and the mean ``loss``/``accuracy`` over each stage's last ``tail`` fraction
    of updates; when some stage sent VQ codes, also ``distortion`` and ``coverage`` (same tail mean, NaN for
    stages that send no codes); with ``state``, the entries of :func:`buffer_memory`."""
    r = jax.tree.map(np.asarray, records)
    upd = r.updated
    k = upd.shape[1]
    out: dict[str, list] = {
        k_: [] for k_ in ("updates", "mean_staleness", "max_staleness", "mean_reuse", "max_reuse", "loss", "accuracy")
    }
    for j in range(k):
        m = upd[:, j]
        n = int(m.sum())
        out["updates"].append(n)
        st, ru = r.staleness[m, j], r.reuse[m, j]
        out["mean_staleness"].append(float(st.mean()) if n else np.nan)
        out["max_staleness"].append(int(st.max()) if n else -1)
        out["mean_reuse"].append(float(ru.mean()) if n else np.nan)
        out["max_reuse"].append(int(ru.max()) if n else -1)
        last = max(1, int(np.ceil(n * tail)))
        out["loss"].append(float(r.loss[m, j][-last:].mean()) if n else np.nan)
        out["accuracy"].append(float(r.accuracy[m, j][-last:].mean()) if n else np.nan)
        if np.isfinite(r.distortion).any():
            for name in ("distortion", "coverage"):
                v = getattr(r, name)[m, j][-last:]
                out.setdefault(name, []).append(float(v.mean()) if n and np.isfinite(v).all() else np.nan)
    summary = {k_: np.asarray(v) for k_, v in out.items()}
    if state is not None:
        summary.update(buffer_memory(state))
    return summary


# ----------------------------------------------------------------------------------------------------------
# Real asynchrony: one thread per stage, each on its own device
# ----------------------------------------------------------------------------------------------------------
_END = object()


class ThreadedResult(NamedTuple):
    """Outcome of :func:`run_threaded`: final ``states`` (stage j's on its device), ``updates`` ``[K]`` (steps
    taken), and per stage lists (host numpy) of ``loss``, ``accuracy``, ``age`` (how many newer batches had
    arrived in the buffer when the consumed one was read; 0 for stage 0) and ``reuse`` (earlier reads of it),
    plus the wall time ``seconds``."""

    states: list[StageState]
    updates: np.ndarray
    loss: list[np.ndarray]
    accuracy: list[np.ndarray]
    age: list[np.ndarray]
    reuse: list[np.ndarray]
    seconds: float


def _consume(stage: Stage, config: AsyncConfig, state: StageState, buf: buffer.BufferState, key: jax.Array):
    idx, ok = buffer.select(buf, key, config.policy, config.max_reuse)
    age, reuse = buf.count - 1 - buf.seq[idx], buf.uses[idx]
    (x, y), buf = buffer.read(buf, idx, ok)

    def run(st):
        st, feat, loss, acc = stage_step(stage, st, x, y)
        return st, feat, loss, acc

    def skip(st):
        feat = jax.eval_shape(lambda s: stage_step(stage, s, x, y)[1], st)
        return st, jnp.zeros(feat.shape, feat.dtype), jnp.float32(jnp.nan), jnp.float32(jnp.nan)

    state, feat, loss, acc = jax.lax.cond(ok, run, skip, state)
    return state, buf, (feat, y), loss, acc, ok, age, reuse


def run_threaded(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    batches: Sequence[tuple[Any, Any]],
    config: AsyncConfig,
    *,
    num_updates: int | Sequence[int],
    devices: Sequence[jax.Device] | None = None,
    slow_stage: int | None = None,
    slow_extra_s: float = 0.0,
    key: jax.Array | None = None,
    timeout_s: float | None = 600.0,
) -> ThreadedResult:
    """Asynchronous DGL for real: stage j runs in its own thread on ``devices[j % len(devices)]`` and takes
    ``num_updates[j]`` steps (an int: the same for all). Stage 0 cycles through ``batches`` (host
    ``(x [batch, H, W, C], labels [batch])``); stage j > 0 samples from its own replay buffer (on its device,
    ``config`` gives capacity/policy/max_reuse), which the stage below fills by sending its features
    (``device_put`` to stage j's device, through an unbounded-enough :class:`~dgl_jax.parallel.Channel`).

    A stage waits only when its buffer has nothing to sample; if the stage below has finished and nothing
    can be sampled, it stops early (``updates[j] < num_updates[j]``). ``slow_stage`` sleeps ``slow_extra_s``
    seconds after each of its steps (an injected slow-down). Every function is compiled in the calling thread
    before any worker starts (jax#17457). A worker exception is re-raised here, ``KeyboardInterrupt`` or
    ``timeout_s`` stop every thread (:class:`~dgl_jax.parallel.Workers`). ``states`` are copied, not donated.
    """
    from dgl_jax.parallel import Workers  # the shared thread machinery (stop event, error propagation)

    k = len(stages)
    if len(states) != k:
        raise ValueError(f"got {len(stages)} stages but {len(states)} states")
    if not batches:
        raise ValueError("run_threaded needs at least one batch")
    _check_stage(slow_stage, k)
    if slow_extra_s < 0:
        raise ValueError(f"slow_extra_s must be >= 0, got {slow_extra_s}")
    n_up = [int(num_updates)] * k if np.ndim(num_updates) == 0 else [int(n) for n in num_updates]
    if len(n_up) != k or min(n_up) < 0:
        raise ValueError(f"num_updates must be one int >= 0 or {k} of them, got {num_updates}")
    devices = list(jax.devices() if devices is None else devices)
    devs = [devices[j % len(devices)] for j in range(k)]
    key = jax.random.key(0) if key is None else key
    keys = [jax.device_put(kk, d) for kk, d in zip(jax.random.split(key, k), devs, strict=True)]

    x0, y0 = jnp.asarray(batches[0][0]), jnp.asarray(batches[0][1])
    examples = message_example(stages, states, x0, y0)
    placed = [jax.device_put(jax.tree.map(jnp.copy, s), d) for s, d in zip(states, devs, strict=True)]
    bufs = [None] + [
        jax.device_put(buffer.init(config.capacity, ex), d) for ex, d in zip(examples, devs[1:], strict=True)
    ]

    # compile everything here, in the main thread
    step0 = jax.jit(functools.partial(stage_step, stages[0]), donate_argnums=0)
    step0 = step0.lower(placed[0], jax.device_put(x0, devs[0]), jax.device_put(y0, devs[0])).compile()
    consume, push = [None], [None]
    for j in range(1, k):
        c = jax.jit(functools.partial(_consume, stages[j], config), donate_argnums=(0, 1))
        consume.append(c.lower(placed[j], bufs[j], keys[j]).compile())
        p = jax.jit(lambda b, item: buffer.push(b, item), donate_argnums=0)
        push.append(p.lower(bufs[j], jax.device_put(examples[j - 1], devs[j])).compile())
    split = jax.jit(jax.random.split)

    updates = [0] * k
    recs: list[list[tuple]] = [[] for _ in range(k)]

    def worker(j, inbox, outbox):
        state, buf, kj = placed[j], bufs[j], keys[j]
        upstream_done = False
        try:
            while updates[j] < n_up[j]:
                if j == 0:
                    x, y = batches[updates[0] % len(batches)]
                    state, feat, loss, acc = step0(state, jax.device_put(x, devs[0]), jax.device_put(y, devs[0]))
                    y = jax.device_put(y, devs[0])
                    ok, age, reuse = True, 0, 0
                else:
                    while True:  # drain the inbox into the ring buffer without waiting
                        try:
                            item = inbox.get_nowait()
                        except queue.Empty:
                            break
                        if item is _END:
                            upstream_done = True
                        else:
                            buf = push[j](buf, item)
                    kj, sub = split(kj)
                    state, buf, (feat, y), loss, acc, ok, age, reuse = consume[j](state, buf, sub)
                    if not bool(ok):  # nothing to sample: wait for the stage below (or give up if it is done)
                        if upstream_done:
                            break
                        item = inbox.get()
                        if item is _END:
                            upstream_done = True
                        else:
                            buf = push[j](buf, item)
                        continue
                updates[j] += 1
                recs[j].append((loss, acc, age, reuse))
                if outbox is not None:
                    outbox.put(jax.device_put((feat, y), devs[j + 1]))
                if j == slow_stage and slow_extra_s > 0:
                    jax.block_until_ready(loss)
                    time.sleep(slow_extra_s)
        finally:
            placed[j] = state
        if outbox is not None:
            outbox.put(_END)

    t0 = time.perf_counter()
    with Workers() as w:
        # inboxes hold at most everything the producer will send, so a producer never waits on its consumer
        inboxes = [None] + [w.channel(maxsize=n_up[j - 1] + 1) for j in range(1, k)]
        for j in range(k):
            w.spawn(worker, j, inboxes[j], inboxes[j + 1] if j + 1 < k else None, name=f"async-stage{j}")
        w.join(timeout_s)
    seconds = time.perf_counter() - t0

    def col(j, i):
        return np.asarray([np.asarray(r[i]) for r in recs[j]])

    return ThreadedResult(
        states=placed,
        updates=np.asarray(updates),
        loss=[col(j, 0) for j in range(k)],
        accuracy=[col(j, 1) for j in range(k)],
        age=[col(j, 2) for j in range(k)],
        reuse=[col(j, 3) for j in range(k)],
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------------------
# Trainer method: --method async
# ----------------------------------------------------------------------------------------------------------
ASYNC_OPTIONS: dict[str, Any] = {
    "capacity": 1,
    "policy": "priority_lifo",
    "max_reuse": None,
    "delay": 0,
    "warmup_rounds": None,
    "schedule": "paper",
    "slow_stage": None,
    "slowdown": 1.0,
    # buffers of VQ codes: the fields of dgl_jax.vq_train.VQConfig, prefixed with vq_ (vq_num_codes None: floats)
    "vq_num_codes": None,
    "vq_code_dim": None,  # None: 16 unless vq_groups is given
    "vq_groups": None,
    "vq_sync_every": 1,
    "vq_decay": 0.99,
    "vq_restart_threshold": 1e-2,
    "vq_init": "sample",
}


def _async_options(config: Any) -> tuple[AsyncConfig, dict[str, Any]]:
    unknown = sorted(set(config.method_options) - set(ASYNC_OPTIONS))
    if unknown:
        raise ValueError(f"unknown async options {unknown}; expected some of {sorted(ASYNC_OPTIONS)}")
    o = {**ASYNC_OPTIONS, **config.method_options}
    acfg = AsyncConfig(o["capacity"], o["policy"], o["max_reuse"], o["delay"], o["warmup_rounds"], _vq_option(o))
    _check_slowdown(o["slowdown"])
    if o["schedule"] not in ("paper", "fixed", "round_robin"):
        raise ValueError(f"unknown schedule {o['schedule']!r}; expected one of ('paper', 'fixed', 'round_robin')")
    return acfg, o


def _vq_option(o: dict[str, Any]) -> vt.VQConfig | None:
    """The :class:`~dgl_jax.vq_train.VQConfig` of the ``vq_*`` options (``None`` without ``vq_num_codes``)."""
    names = [n for n in ASYNC_OPTIONS if n.startswith("vq_") and n != "vq_num_codes"]
    if o["vq_num_codes"] is None:
        set_ = [n for n in names if o[n] != ASYNC_OPTIONS[n]]
        if set_:
            raise ValueError(f"async options {set_} need vq_num_codes (the codebook size; null: float buffers)")
        return None
    code_dim = 16 if o["vq_code_dim"] is None and o["vq_groups"] is None else o["vq_code_dim"]
    try:
        return vt.VQConfig(
            num_codes=o["vq_num_codes"],
            code_dim=code_dim,
            groups=o["vq_groups"],
            decay=o["vq_decay"],
            restart_threshold=o["vq_restart_threshold"],
            sync_every=o["vq_sync_every"],
            init=o["vq_init"],
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"async VQ options: {e}") from None


def _async_schedule(num_stages: int, o: dict[str, Any]) -> Schedule:
    return make_schedule(o["schedule"], num_stages, o["slow_stage"], o["slowdown"])


def register_methods() -> None:
    """Registers ``async`` in the trainer's method registry (options: :data:`ASYNC_OPTIONS`).

    One trainer step runs K ticks of the schedule; stage 0 reads the step's batch whenever it is active (0, 1
    or more times per step). Logged per stage: ``loss``/``accuracy`` (mean over its updates in the step),
    ``updates`` (count), ``staleness`` and ``reuse`` (mean over its updates), ``buffer_mib`` (its input
    buffer's stored items plus the codebook it holds, MiB) and ``buffer_mib_fp32`` (the same buffer of
    float32 features); with ``vq_num_codes``, also ``vq_distortion`` and ``vq_coverage`` of what it sent.
    With ``capacity=1`` and ``schedule=round_robin`` (and no VQ) the run equals ``--method dgl``.
    """
    from dgl_jax.trainer import METHODS, Method, register_method

    if "async" in METHODS:
        return

    def _extra(st: AsyncState) -> dict[str, Any]:
        extra = {"buffers": st.buffers, "lines": st.lines, "tick": st.tick, "consumed": st.consumed}
        if st.boundaries:
            extra["vq"] = st.boundaries  # only with VQ: float runs keep their checkpoint layout
        return extra

    def init_extra(stages, states, config, key, example):
        acfg, o = _async_options(config)
        _async_schedule(len(stages), o)  # a slow stage out of range fails here, before training
        x = jnp.zeros((config.batch_size, *example.shape[1:]), example.dtype)
        st = init_async(stages, states, x, jnp.zeros((config.batch_size,), jnp.int32), acfg, key)
        return _extra(st)

    def make_step(stages, config, phase, features):
        acfg, o = _async_options(config)
        k = len(stages)
        schedule = _async_schedule(k, o)

        def step(states, extra, x, y, key):
            st = AsyncState(
                states, extra["buffers"], extra["tick"], extra["consumed"], key, extra["lines"], extra.get("vq", ())
            )
            st, rec = async_ticks(stages, acfg, lambda n: (x, y), st, schedule, k)
            upd = rec.updated
            n = upd.sum(0)

            def mean(v):
                return jnp.where(n > 0, jnp.where(upd, v, 0).sum(0) / jnp.maximum(n, 1), jnp.nan)

            metrics = {
                "loss": jnp.nanmean(rec.loss, 0),
                "accuracy": jnp.nanmean(rec.accuracy, 0),
                "updates": n.astype(jnp.float32),
                "staleness": mean(rec.staleness.astype(jnp.float32)),
                "reuse": mean(rec.reuse.astype(jnp.float32)),
            }
            mem = buffer_memory(st)  # static: from shapes
            metrics["buffer_mib"] = jnp.asarray((mem["buffer_bytes"] + mem["codebook_bytes"]) / 2**20, jnp.float32)
            metrics["buffer_mib_fp32"] = jnp.asarray(mem["buffer_bytes_fp32"] / 2**20, jnp.float32)
            if acfg.vq is not None:
                metrics["vq_distortion"] = jnp.nanmean(rec.distortion, 0)
                metrics["vq_coverage"] = jnp.nanmean(rec.coverage, 0)
            return st.states, _extra(st), metrics

        return step

    register_method(
        Method(
            "async",
            "asynchronous DGL: stages read replay buffers, one schedule tick per stage update (Algorithm 2)",
            make_step,
            init_extra=init_extra,
            validate=lambda config: _async_options(config) and None,
            eval_messages=lambda extra: vt.eval_messages(extra["vq"]) if "vq" in extra else None,
        )
    )
