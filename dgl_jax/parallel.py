"""Stages on separate devices: thread machinery, placements, a pipelined MPMD executor and an SPMD tick.

Three layers, each usable on its own:

* **Threads** (:class:`Workers`, :class:`Channel`, :func:`run_chain`): a thread per device or stage,
  bounded queues between them, a shared stop ``Event``; the first exception in any worker stops all of
  them and is re-raised in the caller; ``KeyboardInterrupt`` stops them too. Nothing here knows about DGL:
  the asynchronous DGL runner reuses it. Why threads: on CPU, work dispatched to several devices from ONE
  Python thread does not overlap (measured: a jitted 50 ms ``pure_callback`` gives 19.7 calls/s for 1, 2
  or 4 fake devices from one thread, and 19.7 / 38.9 / 76.8 calls/s with one thread per device). Compile
  every function in the main thread before starting workers (hangs reported otherwise, jax#17457).
* **Placements** (:func:`make_placement`): which devices each stage runs on. One stage per device; several
  stages per device when K > devices; a data-parallel sub-mesh per stage when devices > K. Validated before
  anything is compiled.
* **MPMD pipeline** (:class:`PipelinedDGL`): each stage's :class:`~dgl_jax.stage.StageState` committed to
  its devices, one jitted :func:`~dgl_jax.train.stage_step` compiled per stage, the message moved between
  devices with ``jax.device_put`` outside jit, one worker thread per stage. T batches through it give the
  same states as T calls of :func:`~dgl_jax.train.dgl_step` (DGL sends pre-update features, so the
  pipelined order *is* the synchronous order).
* **SPMD pipeline** (:class:`SpmdPipeline`): one ``jax.shard_map`` program over a ``'stage'`` mesh axis,
  messages passed with ``lax.ppermute``; stages of different shapes are packed into padded flat buffers
  and selected with ``lax.switch`` on ``lax.axis_index``. This path runs across hosts under
  ``jax.distributed.initialize``.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dgl_jax.stage import Stage, StageState
from dgl_jax.train import StepMetrics, stage_step

PyTree = Any
StepFn = Callable[[StageState, jax.Array, jax.Array], tuple[StageState, jax.Array, jax.Array, jax.Array]]


# ----------------------------------------------------------------------------------------------------------
# Threads: a small reusable machinery (also used by the asynchronous DGL runner)
# ----------------------------------------------------------------------------------------------------------
class Stopped(Exception):
    """Raised inside a worker by :meth:`Channel.put` / :meth:`Channel.get` once the group is stopping."""


class Channel:
    """A bounded FIFO between threads whose ``put``/``get`` wait in slices of ``poll_s`` seconds and raise
    :class:`Stopped` once ``stop`` is set, so no thread ever blocks forever on a queue.

    ``maxsize`` bounds how far a producer may run ahead of its consumer (back-pressure).
    """

    def __init__(self, stop: threading.Event, maxsize: int = 2, poll_s: float = 0.05):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self._q: queue.Queue = queue.Queue(maxsize)
        self._stop = stop
        self._poll = poll_s

    def put(self, item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._q.put(item, timeout=self._poll)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                return self._q.get(timeout=self._poll)
            except queue.Empty:
                continue

    def get_nowait(self) -> Any:
        """The next item, or raises ``queue.Empty`` (for consumers that poll, e.g. replay buffers)."""
        return self._q.get_nowait()


class Workers:
    """A group of worker threads sharing one stop ``Event``.

    Use as a context manager::

        with Workers() as w:
            ch = w.channel(maxsize=2)
            w.spawn(producer, ch)
            w.spawn(consumer, ch)
            w.join(timeout=60)          # re-raises the first worker exception

    A worker function runs once in its thread; if it raises (anything but :class:`Stopped`), the group is
    stopped and :meth:`join` re-raises that exception in the caller. Leaving the ``with`` block (normally,
    on error or on ``KeyboardInterrupt``) sets ``stop`` and joins every thread, so nothing is left running.
    """

    def __init__(self, join_timeout_s: float = 30.0):
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._join_timeout = join_timeout_s

    def channel(self, maxsize: int = 2) -> Channel:
        """A :class:`Channel` tied to this group's stop event."""
        return Channel(self.stop, maxsize)

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> threading.Thread:
        """Starts ``fn(*args)`` in a daemon thread of this group."""

        def target():
            try:
                fn(*args)
            except Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - propagated to the caller by join()
                with self._lock:
                    self._errors.append(e)
                self.stop.set()

        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def raise_if_failed(self) -> None:
        """Re-raises the first exception raised by a worker, if any."""
        with self._lock:
            if self._errors:
                raise self._errors[0]

    def join(self, timeout: float | None = None) -> None:
        """Waits for every worker (polling, so ``KeyboardInterrupt`` is seen), then re-raises a worker error.

        Raises ``TimeoutError`` (after stopping the group) when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for t in self._threads:
                while t.is_alive():
                    t.join(0.05)
                    self.raise_if_failed()
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"workers still running after {timeout} s")
        except BaseException:
            self.close()
            raise
        self.raise_if_failed()

    def close(self) -> None:
        """Sets ``stop`` and joins every thread (bounded by ``join_timeout_s`` each)."""
        self.stop.set()
        for t in self._threads:
            t.join(self._join_timeout)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if exc[0] is None:
            self.raise_if_failed()


_END = object()


def run_chain(
    fns: Sequence[Callable[[Any], Any]],
    items: Iterable[Any],
    *,
    maxsize: int = 2,
    timeout_s: float | None = None,
) -> list[Any]:
    """Runs ``items`` through the chain ``fns[-1](...fns[1](fns[0](item)))`` with one thread per function and
    bounded queues between them: ``fns[j]`` works on item t while ``fns[j+1]`` works on item t-1.

    Each ``fns[j]`` is called from its own thread only, in item order, so it may keep private state (e.g.
    a stage's ``StageState`` in a closure). Returns the outputs of ``fns[-1]`` in order. A worker exception
    is re-raised here; ``timeout_s`` bounds the whole run (``TimeoutError``).
    """
    if not fns:
        raise ValueError("run_chain needs at least one function")
    outputs: list[Any] = []
    with Workers() as w:
        chans = [w.channel(maxsize) for _ in range(len(fns) + 1)]

        def source():
            for item in items:
                chans[0].put(item)
            chans[0].put(_END)

        def worker(fn, inp, out):
            while True:
                item = inp.get()
                if item is _END:
                    out.put(_END)
                    return
                out.put(fn(item))

        def sink():
            while True:
                item = chans[-1].get()
                if item is _END:
                    return
                outputs.append(item)

        w.spawn(source, name="source")
        for j, fn in enumerate(fns):
            w.spawn(worker, fn, chans[j], chans[j + 1], name=f"stage{j}")
        w.spawn(sink, name="sink")
        w.join(timeout_s)
    return outputs


# ----------------------------------------------------------------------------------------------------------
# Placements
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Placement:
    """Devices of every stage: ``stage_devices[j]`` is the tuple of devices stage j runs on (more than one:
    a data-parallel sub-mesh with axis ``'data'``, batch sharded, state replicated)."""

    stage_devices: tuple[tuple[jax.Device, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_devices)

    def mesh(self, j: int) -> Mesh:
        """Stage j's one-axis mesh ``('data',)`` over its devices."""
        return Mesh(np.array(self.stage_devices[j]), ("data",))

    def state_sharding(self, j: int) -> NamedSharding:
        """Stage j's state: replicated over its devices."""
        return NamedSharding(self.mesh(j), P())

    def batch_sharding(self, j: int) -> NamedSharding:
        """Stage j's inputs ``[batch, ...]``: batch split over its devices."""
        return NamedSharding(self.mesh(j), P("data"))

    def describe(self) -> list[list[str]]:
        return [[str(d) for d in devs] for devs in self.stage_devices]


def make_placement(
    num_stages: int,
    devices: Sequence[jax.Device] | None = None,
    *,
    num_devices: int | None = None,
    assignment: Sequence[int | Sequence[int]] | None = None,
) -> Placement:
    """Decides which devices each of ``num_stages`` stages runs on (nothing is compiled or moved here).

    ``devices``: the pool (default ``jax.local_devices()``); ``num_devices``: use only the first that many.
    ``assignment``: explicit, per stage, a device index into the pool or a list of indices (a data-parallel
    group). Default: with D devices and K stages, K <= D gives every stage ``D // K`` consecutive devices
    (data parallel inside the stage, leftover devices unused); K > D puts consecutive stages on the same
    device (stage j on device ``j * D // K``, e.g. 3 stages on 2 devices: ``[0, 0, 1]``).

    Raises ``ValueError`` for more devices than exist, an empty pool, a stage left without a device, an
    index out of range, or a device used by two data-parallel groups that differ.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    pool = list(jax.local_devices() if devices is None else devices)
    if not pool:
        raise ValueError("no devices to place stages on (empty device list)")
    if num_devices is not None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if num_devices > len(pool):
            raise ValueError(
                f"{num_devices} devices requested but only {len(pool)} exist ({', '.join(map(str, pool))})"
            )
        pool = pool[:num_devices]
    d = len(pool)
    if assignment is None:
        if num_stages <= d:
            per = d // num_stages
            groups = [tuple(range(j * per, (j + 1) * per)) for j in range(num_stages)]
        else:
            groups = [(j * d // num_stages,) for j in range(num_stages)]
    else:
        if len(assignment) != num_stages:
            raise ValueError(
                f"assignment has {len(assignment)} entries for {num_stages} stages: every stage needs a device"
            )
        groups = []
        for j, a in enumerate(assignment):
            g = (a,) if isinstance(a, int) else tuple(a)
            if not g:
                raise ValueError(f"stage {j} is left without a device (assignment {list(assignment)})")
            bad = [i for i in g if not 0 <= i < d]
            if bad:
                raise ValueError(f"stage {j}: device index {bad} out of range for {d} devices (0..{d - 1})")
            if len(set(g)) != len(g):
                raise ValueError(f"stage {j}: device indices {list(g)} repeat")
            groups.append(g)
        for g in groups:
            for h in groups:
                if set(g) & set(h) and set(g) != set(h):
                    raise ValueError(f"device groups {list(g)} and {list(h)} overlap without being equal")
    return Placement(tuple(tuple(pool[i] for i in g) for g in groups))


# ----------------------------------------------------------------------------------------------------------
# MPMD: one jitted program per stage, a thread per stage
# ----------------------------------------------------------------------------------------------------------
class PipelinedDGL:
    """Synchronous DGL pipelined over devices (MPMD): stage j's state lives on ``placement.stage_devices[j]``,
    its local update is compiled for those devices, and messages move with ``jax.device_put``.

    ``step_fns[j](state, x, labels) -> (state, features, loss, accuracy)`` defaults to
    ``stage_step(stages[j], ...)``; pass your own to add work to a stage (benchmarks add a fixed wait).

    Usage::

        pipe = PipelinedDGL(stages, make_placement(len(stages)))
        states = pipe.place(states)
        pipe.compile(states, x_example, labels_example)   # main thread, before any worker starts
        states, metrics = pipe.run(states, batches)       # metrics: StepMetrics with [T, K] arrays
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        placement: Placement,
        step_fns: Sequence[StepFn] | None = None,
        *,
        donate: bool = True,
    ):
        if placement.num_stages != len(stages):
            raise ValueError(
                f"placement covers {placement.num_stages} stages but {len(stages)} stages were given: "
                "every stage needs a device"
            )
        if step_fns is None:
            step_fns = [functools.partial(stage_step, s) for s in stages]
        if len(step_fns) != len(stages):
            raise ValueError(f"got {len(step_fns)} step functions for {len(stages)} stages")
        self.stages = list(stages)
        self.placement = placement
        self._jitted = [
            jax.jit(
                f,
                donate_argnums=(0,) if donate else (),
                out_shardings=(
                    placement.state_sharding(j),
                    placement.batch_sharding(j),
                    placement.state_sharding(j),
                    placement.state_sharding(j),
                ),
            )
            for j, f in enumerate(step_fns)
        ]
        self._compiled: list[Any] | None = None

    def place(self, states: Sequence[StageState]) -> list[StageState]:
        """Commits ``states[j]`` to stage j's devices (replicated over a data-parallel group)."""
        if len(states) != self.placement.num_stages:
            raise ValueError(f"got {len(states)} states for {self.placement.num_stages} stages")
        return [jax.device_put(s, self.placement.state_sharding(j), may_alias=False) for j, s in enumerate(states)]

    def _check_batch(self, batch: int) -> None:
        for j, devs in enumerate(self.placement.stage_devices):
            if batch % len(devs):
                raise ValueError(f"batch {batch} is not divisible by stage {j}'s {len(devs)} data-parallel devices")

    def compile(self, states: Sequence[StageState], x: jax.Array, labels: jax.Array) -> None:
        """Compiles every stage's update for its devices (call from the main thread; ``states`` placed)."""
        self._check_batch(x.shape[0])
        compiled = []
        xs = jax.ShapeDtypeStruct(x.shape, x.dtype)
        ys = jax.ShapeDtypeStruct(labels.shape, labels.dtype)
        for j, (f, st) in enumerate(zip(self._jitted, states, strict=True)):
            sh = self.placement.batch_sharding(j)
            xj = jax.ShapeDtypeStruct(xs.shape, xs.dtype, sharding=sh)
            yj = jax.ShapeDtypeStruct(ys.shape, ys.dtype, sharding=sh)
            st_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), st)
            compiled.append(f.lower(st_spec, xj, yj).compile())
            out = jax.eval_shape(f, st_spec, xj, yj)[1]
            xs = jax.ShapeDtypeStruct(out.shape, out.dtype)
        self._compiled = compiled

    def run(
        self,
        states: Sequence[StageState],
        batches: Iterable[tuple[Any, Any]],
        *,
        maxsize: int = 2,
        timeout_s: float | None = None,
    ) -> tuple[list[StageState], StepMetrics]:
        """Trains on every ``(x, labels)`` of ``batches``, one thread per stage, and returns the final states
        and the metrics of every step (``loss``/``accuracy`` ``[T, K]``, host numpy).

        Equal to T sequential :func:`~dgl_jax.train.dgl_step` calls. ``states`` must come from
        :meth:`place` and are donated. No worker blocks on device results: the only waits are the bounded
        queues (``maxsize``) and, at the end, fetching the metrics.
        """
        if self._compiled is None:
            raise ValueError("call compile(states, x, labels) in the main thread before run()")
        k = self.placement.num_stages
        final: list[Any] = list(states)
        metrics: list[list[tuple[jax.Array, jax.Array]]] = [[] for _ in range(k)]

        def make_fn(j):
            fn, xs, ys = self._compiled[j], self.placement.batch_sharding(j), self.placement.batch_sharding(j)

            def step(msg):
                x, labels = msg
                x, labels = jax.device_put(x, xs), jax.device_put(labels, ys)
                final[j], out, loss, acc = fn(final[j], x, labels)
                metrics[j].append((loss, acc))
                return out, labels

            return step

        batches = ((self._check_batch_item(x), y) for x, y in batches)
        run_chain([make_fn(j) for j in range(k)], batches, maxsize=maxsize, timeout_s=timeout_s)
        loss = np.array([[np.asarray(m[0]) for m in ms] for ms in metrics]).T
        acc = np.array([[np.asarray(m[1]) for m in ms] for ms in metrics]).T
        return final, StepMetrics(loss.reshape(-1, k), acc.reshape(-1, k))

    def _check_batch_item(self, x: Any) -> Any:
        self._check_batch(np.shape(x)[0])
        return x


def message_shapes(stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array) -> list[tuple[int, ...]]:
    """Shapes of the messages stages 0..K-2 send for an input like ``x: [batch, H, W, C]`` (abstract
    evaluation only, nothing runs)."""
    shapes, xs = [], jax.ShapeDtypeStruct(x.shape, x.dtype)
    labels = jax.ShapeDtypeStruct((x.shape[0],), jnp.int32)
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        xs = jax.eval_shape(functools.partial(stage_step, stage), st, xs, labels)[1]
        shapes.append(tuple(xs.shape))
    return shapes
