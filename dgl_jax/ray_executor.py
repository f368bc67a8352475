"""Asynchronous DGL on Ray: one actor per stage group, wires through the object store, lost actors come back.

JAX's multi-controller runtime is lock-step (its collectives wait for every process), so truly asynchronous
stages across processes and machines run as Ray actors that each own their devices (MPMD). Each
:class:`StageActor` runs :func:`dgl_jax.asynchronous.stage_loop` with the programs of
:func:`~dgl_jax.asynchronous.compile_stage`: the same jitted :func:`~dgl_jax.steps.stage_step` and boundary
codec as the threaded executor. After each update the sender ships its ``(wire, targets)`` item (host numpy:
packed VQ codes plus their codebook when a VQ codec is on) to the receiver actor through the object store;
the receiver puts it into its replay buffer, on its own device.

* **Back-pressure.** A receiver's :class:`~dgl_jax.asynchronous.Inbox` holds at most ``queue_size`` items
  (a delivery waits while it is full; an item enters the replay buffer only once the slot it would
  overwrite has been read), and a sender keeps at most ``queue_size`` deliveries unacknowledged: memory
  stays bounded whatever the speeds.
* **Injected slow-down and link delay**, as in :func:`~dgl_jax.asynchronous.run_threaded`: ``slow_stage``
  sleeps ``slowdown - 1`` times each update's duration; every item becomes readable ``link_delay_s``
  seconds after it reached the receiver (with ``link_bandwidth_bps``, after its emulated sending time on the
  receiver's inbox, :func:`~dgl_jax.asynchronous.link_schedule`).
* **Fault tolerance.** Every actor checkpoints its stage state, key and update count (orbax, through
  :class:`~dgl_jax.checkpoint.Checkpointer`) every ``checkpoint_every`` updates and whenever the driver sets
  its state, into ``<run>/stage<j>/``. An actor that dies (``kill -9`` of its process) is restarted by Ray
  (``max_restarts``); its constructor restores the newest checkpoint, and the driver re-issues the rest of
  the segment: the stage loses at most its updates since that checkpoint (and its replay buffer, which
  refills). The driver keeps ``<run>/manifest.json``: actors, their processes, checkpoints, restarts.
* **Stopping.** :meth:`RayExecutor.close` asks every loop to stop, then kills the actors and, if it started
  it, shuts the local Ray instance down. Driver-level checkpoints (the trainer's) make a run resumable.

The driver runs *segments*: :meth:`RayExecutor.run` gives every stage a number of updates (stage 0 a list of
batches) and returns when all are done, with the states and per-stage records. The trainer runs one segment
per chunk of steps; stages run freely inside a segment and meet at its end.

Ray is imported here only (lazily): ``import dgl_jax`` never needs it. Without an address a local Ray
instance starts (CPU actors on a CPU machine, as many logical CPUs as actors); ``address`` joins a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import asynchronous as asy
from dgl_jax import buffer
from dgl_jax.files import write_json
from dgl_jax.stage import Stage, StageState

PyTree = Any
RAY_PIN = "ray==2.60.0"
CONNECT_TIMEOUT_S = 5.0  # to reach an address before Ray is asked to join it
START_TIMEOUT_S = 180.0  # for every actor to be placed, compile its programs and answer


def import_ray():
    """``ray``, or a one-line ``ValueError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--executor ray needs Ray: pip install {RAY_PIN} (or the extra dgl-jax[ray])") from None
    return ray


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """``ValueError`` (one line) unless a TCP connection to ``address`` (``host:port`` or ``ray://host:port``;
    ``auto`` is not checked) opens within ``timeout_s``: Ray itself would retry for a minute or more."""
    if address == "auto":
        return
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} is not valid; expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ValueError(f"--ray-address {address!r}: cannot reach it ({why}); is a Ray head running there?") from None


def _env_vars() -> dict[str, str]:
    """The driver's JAX settings the actors need (fake CPU devices, platform) and no usage-stats prompt."""
    env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if k in os.environ}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def connect(address: str | None, num_actors: int) -> bool:
    """Joins the Ray cluster at ``address``, or starts a local instance with at least ``num_actors`` CPUs
    (no dashboard, actors' output kept in Ray's log folder, only errors logged). Reuses an initialised Ray.
    Returns whether this call started Ray (then :meth:`RayExecutor.close` shuts it down)."""
    ray = import_ray()
    if address:
        check_address(address)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": _env_vars()}, **quiet)
        except Exception as e:  # noqa: BLE001 - Ray raises many types; one line
            raise ValueError(f"--ray-address {address!r}: cannot join ({_first_line(e)})") from None
    else:
        cpus = max(num_actors, os.cpu_count() or 1)
        with warnings.catch_warnings():  # Ray forks its services after JAX started its threads: harmless here
            warnings.simplefilter("ignore", RuntimeWarning)
            ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": _env_vars()}, **quiet)
    return True


