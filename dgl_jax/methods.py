"""The method registry: how the trainer builds and takes one step of each training method.

A :class:`Method` is a set of pure hooks; the trainer jits what they return. The algorithms
(:mod:`dgl_jax.steps`, :mod:`dgl_jax.asynchronous`, :mod:`dgl_jax.dni`) know nothing of the trainer; this
module adapts them to it, and the trainer knows nothing of the algorithms. Register your own method with
:func:`register_method` (then ``--method NAME`` and ``TrainConfig(method=NAME)`` use it; from a shell, put
the call in a module and pass ``--import MODULE``).

Built-in: ``dgl``, ``backprop``, ``sequential``, ``async``, ``dni``, ``cdni``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import asynchronous as asy
from dgl_jax import dni
from dgl_jax.accounting import buffer_memory
from dgl_jax.stage import Stage, StageState, drop_aux_heads, message_specs
from dgl_jax.steps import backprop_step, dgl_step, forward_features, sequential_step

PyTree = Any
StepFn = Callable[[list[StageState], PyTree, PyTree, PyTree, jax.Array], tuple[list[StageState], PyTree, dict]]


def _no_extra(stages, states, config, key, example):
    return {}


def _one_phase(num_stages: int, config: Any) -> int:
    return 1


def _no_options(config: Any) -> None:
    if config.method_options:
        raise ValueError(f"method {config.method!r} takes no method options, got {sorted(config.method_options)}")


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method as a set of hooks (all pure; the trainer jits what they return).

    * ``make_step(stages, config, phase, features) -> step``; ``step(states, extra, x, targets, key) ->
      (states, extra, metrics)`` takes one optimizer step on a batch (``features`` is True when ``x`` holds
      the phase's cached inputs from ``phase_inputs`` instead of images); ``metrics`` is a dict of arrays,
      at least ``loss`` and ``accuracy`` of shape ``[K]`` (NaN for stages not trained by this step). Any
      other ``[K]`` or scalar entry is logged as well.
    * ``prepare_stages(stages, config)``: e.g. drop the auxiliary heads for backprop.
    * ``init_extra(stages, states, config, key, example)``: method state carried between steps and saved in
      checkpoints (replay buffers, synthesizers, ...); ``{}`` by default. ``example`` is one training batch
      (``ShapeDtypeStruct`` s).
    * ``num_phases(K, config)``: the schedule has ``num_phases * epochs`` epochs (sequential greedy: K).
    * ``phase_inputs(trainer, states, phase)``: an array replacing the training images during ``phase`` (the
      frozen features of sequential greedy), or ``None``.
    * ``validate(config)``: raise ``ValueError`` for bad ``method_options``.
    * ``codecs``: whether the method sends messages through the stages' boundary codecs (``--codec``).
    """

    name: str
    description: str
    make_step: Callable[[Sequence[Stage], Any, int, bool], StepFn]
    prepare_stages: Callable[[list[Stage], Any], list[Stage]] = lambda stages, config: stages
    init_extra: Callable[..., PyTree] = _no_extra
    num_phases: Callable[[int, Any], int] = _one_phase
    phase_inputs: Callable[[Any, list[StageState], int], jax.Array | None] | None = None
    validate: Callable[[Any], None] = _no_options
    codecs: bool = False


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` to :data:`METHODS`; a name registered twice raises ``ValueError`` (unless
    ``replace``)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a dgl_jax.methods.Method, got {type(method).__name__}")
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to override it")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the registered ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not valid; expected one of {sorted(METHODS)}")
    return METHODS[name]


# ----------------------------------------------------------------------------------------------------------
# dgl, backprop, sequential
# ----------------------------------------------------------------------------------------------------------
def _wrap(step_fn: Callable[..., tuple[list[StageState], dict]]) -> StepFn:
    def step(states, extra, x, y, key):
        states, metrics = step_fn(states, x, y, key)
        return states, extra, metrics

    return step


def _sequential_make_step(stages, config, phase, features):
    def step(states, extra, x, y, key):
        states, m = sequential_step(stages, states, phase, x, y, features, key)
        return states, extra, m

    return step


def _sequential_phase_inputs(trainer: Any, states: list[StageState], phase: int) -> jax.Array | None:
    config = trainer.config
    if phase == 0 or config.augment or config.feature_cache_mb <= 0:
        return None
    shape = jax.eval_shape(
        lambda x: forward_features(trainer.stages[:phase], states[:phase], x), trainer.train_images[:1]
    ).shape
    nbytes = trainer.num_train * int(np.prod(shape[1:])) * 4
    if nbytes > config.feature_cache_mb * 2**20:
        trainer.log(
            f"sequential phase {phase}: frozen features need {nbytes / 2**20:.0f} MiB > feature_cache_mb="
            f"{config.feature_cache_mb:g}; recomputing them every step instead"
        )
        return None
    return trainer.frozen_features(states, phase)


register_method(
    Method(
        "dgl",
        "synchronous decoupled greedy learning (Algorithm 1)",
        lambda stages, config, phase, features: _wrap(lambda s, x, y, k: dgl_step(stages, s, x, y, k)),
        codecs=True,
    )
)
register_method(
    Method(
        "backprop",
        "end-to-end backprop through the trunk and the last head (aux heads dropped)",
        lambda stages, config, phase, features: _wrap(lambda s, x, y, k: backprop_step(stages, s, x, y, k)),
        prepare_stages=lambda stages, config: drop_aux_heads(stages),
    )
)
register_method(
    Method(
        "sequential",
        "sequential greedy: stage j trains for `epochs` on the frozen stages below it",
        _sequential_make_step,
        num_phases=lambda k, config: k,
        phase_inputs=_sequential_phase_inputs,
    )
)


# ----------------------------------------------------------------------------------------------------------
# async
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
    # wall-clock executors only (--executor threads|ray; dgl_jax.wallclock): link latency, emulated link
    # bandwidth (bit/s, None: infinite), link capacity (items)
    "link_delay_s": 0.0,
    "link_bandwidth_bps": None,
    "queue_size": 4,
}


def async_options(config: Any) -> tuple[asy.AsyncConfig, dict[str, Any]]:
    """The :class:`~dgl_jax.asynchronous.AsyncConfig` and the full option dict of ``config.method_options``."""
    unknown = sorted(set(config.method_options) - set(ASYNC_OPTIONS))
    if unknown:
        raise ValueError(f"unknown async options {unknown}; expected some of {sorted(ASYNC_OPTIONS)}")
    o = {**ASYNC_OPTIONS, **config.method_options}
    acfg = asy.AsyncConfig(o["capacity"], o["policy"], o["max_reuse"], o["delay"], o["warmup_rounds"])
    asy._check_slowdown(o["slowdown"])
    if o["schedule"] not in asy.SCHEDULES:
        raise ValueError(f"unknown schedule {o['schedule']!r}; expected one of {asy.SCHEDULES}")
    return acfg, o


def _async_state_extra(st: asy.AsyncState) -> dict[str, Any]:
    return {"buffers": st.buffers, "lines": st.lines, "tick": st.tick, "consumed": st.consumed}


def _async_init_extra(stages, states, config, key, example):
    acfg, o = async_options(config)
    asy.make_schedule(o["schedule"], len(stages), o["slow_stage"], o["slowdown"])  # a bad slow stage fails here
    targets = jax.ShapeDtypeStruct((example.shape[0],), jnp.int32)
    return _async_state_extra(asy.init_async(stages, states, example, targets, acfg, key))


def _async_make_step(stages, config, phase, features):
    acfg, o = async_options(config)
    k = len(stages)
    schedule = asy.make_schedule(o["schedule"], k, o["slow_stage"], o["slowdown"])

    def step(states, extra, x, y, key):
        st = asy.AsyncState(states, extra["buffers"], extra["tick"], extra["consumed"], key, extra["lines"])
        st, rec = asy.async_ticks(stages, acfg, lambda n: (x, y), st, schedule, k)
        upd = rec.updated
        n = upd.sum(0)

        def mean(v):
            return jnp.where(n > 0, jnp.where(upd, v, 0).sum(0) / jnp.maximum(n, 1), jnp.nan)

        mem = buffer_memory(stages, st.buffers)  # static: from shapes
        stored = np.array([0] + [m["stored_bytes"] for m in mem]) / 2**20
        fp32 = np.array([0] + [m["float32_bytes"] for m in mem]) / 2**20
        metrics = {
            "loss": jnp.nanmean(rec.loss, 0),
            "accuracy": jnp.nanmean(rec.accuracy, 0),
            "updates": n.astype(jnp.float32),
            "staleness": mean(rec.staleness.astype(jnp.float32)),
            "reuse": mean(rec.reuse.astype(jnp.float32)),
            "buffer_mib": jnp.asarray(stored, jnp.float32),
            "buffer_mib_fp32": jnp.asarray(fp32, jnp.float32),
        }
        return st.states, _async_state_extra(st), metrics

    return step


register_method(
    Method(
        "async",
        "asynchronous DGL: stages read replay buffers of wires, one schedule tick per stage update (Algorithm 2)",
        _async_make_step,
        init_extra=_async_init_extra,
        validate=lambda config: async_options(config) and None,
        codecs=True,
    )
)


# ----------------------------------------------------------------------------------------------------------
# dni, cdni
# ----------------------------------------------------------------------------------------------------------
def _dni_method(name: str, conditional: bool, text: str) -> Method:
    def init_extra(stages, states, config, key, example):
        synths = dni._synths_for(stages, config, conditional)
        return {"synth": dni.init_synthesizers(synths, key, message_specs(stages, states, example))}

    def make_step(stages, config, phase, features):
        synths = dni._synths_for(stages, config, conditional)

        def step(states, extra, x, y, key):
            states, synth, m = dni.dni_step(stages, synths, states, extra["synth"], x, y)
            return states, {"synth": synth}, m

        return step

    return Method(
        name,
        text,
        make_step,
        prepare_stages=lambda stages, config: drop_aux_heads(stages),
        init_extra=init_extra,
        validate=dni._validate,
    )


register_method(
    _dni_method("dni", False, "decoupled neural interfaces: blocks update from synthetic gradients (Jaderberg et al.)")
)
register_method(_dni_method("cdni", True, "DNI with label-conditioned synthesizers"))
