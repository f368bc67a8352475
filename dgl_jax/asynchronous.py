"""Asynchronous DGL with replay buffers (Algorithm 2 of the papers): simulated inside one jitted
``lax.scan``, and run for real with one thread per stage on its own device.

**Simulation.** Time is a sequence of *ticks*. A schedule (a small pure pytree object) says which stages are
active at each tick. Stage 0 reads the next fresh batch (``input_fn(n)``); stage j > 0 samples an item from
buffer j-1 (a :mod:`dgl_jax.buffer` ring buffer of ``(wire, targets)``), decodes it with boundary j-1's
codec, takes one local step (:func:`~dgl_jax.steps.stage_step`, the unit every executor runs) and pushes
the wire of its output, computed with its pre-update weights, into buffer j. All reads of a tick happen
before its pushes, so stages active in the same tick run "in parallel": an item sent at tick t is readable
from tick ``t + 1 + delay`` (in flight, it sits in a :class:`DelayLine`, not in the receiver's buffer). The
first ``warmup_rounds * K`` ticks are the paper's ordered warm-up (stages 0, 1, ..., K-1 in turn) that
fills the buffers.

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

**Buffers of wires.** Buffers and delay lines hold what the sender's codec produced (``Stage.codec``, see
:mod:`dgl_jax.codecs`): float features without a codec, packed VQ codes plus the codebook they refer to
with a VQ codec. Wires are self-contained, so an item decodes to what its sender meant however long it
waited. :func:`dgl_jax.accounting.buffer_memory` gives the bytes of the stored items.

**Real asynchrony.** Every wall-clock executor runs :func:`stage_loop` once per stage with the programs of
:func:`compile_stage` (the same jitted :func:`~dgl_jax.steps.stage_step` and codec functions), wires
arriving through an :class:`Inbox` (bounded, with an optional injected link latency and emulated bandwidth).
:func:`run_threaded`: one Python thread per stage (the thread machinery of :mod:`dgl_jax.parallel`:
:class:`~dgl_jax.parallel.Workers`), stage j's state and its input buffer committed to its own device; a
stage waits only when its buffer has nothing to sample. Worker errors propagate to the caller;
``KeyboardInterrupt`` and timeouts stop every thread. :mod:`dgl_jax.ray_executor` runs the same loops in Ray
actors, one per stage, across processes and machines.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import buffer
from dgl_jax.objective import stage_key
from dgl_jax.stage import Stage, StageState, decode_message, message_specs, wire_spec
from dgl_jax.steps import stage_step

PyTree = Any
InputFn = Callable[[jax.Array], tuple[PyTree, PyTree]]
SCHEDULES = ("paper", "fixed", "round_robin")


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------
def _check_stage(stage: int | None, num_stages: int) -> None:
    if stage is not None and not 0 <= stage < num_stages:
        raise ValueError(f"stage index {stage} out of range for {num_stages} stages (expected 0..{num_stages - 1})")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_slowdown(slowdown: float) -> None:
    if not (_is_number(slowdown) and slowdown >= 1.0):
        raise ValueError(f"slow-down factor must be a number >= 1, got {slowdown!r}")


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
    and ``warmup_rounds`` of ordered warm-up (None: ``capacity`` rounds, which fills every buffer). What the
    buffers hold is decided by the stages' codecs."""

    capacity: int = 1
    policy: str = "priority_lifo"
    max_reuse: int | None = None
    delay: int = 0
    warmup_rounds: int | None = None

    def __post_init__(self):
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
    """Carry of the simulation: per-stage ``states`` (codec states included), ``buffers[j]`` (input of stage
    j+1, K-1 of them, items ``(wire, targets)``), the current ``tick``, ``consumed`` (fresh batches stage 0
    has read), ``key``, and the K-1 :class:`DelayLine` of messages in flight (empty list without delay)."""

    states: list[StageState]
    buffers: list[buffer.BufferState]
    tick: jax.Array
    consumed: jax.Array
    key: jax.Array
    lines: list[DelayLine]


