"""DNI and cDNI baselines (Jaderberg et al. 2017): stages updated from *synthetic* gradients.

Stage j < K-1 has no head; a synthesizer ``M_j`` predicts the gradient of the loss w.r.t. the stage's output
``h_j`` (``[batch, H, W, C]``) and the block updates with it at once (update unlocked). ``M_j`` is trained
to regress the gradient that stage j+1 sends back (itself synthetic for j+1 < K-1, bootstrapped as in the
DNI paper; the true loss gradient for the last stage). cDNI also feeds the labels (one-hot, tiled over
space) to the synthesizer. The paper's synthesizer: 3 conv5x5 128 layers, the last zero-initialised, Adam
3e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dgl_jax.layers import Conv
from dgl_jax.losses import accuracy
from dgl_jax.objective import stage_apply
from dgl_jax.stage import Stage, StageState, init_stage_states, message_specs
from dgl_jax.steps import apply_updates


class Synthesizer(nn.Module):
    """Predicts ``dL/dh`` of the same shape as ``h: [batch, H, W, C]``: ``depth`` conv ``kernel`` layers of
    ``width`` (ReLU between), the last zero-initialised, so training starts from zero synthetic gradients.
    ``num_classes > 0`` makes it conditional (cDNI): one-hot labels are tiled and concatenated to ``h``."""

    depth: int = 3
    width: int = 128
    kernel: int = 5
    num_classes: int = 0

    @nn.compact
    def __call__(self, h: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        x = h.astype(jnp.float32)
        if self.num_classes:
            if labels is None:
                raise ValueError("a conditional (cDNI) synthesizer needs the labels")
            onehot = jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)[:, None, None, :]
            x = jnp.concatenate([x, jnp.broadcast_to(onehot, (*x.shape[:3], self.num_classes))], axis=-1)
        k = (self.kernel, self.kernel)
        for _ in range(self.depth - 1):
            x = nn.relu(Conv(self.width, k, padding=self.kernel // 2)(x))
        return Conv(h.shape[-1], k, padding=self.kernel // 2, kernel_init=nn.initializers.zeros)(x)


def synthesizer_stages(
    num_boundaries: int,
    *,
    conditional: bool = False,
    num_classes: int = 10,
    learning_rate: float = 3e-5,
    depth: int = 3,
    width: int = 128,
    kernel: int = 5,
) -> list[Stage]:
    """``num_boundaries`` synthesizers as :class:`Stage` s (``block`` = the synthesizer, no head) with Adam."""
    module = Synthesizer(depth, width, kernel, num_classes if conditional else 0)
    tx = optax.adam(learning_rate)
    return [Stage(block=module, head=None, tx=tx, schedule=optax.constant_schedule(learning_rate))] * num_boundaries


def init_synthesizers(
    synths: Sequence[Stage], key: jax.Array, stage_outputs: Sequence[jax.ShapeDtypeStruct]
) -> list[StageState]:
    """Initialises synthesizer ``j`` on the shape of stage ``j``'s output (``[batch, H, W, C]``)."""
    states = []
    for synth, shape, k in zip(synths, stage_outputs, jax.random.split(key, len(synths)), strict=True):
        h = jnp.zeros(shape.shape, jnp.float32)
        labels = jnp.zeros(shape.shape[:1], jnp.int32)
        params = synth.block.init(k, h, labels)["params"]
        states.append(StageState(params, {}, synth.tx.init(params), jnp.zeros((), jnp.int32)))
    return states


def init_dni(
    stages: Sequence[Stage], synths: Sequence[Stage], key: jax.Array, example: jax.Array
) -> tuple[list[StageState], list[StageState]]:
    """States of the trunk stages (built with ``drop_aux_heads``) and of their K-1 synthesizers."""
    if len(synths) != len(stages) - 1:
        raise ValueError(f"DNI needs one synthesizer per boundary: {len(stages) - 1}, got {len(synths)}")
    k1, k2 = jax.random.split(key)
    states = init_stage_states(stages, k1, example)
    return states, init_synthesizers(synths, k2, message_specs(stages, states, example))


def _block_fn(stage: Stage, state: StageState):
    """``(params, x) -> (h, batch_stats)`` of the stage's block in train mode."""

    def fn(params, x):
        variables = {"params": params, **state.model_state}
        if not state.model_state:
            return stage.module.apply(variables, x, True, method=stage.module.features), {}
        h, new = stage.module.apply(variables, x, True, method=stage.module.features, mutable=list(state.model_state))
        return h, dict(new)

    return fn


