"""The greedy objective as plain functions over parameters and inputs, usable from any JAX code.

``stage_loss`` is stage j's local loss ``loss_fn_j(h_j(f_j(x)), targets)`` with its input ``x`` treated as
a constant; ``greedy_loss`` sums it over the stages with ``stop_gradient`` between them (and each
boundary's codec: stage j+1 reads ``decode(encode(x_j))``), so ``jax.grad(greedy_loss)`` is exactly the
list of per-stage local gradients: no gradient crosses a stage.

Randomness: ``key`` (last argument; ``None``: deterministic) reaches the stochastic layers of every stage;
stage j uses ``fold_in(key, j)``, split as ``fold_in(., 0)`` for its layers and ``fold_in(., 1)`` for its
codec, the same derivation as :func:`dgl_jax.steps.dgl_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dgl_jax.losses import accuracy, cross_entropy
from dgl_jax.stage import Stage, decode_message, encode_message, message_specs

PyTree = Any
__all__ = [
    "StageOutput",
    "accuracy",
    "cross_entropy",
    "greedy_loss",
    "message_specs",
    "reads_wire",
    "stage_apply",
    "stage_loss",
    "wire_first",
]


class StageOutput(NamedTuple):
    """What a stage's forward pass produces: ``features`` (the message to the next stage, any pytree),
    ``output`` (what the head returns, e.g. logits ``[batch, classes]``; ``None`` without head) and the
    updated ``model_state`` (every mutable collection)."""

    features: PyTree
    output: PyTree
    model_state: PyTree


def split_key(key: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """``(layers key, codec key)`` of one stage's step: ``fold_in(key, 0)`` and ``fold_in(key, 1)``."""
    if key is None:
        return None, None
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def stage_key(key: jax.Array | None, j: int) -> jax.Array | None:
    """Stage ``j``'s key of a multi-stage step: ``fold_in(key, j)``."""
    return None if key is None else jax.random.fold_in(key, j)


def with_auto_axes(fn: Any, x: PyTree, *args: Any) -> Any:
    """``fn(x, *args)``, with the current mesh's Explicit axes made automatic inside (``jax.sharding.auto_axes``)
    so the zoo's reshapes need no sharding annotations. Outputs whose leading axis is the batch keep ``x``'s
    batch sharding; the others (statistics, parameters) come out replicated. Without an Explicit mesh: ``fn``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
        return fn(x, *args)
    leaf = jax.tree.leaves(x)[0]
    batch, batch_axes = leaf.shape[0], jax.typeof(leaf).sharding.spec[0] if leaf.ndim else None
    plain = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), t)  # noqa: E731
    shapes = jax.eval_shape(fn, plain(x), *plain(args))
    spec = lambda a: P(batch_axes, *([None] * (a.ndim - 1))) if a.ndim and a.shape[0] == batch else P()  # noqa: E731
    return jax.sharding.auto_axes(fn, out_sharding=jax.tree.map(spec, shapes))(x, *args)


def stage_apply(
    stage: Stage,
    params: PyTree,
    model_state: PyTree,
    x: PyTree,
    train: bool = True,
    key: jax.Array | None = None,
    *,
    head_input: PyTree = None,
) -> StageOutput:
    """Runs block and head of ``stage`` on ``x``; in train mode every mutable collection of ``model_state``
    is updated (BatchNorm statistics, ...). ``key`` feeds the stage's RNG streams (dropout, ...). With
    ``head_input`` the head reads that value instead of the block's output, with a straight-through gradient
    (:class:`dgl_jax.stage.StageModule`). Works on batches sharded over Auto and Explicit mesh axes
    (:func:`with_auto_axes`)."""
    mutable = list(model_state) if train else False
    rngs = stage.rngs(key)

    def run(x, params, model_state, head_input):
        variables = {"params": params, **model_state}
        if mutable:
            (h, out), new = stage.module.apply(variables, x, True, head_input, rngs=rngs, mutable=mutable)
            return h, out, dict(new)
        h, out = stage.module.apply(variables, x, train, head_input, rngs=rngs)
        return h, out, model_state

    try:
        return StageOutput(*with_auto_axes(run, x, params, model_state, head_input))
    except flax.errors.InvalidRngError as e:
        raise ValueError(
            f"stage {stage.layers or type(stage.block).__name__} draws random numbers ({str(e).splitlines()[0][:80]}"
            "...): pass key=... to the step or loss"
        ) from None


def stage_loss(
    stage: Stage,
    params: PyTree,
    model_state: PyTree,
    x: PyTree,
    targets: PyTree,
    train: bool = True,
    key: jax.Array | None = None,
    *,
    head_input: PyTree = None,
) -> tuple[jax.Array, StageOutput]:
    """Stage j's local loss ``stage.loss_fn(head(block(stop_gradient(x))), targets)`` and its
    :class:`StageOutput`. The returned ``features`` are computed with the given (pre-update) ``params``.
    ``head_input``: what the head reads instead of the block's output (straight-through, see
    :func:`stage_apply`; :func:`wire_first` computes it for a stage whose head reads its wire).
    Raises ``ValueError`` when ``loss_fn`` does not return a scalar."""
    if stage.head is None:
        raise ValueError("stage_loss needs a stage with a head (this one was built by drop_aux_heads)")
    out = stage_apply(stage, params, model_state, jax.lax.stop_gradient(x), train, key, head_input=head_input)
    loss = stage.loss_fn(out.output, targets)
    if jnp.shape(loss) != ():
        name = getattr(stage.loss_fn, "__name__", repr(stage.loss_fn))
        raise ValueError(f"loss_fn {name} returned shape {tuple(jnp.shape(loss))}; a stage's loss must be a scalar")
    return loss, out


def reads_wire(stage: Stage) -> bool:
    """Whether ``stage``'s head trains on its decoded wire (``head_reads_wire`` and a codec on its output)."""
    return stage.head_reads_wire and stage.codec is not None


