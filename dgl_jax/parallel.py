"""Stages on separate devices: thread machinery, placements, a pipelined MPMD executor and an SPMD tick.

Three layers, each usable on its own:

* **Threads** (:class:`Workers`, :class:`Channel`, :func:`run_chain`): a thread per device or stage,
  bounded queues between them, a shared stop ``Event``; the first exception in any worker stops all of
  them and is re-raised in the caller; ``KeyboardInterrupt`` stops them too. Nothing here knows about DGL:
  the asynchronous DGL runner reuses it. Why threads: on CPU, work dispatched to several devices from ONE
  Python thread does not overlap; one thread per device does (figures in the README and
  ``benchmarks/results/pipeline.json``). Compile
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
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dgl_jax.accounting import nbytes
from dgl_jax.objective import stage_key
from dgl_jax.stage import Stage, StageState, decode_message, message_specs, wire_spec
from dgl_jax.steps import stage_step

PyTree = Any
StepFn = Callable[[StageState, PyTree, PyTree, jax.Array | None], tuple[StageState, PyTree, dict]]


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
    its local update is compiled for those devices, and the wire (its codec's output: any pytree) moves
    with ``jax.device_put``.

    ``step_fns[j](state, x, targets, key) -> (state, wire, metrics)`` defaults to
    ``stage_step(stages[j], ...)``; pass your own to add work to a stage (benchmarks add a fixed wait).
    Stage j > 0 decodes what stage j-1 sent on its own devices, inside its compiled step.

    Usage::

        pipe = PipelinedDGL(stages, make_placement(len(stages)))
        states = pipe.place(states)
        pipe.compile(states, x_example, targets_example)   # main thread, before any worker starts
        states, metrics = pipe.run(states, batches, key)    # metrics: loss/accuracy [T, K]

    Batch t uses the key ``fold_in(key, t)``, the key :func:`~dgl_jax.steps.dgl_step` would get.
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

        def receive(j, fn):
            def step(state, wire, targets, key):
                x = wire if j == 0 else decode_message(self.stages[j - 1], wire)
                return fn(state, x, targets, key)

            return step

        self._jitted = [jax.jit(receive(j, f), donate_argnums=(0,) if donate else ()) for j, f in enumerate(step_fns)]
        self._compiled: list[Any] | None = None
        self._batch: int | None = None

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

    def _sharding(self, j: int, leaf: Any) -> NamedSharding:
        """Leaves with the batch as leading axis are split over stage j's devices, others replicated."""
        batched = np.ndim(leaf) >= 1 and np.shape(leaf)[0] == self._batch
        return self.placement.batch_sharding(j) if batched else self.placement.state_sharding(j)

    def put(self, j: int, tree: PyTree) -> PyTree:
        """``tree`` (a wire, targets or a batch) moved to stage j's devices."""
        return jax.tree.map(lambda a: jax.device_put(a, self._sharding(j, a)), tree)

    def compile(self, states: Sequence[StageState], x: PyTree, targets: PyTree) -> None:
        """Compiles every stage's update for its devices (call from the main thread; ``states`` placed)."""
        self._batch = jax.tree.leaves(x)[0].shape[0]
        self._check_batch(self._batch)
        spec = lambda j, t: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a), sharding=self._sharding(j, a)), t
        )
        key = jax.random.key(0)
        wires = [x] + [
            wire_spec(s, st.codec, m)
            for s, st, m in zip(self.stages[:-1], states[:-1], message_specs(self.stages, states, x), strict=True)
        ]
        compiled = []
        for j, (f, st) in enumerate(zip(self._jitted, states, strict=True)):
            st_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), st)
            k_spec = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.placement.state_sharding(j))
            compiled.append(f.lower(st_spec, spec(j, wires[j]), spec(j, targets), k_spec).compile())
        self._compiled = compiled

    def run(
        self,
        states: Sequence[StageState],
        batches: Iterable[tuple[Any, Any]],
        key: jax.Array | None = None,
        *,
        keys: Sequence[jax.Array] | None = None,
        maxsize: int = 2,
        timeout_s: float | None = None,
    ) -> tuple[list[StageState], dict[str, np.ndarray]]:
        """Trains on every ``(x, targets)`` of ``batches``, one thread per stage, and returns the final states
        and the metrics of every step (``loss``/``accuracy`` ``[T, K]``, host numpy).

        Equal to T sequential :func:`~dgl_jax.steps.dgl_step` calls with keys ``fold_in(key, t)`` (default
        ``key``: ``jax.random.key(0)``), or ``keys[t]`` when given. :attr:`bytes_sent` then holds, per
        boundary, the ``nbytes`` of the wires and targets moved to the next stage's devices. ``states`` must
        come from :meth:`place` and are donated. No worker
        blocks on device results: the only waits are the bounded queues (``maxsize``) and, at the end,
        fetching the metrics.
        """
        if self._compiled is None:
            raise ValueError("call compile(states, x, targets) in the main thread before run()")
        k = self.placement.num_stages
        key = jax.random.key(0) if key is None else key
        final: list[Any] = list(states)
        metrics: list[list[Any]] = [[] for _ in range(k)]

        self.bytes_sent = [0] * (k - 1)

        def make_fn(j):
            fn, rep = self._compiled[j], self.placement.state_sharding(j)

            def step(msg):
                wire, targets, key_t = msg
                wire, targets = self.put(j, wire), self.put(j, targets)
                if j > 0:
                    self.bytes_sent[j - 1] += nbytes(wire) + nbytes(targets)
                final[j], out, m = fn(final[j], wire, targets, jax.device_put(stage_key(key_t, j), rep))
                metrics[j].append(m)
                return out, targets, key_t

            return step

        def items():
            for t, (x, y) in enumerate(batches):
                self._check_batch(jax.tree.leaves(x)[0].shape[0])
                yield x, y, (keys[t] if keys is not None else jax.random.fold_in(key, t))

        run_chain([make_fn(j) for j in range(k)], items(), maxsize=maxsize, timeout_s=timeout_s)
        return final, {
            name: np.array([[np.asarray(m[name]) for m in ms] for ms in metrics]).T.reshape(-1, k)
            for name in ("loss", "accuracy")
        }


