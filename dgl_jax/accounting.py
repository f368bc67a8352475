"""Bytes of what crosses a boundary and of what replay buffers store, read from the arrays themselves.

Every figure here is the ``nbytes`` (size x itemsize) of a pytree's leaves, for concrete arrays or for
``jax.ShapeDtypeStruct`` s (so it can be computed statically with ``jax.eval_shape``): never an ideal bit
count of a format the code does not produce.

* :func:`nbytes`: bytes of any pytree of arrays.
* :func:`boundary_traffic`: per boundary, the wire each step sends (its codec's output, codebook syncs
  included) against the same message in float32.
* :func:`buffer_memory`: per replay buffer, the bytes of the stored items against float32 messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def nbytes(tree: PyTree) -> int:
    """Sum of ``size * itemsize`` over the array leaves of ``tree`` (arrays or ``ShapeDtypeStruct`` s); other
    leaves (Python numbers, markers) carry no array bytes and count 0."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")]
    return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def float32_bytes(tree: PyTree) -> int:
    """Bytes of ``tree`` if every floating leaf were float32 (the reference plain DGL sends)."""
    return int(
        sum(
            int(np.prod(leaf.shape))
            * (4 if jnp.issubdtype(leaf.dtype, jnp.floating) else np.dtype(leaf.dtype).itemsize)
            for leaf in jax.tree.leaves(tree)
        )
    )


def boundary_traffic(stages: Sequence[Any], states: Sequence[Any], example: PyTree) -> list[dict[str, Any]]:
    """Per boundary ``j -> j+1`` for one batch shaped like ``example``: ``wire_bytes`` (what stage j's codec
    sends per step), ``float32_bytes`` (the message as float32), their ``ratio`` and the ``codec`` name."""
    from dgl_jax.stage import message_specs, wire_spec

    out = []
    messages = message_specs(stages, states, example)
    for j, (stage, st, msg) in enumerate(zip(stages[:-1], states[:-1], messages, strict=True)):
        wire = wire_spec(stage, st.codec, msg)
        w, f = nbytes(wire), float32_bytes(msg)
        name = "identity" if stage.codec is None else stage.codec.name
        out.append({"boundary": j, "codec": name, "wire_bytes": w, "float32_bytes": f, "ratio": f / max(w, 1)})
    return out


def buffer_memory(stages: Sequence[Any], buffers: Sequence[Any]) -> list[dict[str, int]]:
    """Per replay buffer (input of stage j+1): ``stored_bytes`` (every slot's ``(wire, targets)`` as
    allocated) and ``float32_bytes`` (the same slots holding float32 messages and the targets)."""
    from dgl_jax.stage import decode_message

    out = []
    for stage, buf in zip(stages[:-1], buffers, strict=True):
        wire, targets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), buf.items)
        msg = jax.eval_shape(lambda w, s=stage: decode_message(s, w), wire)
        cap = buf.capacity
        out.append({"stored_bytes": nbytes(buf.items), "float32_bytes": cap * (float32_bytes(msg) + nbytes(targets))})
    return out