def wire_first(
    stage: Stage,
    params: PyTree,
    model_state: PyTree,
    codec_state: PyTree,
    x: PyTree,
    key: jax.Array | None = None,
) -> tuple[PyTree, PyTree, PyTree]:
    """For a stage whose head reads its wire (:func:`reads_wire`): its features on ``x`` (train mode, the given
    pre-update ``params``; the updated statistics are dropped), encoded by its codec. Returns ``(new codec
    state, wire, decoded)``; ``decoded`` is the ``head_input`` of :func:`stage_loss`. ``key`` is the stage's
    key, split as a step splits it (:func:`split_key`)."""
    k_layers, k_codec = split_key(key)
    feats = stage_apply(stage, params, model_state, jax.lax.stop_gradient(x), True, k_layers).features
    codec_state, wire = encode_message(stage, codec_state, jax.lax.stop_gradient(feats), k_codec)
    return codec_state, wire, decode_message(stage, wire)


class GreedyOutput(NamedTuple):
    """One stage's share of :func:`greedy_loss`: its ``loss``, :class:`StageOutput`, the ``wire`` it sent
    (its codec's encoding of the features; ``None`` for the last stage) and its new ``codec_state``."""

    loss: jax.Array
    out: StageOutput
    wire: PyTree
    codec_state: PyTree


def greedy_loss(
    stages: Sequence[Stage],
    params: Sequence[PyTree],
    model_states: Sequence[PyTree],
    x: PyTree,
    targets: PyTree,
    train: bool = True,
    codec_states: Sequence[PyTree] | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, list[GreedyOutput]]:
    """Sum of the K local losses on one batch; stage j+1 reads ``decode(encode(stop_gradient(x_j)))``
    through boundary j's codec (``codec_states``: one per stage, e.g. ``[s.codec for s in states]``;
    ``None``: the stages' codecs are not used). Returns ``(total, [GreedyOutput for each stage])``. The
    gradient of ``total`` w.r.t. stage j's params equals the gradient of ``loss_j`` alone. Carry
    ``out.model_state`` (BatchNorm statistics) and ``codec_state`` into the next call."""
    k = len(stages)
    if not k == len(params) == len(model_states):
        raise ValueError(f"got {k} stages, {len(params)} param trees and {len(model_states)} model states")
    if codec_states is not None and len(codec_states) != k:
        raise ValueError(f"got {len(codec_states)} codec states for {k} stages")
    total, per_stage = jnp.zeros((), jnp.float32), []
    for j, (stage, p, ms) in enumerate(zip(stages, params, model_states, strict=True)):
        k_layers, k_codec = split_key(stage_key(key, j))
        wire, cs, head_input = None, None if codec_states is None else codec_states[j], None
        early = codec_states is not None and j < k - 1 and reads_wire(stage)
        if early:  # the head reads the decoded wire: encode first
            cs, wire, head_input = wire_first(stage, p, ms, cs, x, stage_key(key, j))
        try:
            loss, out = stage_loss(stage, p, ms, x, targets, train, k_layers, head_input=head_input)
        except ValueError as e:
            raise ValueError(f"stage {j}: {e}") from None
        total = total + loss
        if j < k - 1:
            feats = jax.lax.stop_gradient(out.features)
            if codec_states is None:
                wire, x = feats, feats
            elif early:
                x = head_input
            else:
                cs, wire = encode_message(stage, cs, feats, k_codec)
                x = decode_message(stage, wire)
        per_stage.append(GreedyOutput(loss, out, wire, cs))
    return total, per_stage