class AsyncRecords(NamedTuple):
    """Per tick and stage (``[T, K]``): ``updated`` (bool: the stage took a step), ``staleness`` (age in ticks
    of the consumed batch; 0 for stage 0's fresh data; -1 without update), ``reuse`` (how often the consumed
    batch had been read before; -1 without update), ``loss`` and ``accuracy`` (NaN without update)."""

    updated: jax.Array
    staleness: jax.Array
    reuse: jax.Array
    loss: jax.Array
    accuracy: jax.Array


def buffer_items(stages: Sequence[Stage], states: Sequence[StageState], x: PyTree, targets: PyTree) -> list[PyTree]:
    """Shapes (``ShapeDtypeStruct`` s) of the K-1 buffer items ``(wire, targets)`` for batches like ``x``."""
    specs = message_specs(stages, states, x)
    t = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), targets)
    return [(wire_spec(s, st.codec, m), t) for s, st, m in zip(stages[:-1], states[:-1], specs, strict=True)]


def _zeros(spec: PyTree) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def init_async(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    x: PyTree,
    targets: PyTree,
    config: AsyncConfig,
    key: jax.Array,
) -> AsyncState:
    """The initial :class:`AsyncState`: ``states`` and K-1 empty buffers of ``config.capacity`` items
    ``(wire, targets)`` sized for batches like ``x`` / ``targets`` (arrays or ``ShapeDtypeStruct`` s)."""
    if len(stages) != len(states):
        raise ValueError(f"got {len(stages)} stages but {len(states)} states")
    items = [_zeros(spec) for spec in buffer_items(stages, states, x, targets)]
    bufs = [buffer.init(config.capacity, it) for it in items]
    lines = [_line_init(config.delay, it) for it in items] if config.delay else []
    zero = jnp.zeros((), jnp.int32)
    return AsyncState(list(states), bufs, zero, jnp.zeros((), jnp.int32), key, lines)


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

    ``input_fn(n) -> (x, targets)`` gives stage 0's n-th fresh batch (traced ``n``). Stage j's step at tick
    t uses the key ``fold_in(fold_in(state.key-derived tick key, j)``. Returns the final state and
    :class:`AsyncRecords` with ``[num_ticks, K]`` arrays.
    """
    k = len(stages)
    if schedule.num_stages != k:
        raise ValueError(f"schedule is for {schedule.num_stages} stages but the model has {k}")
    warm_ticks = config.warmup * k
    item_shapes = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), b.items) for b in state.buffers]
    nan = jnp.float32(jnp.nan)

    def make_branches(j):
        def run(st, inp, n, key):
            if j == 0:
                x, y = input_fn(n)
            else:
                wire, y = inp
                x = decode_message(stages[j - 1], wire)
            st, wire_out, m = stage_step(stages[j], st, x, y, key)
            return st, (wire_out, y) if j < k - 1 else None, m["loss"], m["accuracy"]

        def skip(st, inp, n, key):
            out = _zeros(item_shapes[j]) if j < k - 1 else None
            return st, out, nan, nan

        return run, skip

    branches = [make_branches(j) for j in range(k)]

    def body(carry: AsyncState, _):
        states, bufs, t, consumed, key, lines = carry
        lines = list(lines)
        key, sched_key, *sample_keys = jax.random.split(key, k + 1)
        active = jnp.where(t < warm_ticks, jnp.arange(k) == t % k, schedule(sched_key, t))
        new_bufs = list(bufs)
        inputs, valids, stale, reuse = [None], [active[0]], [jnp.int32(0)], [jnp.int32(0)]
        for j in range(1, k):  # all reads first (pre-tick buffers)
            b = bufs[j - 1]
            idx, ok = buffer.select(b, config.policy, config.max_reuse, key=sample_keys[j - 1])
            valid = active[j] & ok
            item, new_bufs[j - 1] = buffer.read(b, idx, valid)
            inputs.append(item)
            valids.append(valid)
            stale.append(t - b.ticks[idx])
            reuse.append(b.uses[idx])
        new_states, losses, accs = [], [], []
        for j in range(k):
            run, skip = branches[j]
            ops = (states[j], inputs[j], consumed, stage_key(sched_key, j + 1))
            st, out, loss, acc = jax.lax.cond(valids[j], run, skip, *ops)
            new_states.append(st)
            losses.append(jnp.asarray(loss, jnp.float32))
            accs.append(jnp.asarray(acc, jnp.float32))
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
        )
        carry = AsyncState(new_states, new_bufs, t + 1, consumed + valids[0].astype(jnp.int32), key, lines)
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


def summarize(records: AsyncRecords, tail: float = 0.1) -> dict[str, np.ndarray]:
    """Per-stage summary (``[K]`` host arrays): ``updates``, ``mean_staleness``, ``max_staleness``,
    ``mean_reuse``, ``max_reuse`` and the mean ``loss``/``accuracy`` over each stage's last ``tail`` fraction
    of updates. Buffer memory: :func:`dgl_jax.accounting.buffer_memory`."""
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
    return {k_: np.asarray(v) for k_, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# Real asynchrony: one loop per stage (a thread here, a Ray actor in dgl_jax.ray_executor)
# ----------------------------------------------------------------------------------------------------------
class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # what a stage sends on its link once it has taken its last update of a run


def link_schedule(
    put_s: float, link_free_s: float, nbytes_: int, bandwidth_bps: float | None, latency_s: float
) -> tuple[float, float]:
    """When an item of ``nbytes_`` bytes put on a link at ``put_s`` becomes readable, and when the link is free
    again: the link sends one item at a time, from ``start = max(put_s, link_free_s)`` for ``8 nbytes_ /
    bandwidth_bps`` seconds (0 for ``bandwidth_bps=None``: infinite), then the item travels ``latency_s``.
    Returns ``(start + send + latency_s, start + send)``; ready times never decrease, so items stay in order."""
    done = max(put_s, link_free_s) + (0.0 if bandwidth_bps is None else 8.0 * nbytes_ / bandwidth_bps)
    return done + latency_s, done


def check_bandwidth(bandwidth_bps: float | None) -> None:
    """``ValueError`` (one line) unless ``bandwidth_bps`` is None (infinite) or a number > 0 (bit/s)."""
    if bandwidth_bps is not None and not float(bandwidth_bps) > 0:
        raise ValueError(f"link bandwidth must be > 0 bit/s or None (infinite), got {bandwidth_bps}")


class Inbox:
    """A stage's incoming link: a bounded FIFO of items, each readable ``delay_s`` seconds after it was put
    (an injected link latency; items stay in order). With ``bandwidth_bps`` (bit/s; None: infinite) the link
    also sends one item at a time, ``8 nbytes / bandwidth_bps`` seconds each (``nbytes`` of the item's arrays,
    :func:`dgl_jax.accounting.nbytes`), before its latency (:func:`link_schedule`); ``put`` then first waits
    until the item's arrays are computed, so sending starts once the data exists. ``maxsize`` (None:
    unbounded) counts the items in flight and waiting: when it is reached, ``put`` waits for the consumer
    (back-pressure: lock-step runs) or, with ``drop_oldest``, drops the oldest item (free-running runs: the
    replay buffer would overwrite it anyway; :attr:`dropped` counts them; the link time it took stays spent).
    :data:`END` is never dropped and never waits. Waits poll ``stop`` every ``poll_s`` and raise
    :class:`~dgl_jax.parallel.Stopped` once it is set."""

    def __init__(
        self,
        maxsize: int | None = None,
        delay_s: float = 0.0,
        drop_oldest: bool = False,
        stop: threading.Event | None = None,
        poll_s: float = 0.05,
        bandwidth_bps: float | None = None,
    ):
        if maxsize is not None and maxsize < 1:
            raise ValueError(f"inbox maxsize must be >= 1 or None, got {maxsize}")
        if not delay_s >= 0:
            raise ValueError(f"link delay must be >= 0 seconds, got {delay_s}")
        check_bandwidth(bandwidth_bps)
        self.maxsize, self.delay_s, self.drop_oldest = maxsize, float(delay_s), drop_oldest
        self.bandwidth_bps = None if bandwidth_bps is None else float(bandwidth_bps)
        self.link_free = -float("inf")  # time.monotonic() from which the link is free to send the next item
        self.stop = threading.Event() if stop is None else stop
        self.poll_s = poll_s
        self.dropped = 0
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            from dgl_jax.parallel import Stopped

            raise Stopped

    def close(self) -> None:
        """The consumer is gone: later items are dropped (counted in :attr:`dropped`), no put waits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def put(self, item: Any) -> None:
        """Appends ``item`` (readable when :func:`link_schedule` says), waiting or dropping as described above."""
        nbytes_ = 0
        if self.bandwidth_bps is not None:
            from dgl_jax.accounting import nbytes

            jax.block_until_ready(item)
            nbytes_ = nbytes(item)  # markers such as END and ints: 0
        with self._cond:
            if self._closed:
                self.dropped += item is not END
                return
            while item is not END and self.maxsize is not None and len(self._items) >= self.maxsize:
                if self._closed:
                    self.dropped += 1
                    return
                old = next((i for i, (_, it) in enumerate(self._items) if it is not END), None)
                if self.drop_oldest and old is not None:
                    del self._items[old]
                    self.dropped += 1
                    break
                self._check_stop()
                self._cond.wait(self.poll_s)
            ready, self.link_free = link_schedule(
                time.monotonic(), self.link_free, nbytes_, self.bandwidth_bps, self.delay_s
            )
            self._items.append((ready, item))
            self._cond.notify_all()

    def get_nowait(self) -> Any:
        """The oldest item if it has arrived, else raises ``queue.Empty``."""
        with self._cond:
            if self._items and self._items[0][0] <= time.monotonic():
                item = self._items.popleft()[1]
                self._cond.notify_all()
                return item
        raise queue.Empty

    def get(self) -> Any:
        """The oldest item, waiting for it to arrive."""
        with self._cond:
            while True:
                self._check_stop()
                wait = self._items[0][0] - time.monotonic() if self._items else self.poll_s
                if self._items and wait <= 0:
                    item = self._items.popleft()[1]
                    self._cond.notify_all()
                    return item
                self._cond.wait(min(wait, self.poll_s))


