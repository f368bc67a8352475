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
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

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
        """Commits a copy of ``states[j]`` to stage j's devices (replicated over a data-parallel group)."""
        if len(states) != self.placement.num_stages:
            raise ValueError(f"got {len(states)} states for {self.placement.num_stages} stages")
        # Through the host: fresh buffers, so donating the placed states never deletes the caller's arrays
        # (a replicated device_put may alias a buffer already on one of the target devices).
        return [jax.device_put(jax.device_get(s), self.placement.state_sharding(j)) for j, s in enumerate(states)]

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


# ----------------------------------------------------------------------------------------------------------
# SPMD: one shard_map program over a 'stage' mesh axis, messages through lax.ppermute
# ----------------------------------------------------------------------------------------------------------
class _Packer:
    """Packs one pytree of arrays into a float32 vector and an int32 vector (padded to given sizes) and back.

    Floating leaves (float32/bfloat16/float16) go to the float vector, integer and bool leaves to the int
    vector; the round trip is exact for those dtypes (ints up to 2**31).
    """

    def __init__(self, tree: PyTree):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.specs = []  # (is_float, offset, shape, dtype)
        nf = ni = 0
        for leaf in leaves:
            dtype, size = jnp.dtype(leaf.dtype), math.prod(leaf.shape)
            if jnp.issubdtype(dtype, jnp.floating):
                self.specs.append((True, nf, tuple(leaf.shape), dtype))
                nf += size
            elif jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
                self.specs.append((False, ni, tuple(leaf.shape), dtype))
                ni += size
            else:
                raise ValueError(f"cannot pack a leaf of dtype {dtype}: expected floating, integer or bool")
        self.num_floats, self.num_ints = nf, ni

    def pack(self, tree: PyTree, nf: int, ni: int, xp: Any = jnp) -> tuple[Any, Any]:
        fs = [xp.zeros((0,), xp.float32)]
        is_ = [xp.zeros((0,), xp.int32)]
        for (is_float, _, _, _), leaf in zip(self.specs, jax.tree.leaves(tree), strict=True):
            (fs if is_float else is_).append(xp.ravel(leaf).astype(xp.float32 if is_float else xp.int32))
        f, i = xp.concatenate(fs), xp.concatenate(is_)
        return xp.pad(f, (0, nf - f.shape[0])), xp.pad(i, (0, ni - i.shape[0]))

    def unpack(self, f: jax.Array, i: jax.Array) -> PyTree:
        leaves = []
        for is_float, off, shape, dtype in self.specs:
            src = f if is_float else i
            leaves.append(src[off : off + math.prod(shape)].reshape(shape).astype(dtype))
        return jax.tree.unflatten(self.treedef, leaves)


class SpmdState(NamedTuple):
    """The whole pipeline as stacked arrays, row j on stage j's devices (mesh axis ``'stage'``):

    ``floats [K, Pf]`` / ``ints [K, Pi]``: each stage's :class:`StageState`, packed and zero-padded;
    ``msg [K, B, M]``: the (flattened, padded) input stage j will consume at the next tick, received from
    stage j-1; ``labels [K, B]``: its labels; ``valid [K]``: whether that message is a real batch (False
    during the pipeline's fill).
    """

    floats: jax.Array
    ints: jax.Array
    msg: jax.Array
    labels: jax.Array
    valid: jax.Array