def actor_resources(num_actors: int, cpus_per_actor: float = 1.0, gpus_per_actor: float | None = None) -> dict:
    """Ray resources of one actor: ``gpus_per_actor`` GPUs (None: 1 when the cluster has GPUs, else 0) and
    ``cpus_per_actor`` CPUs. ``ValueError`` (one line) when ``num_actors`` of them do not fit the cluster's
    total resources (instead of actors that would wait forever to be placed)."""
    ray = import_ray()
    total = ray.cluster_resources()
    gpus = (1.0 if total.get("GPU", 0) >= 1 else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    need = {"CPU": num_actors * cpus_per_actor, "GPU": num_actors * gpus}
    short = [r for r, n in need.items() if n > total.get(r, 0.0) + 1e-9]
    if short:
        have = ", ".join(f"{total.get(r, 0.0):g} {r}" for r in need)
        want = f"{cpus_per_actor:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        raise ValueError(
            f"--executor ray: {num_actors} stage actors of {want} each do not fit the cluster ({have} in all); "
            f"use fewer stages (--split) or a bigger cluster"
        )
    return {"num_cpus": cpus_per_actor, "num_gpus": gpus}


class Options(NamedTuple):
    """How the actors run (see :class:`RayExecutor`)."""

    lockstep: bool = False
    queue_size: int = 4
    checkpoint_every: int = 100
    injected: asy.Injected = asy.Injected()  # slow-down, link latency and bandwidth
    restart_timeout_s: float = 600.0  # how long a dead actor may take to come back (it imports jax, compiles)


def _host(tree: PyTree) -> PyTree:
    return jax.tree.map(np.asarray, jax.device_get(tree))