class StageProgram(NamedTuple):
    """Stage j's functions, compiled once for its device: ``split`` (its key stream), and either ``step``
    (stage 0: :func:`~dgl_jax.steps.stage_step` on a fresh batch) or ``consume`` (stage j > 0: sample its
    replay buffer, decode with boundary j-1's codec, :func:`~dgl_jax.steps.stage_step`) and ``push`` (an
    arrived item into the buffer). ``item_bytes``: ``nbytes`` of the ``(wire, targets)`` item the stage
    sends per update (0 for the last stage)."""

    split: Callable
    step: Callable | None
    consume: Callable | None
    push: Callable | None
    item_bytes: int


def compile_stage(
    stages: Sequence[Stage],
    j: int,
    config: AsyncConfig,
    state: StageState,
    buf: buffer.BufferState | None,
    x: PyTree,
    targets: PyTree,
    key: jax.Array,
) -> StageProgram:
    """Compiles stage ``j``'s :class:`StageProgram` for the device that holds ``state`` (and ``buf``, its input
    buffer, None for stage 0), ``key`` and, for stage 0, the example batch ``x`` / ``targets`` (placed
    arrays, or ``ShapeDtypeStruct`` s: then for the default device)."""
    from dgl_jax.accounting import nbytes

    split = jax.jit(jax.random.split)
    if j == 0:
        step = jax.jit(functools.partial(stage_step, stages[0]), donate_argnums=0).lower(state, x, targets, key)
        out = jax.eval_shape(functools.partial(stage_step, stages[0]), state, x, targets, key)[1]
        return StageProgram(split, step.compile(), None, None, nbytes((out, targets)) if len(stages) > 1 else 0)
    consume = jax.jit(functools.partial(_consume, stages[j], stages[j - 1], config), donate_argnums=(0, 1))
    item = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=_sharding(a)), buf.items)
    push = jax.jit(lambda b, it: buffer.push(b, it), donate_argnums=0)
    out = jax.eval_shape(functools.partial(_consume, stages[j], stages[j - 1], config), state, buf, key)[2]
    return StageProgram(
        split,
        None,
        consume.lower(state, buf, key).compile(),
        push.lower(buf, item).compile(),
        nbytes(out) if j < len(stages) - 1 else 0,
    )


