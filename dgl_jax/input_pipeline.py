"""The training input: each epoch's example order and each step's batch and key, derived from the run key.

Everything is a pure function of ``(run key, epoch, step)``, so a run resumed at any chunk boundary reads
the same batches with the same keys: resume is bit-identical. Batches are gathered (and augmented) inside
jit from the split held on the device, or read by the host (the grain loader) and augmented inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgl_jax.data import augment_batch


def epoch_order(key, epoch, n):
    """The epoch's example order ``perm`` (a permutation of ``n`` from ``fold_in(fold_in(key, 1), epoch)``)
    and the base of its step keys ``fold_in(fold_in(key, 2), epoch)``."""
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1), epoch), n)
    return perm, jax.random.fold_in(jax.random.fold_in(key, 2), epoch)


def batch_at(images, labels, perm, step_base, s, batch, steps_per_epoch, augment):
    """Batch ``s`` of the epoch: ``perm[s*batch:(s+1)*batch]`` gathered, then :func:`_augment_at`."""
    idx = jax.lax.dynamic_slice_in_dim(perm, jnp.minimum(s, steps_per_epoch - 1) * batch, batch)
    return augment_at(images[idx], labels[idx], step_base, s, augment)


def augment_at(x, y, step_base, s, augment):
    """Batch ``s`` (``x: [batch, H, W, C]``) augmented with ``fold_in(fold_in(step_base, s), 0)`` when
    ``augment`` is ``(padding, flip)``; returns ``(x, y, key)`` with the step's method key ``fold_in(..., 1)``."""
    skey = jax.random.fold_in(step_base, s)
    if augment is not None:
        x = augment_batch(jax.random.fold_in(skey, 0), x, *augment)
    return x, y, jax.random.fold_in(skey, 1)


def streamed_step(step_fn, augment, states, extra, x, y, step_base, s):
    """One optimizer step on batch ``s`` read by the host (``x: [batch, H, W, C]``, ``y: [batch]``)."""
    x, y, k = augment_at(x, y, step_base, s, augment)
    return step_fn(states, extra, x, y, k)


def one_step(step_fn, batch, steps_per_epoch, augment, states, extra, images, labels, perm, step_base, s):
    """One optimizer step on batch ``s`` (gathered inside jit): ``(states, extra, metrics)``."""
    x, y, k = batch_at(images, labels, perm, step_base, s, batch, steps_per_epoch, augment)
    return step_fn(states, extra, x, y, k)


def run_chunk(step_fn, chunk, batch, steps_per_epoch, augment, states, extra, images, labels, perm, step_base, start):
    """``chunk`` optimizer steps from step ``start`` inside one ``lax.scan``; steps past the end of the epoch
    are skipped (``lax.cond``) and report NaN metrics, so one compiled program serves every chunk."""
    args = (images, labels, perm, step_base)
    x0, y0, k0 = batch_at(*args, jnp.int32(0), batch, steps_per_epoch, augment)
    metric_shapes = jax.eval_shape(step_fn, states, extra, x0, y0, k0)[2]

    def body(carry, i):
        s = start + i

        def run(c):
            st, ex, m = one_step(step_fn, batch, steps_per_epoch, augment, c[0], c[1], *args, s)
            return (st, ex), m

        def skip(c):
            return c, jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), metric_shapes)

        return jax.lax.cond(s < steps_per_epoch, run, skip, carry)

    (states, extra), metrics = jax.lax.scan(body, (list(states), extra), jnp.arange(chunk))
    return states, extra, metrics
