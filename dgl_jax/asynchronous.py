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
# Real asynchrony: one thread per stage, each on its own device
# ----------------------------------------------------------------------------------------------------------
_END = object()


class ThreadedResult(NamedTuple):
    """Outcome of :func:`run_threaded`: final ``states`` (stage j's on its device), ``updates`` ``[K]`` (steps
    taken), and per stage lists (host numpy) of ``loss``, ``accuracy``, ``age`` (how many newer batches had
    arrived in the buffer when the consumed one was read; 0 for stage 0) and ``reuse`` (earlier reads of it),
    plus the wall time ``seconds`` and ``bytes_sent`` ``[K]`` (the ``nbytes`` of the wires each stage put on
    its outgoing link, counted from the transferred arrays)."""

    states: list[StageState]
    updates: np.ndarray
    loss: list[np.ndarray]
    accuracy: list[np.ndarray]
    age: list[np.ndarray]
    reuse: list[np.ndarray]
    seconds: float
    bytes_sent: np.ndarray


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
    timeout_s: float | None = 600.0,
    key: jax.Array | None = None,
) -> ThreadedResult:
    """Asynchronous DGL for real: stage j runs in its own thread on ``devices[j % len(devices)]`` and takes
    ``num_updates[j]`` steps (an int: the same for all). Stage 0 cycles through ``batches`` (host
    ``(x, targets)``); stage j > 0 samples from its own replay buffer of wires (on its device, ``config``
    gives capacity/policy/max_reuse), which the stage below fills by sending its wire (``device_put`` to
    stage j's device, through a :class:`~dgl_jax.parallel.Channel`). Each step's key comes from splitting
    stage j's key ``fold_in(key, j)``.

    A stage waits only when its buffer has nothing to sample; if the stage below has finished and nothing
    can be sampled, it stops early (``updates[j] < num_updates[j]``). ``slow_stage`` sleeps ``slow_extra_s``
    seconds after each of its steps (an injected slow-down). Every function is compiled in the calling thread
    before any worker starts (jax#17457). A worker exception is re-raised here, ``KeyboardInterrupt`` or
    ``timeout_s`` stop every thread (:class:`~dgl_jax.parallel.Workers`). ``states`` are copied, not donated.
    """
    from dgl_jax.accounting import nbytes
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
    keys = [jax.device_put(jax.random.fold_in(key, j), d) for j, d in enumerate(devs)]

    x0, y0 = jnp.asarray(batches[0][0]), jnp.asarray(batches[0][1])
    items = buffer_items(stages, states, x0, y0)
    placed = [jax.device_put(jax.tree.map(jnp.copy, s), d) for s, d in zip(states, devs, strict=True)]
    bufs = [None] + [
        jax.device_put(buffer.init(config.capacity, _zeros(it)), d) for it, d in zip(items, devs[1:], strict=True)
    ]
    item_bytes = [nbytes(it) for it in items]

    # compile everything here, in the main thread
    split = jax.jit(jax.random.split)
    step0 = jax.jit(functools.partial(stage_step, stages[0]), donate_argnums=0)
    step0 = step0.lower(placed[0], jax.device_put(x0, devs[0]), jax.device_put(y0, devs[0]), keys[0]).compile()
    consume, push = [None], [None]
    for j in range(1, k):
        c = jax.jit(functools.partial(_consume, stages[j], stages[j - 1], config), donate_argnums=(0, 1))
        consume.append(c.lower(placed[j], bufs[j], keys[j]).compile())
        p = jax.jit(lambda b, item: buffer.push(b, item), donate_argnums=0)
        push.append(p.lower(bufs[j], jax.device_put(_zeros(items[j - 1]), devs[j])).compile())

    updates = [0] * k
    sent = [0] * k
    recs: list[list[tuple]] = [[] for _ in range(k)]

    def worker(j, inbox, outbox):
        state, buf, kj = placed[j], bufs[j], keys[j]
        upstream_done = False
        try:
            while updates[j] < n_up[j]:
                kj, sub = split(kj)
                if j == 0:
                    x, y = batches[updates[0] % len(batches)]
                    y = jax.device_put(y, devs[0])
                    state, wire, m = step0(state, jax.device_put(x, devs[0]), y, sub)
                    loss, acc, ok, age, reuse = m["loss"], m["accuracy"], True, 0, 0
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
                    state, buf, (wire, y), loss, acc, ok, age, reuse = consume[j](state, buf, sub)
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
                    moved = jax.device_put((wire, y), devs[j + 1])
                    sent[j] += item_bytes[j]
                    outbox.put(moved)
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
        bytes_sent=np.asarray(sent),
    )