def _sharding(a: Any) -> Any:
    """The single-device sharding of a committed array (None for a ``ShapeDtypeStruct``: the default device)."""
    return a.sharding if isinstance(a, jax.Array) else getattr(a, "sharding", None)


class LoopResult(NamedTuple):
    """What :func:`stage_loop` leaves: the stage's ``state``, input ``buf`` and ``key``, ``updates`` taken,
    ``records`` (one ``(loss, accuracy, age, reuse)`` per update, device scalars), ``upstream_done`` (the
    stage below sent :data:`END`) and ``busy_s`` (seconds spent in its own updates, injected slow-down
    included, waits for input excluded)."""

    state: StageState
    buf: buffer.BufferState | None
    key: jax.Array
    updates: int
    records: list[tuple]
    upstream_done: bool
    busy_s: float


def stage_loop(
    j: int,
    program: StageProgram,
    state: StageState,
    buf: buffer.BufferState | None,
    key: jax.Array,
    num_updates: int | None,
    *,
    device: jax.Device,
    batch: Callable[[int], tuple[Any, Any]] | None = None,
    inbox: Inbox | None = None,
    send: Callable[[PyTree], None] | None = None,
    lockstep: bool = False,
    slowdown: float = 1.0,
    slow_extra_s: float = 0.0,
    stop: threading.Event | None = None,
    on_update: Callable[[int, StageState, jax.Array], None] | None = None,
) -> LoopResult:
    """Stage ``j``'s loop, the same for every wall-clock executor: up to ``num_updates`` updates, each with
    the next key of ``split(key)``. Stage 0 trains on ``batch(n)`` (host ``(x, targets)``, its n-th update of
    this call); stage j > 0 moves what has arrived in ``inbox`` into its replay buffer ``buf`` (on
    ``device``) and takes one step on an item the buffer's policy picks.

    Free-running, an arrived item enters the buffer only when the slot it would overwrite has been read at
    least once: no wire is lost unread, and a slower stage makes its sender wait (back-pressure through the
    bounded inbox), while a faster one reuses items (up to ``max_reuse``). The stage waits only when the
    buffer has nothing to sample; it stops early once :data:`END` came and nothing can be sampled, and with
    ``num_updates=None`` as soon as END came and every item has been read. ``lockstep=True`` takes exactly
    one new item per update (every wire consumed once, in order: pipelined synchronous DGL).

    After each update the ``(wire, targets)`` item goes to ``send`` (None for the last stage),
    ``on_update(updates, state, key)`` is called (checkpoints), and the stage sleeps ``slowdown - 1`` times
    the update's own time plus ``slow_extra_s`` (injected slow-down). ``stop`` (set) ends the loop after the
    current update. The caller sends :data:`END` if it wants to."""
    records: list[tuple] = []
    n, upstream_done, busy = 0, False, 0.0
    if num_updates is None and (j == 0 or lockstep):
        raise ValueError("num_updates=None (until the stage below is done) is for free-running stages j > 0")
    while (num_updates is None or n < num_updates) and not (stop is not None and stop.is_set()):
        key, sub = program.split(key)
        if j == 0:
            x, y = batch(n)
            t0 = time.perf_counter()
            y = jax.device_put(y, device)
            state, wire, m = program.step(state, jax.device_put(x, device), y, sub)
            rec = (m["loss"], m["accuracy"], 0, 0)
        else:
            if lockstep:
                item = inbox.get()
                if item is END:
                    upstream_done = True
                    break
                buf = program.push(buf, jax.device_put(item, device))
            else:
                while not upstream_done and _room(buf):  # what has arrived, without waiting or overwriting
                    try:
                        item = inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is END:
                        upstream_done = True
                    else:
                        buf = program.push(buf, jax.device_put(item, device))
                if num_updates is None and upstream_done and not _unread(buf):
                    break
            t0 = time.perf_counter()
            state, buf, (wire, y), loss, acc, ok, age, reuse = program.consume(state, buf, sub)
            if not bool(ok):  # nothing to sample: wait for the stage below (or give up if it is done)
                if upstream_done or lockstep:
                    break
                item = inbox.get()
                if item is END:
                    upstream_done = True
                else:
                    buf = program.push(buf, jax.device_put(item, device))
                continue
            rec = (loss, acc, age, reuse)
        n += 1
        records.append(rec)
        if send is not None:
            send((wire, y))
        if on_update is not None:
            on_update(n, state, key)
        if slowdown > 1.0 or slow_extra_s > 0:
            jax.block_until_ready(rec[0])
            time.sleep((slowdown - 1.0) * (time.perf_counter() - t0) + slow_extra_s)
        busy += time.perf_counter() - t0
    return LoopResult(state, buf, key, n, records, upstream_done, busy)


