"""Training steps (pure; jit them with the stages closed over) and one-pass evaluation.

* :func:`dgl_step`: synchronous DGL (Algorithm 1): every stage takes one local step on the batch; stage
  j+1 sees stage j's output computed with its pre-update weights, so this equals the pipelined version.
* :func:`backprop_step`: the baseline: the trunk trained end to end through the last head.
* :func:`sequential_step`: sequential greedy: stage j trains on features of the frozen stages below it
  (BatchNorm in eval mode); :func:`forward_features` computes (and lets a trainer cache) those features.
* :func:`evaluate_batch`: one pass through the trunk gives every head's predictions and their ensemble.

Typical use::

    step = jax.jit(functools.partial(dgl_step, stages), donate_argnums=0)
    states, metrics = step(states, images, labels)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgl_jax.objective import accuracy, cross_entropy, stage_apply, stage_loss
from dgl_jax.stage import Stage, StageState


class StepMetrics(NamedTuple):
    """Per-stage training metrics of one step: ``loss`` and ``accuracy``, each ``[K]`` float32.

    For :func:`backprop_step` only the last entry is meaningful (the others are NaN); for
    :func:`sequential_step` only the trained stage's entry is.
    """

    loss: jax.Array
    accuracy: jax.Array


def _apply_updates(stage: Stage, state: StageState, grads, batch_stats) -> StageState:
    updates, opt_state = stage.tx.update(grads, state.opt_state, state.params)
    return StageState(optax.apply_updates(state.params, updates), batch_stats, opt_state, state.step + 1)


def stage_step(
    stage: Stage, state: StageState, x: jax.Array, labels: jax.Array
) -> tuple[StageState, jax.Array, jax.Array, jax.Array]:
    """One local update of ``stage`` on input ``x`` (treated as a constant).

    Returns ``(new_state, features, loss, accuracy)``; ``features`` is the stage's output computed with its
    pre-update params in train mode (the message to the next stage).
    """
    grad_fn = jax.value_and_grad(stage_loss, argnums=1, has_aux=True)
    (loss, out), grads = grad_fn(stage, state.params, state.batch_stats, x, labels)
    new_state = _apply_updates(stage, state, grads, out.batch_stats)
    return new_state, jax.lax.stop_gradient(out.features), loss, accuracy(out.logits, labels)


def dgl_step(
    stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array, labels: jax.Array
) -> tuple[list[StageState], StepMetrics]:
    """Synchronous DGL: each stage takes one optimizer step on the batch ``x: [batch, H, W, C]``."""
    _check(stages, states)
    new_states, losses, accs = [], [], []
    for stage, state in zip(stages, states, strict=True):
        state, x, loss, acc = stage_step(stage, state, x, labels)
        new_states.append(state)
        losses.append(loss)
        accs.append(acc)
    return new_states, StepMetrics(jnp.stack(losses), jnp.stack(accs))


def backprop_step(
    stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array, labels: jax.Array
) -> tuple[list[StageState], StepMetrics]:
    """End-to-end backprop through all blocks and the last head; each stage's own optimizer applies its
    share of the gradient. ``stages`` must come from :func:`dgl_jax.stage.drop_aux_heads`."""
    _check(stages, states)
    if any(s.head is not None for s in stages[:-1]):
        raise ValueError("backprop_step trains the trunk and the last head only: pass drop_aux_heads(stages)")

    def loss_fn(params):
        h, new_stats = x, []
        for stage, p, st in zip(stages, params, states, strict=True):
            out = stage_apply(stage, p, st.batch_stats, h, train=True)
            h = out.features
            new_stats.append(out.batch_stats)
        return cross_entropy(out.logits, labels), (out.logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)([s.params for s in states])
    new_states = [
        _apply_updates(stage, st, g, bs) for stage, st, g, bs in zip(stages, states, grads, new_stats, strict=True)
    ]
    nan = jnp.full((len(stages) - 1,), jnp.nan, jnp.float32)
    metrics = StepMetrics(jnp.concatenate([nan, loss[None]]), jnp.concatenate([nan, accuracy(logits, labels)[None]]))
    return new_states, metrics


def forward_features(
    stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array, train: bool = False
) -> jax.Array:
    """Output of the blocks of ``stages`` on ``x`` (heads not run; BatchNorm in eval mode by default)."""
    for stage, state in zip(stages, states, strict=True):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        x = stage.module.apply(variables, x, train, method=stage.module.features, mutable=train and ["batch_stats"])
        x = x[0] if train else x
    return jax.lax.stop_gradient(x)


def sequential_step(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    stage_index: int,
    x: jax.Array,
    labels: jax.Array,
    *,
    features: bool = False,
) -> tuple[list[StageState], StepMetrics]:
    """Sequential greedy: one update of stage ``stage_index`` with stages below it frozen (eval-mode BN).

    ``x`` is the raw input, or with ``features=True`` the cached output of the frozen stages (see
    :func:`forward_features`), so frozen features need not be recomputed every epoch. ``stage_index`` must
    be static under ``jit``.
    """
    _check(stages, states)
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"stage_index {stage_index} out of range for {len(stages)} stages")
    if not features:
        x = forward_features(stages[:stage_index], states[:stage_index], x)
    new_state, _, loss, acc = stage_step(stages[stage_index], states[stage_index], x, labels)
    new_states = list(states)
    new_states[stage_index] = new_state
    k = len(stages)
    onehot = jnp.arange(k) == stage_index
    return new_states, StepMetrics(jnp.where(onehot, loss, jnp.nan), jnp.where(onehot, acc, jnp.nan))


def ensemble_weights(num_heads: int) -> jax.Array:
    """Default head weights of the ensemble: ``w_j = j + 1`` (deeper heads count more), normalised."""
    w = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
    return w / w.sum()


class EvalOutput(NamedTuple):
    """Correct-prediction counts on a batch: ``per_head`` ``[K]`` (NaN-free; 0 for a stage without head)
    and ``ensemble`` (scalar), plus the per-head summed ``loss`` ``[K]``."""

    per_head: jax.Array
    ensemble: jax.Array
    loss: jax.Array


def evaluate_batch(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    x: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    messages: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
) -> EvalOutput:
    """Counts correct predictions of every head in one pass through the trunk (BatchNorm in eval mode).

    The ensemble predicts ``argmax_c sum_j w_j softmax(logits_j)_c`` over the stages that have a head
    (``weights``: ``[K]``, default :func:`ensemble_weights`). ``mask``: ``[batch]`` bool, False for padding
    rows (a padded last batch): they count neither as correct nor in the loss. ``messages``: K-1 optional
    maps applied to stage j's output ``[batch, H, W, C]`` before stage j+1 reads it (e.g. VQ encode/decode,
    as a deployed quantized pipeline would); None: the float features.
    """
    _check(stages, states)
    k = len(stages)
    if messages is not None and len(messages) != k - 1:
        raise ValueError(f"need one message map (or None) per boundary: {k - 1}, got {len(messages)}")
    weights = ensemble_weights(k) if weights is None else jnp.asarray(weights, jnp.float32)
    correct, losses, probs = [], [], 0.0
    for j, (stage, state) in enumerate(zip(stages, states, strict=True)):
        out = stage_apply(stage, state.params, state.batch_stats, x, train=False)
        x = out.features
        if messages is not None and j < k - 1 and messages[j] is not None:
            x = messages[j](x)
        if out.logits is None:
            correct.append(jnp.zeros((), jnp.int32))
            losses.append(jnp.zeros((), jnp.float32))
            continue
        if mask is None:
            correct.append(jnp.sum(jnp.argmax(out.logits, -1) == labels))
            losses.append(cross_entropy(out.logits, labels) * labels.shape[0])
        else:
            correct.append(jnp.sum((jnp.argmax(out.logits, -1) == labels) & mask))
            per_example = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), labels)
            losses.append(jnp.sum(jnp.where(mask, per_example, 0.0)))
        probs = probs + weights[j] * jax.nn.softmax(out.logits)
    hits = jnp.argmax(probs, -1) == labels
    ensemble = jnp.sum(hits if mask is None else hits & mask)
    return EvalOutput(jnp.stack(correct), ensemble, jnp.stack(losses))


def _check(stages: Sequence[Stage], states: Sequence[StageState]) -> None:
    if len(stages) != len(states):
        raise ValueError(f"got {len(stages)} stages but {len(states)} states")
    if not stages:
        raise ValueError("need at least one stage")
