"""A functional ring buffer of mini-batches (the replay buffer of asynchronous DGL), optax style.

The state is a :class:`BufferState` (a NamedTuple of arrays, so it lives inside ``jit``, ``lax.scan`` and
``vmap``; nothing goes through the host). The functions are pure::

    buf = buffer.init(capacity, (features, labels))       # example: ONE batch, any pytree (VQ codes too)
    buf = buffer.push(buf, (x, y), tick=t)                 # overwrites the oldest slot when full
    (x, y), valid, buf = buffer.sample(buf, policy="priority_lifo", max_reuse=None, key=key)

``valid`` is False when nothing can be sampled (empty buffer, every slot already used ``max_reuse`` times,
or, with ``now``/``delay``, nothing old enough yet): the consumer then skips its turn; the returned item is
then slot 0's content and must be ignored, and the state is unchanged.

Sampling policies (``policy`` is a static Python string):

* ``"priority_lifo"`` (the paper's): the least-used slot, ties broken by the most recent insertion.
* ``"lifo"``: the most recent insertion.  * ``"fifo"``: the oldest insertion.
* ``"uniform"``: uniformly among the eligible slots (needs ``key``).

Recency is an insertion sequence number stored per slot (``seq``), not a slot index, so it is right across
the ring wrap (the reference code computes the newest slot off by one after wrapping).
``ticks`` records each slot's insertion time (the caller's clock) for staleness, and ``uses`` how often each
slot has been read since it was written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

POLICIES = ("priority_lifo", "lifo", "fifo", "uniform")


class BufferState(NamedTuple):
    """Ring buffer state. ``items``: the stored pytree, each leaf ``[capacity, *leaf_shape]``; ``write``: next
    slot to write (int32); ``size``: fill level (int32, <= capacity); ``uses``: ``[capacity]`` reads per slot
    since it was written; ``ticks``: ``[capacity]`` insertion tick per slot; ``seq``: ``[capacity]`` insertion
    sequence number per slot (recency; -1 for empty slots); ``count``: total pushes so far (int32)."""

    items: PyTree
    write: jax.Array
    size: jax.Array
    uses: jax.Array
    ticks: jax.Array
    seq: jax.Array
    count: jax.Array

    @property
    def capacity(self) -> int:
        return self.uses.shape[-1]


def check_policy(policy: str) -> str:
    """Returns ``policy`` or raises ``ValueError`` naming it and the accepted ones."""
    if policy not in POLICIES:
        raise ValueError(f"unknown buffer policy {policy!r}; expected one of {POLICIES}")
    return policy


def check_max_reuse(max_reuse: int | None) -> int | None:
    if max_reuse is not None and int(max_reuse) < 1:
        raise ValueError(f"max_reuse must be >= 1 or None, got {max_reuse}")
    return max_reuse


def init(capacity: int, example: PyTree) -> BufferState:
    """An empty buffer of ``capacity`` slots, each shaped like ``example`` (one batch; any pytree of arrays,
    e.g. ``(wire, targets)``: float features, or packed VQ codes with their codebook)."""
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"buffer capacity must be an int >= 1, got {capacity!r}")
    items = jax.tree.map(lambda a: jnp.zeros((capacity, *jnp.shape(a)), jnp.asarray(a).dtype), example)
    return BufferState(
        items=items,
        write=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
        uses=jnp.zeros((capacity,), jnp.int32),
        ticks=jnp.zeros((capacity,), jnp.int32),
        seq=jnp.full((capacity,), -1, jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def push(state: BufferState, item: PyTree, tick: jax.Array | int | None = None, valid: Any = True) -> BufferState:
    """Writes ``item`` into the next slot (the oldest one once full), with use count 0 and insertion time
    ``tick`` (default: the insertion sequence number). ``valid=False`` (may be traced) leaves the state
    unchanged, so a scan can push conditionally without a ``cond``."""
    valid = jnp.asarray(valid, bool)
    w = state.write
    tick = state.count if tick is None else jnp.asarray(tick, jnp.int32)

    def put(buf, x):
        x = jnp.asarray(x, buf.dtype)
        return buf.at[w].set(jnp.where(valid, x, buf[w]))

    items = jax.tree.map(put, state.items, item)
    cap = state.capacity
    return BufferState(
        items=items,
        write=jnp.where(valid, (w + 1) % cap, w),
        size=jnp.where(valid, jnp.minimum(state.size + 1, cap), state.size),
        uses=state.uses.at[w].set(jnp.where(valid, 0, state.uses[w])),
        ticks=state.ticks.at[w].set(jnp.where(valid, tick, state.ticks[w])),
        seq=state.seq.at[w].set(jnp.where(valid, state.count, state.seq[w])),
        count=state.count + valid.astype(jnp.int32),
    )


def eligible(
    state: BufferState, max_reuse: int | None = None, now: jax.Array | int | None = None, delay: int = 0
) -> jax.Array:
    """``[capacity]`` bool: slots that may be sampled: filled, used fewer than ``max_reuse`` times, and (when
    ``now`` is given) inserted at least ``delay`` ticks before ``now`` (a communication delay)."""
    ok = state.seq >= 0
    if max_reuse is not None:
        ok = ok & (state.uses < max_reuse)
    if now is not None:
        ok = ok & (state.ticks + delay <= jnp.asarray(now, jnp.int32))
    return ok


def can_sample(
    state: BufferState, max_reuse: int | None = None, now: jax.Array | int | None = None, delay: int = 0
) -> jax.Array:
    """Scalar bool: whether :func:`sample` would return a valid item (False: the consumer skips its turn)."""
    return jnp.any(eligible(state, max_reuse, now, delay))


def select(
    state: BufferState,
    policy: str = "priority_lifo",
    max_reuse: int | None = None,
    now: jax.Array | int | None = None,
    delay: int = 0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The slot ``policy`` picks and whether it is valid: ``(index int32, valid bool)``; index 0 if invalid."""
    check_policy(policy)
    check_max_reuse(max_reuse)
    ok = eligible(state, max_reuse, now, delay)
    valid = jnp.any(ok)
    big = jnp.iinfo(jnp.int32).max
    if policy == "priority_lifo":
        least = jnp.min(jnp.where(ok, state.uses, big))
        cand = ok & (state.uses == least)
        idx = jnp.argmax(jnp.where(cand, state.seq, -1))
    elif policy == "lifo":
        idx = jnp.argmax(jnp.where(ok, state.seq, -1))
    elif policy == "fifo":
        idx = jnp.argmin(jnp.where(ok, state.seq, big))
    else:  # uniform
        if key is None:
            raise ValueError("policy 'uniform' needs a PRNG key")
        idx = jax.random.categorical(key, jnp.where(ok, 0.0, -jnp.inf))
    idx = jnp.where(valid, idx, 0).astype(jnp.int32)
    return idx, valid


def read(state: BufferState, index: jax.Array, valid: Any = True) -> tuple[PyTree, BufferState]:
    """The item in slot ``index`` and the state with that slot's use count incremented (if ``valid``)."""
    item = jax.tree.map(lambda buf: buf[index], state.items)
    uses = state.uses.at[index].add(jnp.asarray(valid, jnp.int32))
    return item, state._replace(uses=uses)


def sample(
    state: BufferState,
    policy: str = "priority_lifo",
    max_reuse: int | None = None,
    now: jax.Array | int | None = None,
    delay: int = 0,
    key: jax.Array | None = None,
) -> tuple[PyTree, jax.Array, BufferState]:
    """Samples one batch by ``policy``: returns ``(item, valid, new_state)`` (see the module docstring).

    ``max_reuse``: a slot read that many times is no longer eligible (None: unlimited). ``now``/``delay``:
    only items pushed with ``tick <= now - delay`` are eligible.
    """
    idx, valid = select(state, policy, max_reuse, now, delay, key)
    item, new_state = read(state, idx, valid)
    return item, valid, new_state