def _room(buf: buffer.BufferState) -> bool:
    """Whether a push would not overwrite an item nobody has read yet."""
    size, uses, write = jax.device_get((buf.size, buf.uses, buf.write))
    return bool(size < uses.shape[0] or uses[write] >= 1)


def _unread(buf: buffer.BufferState) -> bool:
    """Whether the buffer holds an item that has not been read yet."""
    seq, uses = jax.device_get((buf.seq, buf.uses))
    return bool(((seq >= 0) & (uses == 0)).any())


class ThreadedResult(NamedTuple):
    """Outcome of :func:`run_threaded`: final ``states`` (stage j's on its device), ``updates`` ``[K]`` (steps
    taken), and per stage lists (host numpy) of ``loss``, ``accuracy``, ``age`` (how many newer batches had
    arrived in the buffer when the consumed one was read; 0 for stage 0) and ``reuse`` (earlier reads of it),
    plus the wall time ``seconds`` and ``bytes_sent`` ``[K]`` (the ``nbytes`` of the wires each stage put on
    its outgoing link, counted from the transferred arrays); ``buffers`` (stage j's input buffer at the end,
    None for stage 0: pass them to the next call to carry on), ``dropped`` ``[K]`` (items dropped on stage
    j's full inbox), ``busy_s`` ``[K]`` (seconds each stage spent in its own updates) and ``stage_s`` ``[K]``
    (seconds each stage's loop ran)."""

    states: list[StageState]
    updates: np.ndarray
    loss: list[np.ndarray]
    accuracy: list[np.ndarray]
    age: list[np.ndarray]
    reuse: list[np.ndarray]
    seconds: float
    bytes_sent: np.ndarray
    buffers: list[buffer.BufferState | None] | None = None
    dropped: np.ndarray | None = None
    busy_s: np.ndarray | None = None
    stage_s: np.ndarray | None = None