class StageActor:
    """Stage ``j`` of ``num_stages`` in its own process (wrapped by ``ray.remote`` in :class:`RayExecutor`):
    its state, key stream and replay buffer live on its first local device. ``blob``: the cloudpickled stage
    list; ``spec``: its :class:`~dgl_jax.stage.StageState` shapes; ``example``: one ``(x, targets)`` batch
    and ``item`` one item of its input buffer (None for stage 0), as ``ShapeDtypeStruct`` s; stage j+1's
    handle comes from :meth:`connect`. The arguments are small (Ray keeps them to restart the actor); the
    driver then sends the state (:meth:`set_state`). A restarted actor restores the newest checkpoint of
    ``ckpt_dir`` instead."""

    def __init__(self, j, num_stages, blob, config, spec, example, item, key_data, ckpt_dir, options):
        import ray.cloudpickle as cloudpickle

        from dgl_jax.checkpoint import Checkpointer, silence_closed_loop_errors

        logging.getLogger("absl").setLevel(logging.CRITICAL + 1)
        silence_closed_loop_errors()
        self.j, self.k, self.config, self.opt = j, num_stages, config, options
        self.stages = cloudpickle.loads(blob)
        self.device = jax.local_devices()[0]
        self.downstream = None  # stage j+1's handle, from connect()
        self.stop_event = threading.Event()
        self.ckpt = Checkpointer(Path(ckpt_dir) / f"stage{j}", max_to_keep=2)
        self.ckpt.cleanup()
        self.state = jax.device_put(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec), self.device)
        self.key = jax.device_put(jax.random.wrap_key_data(jnp.asarray(key_data)), self.device)
        self.updates, self.restored = 0, None
        if self.ckpt.steps():
            tree, meta = self.ckpt.restore(self._tree(), warn=lambda msg: None)
            self._set(tree["state"], tree["key"], int(meta["updates"]))
            self.restored = {"updates": self.updates, "checkpoint": str(self.ckpt.path(int(meta["global_step"])))}
        self.buf = None
        if j > 0:
            self.buf = jax.device_put(buffer.init(config.capacity, asy._zeros(item)), self.device)
        x, y = jax.device_put(tuple(jnp.zeros(s.shape, s.dtype) for s in example), self.device)
        self.program = asy.compile_stage(self.stages, j, config, self.state, self.buf, x, y, self.key)
        links = options.injected
        self.inbox = asy.Inbox(
            options.queue_size, links.link_delay_s, stop=self.stop_event, bandwidth_bps=links.link_bandwidth_bps
        )
        self._lock = threading.Lock()
        self._next_seq: int | None = None
        self._early: dict[int, Any] = {}
        self._seq_out = 0

    # -- state ------------------------------------------------------------------------------------------
    def _tree(self) -> dict:
        return {"state": self.state, "key": jax.random.key_data(self.key)}

    def _set(self, state, key_data, updates: int) -> None:
        self.state = jax.device_put(jax.tree.map(jnp.asarray, state), self.device)
        self.key = jax.device_put(jax.random.wrap_key_data(jnp.asarray(key_data)), self.device)
        self.updates = int(updates)

    def _checkpoint(self) -> None:
        self.ckpt.save(self.updates, self._tree(), {"updates": self.updates, "stage": self.j})

    def set_state(self, state) -> int:
        """Sets the stage state (from the driver; the key stream and the update count go on) and checkpoints."""
        self._set(state, jax.random.key_data(self.key), self.updates)
        self._checkpoint()
        self.restored = None
        return self.updates

    def get_state(self) -> tuple[PyTree, np.ndarray, int]:
        """``(state, key data, updates)`` as host arrays."""
        return _host(self.state), np.asarray(jax.random.key_data(self.key)), self.updates

    def info(self) -> dict:
        """Process id, node, device, update count and what the constructor restored (None: fresh start)."""
        import ray

        return {
            "stage": self.j,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": str(self.device),
            "updates": self.updates,
            "restored": self.restored,
            "checkpoints": self.ckpt.steps(),
        }

    def connect(self, downstream: Any) -> None:
        """Sets the handle of stage j+1 (after construction and after every restart: handles are not
        constructor arguments, which Ray would have to keep in its object store)."""
        self.downstream = downstream

    def progress(self) -> int:
        return self.updates

    def stop(self) -> None:
        """Ends a running loop after its current update (and any wait)."""
        self.stop_event.set()

    # -- links ------------------------------------------------------------------------------------------
    def deliver(self, seq: int, segment: int, item: PyTree | None) -> None:
        """An item from stage j-1 (``None``: the end of its ``segment``), put into the inbox in ``seq`` order.
        Called in the actor's ``link`` concurrency group (one thread), so a delivery waiting on a full inbox
        (lock-step back-pressure) holds back the later ones."""
        with self._lock:
            if self._next_seq is None or seq < self._next_seq:  # first delivery (or after a restart of either)
                self._next_seq = seq
            self._early[seq] = (segment, item)
            while self._next_seq in self._early:
                seg, it = self._early.pop(self._next_seq)
                self._next_seq += 1
                self.inbox.put(("end", seg) if it is None else it)

    def _deliver(self, segment: int, item: PyTree | None) -> Any:
        """Ships ``item`` (host arrays; None: the end of ``segment``) to stage j+1; returns the call's ref."""
        ref = self.downstream.deliver.options(concurrency_group="link").remote(self._seq_out, segment, item)
        self._seq_out += 1
        return ref

    # -- the loop ---------------------------------------------------------------------------------------
    def end_segment(self, segment: int) -> None:
        """The end of ``segment`` from the driver (the sender finished before this actor was restarted)."""
        self.inbox.put(("end", segment))

    def run(self, segment: int, target: int | None, batches: list | None = None, first: int = 0) -> dict:
        """Takes updates until the stage has ``target`` in all (None, stage j > 0 free-running: until the end
        of the segment came and every item has been read; stage 0: batch ``u - first`` of ``batches``,
        cyclically, for its update ``u``), sends the end of ``segment`` downstream and returns its records:
        ``loss``/``accuracy``/``age``/``reuse`` per update, ``updates``, ``bytes_sent``, ``dropped``,
        ``fill`` (buffer occupancy at the end), ``busy_s`` and ``wall_s``."""
        import ray

        self.stop_event.clear()
        t0 = time.perf_counter()
        sent, outstanding, lost = 0, [], 0
        window = max(1, self.opt.queue_size)

        def send(item):
            nonlocal sent, lost
            host = _host(item)
            outstanding.append(self._deliver(segment, host))
            sent += self.program.item_bytes
            while len(outstanding) > window:  # back-pressure: at most `window` deliveries unacknowledged
                try:
                    ray.get(outstanding.pop(0))
                except ray.exceptions.RayActorError:
                    lost += 1  # the receiver died: it restarts from its checkpoint and refills its buffer

        def on_update(n, state, key):
            self.state, self.key, self.updates = state, key, base + n
            if self.opt.checkpoint_every and self.updates % self.opt.checkpoint_every == 0:
                self._checkpoint()

        base = self.updates
        todo = None if target is None else max(0, target - base)
        slowdown, slow_extra_s = self.opt.injected.stage(self.j)
        out = asy.stage_loop(
            self.j,
            self.program,
            self.state,
            self.buf,
            self.key,
            todo,
            device=self.device,
            batch=(lambda n: batches[(base + n - first) % len(batches)]) if self.j == 0 else None,
            inbox=_SegmentInbox(self.inbox, segment) if self.j > 0 else None,
            send=send if self.downstream is not None else None,
            lockstep=self.opt.lockstep,
            slowdown=slowdown,
            slow_extra_s=slow_extra_s,
            stop=self.stop_event,
            on_update=on_update,
        )
        self.state, self.buf, self.key, self.updates = out.state, out.buf, out.key, base + out.updates
        if self.downstream is not None:
            outstanding.append(self._deliver(segment, None))
            for ref in outstanding:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    lost += 1
        recs = jax.device_get(out.records)
        cols = [np.asarray([r[i] for r in recs], np.float64) for i in range(4)] if recs else [np.zeros(0)] * 4
        return {
            "stage": self.j,
            "updates": out.updates,
            "total_updates": self.updates,
            "loss": cols[0],
            "accuracy": cols[1],
            "age": cols[2],
            "reuse": cols[3],
            "bytes_sent": sent,
            "lost_deliveries": lost,
            "dropped": self.inbox.dropped,
            "fill": int(self.buf.size) if self.buf is not None else 0,
            "busy_s": out.busy_s,
            "wall_s": time.perf_counter() - t0,
        }


