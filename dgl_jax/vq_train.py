"""Synchronous DGL with vector-quantized messages, and jitted sweeps over VQ configurations.

This is the engine of codebook sweeps (``python -m dgl_jax sweep``, :mod:`dgl_jax.sweep`). A boundary
``j -> j+1`` quantized by a :class:`VQConfig` is a boundary codec (:func:`boundary_codec`, a
:class:`dgl_jax.codecs.Codec`) whose state, kept in the sender's
:attr:`StageState.codec <dgl_jax.stage.StageState>`, is a :class:`Boundary`:

* the **sender** (stage j) takes its usual local step (:func:`dgl_jax.steps.local_update`), encodes its
  output with the codebook copy the receiver holds and updates its own EMA k-means state
  (:func:`dgl_jax.vq.update`, dead-code restarts included); every ``sync_every`` of its updates the
  receiver's copy is refreshed;
* the wire is a :class:`dgl_jax.codecs.VQWire`: the codes ``[batch, H, W, G]`` (uint8/uint16, unpacked) and
  the receiver's codebook copy ``[G, K, d]`` they index (padded to ``max_codes`` in a ``vmap`` sweep);
* the **receiver** (stage j+1) decodes the codes with that codebook and trains on the result.

Encoding with the receiver's copy keeps encoder and decoder consistent when ``sync_every > 1``; with
``sync_every = 1`` (default) both copies are equal at every step and this is plain EMA-VQ, the math of
:func:`dgl_jax.codecs.vq`. Codebooks are seeded from the stages' train-mode outputs on the first batch
(:func:`init_vq`). :func:`vq_dgl_step` is :func:`dgl_jax.steps.dgl_step` on the stages with these codecs
(:func:`vq_stages`), plus VQ health metrics; with every config ``None`` it computes exactly ``dgl_step``.
Evaluation needs nothing special: :func:`dgl_jax.steps.evaluate_batch` on :func:`vq_stages` sends every
boundary through ``decode(encode(.))`` with the receiver's codebook, as a deployed pipeline would.

Keys follow the library: stage j of a step uses ``fold_in(key, j)``, split into its layers' key and its
codec's key (dead-code restarts) by :func:`dgl_jax.objective.split_key`.

Metrics are a dict (the library's one metrics type) of ``[K]`` arrays: ``loss``, ``accuracy``, and for
boundary ``j -> j+1`` at index j (NaN for float boundaries and for the last stage, which sends nothing)
``distortion`` (relative squared error of the decoded features), ``coverage`` and ``perplexity`` of the
batch's codes; ``nonfinite`` (bool): stage j's output held NaN/inf. :func:`check_metrics` raises a
``ValueError`` naming the first such stage on the host (checkify-free). Outside ``jit``,
:func:`dgl_jax.vq.encode` checks concrete inputs directly.

Sweeps (:func:`make_sweep`): configurations that differ only in ``num_codes`` form one *class*; a class is
padded to its largest codebook (padding codes are masked: never chosen, updated or restarted;
``num_codes`` is a traced leaf of the state) and its members, each with its own copy of the network, are
trained by one ``vmap`` of :func:`vq_dgl_step`. Classes of different group layouts are separate ``vmap``
calls inside the same jitted function, so the whole sweep is one compiled program and one dispatch per
step. Each member sees the same batches, keys and initial weights as when run alone.

Bytes: this module counts none. The traffic and memory of a configuration are those of the library codec it
stands for (:meth:`VQConfig.codec`: :func:`dgl_jax.codecs.vq`, packed codes plus the codebook on every
send), measured by :mod:`dgl_jax.accounting` on stages built with :func:`as_codecs`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dgl_jax import codecs, vq
from dgl_jax.objective import reads_wire, split_key, stage_apply, stage_key, wire_first
from dgl_jax.stage import Stage, StageState, with_codec
from dgl_jax.steps import _check, evaluate_batch, local_update, stack_metrics

PyTree = Any
Metrics = dict[str, jax.Array]
INIT_METHODS = ("sample", "kmeans++")


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Quantizer of one stage boundary. Exactly one of ``code_dim`` (channels per group; groups = C / d)
    and ``groups`` is set. ``decay``/``eps``: EMA decay and Laplace smoothing; ``restart_threshold``: codes
    whose EMA count (per batch) falls below it are restarted on current vectors (0 disables);
    ``sync_every``: the receiver's codebook copy is refreshed every that many steps; ``init``: seeding from
    the first batch (``sample`` or ``kmeans++``); ``max_codes``: pad the codebook (sweeps)."""

    num_codes: int = 256
    code_dim: int | None = 16
    groups: int | None = None
    decay: float = 0.99
    eps: float = 1e-5
    restart_threshold: float = 1e-2
    sync_every: int = 1
    init: str = "sample"
    max_codes: int | None = None

    def __post_init__(self):
        vq.code_dtype(self.num_codes)  # num_codes >= 2
        if (self.code_dim is None) == (self.groups is None):
            raise ValueError(f"give exactly one of code_dim or groups, got {self.code_dim}, {self.groups}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if not self.eps >= 0 or not self.restart_threshold >= 0:
            raise ValueError(f"eps and restart_threshold must be >= 0, got {self.eps}, {self.restart_threshold}")
        if not (isinstance(self.sync_every, int) and self.sync_every >= 1):
            raise ValueError(f"sync_every must be an integer >= 1, got {self.sync_every!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init {self.init!r} is not valid; expected one of {INIT_METHODS}")
        if self.max_codes is not None and self.max_codes < self.num_codes:
            raise ValueError(f"max_codes {self.max_codes} must be >= num_codes {self.num_codes}")

    def layout(self, channels: int) -> tuple[int, int]:
        """``(groups, code_dim)`` for a boundary of ``channels`` channels (``ValueError`` if it does not divide)."""
        return vq.resolve_groups(channels, self.code_dim, self.groups)

    def codec(self, packed: bool = True) -> codecs.Codec:
        """The library codec this configuration stands for (:func:`dgl_jax.codecs.vq` with the same ``K``,
        layout and EMA settings; ``packed``: ``ceil(log2 K)``-bit codes). Its wire, packed codes plus the
        unpadded codebook on every send, is what traffic and buffer memory are measured on. With
        ``sync_every > 1`` it still sends the codebook on every step."""
        return codecs.vq(
            self.num_codes,
            self.code_dim,
            self.groups,
            packed=packed,
            decay=self.decay,
            eps=self.eps,
            restart_threshold=self.restart_threshold,
            init=self.init,
        )


Plan = Sequence[VQConfig | None]


class Boundary(NamedTuple):
    """State of a quantized boundary (the codec state of its sender): the sender's EMA k-means state and the
    receiver's codebook copy ``[G, K, d]``."""

    sender: vq.VQState
    receiver: jax.Array


def as_plan(configs: VQConfig | Plan | None, num_stages: int) -> tuple[VQConfig | None, ...]:
    """Per-boundary configs: one config (or ``None``) for all ``K-1`` boundaries, or a sequence of them."""
    if configs is None or isinstance(configs, VQConfig):
        return (configs,) * (num_stages - 1)
    plan = tuple(configs)
    if len(plan) != num_stages - 1:
        raise ValueError(f"need one VQ config (or None) per boundary: {num_stages - 1}, got {len(plan)}")
    return plan


def as_codecs(configs: VQConfig | Plan | None, num_stages: int, packed: bool = True) -> list[codecs.Codec | None]:
    """The library codecs (:meth:`VQConfig.codec`) of a plan, one per boundary (``None``: float32), for
    :func:`dgl_jax.stage.with_codec` and then :mod:`dgl_jax.accounting`."""
    return [None if c is None else c.codec(packed) for c in as_plan(configs, num_stages)]


# ----------------------------------------------------------------------------------------------------------
# The boundary codec
# ----------------------------------------------------------------------------------------------------------
def boundary_codec(cfg: VQConfig) -> codecs.Codec:
    """A boundary quantized by ``cfg`` as a :class:`dgl_jax.codecs.Codec` whose state is a :class:`Boundary`.

    * ``init(example, key=None)``: a random codebook (:func:`dgl_jax.vq.init`, padded to ``cfg.max_codes``),
      shared by sender and receiver; :func:`init_vq` seeds it from data instead.
    * ``encode(boundary, x, key=None)``: codes of ``x: [batch, ..., C]`` with the receiver's copy (the
      sender's padding mask), then the sender's EMA k-means update (dead-code restarts only with ``key``),
      then, every ``cfg.sync_every`` updates, the receiver's copy refreshed. The wire is
      ``VQWire(codes, receiver codebook before the sync)``.
    * ``decode(wire)``: the centroids of the codes, float32 ``[batch, ..., C]``.
    """
    name = f"vq-sweep:{cfg.num_codes}:{cfg.code_dim if cfg.code_dim is not None else f'g{cfg.groups}'}"

    def init(example: PyTree, key: jax.Array | None = None) -> Boundary:
        (x,) = jax.tree.leaves(example)
        groups, code_dim = cfg.layout(int(x.shape[-1]))
        key = jax.random.key(0) if key is None else key
        s = vq.init(cfg.num_codes, code_dim, groups, max_codes=cfg.max_codes, key=key)
        return Boundary(s, s.codebook)

    def encode(b: Boundary, x: jax.Array, key: jax.Array | None = None) -> tuple[Boundary, codecs.VQWire]:
        codes = vq.encode(b.sender._replace(codebook=b.receiver), x)
        sender = vq.update(
            b.sender, x, codes, decay=cfg.decay, eps=cfg.eps, key=key, restart_threshold=cfg.restart_threshold
        )
        receiver = jnp.where(sender.step % cfg.sync_every == 0, sender.codebook, b.receiver)  # periodic sync
        return Boundary(sender, receiver), codecs.VQWire(codes=codes, codebook=b.receiver)

    def decode(wire: codecs.VQWire) -> jax.Array:
        return vq.decode(wire.codebook, wire.codes)

    return codecs.Codec(init, encode, decode, name)


def vq_stages(stages: Sequence[Stage], configs: VQConfig | Plan | None) -> list[Stage]:
    """``stages`` with the :func:`boundary_codec` of every quantized boundary (``None``: float messages), as
    trained by :func:`vq_dgl_step`; :func:`dgl_jax.steps.evaluate_batch` on them evaluates through the
    receivers' codebooks."""
    plan = as_plan(configs, len(stages))
    return with_codec(stages, [None if c is None else boundary_codec(c) for c in plan])


# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------
def message_features(stages: Sequence[Stage], states: Sequence[StageState], x: jax.Array) -> list[jax.Array]:
    """Train-mode outputs of stages ``0..K-2`` on ``x: [batch, H, W, C]`` (the float messages; jitted, and
    compiled once per stage list and input shape)."""
    return _message_features(tuple(stages), list(states), x)


@functools.partial(jax.jit, static_argnums=0)
def _message_features(stages: tuple[Stage, ...], states: list[StageState], x: jax.Array) -> list[jax.Array]:
    out = []
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        x = stage_apply(stage, st.params, st.model_state, x, True).features
        out.append(x)
    return out


def init_vq(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    configs: VQConfig | Plan | None,
    key: jax.Array,
    x: jax.Array,
    features: Sequence[jax.Array] | None = None,
) -> list[StageState]:
    """``states`` with the codec state of every quantized boundary set to a :class:`Boundary` whose codebook
    is seeded (``config.init``) from the stages' train-mode outputs on the first batch ``x: [batch, H, W,
    C]`` (or from precomputed ``features``, see :func:`message_features`); unquantized boundaries (and the
    last stage) get ``()``. Boundary j uses ``fold_in(key, j)``. Train them with :func:`vq_dgl_step`."""
    _check(stages, states)
    plan = as_plan(configs, len(stages))
    features = message_features(stages, states, x) if features is None else features
    out = []
    for j, (cfg, f) in enumerate(zip(plan, features, strict=True)):
        if cfg is None:
            out.append(states[j]._replace(codec=()))
            continue
        vq.check_finite(f, j)
        groups, code_dim = cfg.layout(f.shape[-1])
        if cfg.init == "sample" and f.size // f.shape[-1] < (cfg.max_codes or cfg.num_codes):
            raise ValueError(
                f"init_from_data('sample') needs at least {cfg.max_codes or cfg.num_codes} vectors, "
                f"got {f.size // f.shape[-1]} at the output of stage {j}"
            )
        s = _seed_codebook(jax.random.fold_in(key, j), f, cfg.num_codes, code_dim, groups, cfg.max_codes, cfg.init)
        out.append(states[j]._replace(codec=Boundary(s, jnp.copy(s.codebook))))  # distinct buffers (donation)
    return [*out, states[-1]._replace(codec=())]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _seed_codebook(
    key: jax.Array, feats: jax.Array, num_codes: int, code_dim: int, groups: int, max_codes: int | None, method: str
) -> vq.VQState:
    k1, k2 = jax.random.split(key)
    s = vq.init(num_codes, code_dim, groups, max_codes=max_codes, key=k1)
    return vq.init_from_data(s, feats, method, key=k2)


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------
def vq_dgl_step(
    stages: Sequence[Stage],
    configs: VQConfig | Plan | None,
    states: Sequence[StageState],
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
) -> tuple[list[StageState], Metrics]:
    """Synchronous DGL step with quantized messages on ``x: [batch, H, W, C]``, ``labels: [batch]``.

    ``stages`` and ``configs`` are static (close over them before ``jit``); ``states`` come from
    :func:`init_vq` (a quantized boundary's :class:`Boundary` is its sender's codec state). Stage j uses
    ``fold_in(key, j)``, split into its layers' and its codec's key, as :func:`dgl_jax.steps.dgl_step` does
    on :func:`vq_stages`, which computes the same states. Returns ``(states, metrics)`` (see the module
    docstring for the metrics).
    """
    _check(stages, states)
    stages = vq_stages(stages, configs)
    k = len(stages)
    nan = jnp.full((), jnp.nan, jnp.float32)
    new_states, per_stage = [], []
    for j, (stage, state) in enumerate(zip(stages, states, strict=True)):
        k_layers, k_codec = split_key(stage_key(key, j))
        early = j < k - 1 and reads_wire(stage)
        if early:  # the head trains on the decoded wire: encode first
            b, wire, x_hat = wire_first(stage, state.params, state.model_state, state.codec, x, stage_key(key, j))
        new_state, feats, m = local_update(stage, state, x, labels, k_layers, head_input=x_hat if early else None)
        m = {**m, "distortion": nan, "coverage": nan, "perplexity": nan}
        m["nonfinite"] = ~jnp.all(jnp.isfinite(feats))
        if j < k - 1 and stage.codec is not None:
            if not early:
                b, wire = stage.codec.encode(state.codec, feats, k_codec)
                x_hat = stage.codec.decode(wire)
            new_state = new_state._replace(codec=b)
            st = vq.stats(b.sender, wire.codes)
            m.update(distortion=vq.distortion(feats, x_hat), coverage=st.coverage, perplexity=st.perplexity)
            feats = x_hat
        new_states.append(new_state)
        per_stage.append(m)
        x = feats
    nonfinite = jnp.stack([m.pop("nonfinite") for m in per_stage])
    return new_states, {**stack_metrics(per_stage), "nonfinite": nonfinite}


def check_metrics(metrics: Metrics) -> None:
    """Host-side check: raises :class:`dgl_jax.vq.NonFiniteError` naming the first stage (0-based) whose output
    was non-finite. Works on the metrics of one step or of a sweep/scan (any leading axes)."""
    bad = jnp.asarray(metrics["nonfinite"])
    bad = bad.reshape(-1, bad.shape[-1]).any(0)
    if bool(bad.any()):
        j = int(jnp.argmax(bad))
        raise vq.NonFiniteError(f"non-finite (NaN or inf) features at the output of stage {j}: cannot quantize them")


# ----------------------------------------------------------------------------------------------------------
# Sweeps: several VQ configurations in one compiled program
# ----------------------------------------------------------------------------------------------------------
class Sweep(NamedTuple):
    """A compiled-once sweep over ``plans`` (one :data:`Plan` per configuration).

    * ``init(states, vq_key, x) -> carry``: every configuration starts from copies of the same stage states
      (e.g. ``init_stage_states(stages, key, x)``) and codebooks seeded from the first batch ``x`` as
      :func:`init_vq` would (``vq_key``);
    * ``step(carry, x, labels, key) -> (carry, metrics)``: pure; jit it once. ``metrics`` is a list (one
      metrics dict per configuration, in ``plans`` order, see :func:`vq_dgl_step`);
    * ``evaluate(carry, x, labels) -> [n_configs, K]`` correct counts of every head through the quantized
      boundaries (pure; jit it);
    * ``select(carry, i) -> states``: configuration ``i`` as if trained alone (codebooks in the codec states;
      padded to its class's largest codebook in ``vmap`` mode).
    """

    plans: tuple
    init: Callable
    step: Callable
    evaluate: Callable
    select: Callable


def _class_key(plan: Plan) -> tuple:
    return tuple(None if c is None else dataclasses.replace(c, num_codes=2, max_codes=None) for c in plan)


def make_sweep(stages: Sequence[Stage], plans: Sequence[VQConfig | Plan | None], mode: str = "vmap") -> Sweep:
    """Builds a :class:`Sweep` of ``plans`` (each a config for all boundaries, a per-boundary list, or
    ``None`` = unquantized DGL).

    ``mode="vmap"``: plans equal up to ``num_codes`` share one class, padded to its largest codebook and
    trained by one ``vmap``. ``mode="loop"``: every plan is its own unpadded call inside the same jitted
    function (no padding waste; on XLA:CPU, convolutions vmapped over stacked weights were measured ~4x
    slower than the same convolutions called one after the other, so CPU runs should use ``loop``).
    """
    if mode not in ("vmap", "loop"):
        raise ValueError(f"mode {mode!r} is not valid; expected one of ('vmap', 'loop')")
    k = len(stages)
    plans = tuple(as_plan(p, k) for p in plans)
    if not plans:
        raise ValueError("need at least one configuration to sweep")
    classes: dict[Any, list[int]] = {}
    for i, p in enumerate(plans):
        classes.setdefault(_class_key(p) if mode == "vmap" else i, []).append(i)
    groups = []  # (member indices, padded codebook size per boundary)
    for members in classes.values():
        pads = []
        for j in range(k - 1):
            cfgs = [plans[i][j] for i in members]
            pads.append(None if cfgs[0] is None else max(max(c.num_codes, c.max_codes or 0) for c in cfgs))
        groups.append((members, pads))
    batched = mode == "vmap"

    def member_plan(i: int, pads: list) -> tuple:
        return tuple(
            None if c is None else dataclasses.replace(c, max_codes=m) for c, m in zip(plans[i], pads, strict=True)
        )

    padded_plans = [member_plan(members[0], pads) for members, pads in groups]
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    vmap = jax.vmap if batched else (lambda f: f)
    row = (lambda a, r: a[r]) if batched else (lambda a, r: a)

    def init(states0, vq_key, x):
        carry = []
        _check(stages, states0)
        feats = message_features(stages, states0, x)
        for members, pads in groups:
            sts = []
            for i in members:
                copy = jax.tree.map(jnp.copy, states0)  # same weights, distinct buffers (donation)
                sts.append(init_vq(stages, copy, member_plan(i, pads), vq_key, x, feats))
            carry.append(stack(sts) if batched else sts[0])
        return carry

    def step(carry, x, labels, key):
        new, metrics = [], [None] * len(plans)
        for (members, _), plan, sts in zip(groups, padded_plans, carry, strict=True):
            sts, m = vmap(lambda s, plan=plan: vq_dgl_step(stages, plan, s, x, labels, key))(sts)
            new.append(sts)
            for r, i in enumerate(members):
                metrics[i] = jax.tree.map(lambda a, r=r: row(a, r), m)
        return new, metrics

    def evaluate(carry, x, labels):
        out = [None] * len(plans)
        for (members, _), plan, sts in zip(groups, padded_plans, carry, strict=True):
            coded = vq_stages(stages, plan)
            c = vmap(lambda s, coded=coded: evaluate_batch(coded, s, x, labels).per_head)(sts)
            for r, i in enumerate(members):
                out[i] = row(c, r)
        return jnp.stack(out)

    def select(carry, i):
        for c, (members, _) in enumerate(groups):
            if i in members:
                r = members.index(i)
                return jax.tree.map(lambda a, r=r: row(a, r), carry[c])
        raise IndexError(f"configuration {i} out of range for {len(plans)} configurations")

    return Sweep(plans, init, step, evaluate, select)