class SpmdPipeline:
    """Synchronous DGL as one SPMD program over the mesh axis ``stage_axis`` (size K = number of stages).

    **What one tick computes.** ``tick(state, x_t, labels_t, valid_t)``: every stage j runs, in parallel,
    its local update (:func:`~dgl_jax.train.stage_step`) on its input: stage 0 on the fresh batch ``x_t``,
    stage j > 0 on the message stage j-1 sent at the previous tick. Each stage then sends its output
    (computed with its pre-update params) to stage j+1 with ``lax.ppermute``. So tick t updates stage j on
    batch ``t - j`` with stage j-1's pre-update output from tick t-1; a stage whose input is not a real
    batch (the first j ticks: pipeline fill; ``valid_t=False``: drain) keeps its state. After T batches and
    K-1 drain ticks every stage has taken exactly the updates of T :func:`~dgl_jax.train.dgl_step` calls, in
    the same order (:meth:`run` does this).

    **Stages of different shapes.** Each stage's state is packed into a zero-padded float32 vector (and an
    int32 one) of the largest stage's size, stacked ``[K, Pf]`` and sharded over ``stage_axis``; messages
    are flattened per example and padded to the largest message ``[B, M]``. Inside ``shard_map`` the stage
    picks its own computation with ``lax.switch(lax.axis_index(stage_axis), ...)``. The cost: every device
    holds the padded size of the largest stage, and every message is as big as the largest one.

    **Data parallelism.** A mesh ``(stage_axis, data_axis)`` also splits the batch over ``data_axis``:
    ``shard_map`` is manual over ``stage_axis`` only, and XLA partitions each stage's update over the data
    axis (the gradient mean over the full batch is inserted automatically).

    Across hosts: build ``mesh`` over ``jax.devices()`` after ``jax.distributed.initialize(...)``; every
    process passes the same host data to :meth:`init` and :meth:`tick`.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        mesh: Mesh,
        example_states: Sequence[StageState],
        example_x: jax.Array,
        *,
        stage_axis: str = "stage",
        data_axis: str | None = None,
    ):
        k = len(stages)
        if len(example_states) != k:
            raise ValueError(f"got {len(example_states)} states for {k} stages")
        if stage_axis not in mesh.shape:
            raise ValueError(f"mesh axes {tuple(mesh.shape)} have no stage axis {stage_axis!r}")
        for name, size in mesh.shape.items():
            if size < 1:
                raise ValueError(f"mesh axis {name!r} is empty")
        if mesh.shape[stage_axis] != k:
            raise ValueError(
                f"mesh axis {stage_axis!r} has {mesh.shape[stage_axis]} devices but there are {k} stages: "
                "SPMD needs exactly one position on the stage axis per stage"
            )
        extra = set(mesh.shape) - {stage_axis} - ({data_axis} if data_axis else set())
        if extra:
            raise ValueError(f"mesh axes {sorted(extra)} are neither the stage axis nor data_axis={data_axis!r}")
        if data_axis is not None:
            if data_axis not in mesh.shape:
                raise ValueError(f"data_axis {data_axis!r} is not a mesh axis {tuple(mesh.shape)}")
            if example_x.shape[0] % mesh.shape[data_axis]:
                raise ValueError(
                    f"batch {example_x.shape[0]} is not divisible by the {mesh.shape[data_axis]} devices of "
                    f"axis {data_axis!r}"
                )
        self.stages, self.mesh, self.k = list(stages), mesh, k
        self.stage_axis, self.data_axis = stage_axis, data_axis
        self.batch = example_x.shape[0]
        # Input shape and dtype of every stage, by abstract evaluation.
        self.in_shapes, self.in_dtypes = [], []
        xs = jax.ShapeDtypeStruct(example_x.shape, example_x.dtype)
        labels = jax.ShapeDtypeStruct((self.batch,), jnp.int32)
        for stage, st in zip(stages, example_states, strict=True):
            self.in_shapes.append(tuple(xs.shape[1:]))
            self.in_dtypes.append(jnp.dtype(xs.dtype))
            xs = jax.eval_shape(functools.partial(stage_step, stage), st, xs, labels)[1]
        self.msg_size = max(math.prod(s) for s in self.in_shapes)
        self.packers = [_Packer(st) for st in example_states]
        self.num_floats = max(max(p.num_floats for p in self.packers), 1)
        self.num_ints = max(max(p.num_ints for p in self.packers), 1)
        self._tick = self._build_tick()

    # -- shardings -----------------------------------------------------------------------------------------
    def _spec(self, *rest: Any) -> P:
        return P(self.stage_axis, *rest)

    def _shardings(self) -> SpmdState:
        d = self.data_axis
        return SpmdState(
            NamedSharding(self.mesh, self._spec()),
            NamedSharding(self.mesh, self._spec()),
            NamedSharding(self.mesh, self._spec(d)),
            NamedSharding(self.mesh, self._spec(d)),
            NamedSharding(self.mesh, self._spec()),
        )

    def _global(self, host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    # -- state in and out ----------------------------------------------------------------------------------
    def init(self, states: Sequence[StageState]) -> SpmdState:
        """Packs ``states`` (the same on every process) into a placed :class:`SpmdState` (empty pipeline)."""
        host = [
            p.pack(jax.device_get(st), self.num_floats, self.num_ints, np)
            for p, st in zip(self.packers, states, strict=True)
        ]
        sh = self._shardings()
        return SpmdState(
            self._global(np.stack([h[0] for h in host]), sh.floats),
            self._global(np.stack([h[1] for h in host]), sh.ints),
            self._global(np.zeros((self.k, self.batch, self.msg_size), np.float32), sh.msg),
            self._global(np.zeros((self.k, self.batch), np.int32), sh.labels),
            self._global(np.zeros((self.k,), bool), sh.valid),
        )

    def unpack(self, state: SpmdState) -> list[StageState]:
        """The per-stage :class:`StageState` s as host numpy (gathered from every process)."""
        floats, ints = _gather(state.floats), _gather(state.ints)
        return [p.unpack(floats[j], ints[j]) for j, p in enumerate(self.packers)]

    # -- the tick ------------------------------------------------------------------------------------------
    def _flat_input(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        return jnp.pad(x, ((0, 0), (0, self.msg_size - x.shape[1])))

    def _build_tick(self) -> Callable[..., Any]:
        k, ax = self.k, self.stage_axis

        def branch(j):
            stage, packer = self.stages[j], self.packers[j]
            size = math.prod(self.in_shapes[j])

            def run(f, i, msg, labels, valid):
                st = packer.unpack(f, i)
                x = msg[:, :size].reshape(msg.shape[0], *self.in_shapes[j]).astype(self.in_dtypes[j])
                new, out, loss, acc = stage_step(stage, st, x, labels)
                nf, ni = packer.pack(new, self.num_floats, self.num_ints)
                nf, ni = jnp.where(valid, nf, f), jnp.where(valid, ni, i)
                return nf, ni, self._flat_input(out), loss.astype(jnp.float32), acc.astype(jnp.float32)

            return run

        branches = [branch(j) for j in range(k)]
        perm = [(j, j + 1) for j in range(k - 1)]

        def body(floats, ints, msg, labels, valid, x, y, valid_in):
            j = jax.lax.axis_index(ax)
            first = j == 0
            msg_j = jnp.where(first, x, msg[0])
            labels_j = jnp.where(first, y, labels[0])
            valid_j = jnp.where(first, valid_in, valid[0])
            nf, ni, out, loss, acc = jax.lax.switch(j, branches, floats[0], ints[0], msg_j, labels_j, valid_j)
            sent = jax.lax.ppermute((out, labels_j, valid_j), ax, perm)
            return (
                nf[None],
                ni[None],
                sent[0][None],
                sent[1][None],
                sent[2][None],
                jnp.where(valid_j, loss, jnp.nan)[None],
                jnp.where(valid_j, acc, jnp.nan)[None],
            )

        # Manual over the stage axis only: a data axis stays automatic (XLA splits the batch inside a stage).
        st_specs = (self._spec(),) * 5
        smap = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(*st_specs, P(), P(), P()),
            out_specs=(*st_specs, self._spec(), self._spec()),
            axis_names={ax},
            check_vma=False,
        )

        def tick(state, x, y, valid_in):
            out = smap(*state, self._flat_input(x), y, valid_in)
            return SpmdState(*out[:5]), StepMetrics(out[5], out[6])

        return jax.jit(tick, donate_argnums=0)

    def tick(self, state: SpmdState, x: Any, labels: Any, valid: bool = True) -> tuple[SpmdState, StepMetrics]:
        """One tick (see the class docstring): stage 0 takes ``x: [B, H, W, C]``/``labels: [B]`` (host
        arrays, the same on every process; ignored when ``valid`` is False). Returns the new state and
        per-stage metrics ``[K]`` of this tick (NaN for a stage that did not update)."""
        if np.shape(x)[0] != self.batch:
            raise ValueError(f"batch {np.shape(x)[0]} differs from the batch {self.batch} the pipeline was built for")
        d = self.data_axis
        x = self._global(np.asarray(x), NamedSharding(self.mesh, P(d)))
        y = self._global(np.asarray(labels, np.int32), NamedSharding(self.mesh, P(d)))
        v = self._global(np.asarray(valid, bool), NamedSharding(self.mesh, P()))
        return self._tick(state, x, y, v)

    def run(self, state: SpmdState, batches: Sequence[tuple[Any, Any]]) -> tuple[SpmdState, StepMetrics]:
        """Feeds T batches then K-1 drain ticks: the result equals T :func:`~dgl_jax.train.dgl_step` calls.

        Returns the state and host metrics ``[T, K]`` (row t: every stage's loss on batch t)."""
        batches = list(batches)
        if not batches:
            raise ValueError("run needs at least one batch")
        zeros = (np.zeros_like(np.asarray(batches[0][0])), np.zeros_like(np.asarray(batches[0][1])))
        ticks = []
        for t in range(len(batches) + self.k - 1):
            x, y = batches[t] if t < len(batches) else zeros
            state, m = self.tick(state, x, y, t < len(batches))
            ticks.append(m)
        loss = np.stack([_gather(m.loss) for m in ticks])
        acc = np.stack([_gather(m.accuracy) for m in ticks])
        rows = np.arange(len(batches))[:, None] + np.arange(self.k)[None, :]
        cols = np.broadcast_to(np.arange(self.k), rows.shape)
        return state, StepMetrics(loss[rows, cols], acc[rows, cols])


def _gather(x: jax.Array) -> np.ndarray:
    """A global array as host numpy, from every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