def dni_step(
    stages: Sequence[Stage],
    synths: Sequence[Stage],
    states: Sequence[StageState],
    synth_states: Sequence[StageState],
    x: jax.Array,
    labels: jax.Array,
) -> tuple[list[StageState], list[StageState], dict[str, jax.Array]]:
    """One DNI (or cDNI, by the synthesizers) step on ``x: [batch, H, W, C]``: every block updates with its
    synthetic gradient (the last stage with its ``loss_fn``), every synthesizer with its regression loss.
    All quantities use pre-update parameters, as if the stages ran concurrently. Metrics (``[K]``, as every
    step's): ``loss``/``accuracy`` of the last head (NaN for the others) and ``synth_loss`` of each
    synthesizer (its mean squared error against the gradient it regresses; NaN for the last stage)."""
    if any(s.head is not None for s in stages[:-1]):
        raise ValueError("DNI stages have no auxiliary heads: pass drop_aux_heads(stages)")
    k = len(stages)
    # Forward pass, keeping each block's VJP.
    vjps, outs, new_stats, h = [], [], [], x
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        h, vjp, bs = jax.vjp(_block_fn(stage, st), st.params, h, has_aux=True)
        vjps.append(vjp)
        outs.append(h)
        new_stats.append(bs)
    last, last_st = stages[-1], states[-1]

    def last_loss(params, inp):
        out = stage_apply(last, params, last_st.model_state, inp, True)
        return last.loss_fn(out.output, labels), (out.output, out.model_state)

    (loss, (logits, last_bs)), (g_last, g_in) = jax.value_and_grad(last_loss, argnums=(0, 1), has_aux=True)(
        last_st.params, h
    )
    # Synthetic gradients and the targets they regress (from the stage above, with its own synthetic signal).
    synth_grads = [
        s.block.apply({"params": ss.params}, hj, labels) for s, ss, hj in zip(synths, synth_states, outs, strict=True)
    ]
    targets = [None] * (k - 1)
    targets[k - 2] = g_in
    new_states = [None] * k
    for j in range(k - 1):
        g_params, g_input = vjps[j](synth_grads[j].astype(outs[j].dtype))
        new_states[j] = apply_updates(stages[j], states[j], g_params, new_stats[j])
        if j > 0:
            targets[j - 1] = g_input
    new_states[k - 1] = apply_updates(last, last_st, g_last, last_bs)
    new_synth, synth_losses = [], []
    for s, ss, hj, target in zip(synths, synth_states, outs, targets, strict=True):
        target = jax.lax.stop_gradient(target.astype(jnp.float32))
        hj = jax.lax.stop_gradient(hj)

        def reg(p, s=s, hj=hj, target=target):
            return jnp.mean(jnp.square(s.block.apply({"params": p}, hj, labels) - target))

        sl, g = jax.value_and_grad(reg)(ss.params)
        new_synth.append(apply_updates(s, ss, g, {}))
        synth_losses.append(sl)
    nan = jnp.full((k - 1,), jnp.nan, jnp.float32)
    metrics = {
        "loss": jnp.concatenate([nan, jnp.asarray(loss, jnp.float32)[None]]),
        "accuracy": jnp.concatenate([nan, accuracy(logits, labels).astype(jnp.float32)[None]]),
        "synth_loss": jnp.concatenate([jnp.stack(synth_losses) if synth_losses else nan, nan[:1]]),
    }
    return new_states, new_synth, metrics


# ----------------------------------------------------------------------------------------------------------
# Trainer methods: --method dni / --method cdni
# ----------------------------------------------------------------------------------------------------------
SYNTH_OPTIONS = {"synth_lr": 3e-5, "synth_width": 128, "synth_depth": 3, "synth_kernel": 5}


def _synths_for(stages: Sequence[Stage], config, conditional: bool) -> list[Stage]:
    o = {**SYNTH_OPTIONS, **config.method_options}
    return synthesizer_stages(
        len(stages) - 1,
        conditional=conditional,
        num_classes=_num_classes(stages),
        learning_rate=float(o["synth_lr"]),
        depth=int(o["synth_depth"]),
        width=int(o["synth_width"]),
        kernel=int(o["synth_kernel"]),
    )


def _num_classes(stages: Sequence[Stage]) -> int:
    return int(stages[-1].head.num_classes)


def _validate(config) -> None:
    unknown = sorted(set(config.method_options) - set(SYNTH_OPTIONS))
    if unknown:
        raise ValueError(f"unknown {config.method} options {unknown}; expected some of {sorted(SYNTH_OPTIONS)}")
    o = {**SYNTH_OPTIONS, **config.method_options}
    if not float(o["synth_lr"]) > 0:
        raise ValueError(f"synth_lr {o['synth_lr']!r} is not valid; expected a number > 0")
    for name in ("synth_width", "synth_depth", "synth_kernel"):
        if not int(o[name]) >= 1:
            raise ValueError(f"{name} {o[name]!r} is not valid; expected an integer >= 1")
