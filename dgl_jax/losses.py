"""Local losses and metrics of a stage's head: ``loss_fn(head_output, targets) -> scalar``.

The default loss of every :class:`~dgl_jax.stage.Stage` is :func:`cross_entropy` on integer labels. Any
function of the same shape works: a regression loss (:func:`mse`), or a sum of terms (see
``examples/own_model.py``). Targets may be any pytree; the head output is whatever the head returns.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits: [batch, classes]`` against integer ``labels: [batch]``.

    A label outside ``[0, classes)`` makes the loss and its gradient NaN (never silently another class, as
    an index of ``-1`` would): the run then stops as diverged instead of learning from wrong labels. The
    check is one compare and a multiply, nothing on the host."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    return (losses * jnp.where(valid, 1.0, jnp.nan)).mean()


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error over every element of ``predictions`` and ``targets`` (same shape)."""
    return jnp.mean((predictions.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2)


def is_classification(output: Any, targets: Any) -> bool:
    """Whether ``accuracy`` is defined: ``output`` is ``[batch, classes]`` and ``targets`` integer ``[batch]``
    (decided from shapes and dtypes only, so it is static under ``jit``)."""
    return (
        isinstance(output, jax.Array | jax.ShapeDtypeStruct)
        and isinstance(targets, jax.Array | jax.ShapeDtypeStruct)
        and output.ndim == 2
        and targets.ndim == 1
        and jnp.issubdtype(targets.dtype, jnp.integer)
    )


def accuracy(output: Any, targets: Any) -> jax.Array:
    """Fraction of rows of ``output: [batch, classes]`` whose argmax equals ``targets: [batch]``; NaN (float32
    scalar) when the stage is not a classifier (see :func:`is_classification`)."""
    if output is None or not is_classification(output, targets):
        return jnp.full((), jnp.nan, jnp.float32)
    return jnp.mean(jnp.argmax(output, -1) == targets)


def per_example(loss_fn: Any, output: PyTree, targets: PyTree) -> jax.Array:
    """``[batch]`` losses: ``loss_fn`` applied to each example alone (a batch of one), for masked sums."""
    return jax.vmap(lambda o, t: loss_fn(jax.tree.map(lambda a: a[None], o), jax.tree.map(lambda a: a[None], t)))(
        output, targets
    )
