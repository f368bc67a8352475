"""Evaluation over a whole split: padded batches (nothing dropped), every head and the ensemble, in one
compiled program (:func:`eval_all`) or one batch at a time (:func:`eval_batch`, for streamed splits)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax.stage import Stage, StageState
from dgl_jax.steps import EvalOutput, evaluate_batch


def pad_eval(x: np.ndarray, y: np.ndarray, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(xs [n, b, ...], ys [n, b], mask [n, b])``: the split in batches of ``b = min(batch, N)``, the last
    one zero-padded; ``mask`` is False on padding rows."""
    n = len(y)
    b = min(batch, n)
    pad = -n % b
    xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(-1, b, *x.shape[1:])
    ys = np.concatenate([y, np.zeros((pad,), y.dtype)]).reshape(-1, b)
    mask = (np.arange(n + pad) < n).reshape(-1, b)
    return jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(mask)


def eval_batch(stages: Sequence[Stage], states: Sequence[StageState], x, y, mask) -> EvalOutput:
    """:func:`~dgl_jax.steps.evaluate_batch` on one padded batch ``x: [b, ...]``, ``y: [b]``, ``mask: [b]``."""
    return evaluate_batch(stages, states, x, y, mask=mask)


def eval_all(stages: Sequence[Stage], states: Sequence[StageState], xs, ys, mask) -> EvalOutput:
    """Sums of :func:`eval_batch` over the padded batches ``xs: [n, b, ...]`` in one ``lax.scan``."""

    def one(total, batch):
        x, y, m = batch
        out = evaluate_batch(stages, states, x, y, mask=m)
        return jax.tree.map(jnp.add, total, out), None

    zero = jax.eval_shape(lambda: evaluate_batch(stages, states, xs[0], ys[0], mask=mask[0]))
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero)
    total, _ = jax.lax.scan(one, zero, (xs, ys, mask))
    return total
