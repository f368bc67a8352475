"""``Stage`` (block + auxiliary head + optimizer) and its pure training state ``StageState``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class StageModule(nn.Module):
    """A block and its auxiliary head as one Flax module with params ``{'block': ..., 'head': ...}``.

    ``__call__(x, train)`` returns ``(features, logits)``; ``features(x, train)`` runs the block only.
    ``head`` may be ``None`` (a backprop trunk stage below the last one): logits are then ``None``.
    """

    block: nn.Module
    head: nn.Module | None

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
        h = self.block(x, train)
        return h, (None if self.head is None else self.head(h, train))

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        return self.block(x, train)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Static description of one DGL stage: ``block`` (trunk part), ``head`` (auxiliary classifier or
    ``None``), ``tx`` (its own optax optimizer) and ``schedule`` (its LR schedule, for logging).

    ``layers`` names the trunk units the block holds (for messages and reports).
    """

    block: nn.Module
    head: nn.Module | None
    tx: optax.GradientTransformation | None = None
    schedule: optax.Schedule | None = None
    layers: tuple[str, ...] = ()

    @property
    def module(self) -> StageModule:
        return StageModule(self.block, self.head)


class StageState(NamedTuple):
    """All mutable state of one stage: ``params``, BatchNorm ``batch_stats``, ``opt_state`` and ``step``."""

    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    step: jax.Array


def with_optimizer(
    stages: Sequence[Stage],
    make_tx: Callable[[int], tuple[optax.GradientTransformation, optax.Schedule | None]],
) -> list[Stage]:
    """Returns ``stages`` with ``tx``/``schedule`` set from ``make_tx(stage_index)`` (one optimizer per stage)."""
    out = []
    for j, s in enumerate(stages):
        tx, schedule = make_tx(j)
        out.append(dataclasses.replace(s, tx=tx, schedule=schedule))
    return out


def drop_aux_heads(stages: Sequence[Stage]) -> list[Stage]:
    """The backprop baseline's stages: the same trunk with only the last stage's head."""
    return [dataclasses.replace(s, head=None) for s in stages[:-1]] + [stages[-1]]


def init_stage_states(stages: Sequence[Stage], key: jax.Array, example: jax.Array) -> list[StageState]:
    """Initialises every stage on ``example: [batch, H, W, C]`` (its values are irrelevant, only its shape).

    Stage ``j`` is initialised on the output shape of stage ``j-1``; keys are split once per stage.
    """
    if not stages:
        raise ValueError("need at least one stage")
    states = []
    x = jnp.zeros(example.shape, example.dtype)
    for stage, k in zip(stages, jax.random.split(key, len(stages)), strict=True):
        if stage.tx is None:
            raise ValueError("stage has no optimizer: build stages with with_optimizer(...) first")
        module = stage.module
        variables = jax.jit(module.init, static_argnames="train")(k, x, train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        states.append(StageState(params, batch_stats, stage.tx.init(params), jnp.zeros((), jnp.int32)))
        x = jax.eval_shape(lambda v, x, m=module: m.apply(v, x, False, method=m.features), variables, x)
        x = jnp.zeros(x.shape, x.dtype)
    return states


def make_optimizer(
    name: str = "sgd",
    learning_rate: float = 0.1,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    steps_per_epoch: int = 1,
    decay_epochs: int | Sequence[int] | None = 15,
    decay_factor: float = 0.2,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The paper's recipes as optax transformations, returned with their LR schedule.

    ``sgd``: coupled weight decay (``add_decayed_weights`` before ``sgd``, like PyTorch) with momentum;
    ``adam``: Adam with the same coupled decay. The LR is multiplied by ``decay_factor`` every
    ``decay_epochs`` epochs (an int) or at each listed epoch (a sequence); ``None`` keeps it constant.
    The schedule counts optimizer steps, so momentum survives the LR drops (no optimizer re-creation).
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if decay_epochs is None:
        schedule = optax.constant_schedule(learning_rate)
    elif isinstance(decay_epochs, int):
        if decay_epochs < 1:
            raise ValueError(f"decay_epochs must be >= 1, got {decay_epochs}")
        schedule = optax.exponential_decay(learning_rate, decay_epochs * steps_per_epoch, decay_factor, staircase=True)
    else:
        schedule = optax.piecewise_constant_schedule(
            learning_rate, {int(e) * steps_per_epoch: decay_factor for e in decay_epochs}
        )
    if name == "sgd":
        opt = optax.sgd(schedule, momentum=momentum or None)
    elif name == "adam":
        opt = optax.adam(schedule)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected one of ('sgd', 'adam')")
    tx = optax.chain(optax.add_decayed_weights(weight_decay), opt) if weight_decay else opt
    return tx, schedule