def _consume(stage: Stage, sender: Stage, config: AsyncConfig, state: StageState, buf: buffer.BufferState, key):
    k_sample, k_step = jax.random.split(key)
    idx, ok = buffer.select(buf, config.policy, config.max_reuse, key=k_sample)
    age, reuse = buf.count - 1 - buf.seq[idx], buf.uses[idx]
    (wire, y), buf = buffer.read(buf, idx, ok)

    def run(st):
        return stage_step(stage, st, decode_message(sender, wire), y, k_step)

    def skip(st):
        shapes = jax.eval_shape(run, st)
        return st, _zeros(shapes[1]), jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes[2])

    state, wire_out, m = jax.lax.cond(ok, run, skip, state)
    return state, buf, (wire_out, y), m["loss"], m["accuracy"], ok, age, reuse


class Injected(NamedTuple):
    """Slow-downs and links injected into a wall-clock run (threads or Ray): stage ``slow_stage`` (None: none)
    is slowed ``slowdown`` times (it sleeps ``slowdown - 1`` times each update's duration) plus
    ``slow_extra_s`` seconds per update; every link adds ``link_delay_s`` seconds of latency and carries
    ``link_bandwidth_bps`` bit/s (None: infinite; see :func:`link_schedule`)."""

    slow_stage: int | None = None
    slowdown: float = 1.0
    slow_extra_s: float = 0.0
    link_delay_s: float = 0.0
    link_bandwidth_bps: float | None = None

    def check(self, num_stages: int) -> None:
        """``ValueError`` (one line) for a bad slow stage, slow-down, link delay or link bandwidth."""
        for name, value in self._asdict().items():
            if name != "slow_stage" and not (value is None and name == "link_bandwidth_bps" or _is_number(value)):
                raise ValueError(f"{name} {value!r} is not valid; expected a number")
        _check_stage(self.slow_stage, num_stages)
        _check_slowdown(self.slowdown)
        if not self.slow_extra_s >= 0:
            raise ValueError(f"slow_extra_s must be >= 0, got {self.slow_extra_s}")
        if not self.link_delay_s >= 0:
            raise ValueError(f"link delay must be >= 0 seconds, got {self.link_delay_s}")
        check_bandwidth(self.link_bandwidth_bps)

    def stage(self, j: int) -> tuple[float, float]:
        """``(slowdown, slow_extra_s)`` of stage ``j``: ``(1.0, 0.0)`` unless it is the slowed stage."""
        return (self.slowdown, self.slow_extra_s) if j == self.slow_stage else (1.0, 0.0)


