"""The wall-clock executors behind the trainer: ``--method async --executor threads|ray`` and the pipelined
synchronous ``--method dgl --executor ray``.

The trainer hands each chunk of steps to a :class:`WallclockChunks`: stage 0 trains on the chunk's batches
(the trainer's, in order), every other stage takes as many updates from its replay buffer, each stage at
its own speed (:func:`dgl_jax.asynchronous.stage_loop`), and the stages meet at the end of the chunk, where
the trainer logs, evaluates and checkpoints as for every method. ``threads`` runs them in one process with
:func:`~dgl_jax.asynchronous.run_threaded` (stage j on device ``j mod D`` of the run's devices, the replay
buffers carried from chunk to chunk); ``ray`` in one Ray actor per stage
(:class:`~dgl_jax.ray_executor.RayExecutor`: buffers stay in the actors, which checkpoint and come back).

Method options of ``async`` (``--method-option``): ``capacity``, ``policy``, ``max_reuse`` as in the
simulation; ``schedule=round_robin`` makes the stages lock-step (every wire consumed once, in order:
synchronous DGL, pipelined), any other schedule lets them run free; ``slow_stage``/``slowdown`` slow a stage
down by that factor (it sleeps ``slowdown - 1`` times each update's duration); ``link_delay_s`` adds that
latency to every link and ``link_bandwidth_bps`` (bit/s) emulates its bandwidth
(:func:`~dgl_jax.asynchronous.link_schedule`); ``queue_size`` bounds each link (back-pressure). ``delay``
(ticks of the simulation) must be 0. ``--method dgl --executor ray`` is lock-step with one-item buffers.

Per-stage metrics of each chunk (``metrics.jsonl``): ``loss``/``accuracy`` (means over the stage's updates),
``updates``, ``staleness`` (mean number of newer items in the buffer when the consumed one was read),
``reuse``, ``buffer_fill`` (items in the stage's buffer at the end), ``bytes_sent`` (``nbytes`` of the items
the stage shipped), ``dropped`` (items dropped on its full inbox) and ``updates_per_s`` (updates over the
seconds the stage's loop ran).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import asynchronous as asy

PyTree = Any
METRICS = ("updates", "staleness", "reuse", "buffer_fill", "bytes_sent", "dropped", "updates_per_s")


def is_wallclock(config: Any) -> bool:
    """Whether ``config`` (a ``TrainConfig``) runs on a wall-clock executor."""
    return config.executor == "ray" or (config.method == "async" and config.executor == "threads")


def settings(config: Any) -> tuple[asy.AsyncConfig, dict]:
    """The buffers' :class:`~dgl_jax.asynchronous.AsyncConfig` and the run options (``lockstep``,
    ``queue_size``, ``injected``: an :class:`~dgl_jax.asynchronous.Injected`) of ``config``; one-line
    ``ValueError``."""
    if config.method == "dgl":
        if config.method_options:
            raise ValueError(f"method 'dgl' takes no method options, got {sorted(config.method_options)}")
        return asy.AsyncConfig(capacity=1, policy="lifo"), {
            "lockstep": True,
            "queue_size": 4,
            "injected": asy.Injected(),
        }
    if config.method != "async":
        raise ValueError(f"--executor {config.executor} runs methods 'async' and 'dgl' (ray), not {config.method!r}")
    from dgl_jax.methods import async_options

    acfg, extra = async_options(config)
    o = extra
    if o["delay"]:
        raise ValueError(
            f"--executor {config.executor}: delay={o['delay']} counts ticks of the simulation; "
            "give the link latency in seconds: link_delay_s=SECONDS"
        )
    lockstep = o["schedule"] == "round_robin"
    if lockstep and o["slow_stage"] is not None and o["slowdown"] != 1.0:
        raise ValueError("round_robin (lock-step) cannot slow a stage; use schedule=paper or fixed")
    injected = asy.Injected(
        slow_stage=o["slow_stage"],
        slowdown=o["slowdown"] if o["slow_stage"] is not None else 1.0,
        link_delay_s=o["link_delay_s"],
        link_bandwidth_bps=o["link_bandwidth_bps"],
    )
    injected.check(1 << 30)  # its types and signs; the slow stage against the stage count: in WallclockChunks
    q = extra["queue_size"]
    if not (isinstance(q, int) and q >= 1):
        raise ValueError(f"queue_size {q!r} is not valid; expected an integer >= 1")
    return acfg, {"lockstep": lockstep, "queue_size": q, "injected": injected}


class WallclockChunks:
    """The trainer's chunk function for a wall-clock executor (see the module docstring): call it as the
    trainer calls its chunk functions; :meth:`start` builds the executor (for Ray: connects, checks the
    cluster's resources, starts the actors; one-line ``ValueError`` on bad input), :meth:`close` stops it."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        cfg = trainer.config
        self.config, self.run = settings(cfg)
        self.run["injected"].check(trainer.num_stages)
        self.kind = cfg.executor
        if cfg.ray_address:  # an unreachable cluster fails here, in seconds, before any work
            from dgl_jax.ray_executor import check_address

            check_address(cfg.ray_address)
        self.executor = None
        self._batch_fn = None

    def start(self, directory: str | Path | None = None) -> None:
        """Builds the executor (idempotent). ``directory``: the Ray actors' checkpoints and manifest."""
        if self.executor is not None:
            return
        t = self.trainer
        if self.kind == "threads":
            self.executor = _Threads(t.stages, self.config, self.run, t.layout.devices)
            return
        from dgl_jax.ray_executor import Options, RayExecutor

        x = t.example_batch
        y = jax.ShapeDtypeStruct((x.shape[0],), jnp.int32)
        opts = Options(
            lockstep=self.run["lockstep"],
            queue_size=self.run["queue_size"],
            checkpoint_every=t.config.ray_checkpoint_every,
            injected=self.run["injected"],
        )
        states = t.init_state().stages
        self.executor = RayExecutor(
            t.stages,
            states,
            (x, y),
            self.config,
            opts,
            directory=directory,
            address=t.config.ray_address,
            key=jax.random.fold_in(jax.random.key(t.config.seed), 4),
        )

    def close(self, status: str = "stopped") -> None:
        if self.executor is not None and hasattr(self.executor, "close"):
            self.executor.close(status)
        self.executor = None

    def __call__(self, states, extra, images, labels, perm, step_base, start):
        from dgl_jax.input_pipeline import batch_at

        t = self.trainer
        if self._batch_fn is None:
            b, spe, aug = t.config.batch_size, t.steps_per_epoch, t.augment
            self._batch_fn = jax.jit(lambda *a: batch_at(*a, b, spe, aug))
        steps = range(start, min(start + t.chunk_steps, t.steps_per_epoch))
        items = [self._batch_fn(images, labels, perm, step_base, jnp.int32(s)) for s in steps]
        batches = [(np.asarray(x), np.asarray(y)) for x, y, _ in items]
        self.start()
        if self.kind == "threads":
            new_states, records = self.executor.run(batches, len(batches), states, key=items[0][2])
        else:
            n = len(batches)
            todo = n if self.run["lockstep"] else [n] + [None] * (t.num_stages - 1)
            seg = self.executor.run(batches, todo, states)
            new_states, records = seg.states, seg.records
        n, k = len(batches), t.num_stages
        per_stage = {name: np.full(k, np.nan) for name in ("loss", "accuracy", *METRICS)}
        for j, r in enumerate(records):
            upd = int(r["updates"])
            for name, col in (("loss", "loss"), ("accuracy", "accuracy"), ("staleness", "age"), ("reuse", "reuse")):
                v = np.asarray(r[col], np.float64)
                per_stage[name][j] = float(np.nanmean(v)) if upd and np.isfinite(v).any() else np.nan
            per_stage["updates"][j] = upd
            per_stage["buffer_fill"][j] = r["fill"] if j else np.nan
            per_stage["bytes_sent"][j] = r["bytes_sent"]
            per_stage["dropped"][j] = r["dropped"] if j else np.nan
            per_stage["updates_per_s"][j] = upd / r["wall_s"] if r["wall_s"] > 0 else np.nan
        metrics = {name: jnp.asarray(np.broadcast_to(v, (n, k)), jnp.float32) for name, v in per_stage.items()}
        return new_states, extra, metrics


class _Threads:
    """:func:`~dgl_jax.asynchronous.run_threaded` chunk after chunk, the replay buffers carried over."""

    def __init__(self, stages, config: asy.AsyncConfig, run: dict, devices):
        self.stages, self.config, self.run_opts, self.devices = stages, config, run, list(devices)
        self.buffers = None

    def run(self, batches, num_updates, states, key=None):
        o = self.run_opts
        if not o["lockstep"]:  # stages j > 0: until the stage below is done and they have read everything
            num_updates = [num_updates] + [None] * (len(self.stages) - 1)
        res = asy.run_threaded(
            self.stages,
            states,
            batches,
            self.config,
            num_updates=num_updates,
            devices=self.devices,
            injected=o["injected"],
            lockstep=o["lockstep"],
            queue_size=o["queue_size"],
            buffers=self.buffers,
            key=key,
            timeout_s=None,
        )
        self.buffers = res.buffers
        k = len(self.stages)
        records = [
            {
                "updates": int(res.updates[j]),
                "loss": res.loss[j],
                "accuracy": res.accuracy[j],
                "age": res.age[j],
                "reuse": res.reuse[j],
                "fill": int(res.buffers[j].size) if j else 0,
                "bytes_sent": int(res.bytes_sent[j]),
                "dropped": int(res.dropped[j]),
                "wall_s": float(res.stage_s[j]),
            }
            for j in range(k)
        ]
        return list(jax.device_get(res.states)), records

    def close(self, status: str = "stopped") -> None:
        self.buffers = None
