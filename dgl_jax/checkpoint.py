"""Save and restore the whole run state with orbax (absolute paths, atomic, keep the last N).

A checkpoint is a folder ``<run_dir>/checkpoints/<global_step>/`` holding two orbax items: ``state`` (the
pytree ``{'stages': [StageState, ...], 'extra': ..., 'key': uint32 key data}``) and ``meta`` (JSON:
``epoch``, ``step`` within the epoch, ``global_step``, and a ``signature`` listing every leaf's path, shape
and dtype). Before orbax reads any array the signature is compared with the current run's, so a
checkpoint of another model or method fails with one clear :class:`CheckpointError` line; unreadable
(corrupted, truncated) checkpoints raise :class:`CheckpointError` too instead of a deep orbax traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, or written for a different model/method."""


def state_tree(stages: list, extra: PyTree, key: jax.Array) -> dict:
    """The saved pytree: stage states, method state and the PRNG key as raw ``uint32`` key data."""
    return {"stages": list(stages), "extra": extra, "key": jax.random.key_data(key)}


def signature(tree: PyTree) -> list[str]:
    """``'path shape dtype'`` for every leaf of ``tree``: what must match for a restore to make sense."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [f"{jax.tree_util.keystr(p)} {tuple(np.shape(v))} {np.asarray(v).dtype}" for p, v in leaves]


class Checkpointer:
    """Orbax ``CheckpointManager`` over ``directory`` (made absolute) keeping the last ``max_to_keep``.

    Saves are synchronous (the run state is small next to an epoch) and atomic: orbax writes to a temporary
    folder and renames it when complete, so an interrupted save leaves the previous checkpoint intact.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
            item_names=("state", "meta"),
        )

    def save(self, global_step: int, tree: PyTree, meta: dict) -> None:
        """Writes ``tree`` and ``meta`` (plus the tree's signature) as checkpoint ``global_step``."""
        meta = {**meta, "global_step": int(global_step), "signature": signature(tree)}
        self.manager.save(
            int(global_step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores checkpoint ``step`` (default: the latest) into the structure of ``template``.

        Raises :class:`CheckpointError` when there is none, when it was written for a differently shaped
        state (other model, split, method or dtype), or when orbax cannot read it.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is unreadable: {_first_line(e)}") from e
        if not isinstance(meta, dict) or "signature" not in meta:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no dgl_jax metadata")
        want, have = signature(template), list(meta["signature"])
        if want != have:
            diff = next(
                (f"{h!r} in the checkpoint vs {w!r} now" for w, h in zip(want, have, strict=False) if w != h),
                f"{len(have)} arrays in the checkpoint vs {len(want)} now",
            )
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this run's model/method: first "
                f"difference {diff}"
            )
        try:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
                "state"
            ]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is unreadable: {_first_line(e)}") from e
        restored = jax.tree.map(lambda t, r: jax.numpy.asarray(r, dtype=np.asarray(t).dtype), template, restored)
        return restored, meta

    def close(self) -> None:
        self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
