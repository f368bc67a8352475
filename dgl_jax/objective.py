"""The greedy objective as plain functions over parameters and inputs, usable from any JAX code.

``stage_loss`` is stage j's local loss ``CE(h_j(f_j(x)), y)`` with its input ``x`` treated as a constant;
``greedy_loss`` sums it over the stages with ``stop_gradient`` between them, so ``jax.grad(greedy_loss)``
is exactly the list of per-stage local gradients: no gradient crosses a stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgl_jax.stage import Stage

PyTree = Any


class StageOutput(NamedTuple):
    """What a stage's forward pass produces: ``features`` ``[batch, H, W, C]`` (the message to the next
    stage), ``logits`` ``[batch, classes]`` (float32) and the updated BatchNorm ``batch_stats``."""

    features: jax.Array
    logits: jax.Array | None
    batch_stats: PyTree


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits: [batch, classes]`` against integer ``labels: [batch]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def stage_apply(stage: Stage, params: PyTree, batch_stats: PyTree, x: jax.Array, train: bool = True) -> StageOutput:
    """Runs block and head of ``stage`` on ``x: [batch, H, W, C]``; BatchNorm in train mode when ``train``."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        (h, logits), new = stage.module.apply(variables, x, True, mutable=["batch_stats"])
        return StageOutput(h, logits, new.get("batch_stats", {}))
    h, logits = stage.module.apply(variables, x, False)
    return StageOutput(h, logits, batch_stats)


def stage_loss(
    stage: Stage, params: PyTree, batch_stats: PyTree, x: jax.Array, labels: jax.Array, train: bool = True
) -> tuple[jax.Array, StageOutput]:
    """Stage j's local loss ``CE(head(block(stop_gradient(x))), labels)`` and its :class:`StageOutput`.

    The returned ``features`` are computed with the given (pre-update) ``params``.
    """
    if stage.head is None:
        raise ValueError("stage_loss needs a stage with a head (this one was built by drop_aux_heads)")
    out = stage_apply(stage, params, batch_stats, jax.lax.stop_gradient(x), train)
    return cross_entropy(out.logits, labels), out


def greedy_loss(
    stages: Sequence[Stage],
    params: Sequence[PyTree],
    batch_stats: Sequence[PyTree],
    x: jax.Array,
    labels: jax.Array,
    train: bool = True,
) -> tuple[jax.Array, list[tuple[jax.Array, StageOutput]]]:
    """Sum of the K local losses on one batch, stage j+1 fed ``stop_gradient`` of stage j's features.

    Returns ``(total, [(loss_j, StageOutput_j) for each stage])``. The gradient of ``total`` w.r.t. stage
    j's params equals the gradient of ``loss_j`` alone.
    """
    if not len(stages) == len(params) == len(batch_stats):
        raise ValueError(
            f"got {len(stages)} stages, {len(params)} param trees and {len(batch_stats)} batch_stats trees"
        )
    total, per_stage = jnp.zeros((), jnp.float32), []
    for stage, p, bs in zip(stages, params, batch_stats, strict=True):
        loss, out = stage_loss(stage, p, bs, x, labels, train)
        total = total + loss
        per_stage.append((loss, out))
        x = out.features
    return total, per_stage


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows of ``logits: [batch, classes]`` whose argmax equals ``labels: [batch]``."""
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def message_specs(stages: Sequence[Stage], states: Sequence[Any], example: jax.Array) -> list[jax.ShapeDtypeStruct]:
    """Shapes and dtypes ``[batch, H, W, C]`` of the K-1 messages (outputs of stages ``0..K-2``) for inputs
    shaped like ``example: [batch, H, W, C]``; traced abstractly, nothing is computed."""
    specs, x = [], jax.ShapeDtypeStruct(example.shape, example.dtype)
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        x = jax.eval_shape(
            lambda p, b, x, stage=stage: stage_apply(stage, p, b, x, False).features, st.params, st.batch_stats, x
        )
        specs.append(x)
    return specs
