"""Many processes (hosts) in one run: joining them, the primary process, barriers, global arrays.

A run over P processes is one JAX program: every process runs the same trainer with the same states and
keys, its devices compute their share (the layout spans ``jax.devices()``, every process's), and the
collectives (gradient means, ``ppermute`` between stage groups) cross processes. Only process 0 (the
primary) writes the run folder's files; checkpoints are written by all of them together (orbax).

* :func:`check_process_flags`: the three flags ``--coordinator HOST:PORT --num-processes N --process-id I``
  together or not at all, checked before anything starts.
* :func:`detect_cluster`: the cluster environment JAX detects by itself (SLURM, Open MPI, Cloud TPU, ...)
  when it holds more than one process; ``jax.distributed.initialize()`` is called only then.
* :func:`initialize`: ``jax.distributed.initialize`` bounded by a timeout: a coordinator that never answers
  (or processes that never come) ends the process with one line and exit code 2 instead of JAX's abort.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

PyTree = Any
INIT_TIMEOUT_S = 50.0  # joining the processes: a coordinator that does not answer is reported before 60 s


def check_process_flags(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str, int, int] | None:
    """``(host:port, N, I)`` when the three are given and make sense, ``None`` when none is given;
    ``ValueError`` (one line) otherwise."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: a run over many processes needs {', '.join(given)}")
    host, sep, port = coordinator.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
    if num_processes < 1:
        raise ValueError(f"--num-processes {num_processes}: expected an integer >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id {process_id}: expected 0..{num_processes - 1} (--num-processes {num_processes})"
        )
    return coordinator, num_processes, process_id


def detect_cluster() -> str | None:
    """The name of the cluster environment JAX's ``jax.distributed.initialize()`` would use when it holds
    more than one process (e.g. a SLURM job of several tasks, a multi-host Cloud TPU slice), else ``None``."""
    try:
        from jax._src import clusters
    except ImportError:
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if env.is_env_present() and (env.get_process_count() or 1) > 1:
                    return getattr(env, "name", "") or env.__name__
        except Exception:  # noqa: BLE001 - an environment JAX cannot read is not one we join
            continue
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = INIT_TIMEOUT_S,
    on_timeout: Callable[[str], None] | None = None,
) -> None:
    """Joins the processes with ``jax.distributed.initialize`` (arguments ``None``: from the cluster's
    environment). If they are not joined within ``timeout_s`` seconds, ``on_timeout(line)`` is called
    (default: the line on stderr) and the process ends with exit code 2: JAX's own failure aborts the
    process with a stack trace. A coordinator port that process 0 cannot open is a ``ValueError``."""
    if process_id == 0 and coordinator is not None:
        port = int(coordinator.rpartition(":")[2])
        with socket.socket() as s:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
            except OSError as e:
                raise ValueError(
                    f"--coordinator {coordinator}: process 0 cannot open port {port}: {e.strerror}"
                ) from None
    where = f"--coordinator {coordinator}" if coordinator else "the cluster's coordinator"
    line = (
        f"error: {where}: the {num_processes or 'cluster'} processes did not join within {timeout_s:g} s "
        "(coordinator unreachable, or a process did not start)"
    )
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout_s):
            (on_timeout or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
            os._exit(2)

    threading.Thread(target=watchdog, name="distributed-init-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s) + 30,  # JAX's own timeout aborts: the watchdog comes first
        )
    finally:
        joined.set()


def is_primary() -> bool:
    """True in process 0 (the one that writes the run folder's files)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(value: int) -> int:
    """Process 0's integer ``value`` in every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def place(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """``tree`` laid out on ``sharding``. Across processes (a sharding spanning other processes' devices)
    every process passes the same values and fills its own devices from the host copy."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(a):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree)


def local_rows(sharding: NamedSharding, batch: int) -> slice:
    """The rows of a global ``[batch, ...]`` array laid out on ``sharding`` that this process's devices hold
    (its share of the batch: consecutive rows); every row with one process."""
    spans = [idx[0] for idx in sharding.addressable_devices_indices_map((batch,)).values()]
    start = min(s.start or 0 for s in spans)
    stop = max(batch if s.stop is None else s.stop for s in spans)
    return slice(start, stop)


def from_process_rows(sharding: NamedSharding, local: np.ndarray, batch: int) -> jax.Array:
    """The global ``[batch, ...]`` array laid out on ``sharding`` (batch split over its data axis) whose rows
    :func:`local_rows` are ``local`` in this process: ``jax.make_array_from_process_local_data``."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (batch, *np.shape(local)[1:]))


_agreements = 0


def agree(name: str, error: str | None, timeout_s: float = 600.0) -> str | None:
    """A meeting point of every process after a step that only process 0 does (preparing the run folder,
    committing a checkpoint): process 0 publishes ``error`` (``None``: it went well) and the others wait for
    it; returns process 0's error in the other processes, ``error`` itself in process 0 (and with one process)."""
    global _agreements
    if jax.process_count() == 1:
        return error
    from jax._src.distributed import global_state

    _agreements += 1
    key = f"dgl_jax/{name}/{_agreements}"
    if is_primary():
        global_state.client.key_value_set(key, "ok" if error is None else "error: " + error)
        return error
    value = global_state.client.blocking_key_value_get(key, int(timeout_s * 1000))
    return None if value == "ok" else value.removeprefix("error: ")
