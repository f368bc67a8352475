"""The stage contract: ``Stage`` (block + head + local loss + optimizer + output codec) and ``StageState``.

A stage is the unit every path of the library shares (one device, SPMD, threads, asynchronous buffers):

* **Parts.** ``block`` and ``head`` are any ``flax.linen`` modules, called as
  ``module(x, train=...)``; ``head`` may be ``None`` (a backprop trunk stage). ``loss_fn(head_output,
  targets) -> scalar`` is the stage's local loss (default :func:`dgl_jax.losses.cross_entropy` on integer
  labels; targets may be any pytree). ``tx`` is its own optax optimizer (``None`` until training: nothing
  else needs it). ``codec`` encodes the stage's output for the next stage (``None``: the message itself,
  see :mod:`dgl_jax.codecs`).
* **Randomness.** A PRNG ``key`` (always the last argument, named ``key``; ``None``: deterministic)
  reaches every stochastic layer through the flax RNG streams ``rng_streams`` (default ``('dropout',)``):
  stream ``i`` gets ``fold_in(key, i)``.
* **State.** :class:`StageState` holds ``params``, ``model_state`` (every other variable collection, e.g.
  ``{'batch_stats': ...}``: all of them are carried), ``opt_state``, ``step`` and ``codec`` (the state of
  the codec on the stage's output; ``()`` for none).
* **Messages.** What a stage sends is any pytree; :func:`message_specs` is the one place that computes
  their shapes. Examples given to :func:`init_stage_states` may be arrays or ``jax.ShapeDtypeStruct`` s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dgl_jax.losses import cross_entropy

PyTree = Any


class StageModule(nn.Module):
    """A block and its auxiliary head as one Flax module with params ``{'block': ..., 'head': ...}``.

    ``__call__(x, train)`` returns ``(features, head_output)``; ``features(x, train)`` runs the block only.
    ``head`` may be ``None`` (a backprop trunk stage below the last one): the head output is then ``None``.
    Both modules are called with ``train`` as a keyword.
    """

    block: nn.Module
    head: nn.Module | None

    def __call__(self, x: PyTree, train: bool, head_input: PyTree = None) -> tuple[PyTree, PyTree]:
        """``(features, head_output)``. With ``head_input`` (a constant shaped like the features) the head reads
        ``features + stop_gradient(head_input - features)``: the value ``head_input``, with the gradient passed
        straight through to the block."""
        h = self.block(x, train=train)
        if self.head is None:
            return h, None
        read = h if head_input is None else jax.tree.map(lambda a, b: a + jax.lax.stop_gradient(b - a), h, head_input)
        return h, self.head(read, train=train)

    def features(self, x: PyTree, train: bool) -> PyTree:
        return self.block(x, train=train)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Static description of one stage (see the module docstring): ``block``, ``head``, ``loss_fn``,
    ``tx`` and its LR ``schedule`` (for logging), ``codec`` of its output, the flax ``rng_streams`` its
    layers draw from, and ``layers``, the names of the trunk units the block holds (for reports).

    ``head_reads_wire=True``: the head trains on what the next stage receives, ``decode(encode(features))``
    through the stage's codec, with a straight-through gradient to the block (no effect without a codec)."""

    block: nn.Module
    head: nn.Module | None
    tx: optax.GradientTransformation | None = None
    schedule: optax.Schedule | None = None
    layers: tuple[str, ...] = ()
    loss_fn: Callable[[PyTree, PyTree], jax.Array] = cross_entropy
    codec: Any = None
    rng_streams: tuple[str, ...] = ("dropout",)
    head_reads_wire: bool = False

    @property
    def module(self) -> StageModule:
        return StageModule(self.block, self.head)

    def rngs(self, key: jax.Array | None) -> dict[str, jax.Array] | None:
        """The flax ``rngs`` of one call: stream ``i`` of :attr:`rng_streams` gets ``fold_in(key, i)``."""
        if key is None:
            return None
        return {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rng_streams)}


class StageState(NamedTuple):
    """All mutable state of one stage: ``params``, ``model_state`` (every non-param variable collection,
    e.g. ``{'batch_stats': ...}``), ``opt_state``, ``step`` (int32) and ``codec`` (the state of the codec
    on the stage's output, ``()`` for none)."""

    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    step: jax.Array
    codec: PyTree = ()

    @property
    def batch_stats(self) -> PyTree:
        """The BatchNorm statistics (``model_state['batch_stats']``, ``{}`` if the stage has none)."""
        return self.model_state.get("batch_stats", {})


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


