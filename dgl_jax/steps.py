"""Training steps (pure; jit them with the stages closed over) and one-pass evaluation.

* :func:`stage_step`: one local update of one stage: the unit every executor composes (one device, SPMD,
  threads, asynchronous buffers). It reads a decoded input and returns the wire its codec sends on.
* :func:`dgl_step`: synchronous DGL (Algorithm 1): every stage takes one local step on the batch; stage
  j+1 sees stage j's output computed with its pre-update weights (through boundary j's codec), so this
  equals the pipelined version.
* :func:`backprop_step`: the baseline: the trunk trained end to end through the last head.
* :func:`sequential_step`: sequential greedy: stage j trains on features of the frozen stages below it
  (BatchNorm in eval mode); :func:`forward_features` computes (and lets a trainer cache) those features.
* :func:`evaluate_batch`: one pass through the trunk (and the codecs) gives every head's predictions and
  their ensemble.

Metrics are one type everywhere: a ``dict`` of arrays with at least ``loss`` and ``accuracy`` of shape
``[K]`` (NaN for a stage a step does not train, and ``accuracy`` NaN for a stage that is not a classifier).
Keys: ``key`` is the last argument; stage j of a step uses ``fold_in(key, j)`` (see
:mod:`dgl_jax.objective`). Typical use::

    step = jax.jit(functools.partial(dgl_step, stages), donate_argnums=0)
    states, metrics = step(states, images, labels, key)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgl_jax.losses import accuracy, cross_entropy, is_classification, per_example
from dgl_jax.objective import reads_wire, split_key, stage_apply, stage_key, stage_loss, wire_first, with_auto_axes
from dgl_jax.stage import Stage, StageState, decode_message, encode_message

PyTree = Any
Metrics = dict[str, jax.Array]


def apply_updates(stage: Stage, state: StageState, grads: PyTree, model_state: PyTree) -> StageState:
    """``state`` after one step of ``stage.tx`` on ``grads``, with the new ``model_state`` and ``step + 1``."""
    if stage.tx is None:
        raise ValueError("stage has no optimizer: build stages with with_optimizer(...) first")
    updates, opt_state = stage.tx.update(grads, state.opt_state, state.params)
    return state._replace(
        params=optax.apply_updates(state.params, updates),
        model_state=model_state,
        opt_state=opt_state,
        step=state.step + 1,
    )


def local_update(
    stage: Stage,
    state: StageState,
    x: PyTree,
    targets: PyTree,
    key: jax.Array | None = None,
    *,
    head_input: PyTree = None,
) -> tuple[StageState, PyTree, Metrics]:
    """One optimizer step of ``stage`` on its local loss for the decoded input ``x`` (a constant); the head
    reads ``head_input`` when given (:func:`dgl_jax.objective.stage_loss`).

    Returns ``(new_state, features, metrics)``: ``features`` is the stage's output computed with its
    pre-update params in train mode (before any codec); ``metrics``: scalar ``loss`` and ``accuracy``."""
    loss_fn = lambda p: stage_loss(stage, p, state.model_state, x, targets, True, key, head_input=head_input)  # noqa: E731
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = apply_updates(stage, state, grads, out.model_state)
    return new_state, jax.lax.stop_gradient(out.features), {"loss": loss, "accuracy": accuracy(out.output, targets)}


def stage_step(
    stage: Stage, state: StageState, x: PyTree, targets: PyTree, key: jax.Array | None = None
) -> tuple[StageState, PyTree, Metrics]:
    """One local update of ``stage`` on the decoded input ``x``, then its output encoded by its codec.

    Returns ``(new_state, wire, metrics)``: ``wire`` is what crosses to the next stage (the features
    themselves without a codec); ``state.codec`` is the codec's updated state. ``key`` is split into the
    layers' and the codec's keys (:func:`dgl_jax.objective.split_key`). A stage whose head reads its wire
    (``Stage.head_reads_wire``) encodes first and trains its head on the decoded wire
    (:func:`dgl_jax.objective.wire_first`)."""
    k_layers, k_codec = split_key(key)
    if reads_wire(stage):
        codec_state, wire, decoded = wire_first(stage, state.params, state.model_state, state.codec, x, key)
        new_state, _, metrics = local_update(stage, state, x, targets, k_layers, head_input=decoded)
        return new_state._replace(codec=codec_state), wire, metrics
    new_state, feats, metrics = local_update(stage, state, x, targets, k_layers)
    codec_state, wire = encode_message(stage, state.codec, feats, k_codec)
    return new_state._replace(codec=codec_state), wire, metrics


def stack_metrics(per_stage: Sequence[Metrics]) -> Metrics:
    """``[K]`` arrays from K per-stage metric dicts with the same keys."""
    return {name: jnp.stack([jnp.asarray(m[name], jnp.float32) for m in per_stage]) for name in per_stage[0]}


def dgl_step(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    x: PyTree,
    targets: PyTree,
    key: jax.Array | None = None,
) -> tuple[list[StageState], Metrics]:
    """Synchronous DGL: each stage takes one optimizer step on the batch ``x``; stage j+1 reads
    ``decode(wire_j)``. Stage j's key is ``fold_in(key, j)``. Returns ``(states, metrics)``."""
    _check(stages, states)
    new_states, metrics = [], []
    for j, (stage, state) in enumerate(zip(stages, states, strict=True)):
        state, wire, m = _named(j, stage_step, stage, state, x, targets, stage_key(key, j))
        new_states.append(state)
        metrics.append(m)
        x = decode_message(stage, wire)
    return new_states, stack_metrics(metrics)