def update_counts(num_updates: int | Sequence[int | None], num_stages: int) -> list[int | None]:
    """``num_updates`` as K entries: ints >= 0 (one int: the same for every stage), or None for a stage j > 0
    that runs until the stage below is done and it has read every item (see :func:`stage_loop`)."""
    scalar = num_updates is None or np.ndim(num_updates) == 0
    n_up = [num_updates] * num_stages if scalar else list(num_updates)
    n_up = [None if n is None else int(n) for n in n_up]
    if len(n_up) != num_stages or n_up[0] is None or min(n for n in n_up if n is not None) < 0:
        raise ValueError(
            f"num_updates must be one int >= 0 or {num_stages} of them (None allowed after the first), "
            f"got {num_updates}"
        )
    return n_up


def run_threaded(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    batches: Sequence[tuple[Any, Any]],
    config: AsyncConfig,
    *,
    num_updates: int | Sequence[int],
    devices: Sequence[jax.Device] | None = None,
    injected: Injected | None = None,
    lockstep: bool = False,
    queue_size: int | None = None,
    buffers: Sequence[buffer.BufferState | None] | None = None,
    timeout_s: float | None = 600.0,
    key: jax.Array | None = None,
) -> ThreadedResult:
    """Asynchronous DGL for real: stage j runs :func:`stage_loop` in its own thread on
    ``devices[j % len(devices)]`` and takes ``num_updates[j]`` steps (an int: the same for all; None for
    j > 0: until the stage below is done and every item it sent has been read). Stage 0
    cycles through ``batches`` (host ``(x, targets)``); stage j > 0 samples from its own replay buffer of
    wires (on its device, ``config`` gives capacity/policy/max_reuse; ``buffers`` continues from those of an
    earlier call), which the stage below fills by sending its wire (``device_put`` to stage j's device,
    through an :class:`Inbox` of ``queue_size`` items, None: unbounded, with the latency and bandwidth of
    ``injected``, an :class:`Injected`, None: none).
    Each step's key comes from splitting stage j's key ``fold_in(key, j)``.

    Free-running, a stage waits only when its buffer has nothing to sample; if the stage below has finished
    and nothing can be sampled, it stops early (``updates[j] < num_updates[j]``); no item is overwritten
    before it was read, so a full inbox makes the sender wait (see :func:`stage_loop`). ``lockstep=True`` consumes
    every wire exactly once, in order (a full inbox makes the sender
    wait): with one-item buffers this is pipelined synchronous DGL. ``injected`` also slows a stage down.
    Every function is compiled in the calling thread before any worker starts (jax#17457). A worker exception
    is re-raised here, ``KeyboardInterrupt`` or ``timeout_s`` stop every thread
    (:class:`~dgl_jax.parallel.Workers`). ``states`` (and ``buffers``) are copied, not donated.
    """
    from dgl_jax.parallel import Workers  # the shared thread machinery (stop event, error propagation)

    k = len(stages)
    if len(states) != k:
        raise ValueError(f"got {len(stages)} stages but {len(states)} states")
    if not batches:
        raise ValueError("run_threaded needs at least one batch")
    injected = Injected() if injected is None else injected
    injected.check(k)
    n_up = update_counts(num_updates, k)
    devices = list(jax.devices() if devices is None else devices)
    devs = [devices[j % len(devices)] for j in range(k)]
    key = jax.random.key(0) if key is None else key
    keys = [jax.device_put(jax.random.fold_in(key, j), d) for j, d in enumerate(devs)]

    x0, y0 = jnp.asarray(batches[0][0]), jnp.asarray(batches[0][1])
    items = buffer_items(stages, states, x0, y0)
    placed = [jax.device_put(jax.tree.map(jnp.copy, s), d) for s, d in zip(states, devs, strict=True)]
    if buffers is None:
        bufs = [None] + [
            jax.device_put(buffer.init(config.capacity, _zeros(it)), d) for it, d in zip(items, devs[1:], strict=True)
        ]
    else:
        given = zip(buffers[1:], devs[1:], strict=True)
        bufs = [None] + [jax.device_put(jax.tree.map(jnp.copy, b), d) for b, d in given]

    # compile everything here, in the main thread
    x0d, y0d = jax.device_put(x0, devs[0]), jax.device_put(y0, devs[0])
    programs = [compile_stage(stages, j, config, placed[j], bufs[j], x0d, y0d, keys[j]) for j in range(k)]

    updates, sent, busy, spent = [0] * k, [0] * k, [0.0] * k, [0.0] * k
    recs: list[list[tuple]] = [[] for _ in range(k)]
    inboxes: list[Inbox | None] = [None] * k

    def worker(j):
        outbox = inboxes[j + 1] if j + 1 < k else None
        slowdown, slow_extra = injected.stage(j)

        def send(item):
            outbox.put(jax.device_put(item, devs[j + 1]))
            sent[j] += programs[j].item_bytes

        def count(n, state, key):
            updates[j] = n

        t_start = time.perf_counter()
        try:
            out = stage_loop(
                j,
                programs[j],
                placed[j],
                bufs[j],
                keys[j],
                n_up[j],
                device=devs[j],
                batch=lambda n: batches[n % len(batches)],
                inbox=inboxes[j],
                send=send if outbox is not None else None,
                lockstep=lockstep,
                slowdown=slowdown,
                slow_extra_s=slow_extra,
                on_update=count,
            )
            placed[j], bufs[j] = out.state, out.buf
            recs[j].extend(out.records)
            busy[j], spent[j] = out.busy_s, time.perf_counter() - t_start
        finally:
            if outbox is not None:
                outbox.put(END)
            if inboxes[j] is not None:
                inboxes[j].close()  # the stage below never waits on a consumer that has stopped

    t0 = time.perf_counter()
    with Workers() as w:
        # a full inbox (queue_size items) makes the producer wait; None: unbounded
        for j in range(1, k):
            inboxes[j] = Inbox(
                queue_size, injected.link_delay_s, stop=w.stop, bandwidth_bps=injected.link_bandwidth_bps
            )
        for j in range(k):
            w.spawn(worker, j, name=f"async-stage{j}")
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
        bytes_sent=np.asarray(sent),
        buffers=bufs,
        dropped=np.asarray([0] + [ib.dropped for ib in inboxes[1:]]),
        busy_s=np.asarray(busy),
        stage_s=np.asarray(spent),
    )