def message_shapes(stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array) -> list[tuple[int, ...]]:
    """Shapes of the (single-array) messages stages 0..K-2 send for an input like ``x``
    (:func:`dgl_jax.stage.message_specs`, abstract evaluation only)."""
    return [tuple(m.shape) for m in message_specs(stages, states, x)]


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

    ``floats [K, Pf]`` / ``ints [K, Pi]``: each stage's :class:`StageState` (codec state included), packed
    and zero-padded; ``inbox``: one ``(wire, targets, key_data, valid)`` per boundary, every leaf
    ``[K, ...]``: row j+1 of boundary j's entry is what stage j sent at the previous tick (zeros elsewhere),
    ``valid`` saying whether it is a real batch (False during the pipeline's fill).
    """

    floats: jax.Array
    ints: jax.Array
    inbox: tuple


class SpmdPipeline:
    """Synchronous DGL as one SPMD program over the mesh axis ``stage_axis`` (size K = number of stages, or
    S = number of stage groups).

    **What one tick computes.** ``tick(state, x_t, targets_t, valid_t, key_t)``: every stage j runs, in
    parallel, its local update (:func:`~dgl_jax.steps.stage_step`) on its input: stage 0 on the fresh
    batch ``x_t``, stage j > 0 on ``decode`` of the wire stage j-1 sent at the previous tick. Each stage then
    sends its wire (computed with its pre-update params) to stage j+1 with ``lax.ppermute``. So tick t
    updates stage j on batch ``t - j``; a stage whose input is not a real batch (the first j ticks:
    pipeline fill; ``valid_t=False``: drain) keeps its state. After T batches and K-1 drain ticks every
    stage has taken exactly the updates of T :func:`~dgl_jax.steps.dgl_step` calls, in the same order, with
    the same keys (the key of batch t travels with it; :meth:`run` does this).

    **Wires.** Boundary j's wire keeps its own shapes and dtypes (uint8 codes stay uint8): it crosses in its
    own ``ppermute`` whose only pair is ``(j, j+1)``, so what the compiled program moves between two stages
    is exactly that wire, its targets and its key.

    **Stage groups.** ``groups[j]`` (contiguous, from 0; default ``j``) puts several consecutive stages on
    one position of the stage axis: within a tick, a group's stages update one after the other on the same
    batch, each taking the wire of the one before it at once (computed with its pre-update params, as in
    ``dgl_step``). Group g then updates on batch ``t - g``; only the wires between groups cross devices,
    and S-1 drain ticks empty the pipeline. Per-tick metrics are ``[S * W]``, W the largest group's size.

    **Stages of different shapes.** Each stage's state is packed into a zero-padded float32 vector (and an
    int32 one) of the largest stage's size, stacked ``[K, Pf]`` and sharded over ``stage_axis``. Inside
    ``shard_map`` the stage picks its own computation with ``lax.switch(lax.axis_index(stage_axis), ...)``.

    **Data parallelism.** A mesh ``(stage_axis, data_axis)`` also splits the work of each stage over
    ``data_axis``: ``shard_map`` is manual over ``stage_axis`` only, and XLA partitions each stage's update
    over the data axis (the gradient mean over the full batch is inserted automatically).

    Across hosts: build ``mesh`` over ``jax.devices()`` after ``jax.distributed.initialize(...)``; every
    process passes the same host data to :meth:`init` and :meth:`tick`.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        mesh: Mesh,
        example_states: Sequence[StageState],
        example_x: PyTree,
        example_targets: PyTree | None = None,
        *,
        stage_axis: str = "stage",
        data_axis: str | None = None,
        groups: Sequence[int] | None = None,
    ):
        k = len(stages)
        if len(example_states) != k:
            raise ValueError(f"got {len(example_states)} states for {k} stages")
        groups = list(range(k)) if groups is None else [int(g) for g in groups]
        if (
            len(groups) != k
            or groups[0] != 0
            or any(b - a not in (0, 1) for a, b in zip(groups, groups[1:], strict=False))
        ):
            raise ValueError(f"groups {groups}: expected one group index per stage, contiguous from 0 (e.g. [0, 0, 1])")
        n_groups = groups[-1] + 1
        if stage_axis not in mesh.shape:
            raise ValueError(f"mesh axes {tuple(mesh.shape)} have no stage axis {stage_axis!r}")
        for name, size in mesh.shape.items():
            if size < 1:
                raise ValueError(f"mesh axis {name!r} is empty")
        if mesh.shape[stage_axis] != n_groups:
            raise ValueError(
                f"mesh axis {stage_axis!r} has {mesh.shape[stage_axis]} devices but there are {k} stages in "
                f"{n_groups} groups: SPMD needs exactly one position on the stage axis per group"
            )
        extra = set(mesh.shape) - {stage_axis} - ({data_axis} if data_axis else set())
        if extra:
            raise ValueError(f"mesh axes {sorted(extra)} are neither the stage axis nor data_axis={data_axis!r}")
        self.batch = jax.tree.leaves(example_x)[0].shape[0]
        if data_axis is not None:
            if data_axis not in mesh.shape:
                raise ValueError(f"data_axis {data_axis!r} is not a mesh axis {tuple(mesh.shape)}")
            if self.batch % mesh.shape[data_axis]:
                raise ValueError(
                    f"batch {self.batch} is not divisible by the {mesh.shape[data_axis]} devices of axis {data_axis!r}"
                )
        self.stages, self.mesh, self.k = list(stages), mesh, k
        self.groups, self.num_groups = groups, n_groups
        self.members = [[j for j in range(k) if groups[j] == g] for g in range(n_groups)]
        self.group_width = max(len(m) for m in self.members)  # metric columns per stage-axis position
        self.stage_axis, self.data_axis = stage_axis, data_axis
        spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), t)  # noqa: E731
        self.x_spec = spec(example_x)
        self.targets_spec = spec(jnp.zeros((self.batch,), jnp.int32) if example_targets is None else example_targets)
        self.key_spec = spec(jax.random.key_data(jax.random.key(0)))
        messages = message_specs(stages, example_states, self.x_spec)
        self.wire_specs = [
            wire_spec(s, st.codec, m) for s, st, m in zip(stages[:-1], example_states[:-1], messages, strict=True)
        ]
        self.packers = [_Packer([example_states[j] for j in m]) for m in self.members]
        self.num_floats = max(max(p.num_floats for p in self.packers), 1)
        self.num_ints = max(max(p.num_ints for p in self.packers), 1)
        self._tick = self._build_tick()

    # -- shardings -----------------------------------------------------------------------------------------
    def _spec(self, *rest: Any) -> P:
        return P(self.stage_axis, *rest)

    def _stage_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self._spec())

    def _global(self, host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def _inbox_specs(self) -> tuple:
        """``ShapeDtypeStruct`` s of one device's inbox: ``(wire, targets, key_data, valid)`` per boundary."""
        valid = jax.ShapeDtypeStruct((), jnp.bool_)
        return tuple((self.wire_specs[m[-1]], self.targets_spec, self.key_spec, valid) for m in self.members[:-1])

    # -- state in and out ----------------------------------------------------------------------------------
    def init(self, states: Sequence[StageState]) -> SpmdState:
        """Packs ``states`` (the same on every process) into a placed :class:`SpmdState` (empty pipeline)."""
        host = [
            p.pack(jax.device_get([states[j] for j in m]), self.num_floats, self.num_ints, np)
            for p, m in zip(self.packers, self.members, strict=True)
        ]
        sh = self.shardings()
        inbox = jax.tree.map(
            lambda s, spec: self._global(np.zeros((self.num_groups, *spec.shape), spec.dtype), s),
            sh.inbox,
            self._inbox_specs(),
        )
        return SpmdState(
            self._global(np.stack([h[0] for h in host]), sh.floats),
            self._global(np.stack([h[1] for h in host]), sh.ints),
            inbox,
        )

    def shardings(self) -> SpmdState:
        """Where every array of the state lives: row j on stage j; inbox leaves whose leading axis is the batch
        are also split over the data axis."""
        sh = self._stage_sharding()
        d = self.data_axis
        batched = NamedSharding(self.mesh, self._spec(d))

        def leaf(s):
            return batched if d is not None and len(s.shape) >= 1 and s.shape[0] == self.batch else sh

        return SpmdState(sh, sh, jax.tree.map(leaf, self._inbox_specs()))

    def unpack(self, state: SpmdState) -> list[StageState]:
        """The per-stage :class:`StageState` s as host numpy (gathered from every process)."""
        floats, ints = _gather(state.floats), _gather(state.ints)
        return [st for g, p in enumerate(self.packers) for st in p.unpack(floats[g], ints[g])]

    def wire_bytes(self) -> list[int]:
        """Accounting: bytes each boundary's ``ppermute`` moves per tick (the wire, its targets, its key data
        and its valid flag), summed over the data axis: batch-split leaves cross once in all, the others once
        per data-parallel device."""

        d = 1 if self.data_axis is None else self.mesh.shape[self.data_axis]
        split = lambda a: len(a.shape) >= 1 and a.shape[0] == self.batch and d > 1  # noqa: E731
        return [
            sum(nbytes(a) if split(a) else d * nbytes(a) for a in jax.tree.leaves(item)) for item in self._inbox_specs()
        ]

    def measured_wire_bytes(self, state: SpmdState) -> int:
        """Bytes per tick that the compiled tick's collective-permutes move, read from its optimised HLO: the
        operand sizes of every ``collective-permute`` times its number of source-target pairs."""
        rep = NamedSharding(self.mesh, P())
        spec = lambda t, sh: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t)  # noqa: E731
        state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        args = (self.x_spec, self.targets_spec, self.key_spec, jax.ShapeDtypeStruct((), jnp.bool_))
        hlo = self._tick.lower(state_spec, *(spec(a, rep) for a in args)).compile().as_text()
        return collective_permute_bytes(hlo)

    # -- the tick ------------------------------------------------------------------------------------------
    def _build_tick(self) -> Callable[..., Any]:
        n_groups, ax, width = self.num_groups, self.stage_axis, self.group_width
        inbox_specs = self._inbox_specs()
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731

        def branch(g):
            members, packer = self.members[g], self.packers[g]

            def run(f, i, inbox, x, y, key_data, valid):
                states = packer.unpack(f, i)
                if g > 0:
                    wire, y, key_data, valid = inbox[g - 1]
                    x = decode_message(self.stages[members[0] - 1], wire)
                new, losses, accs = [], [], []
                for n, (j, st) in enumerate(zip(members, states, strict=True)):  # the group's stages in turn
                    key = stage_key(jax.random.wrap_key_data(key_data), j)
                    st, wire_out, m = stage_step(self.stages[j], st, x, y, key)
                    new.append(st)
                    losses.append(m["loss"].astype(jnp.float32))
                    accs.append(m["accuracy"].astype(jnp.float32))
                    if n < len(members) - 1:  # the next stage of the group takes this wire at once
                        x = decode_message(self.stages[j], wire_out)
                nf, ni = packer.pack(new, self.num_floats, self.num_ints)
                nf, ni = jnp.where(valid, nf, f), jnp.where(valid, ni, i)
                outbox = list(zeros(inbox_specs))
                if g < n_groups - 1:
                    outbox[g] = (wire_out, y, key_data, valid)
                pad = [jnp.float32(jnp.nan)] * (width - len(members))
                loss, acc = (jnp.where(valid, jnp.stack(v + pad), jnp.nan) for v in (losses, accs))
                return nf, ni, tuple(outbox), loss, acc

            return run

        branches = [branch(g) for g in range(n_groups)]

        def body(floats, ints, inbox, x, y, key_data, valid_in):
            g = jax.lax.axis_index(ax)
            inbox = jax.tree.map(lambda a: a[0], inbox)
            nf, ni, outbox, loss, acc = jax.lax.switch(g, branches, floats[0], ints[0], inbox, x, y, key_data, valid_in)
            # Boundary b's wire (with its targets, key and valid flag) crosses alone, from group b to group b+1,
            # in its own dtypes: the only collectives of the program.
            received = tuple(jax.lax.ppermute(outbox[b], ax, [(b, b + 1)]) for b in range(n_groups - 1))
            return nf[None], ni[None], jax.tree.map(lambda a: a[None], received), loss, acc

        # Manual over the stage axis only: a data axis stays automatic (XLA splits the work inside a stage).
        stage_spec = self._spec()
        inbox_spec = jax.tree.map(lambda _: stage_spec, inbox_specs)
        smap = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(stage_spec, stage_spec, inbox_spec, P(), P(), P(), P()),
            out_specs=(stage_spec, stage_spec, inbox_spec, stage_spec, stage_spec),
            axis_names={ax},
            check_vma=False,
        )

        def tick(state, x, y, key_data, valid_in):
            out = smap(*state, x, y, key_data, valid_in)
            return SpmdState(*out[:3]), {"loss": out[3], "accuracy": out[4]}

        sh = self._stage_sharding()
        out_shardings = (self.shardings(), {"loss": sh, "accuracy": sh})
        return jax.jit(tick, donate_argnums=0, out_shardings=out_shardings)

    def tick(
        self, state: SpmdState, x: PyTree, targets: PyTree, valid: bool = True, key: jax.Array | None = None
    ) -> tuple[SpmdState, dict[str, jax.Array]]:
        """One tick (see the class docstring): stage 0 takes ``x``/``targets`` (host arrays, the same on every
        process; ignored when ``valid`` is False) and ``key`` (the key of this batch, default
        ``jax.random.key(0)``). Returns the new state and per-stage metrics ``[K]`` of this tick (NaN for a
        stage that did not update); with stage groups ``[S * W]``, stage j at ``g * W + `` its place in group g."""
        if jax.tree.leaves(x)[0].shape[0] != self.batch:
            raise ValueError(
                f"batch {jax.tree.leaves(x)[0].shape[0]} differs from the batch {self.batch} the pipeline was built for"
            )
        rep = NamedSharding(self.mesh, P())

        def put(t):  # device arrays move device to device; host data is laid out on every process
            if jax.process_count() == 1:
                return jax.device_put(t, rep)
            return jax.tree.map(lambda a: self._global(np.asarray(a), rep), t)

        key_data = jax.random.key_data(jax.random.key(0) if key is None else key)
        return self._tick(state, put(x), put(targets), put(key_data), put(np.asarray(valid, bool)))

    def run(
        self,
        state: SpmdState,
        batches: Sequence[tuple[Any, Any]],
        key: jax.Array | None = None,
        *,
        keys: Sequence[jax.Array] | None = None,
    ) -> tuple[SpmdState, dict[str, np.ndarray]]:
        """Feeds T batches then S-1 drain ticks (S = K without stage groups): the result equals T
        :func:`~dgl_jax.steps.dgl_step` calls with keys ``fold_in(key, t)`` (default ``key``:
        ``jax.random.key(0)``), or ``keys[t]`` when given.

        Returns the state and host metrics ``[T, K]`` (row t: every stage's loss on batch t)."""
        batches = list(batches)
        if not batches:
            raise ValueError("run needs at least one batch")
        key = jax.random.key(0) if key is None else key
        zeros = jax.tree.map(np.zeros_like, (np.asarray(batches[0][0]), jax.tree.map(np.asarray, batches[0][1])))
        ticks = []
        for t in range(len(batches) + self.num_groups - 1):
            x, y = batches[t] if t < len(batches) else zeros
            k_t = keys[min(t, len(keys) - 1)] if keys is not None else jax.random.fold_in(key, t)
            state, m = self.tick(state, x, y, t < len(batches), k_t)
            ticks.append(m)
        # stage j (the n-th of group g) takes batch t at tick t + g; its metrics are column g * width + n
        group = np.array(self.groups)
        col = np.array([g * self.group_width + m.index(j) for g, m in enumerate(self.members) for j in m])
        rows = np.arange(len(batches))[:, None] + group[None, :]
        cols = np.broadcast_to(col, rows.shape)
        return state, {name: np.stack([_gather(m[name]) for m in ticks])[rows, cols] for name in ("loss", "accuracy")}


def collective_permute_bytes(hlo: str) -> int:
    """Bytes moved by the ``collective-permute`` s of an optimised HLO module's text: for each, the size of
    what it sends (its result shape, per device) times its number of source-target pairs. For the async
    form (``collective-permute-start``) the first element of its result tuple is what it sends."""
    total = 0
    for line in hlo.splitlines():
        m = _PERMUTE.search(line)
        if not m:
            continue
        types = _ARRAY.findall(m.group(1))
        if m.group(2):  # -start: (operand, output, ...) -> the operand
            types = types[:1]
        pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
        n_pairs = len(re.findall(r"\{\d+,\d+\}", pairs.group(1))) if pairs else 1
        total += n_pairs * sum(
            int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _HLO_BYTES[dtype] for dtype, dims in types
        )
    return total


_PERMUTE = re.compile(r"=\s*(.*?)\s+collective-permute(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_HLO_BYTES.update({"s64": 8, "u64": 8, "f64": 8})


def _gather(x: jax.Array) -> np.ndarray:
    """A global array as host numpy, from every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