def with_codec(stages: Sequence[Stage], codecs: Any) -> list[Stage]:
    """Returns ``stages`` with the codec of each boundary set: one codec for all ``K-1`` boundaries, or a
    sequence of ``K-1`` (``None``: the message itself). The last stage sends nothing and keeps ``None``."""
    k = len(stages)
    single = codecs is None or hasattr(codecs, "encode")  # a Codec is itself a NamedTuple
    plan = [codecs] * (k - 1) if single else list(codecs)
    if len(plan) != k - 1:
        raise ValueError(f"need one codec (or None) per boundary: {k - 1}, got {len(plan)}")
    return [dataclasses.replace(s, codec=c) for s, c in zip(stages, [*plan, None], strict=True)]


def _spec(x: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)


def _zeros(spec: PyTree) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def init_params(stage: Stage, key: jax.Array, example: PyTree) -> tuple[PyTree, PyTree]:
    """``(params, model_state)`` of ``stage`` for inputs like ``example`` (arrays or ``ShapeDtypeStruct`` s;
    only shapes and dtypes are used). Needs no optimizer."""
    variables = jax.jit(stage.module.init, static_argnames="train")(key, _zeros(_spec(example)), train=False)
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def stage_output_spec(stage: Stage, params: PyTree, model_state: PyTree, example: PyTree) -> PyTree:
    """Shapes and dtypes (``ShapeDtypeStruct`` s) of the block's output for inputs like ``example``."""
    variables = {"params": params, **model_state}
    return jax.eval_shape(
        lambda v, x: stage.module.apply(v, x, False, method=stage.module.features), variables, _spec(example)
    )


def message_specs(stages: Sequence[Stage], states: Sequence[Any], example: PyTree) -> list[PyTree]:
    """Shapes and dtypes of the ``K-1`` messages (outputs of stages ``0..K-2``, before their codecs) for
    inputs shaped like ``example``; traced abstractly, nothing is computed. The one place message shapes
    are derived."""
    specs, x = [], _spec(example)
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        x = stage_output_spec(stage, st.params, st.model_state, x)
        specs.append(x)
    return specs


def wire_spec(stage: Stage, codec_state: PyTree, message: PyTree) -> PyTree:
    """Shapes and dtypes of what ``stage`` sends for a message like ``message`` (its codec's wire)."""
    if stage.codec is None:
        return _spec(message)
    return jax.eval_shape(lambda s, m: stage.codec.encode(s, m, None)[1], codec_state, _spec(message))


def encode_message(stage: Stage, codec_state: PyTree, message: PyTree, key: jax.Array | None = None):
    """The sender's half of a boundary: ``(codec_state, wire)`` (the message itself without a codec)."""
    if stage.codec is None:
        return codec_state, message
    return stage.codec.encode(codec_state, message, key)


def decode_message(sender: Stage, wire: PyTree) -> PyTree:
    """The receiver's half: the message ``sender`` encoded into ``wire`` (wires are self-contained)."""
    return wire if sender.codec is None else sender.codec.decode(wire)


def init_stage_states(stages: Sequence[Stage], key: jax.Array, example: PyTree) -> list[StageState]:
    """Initialises every stage on ``example`` (a pytree of arrays or ``ShapeDtypeStruct`` s: one batch of
    inputs; only shapes and dtypes are used). Stage ``j`` is initialised on the message stage ``j-1``
    sends; keys are split once per stage (params from ``k_j``, the codec from ``fold_in(k_j, 1)``).
    Stages without an optimizer get ``opt_state=()``. Raises ``ValueError`` naming the boundary when a
    codec decodes to a different shape or dtype than the message it encodes."""
    if not stages:
        raise ValueError("need at least one stage")
    states, x = [], _spec(example)
    for j, (stage, k) in enumerate(zip(stages, jax.random.split(key, len(stages)), strict=True)):
        params, model_state = init_params(stage, k, x)
        opt_state = () if stage.tx is None else stage.tx.init(params)
        out = stage_output_spec(stage, params, model_state, x)
        codec_state = ()
        if stage.codec is not None and j < len(stages) - 1:
            codec_state = stage.codec.init(out, jax.random.fold_in(k, 1))
            _check_decoded(stage, codec_state, out, f"boundary {j} -> {j + 1}")
        states.append(StageState(params, model_state, opt_state, jnp.zeros((), jnp.int32), codec_state))
        x = out
    return states


def _check_decoded(stage: Stage, codec_state: PyTree, message: PyTree, where: str) -> None:
    got = jax.eval_shape(lambda s, m: stage.codec.decode(stage.codec.encode(s, m, None)[1]), codec_state, message)
    want = _spec(message)
    same = jax.tree.structure(got) == jax.tree.structure(want) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    if not same:
        show = lambda t: jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", t)  # noqa: E731
        raise ValueError(
            f"{where}: codec {getattr(stage.codec, 'name', stage.codec)} decodes to {show(got)} but the "
            f"receiver was initialised on {show(want)}"
        )


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
