"""How a run uses its devices: data-parallel, stage-parallel, or both, decided and checked before any work.

* ``data``: every stage on every device; each batch is split over a ``'data'`` mesh axis and the states are
  replicated. Inside the jitted step XLA partitions the computation, so BatchNorm statistics and gradient
  means are taken over the global batch: the result is the one-device result up to float reassociation.
  Works for every method.
* ``stages``: stage groups (consecutive stages; one stage each by default) on separate devices, one group
  per position of a ``'stage'`` mesh axis, the wire of each boundary between groups (its codec's output)
  sent between them: ``spmd`` (one ``shard_map`` program,
  ``ppermute``; :class:`~dgl_jax.parallel.SpmdPipeline`) or ``threads`` (one program per stage, a thread
  each, ``device_put``; :class:`~dgl_jax.parallel.PipelinedDGL`). Synchronous DGL only: the pipeline gives
  exactly the updates of ``dgl_step``.
* ``stages+data``: ``stage_groups`` positions on the stage axis, the remaining devices data-parallel inside
  each group.

Many hosts: :func:`dgl_jax.distributed.initialize` joins the processes first; the layout then spans
``jax.devices()`` (every process's) and each process computes on its own devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PARALLEL = ("data", "stages", "stages+data")
EXECUTORS = ("spmd", "threads", "ray")
STAGE_PARALLEL_METHODS = ("dgl",)
WALLCLOCK_METHODS = {"threads": ("async",), "ray": ("async", "dgl")}  # dgl_jax.wallclock: stages apart


@dataclasses.dataclass(frozen=True)
class Layout:
    """The devices of a run: ``parallel`` mode, ``executor``, ``stage_groups`` S (1 for ``data``) and
    ``data`` D (devices per stage group), over ``devices`` (S * D of them)."""

    parallel: str
    executor: str
    stage_groups: int
    data: int
    devices: tuple[jax.Device, ...]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def stage_parallel(self) -> bool:
        return self.parallel != "data"

    def mesh(self) -> Mesh:
        """``('data',)`` for data parallelism, ``('stage', 'data')`` otherwise; Auto axes (XLA partitions)."""
        if not self.stage_parallel:
            return Mesh(np.array(self.devices), ("data",), axis_types=(AxisType.Auto,))
        grid = np.array(self.devices).reshape(self.stage_groups, self.data)
        return Mesh(grid, ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto))

    def stage_group(self, num_stages: int) -> list[int]:
        """The group of each of ``num_stages`` stages: contiguous ranges, as even as they can be (stage j in
        group ``j * S // K``; 3 stages in 2 groups: ``[0, 0, 1]``)."""
        return [j * self.stage_groups // num_stages for j in range(num_stages)]

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh(), P())

    def batch(self) -> NamedSharding:
        """A batch split over the data axis (for ``data``)."""
        return NamedSharding(self.mesh(), P("data"))

    def describe(self) -> str:
        if not self.stage_parallel:
            return f"{self.num_devices} device(s), data-parallel"
        return (
            f"{self.num_devices} devices: {self.stage_groups} stage groups x {self.data} data-parallel, "
            f"executor {self.executor}"
        )


def resolve_layout(
    parallel: str,
    devices: int | None,
    stage_groups: int | None,
    executor: str,
    *,
    num_stages: int,
    batch_size: int,
    method: str,
    available: Sequence[jax.Device] | None = None,
) -> Layout:
    """Checks the options against the model, the batch and the machine; ``ValueError`` with one line
    naming the bad value and what is accepted."""
    pool = list(jax.devices() if available is None else available)
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel {parallel!r} is not valid; expected one of {list(PARALLEL)}")
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r} is not valid; expected one of {list(EXECUTORS)}")
    n = len(pool) if devices is None else devices
    if not (isinstance(n, int) and 1 <= n <= len(pool)):
        raise ValueError(f"--devices {devices!r}: expected 1..{len(pool)} (the devices: {len(pool)})")
    if jax.process_count() > 1 and n != len(pool):
        raise ValueError(f"--devices {n}: a run over {jax.process_count()} processes uses all {len(pool)} devices")
    if executor == "ray" and method not in WALLCLOCK_METHODS["ray"]:
        raise ValueError(f"--executor ray runs methods {list(WALLCLOCK_METHODS['ray'])}, not {method!r}")
    if method in WALLCLOCK_METHODS.get(executor, ()) and (executor == "ray" or method == "async"):
        if parallel != "data" or stage_groups not in (None, 1):  # the stages' devices: dgl_jax.wallclock
            raise ValueError(f"--executor {executor} with --method {method} places the stages itself: no --parallel")
        return Layout("data", executor, 1, n, tuple(pool[:n]))
    if parallel == "data":
        if stage_groups not in (None, 1):
            raise ValueError(f"--stage-groups {stage_groups} needs --parallel stages or stages+data")
        s = 1
    else:
        if method not in STAGE_PARALLEL_METHODS:
            raise ValueError(
                f"--parallel {parallel} needs a decoupled method ({', '.join(STAGE_PARALLEL_METHODS)}), "
                f"not {method!r}: its stages cannot update apart"
            )
        s = num_stages if stage_groups is None else stage_groups
        if not (isinstance(s, int) and s >= 1):
            raise ValueError(f"--stage-groups {stage_groups!r}: expected an integer >= 1")
        if s > num_stages:
            raise ValueError(f"--stage-groups {s} is more than the {num_stages} stages")
        if s > n:
            raise ValueError(f"--stage-groups {s} is more than the {n} devices")
        if parallel == "stages" and n != s:
            raise ValueError(f"--parallel stages uses one device per stage group: --devices {s}, not {n}")
        if n % s:
            raise ValueError(f"--devices {n} is not a multiple of --stage-groups {s}")
        if executor == "threads" and jax.process_count() > 1:
            raise ValueError("--executor threads runs within one process; over many processes use --executor spmd")
    d = n // s
    if batch_size % d:
        raise ValueError(f"batch size {batch_size} is not divisible by the {d} data-parallel devices")
    return Layout(parallel, executor, s, d, tuple(pool[:n]))


def split_batch(step_fn: Callable[..., Any], sharding: NamedSharding) -> Callable[..., Any]:
    """``step_fn(states, extra, x, y, key)`` with the batch ``x``, ``y`` constrained to ``sharding`` (split
    over the data axis): XLA then partitions the step over the devices."""

    def step(states, extra, x, y, key):
        x, y = jax.lax.with_sharding_constraint((x, y), sharding)
        return step_fn(states, extra, x, y, key)

    return step