class _SegmentInbox:
    """The inbox as :func:`~dgl_jax.asynchronous.stage_loop` reads it during ``segment``: that segment's end
    marker becomes :data:`~dgl_jax.asynchronous.END`, the end markers of earlier segments are skipped."""

    def __init__(self, inbox: asy.Inbox, segment: int):
        self.inbox, self.segment = inbox, segment

    def _map(self, item):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0] == "end":
            return asy.END if item[1] >= self.segment else None
        return item

    def get_nowait(self):
        while True:
            item = self._map(self.inbox.get_nowait())
            if item is not None:
                return item

    def get(self):
        while True:
            item = self._map(self.inbox.get())
            if item is not None:
                return item


class Segment(NamedTuple):
    """One :meth:`RayExecutor.run`: final ``states`` (host arrays), per-stage ``records`` (the dicts
    :meth:`StageActor.run` returned; after a restart, those of the re-issued run), ``seconds`` (wall) and
    ``restarts`` (the restarts of this segment, as in the manifest)."""

    states: list[StageState]
    records: list[dict]
    seconds: float
    restarts: list[dict]


class RayExecutor:
    """``K`` :class:`StageActor` s, one per stage, connected in a chain; see the module docstring.

    ``stages``/``states``: the model (states on the driver); ``example``: one ``(x, targets)`` batch
    (arrays or ``ShapeDtypeStruct`` s); ``config``: buffer capacity, policy and reuse limit; ``directory``:
    where the actors' checkpoints and the manifest go (None: a temporary folder removed by :meth:`close`);
    ``address``: a Ray cluster to join (None: a local instance, or the already initialised Ray);
    ``max_restarts``: per actor. Bad input (Ray missing, an address that cannot be reached, more actors than
    the cluster's resources, actors that cannot start) raises a one-line ``ValueError``, after which nothing
    is left running."""

    def __init__(
        self,
        stages: Sequence[Stage],
        states: Sequence[StageState],
        example: tuple[PyTree, PyTree],
        config: asy.AsyncConfig,
        options: Options | None = None,
        *,
        directory: str | os.PathLike | None = None,
        address: str | None = None,
        key: jax.Array | None = None,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float | None = None,
        max_restarts: int = 3,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        k = len(stages)
        options = Options() if options is None else options
        if len(states) != k:
            raise ValueError(f"got {k} stages but {len(states)} states")
        options.injected.check(k)
        if options.queue_size < 1 or options.checkpoint_every < 0:
            raise ValueError(f"queue_size must be >= 1 and checkpoint_every >= 0, got {options}")
        self.k, self.options, self.config = k, options, config
        self._tmp = None if directory is not None else tempfile.mkdtemp(prefix="dgl_jax_ray_")
        self.directory = Path(directory if directory is not None else self._tmp).absolute()
        self.address = address
        self.actors: list = []
        for old in self.directory.glob("stage*"):  # an earlier executor's actor checkpoints
            shutil.rmtree(old, ignore_errors=True)
        self._started_ray = connect(address, k)
        self.segment = 0
        self.restarts: list[dict] = []
        self._states_ref: Any = None
        self._closed = False
        try:
            ray = import_ray()
            res = actor_resources(k, cpus_per_actor, gpus_per_actor)
            self.resources = res
            import ray.cloudpickle as cloudpickle

            blob = cloudpickle.dumps(list(stages))
            spec = tuple(jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in example)
            key = jax.random.key(0) if key is None else key
            remote = ray.remote(concurrency_groups={"link": 1})(StageActor).options(
                max_restarts=max_restarts,
                max_task_retries=0,
                max_concurrency=4,
                num_cpus=res["num_cpus"],
                num_gpus=res["num_gpus"],
            )
            specs = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), s) for s in states]
            items = [None] + asy.buffer_items(stages, states, *example)
            items = [
                None if it is None else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), it)
                for it in items
            ]
            actors = [None] * k
            for j in range(k):
                kd = np.asarray(jax.random.key_data(jax.random.fold_in(key, j)))
                args = (
                    j,
                    k,
                    blob,
                    config,
                    specs[j],
                    spec,
                    items[j],
                    kd,
                    str(self.directory),
                    options,
                )
                actors[j] = remote.remote(*args)
            self.actors = actors
            self._wait_started(start_timeout_s)
            ray.get([a.connect.remote(b) for a, b in zip(actors[:-1], actors[1:], strict=True)])
            self.set_states(states)
            self.infos = ray.get([a.info.remote() for a in self.actors])
            self.write_manifest("running")
        except BaseException:
            self.close()
            raise

    def _wait_started(self, timeout_s: float) -> None:
        ray = import_ray()
        refs = [a.info.remote() for a in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for r in ready:
            try:
                ray.get(r)
            except Exception as e:  # noqa: BLE001 - the actor's constructor failed: one line
                raise ValueError(f"--executor ray: a stage actor failed to start: {_first_line(e)}") from None
        if pending:
            raise ValueError(
                f"--executor ray: {len(pending)} of {self.k} stage actors did not start within {timeout_s:g} s "
                f"(cluster resources {ray.available_resources()}); logs: {_log_dir()}"
            )

    # -- driver side ------------------------------------------------------------------------------------
    def set_states(self, states: Sequence[StageState]) -> None:
        """Gives every actor its state (host copy) and checkpoints it there."""
        ray = import_ray()
        ray.get([a.set_state.remote(_host(s)) for a, s in zip(self.actors, states, strict=True)])
        self._states_ref = states

    def states(self) -> list[StageState]:
        """The actors' current states, as driver arrays."""
        ray = import_ray()
        got = ray.get([a.get_state.remote() for a in self.actors])
        return [jax.tree.map(jnp.asarray, s) for s, _, _ in got]

    def updates(self) -> list[int]:
        ray = import_ray()
        return [int(u) for _, _, u in ray.get([a.get_state.remote() for a in self.actors])]

    def run(
        self,
        batches: Sequence[tuple[Any, Any]],
        num_updates: int | Sequence[int],
        states: Sequence[StageState] | None = None,
        poll_s: float = 0.5,
    ) -> Segment:
        """One segment: stage j takes ``num_updates[j]`` more updates (stage 0 on ``batches``, host arrays,
        in order and cyclically); returns when every stage is done. ``states`` (when they are not what the
        last segment returned) are given to the actors first. A dead actor is waited for (Ray restarts it
        from its checkpoint) and its segment re-issued; an error inside an actor is re-raised as a one-line
        ``RuntimeError``."""
        ray = import_ray()
        n_up = asy.update_counts(num_updates, self.k)
        if states is not None and states is not self._states_ref:
            self.set_states(states)
        self.segment += 1
        seg = self.segment
        t0 = time.perf_counter()
        start = self.updates()
        target = [None if n is None else s + n for s, n in zip(start, n_up, strict=True)]
        host_batches = ray.put([(np.asarray(x), np.asarray(y)) for x, y in batches])
        restarts: list[dict] = []
        seen = list(start)

        def issue(j):
            return self.actors[j].run.remote(seg, target[j], host_batches if j == 0 else None, start[0])

        pending = {issue(j): j for j in range(self.k)}
        results: list[dict | None] = [None] * self.k
        # Restarted stages whose sender has not finished yet. The sender's end-of-segment delivery may have
        # been lost with the dead actor, so the driver sends the end itself once the sender is done (an end
        # the stage already has is harmless: later ones of a finished segment are skipped).
        needs_end: set[int] = set()
        last_poll = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            for ref in ready:
                j = pending.pop(ref)
                try:
                    results[j] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    event = self._restarted(j, seen[j], self.options.restart_timeout_s)
                    restarts.append(event)
                    pending[issue(j)] = j
                    if j > 0:
                        needs_end.add(j)
                except ray.exceptions.RayTaskError as e:
                    raise RuntimeError(f"stage {j} failed: {_first_line(e.cause or e)}") from None
            for j in sorted(needs_end):
                if results[j - 1] is not None:  # its sender is done: the end goes to the new inbox
                    self.actors[j].end_segment.remote(seg)
                    needs_end.discard(j)
            if time.monotonic() - last_poll > 1.0:  # how far each stage got (the manifest's record of a loss)
                last_poll = time.monotonic()
                for j in pending.values():
                    with contextlib.suppress(Exception):
                        seen[j] = max(seen[j], int(ray.get(self.actors[j].progress.remote(), timeout=poll_s)))
        seconds = time.perf_counter() - t0
        got = ray.get([a.get_state.remote() for a in self.actors])
        states_out = [jax.tree.map(jnp.asarray, s) for s, _, _ in got]
        self._states_ref = states_out  # passed back unchanged next time: not sent again
        self.write_manifest("running", last_segment={"segment": seg, "seconds": seconds, "target": target})
        return Segment(states_out, results, seconds, restarts)

    def _restarted(self, j: int, last_seen: int, timeout_s: float) -> dict:
        """Waits for Ray to restart actor ``j`` (``RuntimeError`` if it does not come back) and records it."""
        ray = import_ray()
        deadline = time.monotonic() + timeout_s
        while True:
            if self._closed:
                raise RuntimeError(f"the executor was closed while stage {j}'s actor was restarting")
            try:
                info = ray.get(self.actors[j].info.remote(), timeout=10)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"stage {j}'s actor died and was not restarted ({_first_line(e)}); logs: {_log_dir()}"
                    ) from None
                time.sleep(0.2)
        if j + 1 < self.k:
            ray.get(self.actors[j].connect.remote(self.actors[j + 1]))
        restored = (info.get("restored") or {}).get("updates", 0)
        event = {
            "stage": j,
            "segment": self.segment,
            "time": time.time(),
            "pid": info["pid"],
            "restored_updates": restored,
            "restored_from": (info.get("restored") or {}).get("checkpoint"),
            "last_seen_updates": last_seen,
        }
        self.restarts.append(event)
        self.infos[j] = info
        self.write_manifest("running")
        return event

    def write_manifest(self, status: str, **more: Any) -> None:
        """``<directory>/manifest.json``: status, address, options, the actors (stage, pid, node, device),
        their checkpoint folders and every restart so far."""
        write_json(
            self.directory / "manifest.json",
            {
                "status": status,
                "address": self.address or "local",
                "ray": import_ray().__version__,
                "stages": self.k,
                "options": self.options._asdict(),
                "buffer": {"capacity": self.config.capacity, "policy": self.config.policy},
                "resources_per_actor": getattr(self, "resources", None),
                "segments": self.segment,
                "actors": [
                    {**i, "checkpoints_dir": str(self.directory / f"stage{i['stage']}")}
                    for i in getattr(self, "infos", [])
                ],
                "restarts": self.restarts,
                **more,
            },
        )

    def close(self, status: str = "stopped") -> None:
        """Stops every loop, kills the actors, shuts down the Ray instance this executor started."""
        if self._closed:
            return
        self._closed = True
        try:
            ray = import_ray()
        except ValueError:
            return
        for a in self.actors:
            with contextlib.suppress(Exception):
                a.stop.remote()
        if self.actors and hasattr(self, "infos"):
            with contextlib.suppress(Exception):
                self.write_manifest(status)
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors = []
        if self._started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close("stopped" if exc[0] is None else "failed")


def _log_dir() -> str:
    with contextlib.suppress(Exception):
        import ray

        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    return "Ray's session folder"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