def _named(j: int, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as e:
        if str(e).startswith("stage "):
            raise
        raise ValueError(f"stage {j}: {e}") from None


def backprop_step(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    x: PyTree,
    targets: PyTree,
    key: jax.Array | None = None,
) -> tuple[list[StageState], Metrics]:
    """End-to-end backprop through all blocks and the last head (its ``loss_fn``); each stage's own optimizer
    applies its share of the gradient. ``stages`` must come from :func:`dgl_jax.stage.drop_aux_heads`."""
    _check(stages, states)
    if any(s.head is not None for s in stages[:-1]):
        raise ValueError("backprop_step trains the trunk and the last head only: pass drop_aux_heads(stages)")

    def loss_fn(params):
        h, new_ms = x, []
        for j, (stage, p, st) in enumerate(zip(stages, params, states, strict=True)):
            out = stage_apply(stage, p, st.model_state, h, True, split_key(stage_key(key, j))[0])
            h = out.features
            new_ms.append(out.model_state)
        return stages[-1].loss_fn(out.output, targets), (out.output, new_ms)

    (loss, (output, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)([s.params for s in states])
    new_states = [
        apply_updates(stage, st, g, ms) for stage, st, g, ms in zip(stages, states, grads, new_ms, strict=True)
    ]
    nan = jnp.full((len(stages) - 1,), jnp.nan, jnp.float32)
    return new_states, {
        "loss": jnp.concatenate([nan, jnp.asarray(loss, jnp.float32)[None]]),
        "accuracy": jnp.concatenate([nan, accuracy(output, targets).astype(jnp.float32)[None]]),
    }


def forward_features(stages: Sequence[Stage], states: Sequence[StageState], x: PyTree, train: bool = False) -> PyTree:
    """Output of the blocks of ``stages`` on ``x`` (heads not run; BatchNorm in eval mode by default)."""
    for stage, state in zip(stages, states, strict=True):

        def block(x, params, model_state, stage=stage):
            variables = {"params": params, **model_state}
            mutable = list(model_state) if train else False
            out = stage.module.apply(variables, x, train, method=stage.module.features, mutable=mutable)
            return out[0] if mutable else out

        x = with_auto_axes(block, x, state.params, state.model_state)
    return jax.lax.stop_gradient(x)


def sequential_step(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    stage_index: int,
    x: PyTree,
    targets: PyTree,
    features: bool = False,
    key: jax.Array | None = None,
) -> tuple[list[StageState], Metrics]:
    """Sequential greedy: one update of stage ``stage_index`` with stages below it frozen (eval-mode BN).

    ``x`` is the raw input, or with ``features=True`` the cached output of the frozen stages (see
    :func:`forward_features`), so frozen features need not be recomputed every epoch. ``stage_index`` must
    be static under ``jit``. The trained stage's key is ``fold_in(key, stage_index)``.
    """
    _check(stages, states)
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"stage_index {stage_index} out of range for {len(stages)} stages")
    if not features:
        x = forward_features(stages[:stage_index], states[:stage_index], x)
    k_layers = split_key(stage_key(key, stage_index))[0]
    new_state, _, m = local_update(stages[stage_index], states[stage_index], x, targets, k_layers)
    new_states = list(states)
    new_states[stage_index] = new_state
    onehot = jnp.arange(len(stages)) == stage_index
    return new_states, {name: jnp.where(onehot, v.astype(jnp.float32), jnp.nan) for name, v in m.items()}


def ensemble_weights(num_heads: int) -> jax.Array:
    """Default head weights of the ensemble: ``w_j = j + 1`` (deeper heads count more), normalised."""
    w = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
    return w / w.sum()


class EvalOutput(NamedTuple):
    """Sums over a batch: ``per_head`` ``[K]`` correct predictions (0 for a stage without head or that is not
    a classifier), ``ensemble`` (scalar correct predictions of the weighted heads) and ``loss`` ``[K]``
    (summed per-example local losses)."""

    per_head: jax.Array
    ensemble: jax.Array
    loss: jax.Array


def evaluate_batch(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    x: PyTree,
    targets: PyTree,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> EvalOutput:
    """Scores every head in one pass through the trunk (eval mode, no randomness); each boundary's message
    goes through its codec (``decode(encode(.))`` with the sender's codec state, as a deployed pipeline
    would), and a head that reads its wire (``Stage.head_reads_wire``) scores the decoded message. The
    ensemble predicts ``argmax_c sum_j w_j softmax(output_j)_c`` over the classifier heads
    (``weights``: ``[K]``, default :func:`ensemble_weights`). ``mask``: ``[batch]`` bool, False for padding
    rows: they count neither as correct nor in the loss. Losses are ``loss_fn`` per example, summed."""
    _check(stages, states)
    k = len(stages)
    weights = ensemble_weights(k) if weights is None else jnp.asarray(weights, jnp.float32)
    correct, losses, probs = [], [], 0.0
    labels = targets if isinstance(targets, jax.Array) else None
    for j, (stage, state) in enumerate(zip(stages, states, strict=True)):
        out = stage_apply(stage, state.params, state.model_state, x, train=False)
        if j < k - 1:
            sent = decode_message(stage, encode_message(stage, state.codec, out.features)[1])
            if reads_wire(stage):  # its head was trained on what it sends: score it there
                out = stage_apply(stage, state.params, state.model_state, x, train=False, head_input=sent)
            x = sent
        if out.output is None:
            correct.append(jnp.zeros((), jnp.int32))
            losses.append(jnp.zeros((), jnp.float32))
            continue
        per_ex = per_example(stage.loss_fn, out.output, targets).astype(jnp.float32)
        losses.append(jnp.sum(per_ex if mask is None else jnp.where(mask, per_ex, 0.0)))
        if not is_classification(out.output, targets):
            correct.append(jnp.zeros((), jnp.int32))
            continue
        hits = jnp.argmax(out.output, -1) == labels
        correct.append(jnp.sum(hits if mask is None else hits & mask))
        probs = probs + weights[j] * jax.nn.softmax(out.output)
    if isinstance(probs, float):
        ensemble = jnp.zeros((), jnp.int32)
    else:
        hits = jnp.argmax(probs, -1) == labels
        ensemble = jnp.sum(hits if mask is None else hits & mask)
    return EvalOutput(jnp.stack(correct), ensemble, jnp.stack(losses))


def _check(stages: Sequence[Stage], states: Sequence[StageState]) -> None:
    if len(stages) != len(states):
        raise ValueError(f"got {len(stages)} stages but {len(states)} states")
    if not stages:
        raise ValueError("need at least one stage")


__all__ = [
    "EvalOutput",
    "Metrics",
    "backprop_step",
    "cross_entropy",
    "dgl_step",
    "ensemble_weights",
    "evaluate_batch",
    "forward_features",
    "local_update",
    "sequential_step",
    "stack_metrics",
    "stage_step",
]
