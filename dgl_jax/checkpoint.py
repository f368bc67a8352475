"""Save and restore the whole run state with orbax: absolute paths, atomic, checksummed, keep the last N.

A checkpoint is a folder ``<directory>/<global_step>/`` holding two orbax items: ``state`` (the pytree
``{'stages': [StageState, ...], 'extra': ..., 'key': uint32 key data}``) and ``meta`` (JSON: ``epoch``,
``step`` within the epoch, ``global_step``, and a ``signature`` listing every leaf's path, shape and dtype),
plus ``checksums.json`` (the SHA-256 and size of every other file).

**Writing.** orbax writes the folder as ``<step>.partial`` (itself through its own
``*.orbax-checkpoint-tmp*`` folder), then the checksums of every file are written atomically and the folder
is renamed to ``<step>``: a folder named by a step number is always complete. A save that fails (full
disk, no permission) raises :class:`CheckpointWriteError`, one line naming the path and the cause, and
leaves the previous checkpoints as they were; :meth:`Checkpointer.cleanup` removes what an interrupted
save left behind. Old checkpoints beyond ``max_to_keep`` are removed only after the new one is complete.

**Reading.** Before orbax reads anything, the checksums are verified (a flipped bit, a truncated or missing
file is named in one line) and the signature is compared with the current run's, so a checkpoint of
another model or method fails with one clear :class:`CheckpointError` line. :meth:`Checkpointer.restore`
falls back to the newest checkpoint that verifies, reporting each one skipped through ``warn``; orbax's
own logging and asyncio's are silenced while it works (no tracebacks on the failure paths). Checkpoints of
earlier versions (no ``checksums.json``) are still read, unverified.

Fault injection for tests (documented in the README, "Faults"): ``DGL_JAX_FAULT_SAVE_ERROR=N`` makes the
N-th save of the process fail as a full disk would, after orbax has written its files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dgl_jax.distributed import agree, barrier, is_primary
from dgl_jax.files import write_json

PyTree = Any
CHECKSUMS = "checksums.json"
PARTIAL = ".partial"  # suffix of a checkpoint being written
TRASH = ".trash-"  # prefix of a checkpoint being deleted
LEFTOVERS = (".orbax-checkpoint-tmp", PARTIAL, TRASH)  # names of what an interrupted save or delete leaves
_saves_in_process = 0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or written for a different model/method."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (full disk, permissions): the message names the path and cause."""


def state_tree(stages: list, extra: PyTree, key: jax.Array) -> dict:
    """The saved pytree: stage states, method state and the PRNG key as raw ``uint32`` key data."""
    return {"stages": list(stages), "extra": extra, "key": np.asarray(jax.random.key_data(key))}


def signature(tree: PyTree) -> list[str]:
    """``'path shape dtype'`` for every leaf of ``tree``: what must match for a restore to make sense."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [f"{jax.tree_util.keystr(p)} {tuple(np.shape(v))} {np.asarray(v).dtype}" for p, v in leaves]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences orbax's absl logging and asyncio's error reports (their tracebacks) for the duration."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _closed_loop_error(unraisable: Any) -> bool:
    return isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)


def silence_closed_loop_errors() -> None:
    """After a failed orbax write or read, tensorstore's callbacks may still fire into orbax's closed asyncio
    loop, each printing an ignored ``RuntimeError('Event loop is closed')`` traceback: those (and only those)
    are dropped from ``sys.unraisablehook``. Idempotent."""
    hook = sys.unraisablehook
    if getattr(hook, "_dgl_jax_filter", False):
        return

    def filtered(unraisable: Any) -> None:
        if not _closed_loop_error(unraisable):
            hook(unraisable)

    filtered._dgl_jax_filter = True
    sys.unraisablehook = filtered


def file_checksums(folder: Path) -> dict[str, dict]:
    """``{relative path: {'sha256': hex, 'bytes': size}}`` of every file under ``folder`` but ``checksums.json``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel == CHECKSUMS:
                continue
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[rel] = {"sha256": digest, "bytes": path.stat().st_size}
    return dict(sorted(out.items()))


def write_error_cause(e: BaseException) -> str:
    """The cause of a failed write in a few words: the OS error of ``e`` or of its causes (also when orbax /
    tensorstore report it inside a message, ``[os_error_code='28']``), else the first line of ``e``."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        m = re.search(r"os_error_code='?(\d+)", str(seen))
        if m:
            return os.strerror(int(m.group(1)))
        seen = seen.__cause__ or seen.__context__
    return _first_line(e)


class Checkpointer:
    """Checkpoints of one run in ``directory`` (made absolute), keeping the last ``max_to_keep``.

    Saves are synchronous (the run state is small next to an epoch) and atomic (see the module docstring).
    Nothing is created until the first :meth:`save`.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.skipped: list[tuple[int, str]] = []  # (step, why) of the checkpoints the last restore passed over
        self._ckptr = None

    @property
    def orbax(self) -> ocp.Checkpointer:
        if self._ckptr is None:
            self._ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        return self._ckptr

    def path(self, step: int) -> Path:
        return self.directory / str(int(step))

    # -- writing -----------------------------------------------------------------------------------------
    def save(
        self, global_step: int, tree: PyTree, meta: dict, before_commit: Callable[[Path], None] | None = None
    ) -> Path:
        """Writes ``tree`` and ``meta`` (plus the tree's signature) as checkpoint ``global_step``; returns its
        folder. ``before_commit(partial_folder)`` is called once every file and the checksums are written,
        just before the rename that makes the checkpoint visible (a hook for tests). Raises
        :class:`CheckpointWriteError` (one line: the path and the cause) when it cannot be written; the
        previous checkpoints are then untouched and the partial folder is removed."""
        global _saves_in_process
        _saves_in_process += 1
        step = int(global_step)
        final, partial = self.path(step), self.directory / f"{step}{PARTIAL}"
        meta = {**meta, "global_step": step, "signature": signature(tree)}
        primary = is_primary()  # many processes: all write the arrays (orbax), process 0 the rest
        error = None
        try:
            if primary:
                self.directory.mkdir(parents=True, exist_ok=True)
                for old in self.directory.glob(f"{step}{PARTIAL}*"):
                    _remove(old)
            barrier(f"dgl_jax-checkpoint-{step}")
            with quiet():
                self.orbax.save(
                    partial, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
                )
            if os.environ.get("DGL_JAX_FAULT_SAVE_ERROR", "") == str(_saves_in_process):
                raise OSError(errno.ENOSPC, "No space left on device (DGL_JAX_FAULT_SAVE_ERROR)", str(partial))
            if primary:
                write_json(partial / CHECKSUMS, {"algorithm": "sha256", "files": file_checksums(partial)})
                if before_commit is not None:
                    before_commit(partial)
                if final.exists():  # an unusable checkpoint of this step (passed over by restore): replaced
                    self._trash(final)
                os.replace(partial, final)
                _fsync_dir(self.directory)
        except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
            silence_closed_loop_errors()
            if primary:
                with contextlib.suppress(OSError):
                    for old in self.directory.glob(f"{step}{PARTIAL}*"):
                        _remove(old)
            error = f"cannot write checkpoint {final}: {write_error_cause(e)}"
        error = agree("checkpoint", error)  # the others learn how process 0's commit went
        if error is not None:
            raise CheckpointWriteError(error)
        if primary:
            self._drop_old()
        return final

    def _trash(self, folder: Path) -> None:
        """Removes ``folder``: renamed first, so an interrupted removal never leaves a half step folder."""
        trash = folder.with_name(f"{TRASH}{folder.name}")
        _remove(trash)
        os.replace(folder, trash)
        _remove(trash)

    def _drop_old(self) -> None:
        steps = self.steps()
        for step in steps[: max(0, len(steps) - self.max_to_keep)]:
            with contextlib.suppress(OSError):
                self._trash(self.path(step))

    def cleanup(self) -> list[str]:
        """Removes what interrupted saves and removals left (``*.partial``, ``*.orbax-checkpoint-tmp*``,
        ``.trash-*``); returns their names. Only for the process that owns the run (it holds its lock)."""
        if not self.directory.is_dir():
            return []
        gone = []
        for p in sorted(self.directory.iterdir()):
            if any(marker in p.name for marker in LEFTOVERS):
                with contextlib.suppress(OSError):
                    _remove(p)
                    gone.append(p.name)
        return gone

    def set_aside(self, step: int) -> Path:
        """Renames checkpoint ``step`` to ``<step>.corrupt`` (kept for inspection, no longer a checkpoint)."""
        src = self.path(step)
        dst, i = src.with_name(f"{step}.corrupt"), 1
        while dst.exists():
            dst, i = src.with_name(f"{step}.corrupt{i}"), i + 1
        os.replace(src, dst)
        return dst

    # -- reading -----------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (folders named by a number), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def verify(self, step: int) -> str | None:
        """None if checkpoint ``step`` matches its checksums (or predates them), else why not, naming the file."""
        folder = self.path(step)
        sums = folder / CHECKSUMS
        if not sums.exists():
            return None if folder.is_dir() else f"{folder} is missing"
        try:
            files = json.loads(sums.read_text())["files"]
            items = [(str(rel), str(v["sha256"]), int(v["bytes"])) for rel, v in files.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{sums} is unreadable ({type(e).__name__})"
        for rel, digest, size in items:
            path = folder / rel
            try:
                have = path.stat().st_size
                with open(path, "rb") as f:
                    ok = hashlib.file_digest(f, "sha256").hexdigest() == digest
            except FileNotFoundError:
                return f"{path} is missing"
            except OSError as e:
                return f"{path} is unreadable ({e.strerror or type(e).__name__})"
            if have != size:
                return f"{path} is truncated or extended ({have} bytes, {size} written)"
            if not ok:
                return f"{path} does not match its checksum (corrupted)"
        return None

    def restore(
        self, template: PyTree, step: int | None = None, warn: Callable[[str], None] | None = None
    ) -> tuple[PyTree, dict]:
        """Restores checkpoint ``step`` (default: the newest that is usable) into the structure of ``template``.

        Each newer checkpoint passed over (checksum mismatch, truncated, missing or unreadable file) is
        reported through ``warn`` (default: :func:`warnings.warn`), one line naming the file, and recorded in
        :attr:`skipped`. Raises :class:`CheckpointError` when there is none, when none is usable, or when the
        checkpoint was written for a differently shaped state (other model, split, method or dtype).
        """
        warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))
        candidates = [int(step)] if step is not None else self.steps()[::-1]
        self.skipped = []
        if not candidates:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        for s in candidates:
            try:
                restored, meta = self._restore_one(template, s)
            except _Unusable as e:
                self.skipped.append((s, str(e)))
                continue
            for bad, why in self.skipped:
                warn(f"checkpoint {self.path(bad)} is unusable: {why}; using checkpoint {self.path(s)} instead")
            return restored, meta
        if len(self.skipped) == 1:
            raise CheckpointError(f"no usable checkpoint: {self.skipped[0][1]}")
        why = "; ".join(f"{s}: {w}" for s, w in self.skipped)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: {why}")

    def _restore_one(self, template: PyTree, step: int) -> tuple[PyTree, dict]:
        folder = self.path(step)
        problem = self.verify(step)
        if problem is not None:
            raise _Unusable(problem)
        try:
            with quiet():
                meta = self.orbax.restore(folder, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
            silence_closed_loop_errors()
            raise _Unusable(f"checkpoint {folder} is unreadable: {_first_line(e)}") from None
        if not isinstance(meta, dict) or "signature" not in meta:
            raise _Unusable(f"checkpoint {folder} has no dgl_jax metadata")
        want, have = signature(template), list(meta["signature"])
        if want != have:
            diff = next(
                (f"{h!r} in the checkpoint vs {w!r} now" for w, h in zip(want, have, strict=False) if w != h),
                f"{len(have)} arrays in the checkpoint vs {len(want)} now",
            )
            raise CheckpointError(
                f"checkpoint {folder} does not match this run's model/method: first difference {diff}"
            )
        try:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            with quiet():
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                restored = self.orbax.restore(folder, args=args)["state"]
        except Exception as e:  # noqa: BLE001
            silence_closed_loop_errors()
            raise _Unusable(f"checkpoint {folder} is unreadable: {_first_line(e)}") from None
        restored = jax.tree.map(lambda t, r: jax.numpy.asarray(r, dtype=np.asarray(t).dtype), template, restored)
        return restored, meta

    def read(self, step: int | None = None) -> PyTree:
        """The saved state pytree of checkpoint ``step`` (default: the newest) as orbax reads it back, without a
        template (dicts and lists of arrays), after verifying its checksums."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        problem = self.verify(step)
        if problem is not None:
            raise CheckpointError(problem)
        with quiet():
            return self.orbax.restore(self.path(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
                "state"
            ]

    def close(self) -> None:
        if self._ckptr is not None:
            self._ckptr.close()
            self._ckptr = None


class _Unusable(Exception):
    """A checkpoint that cannot be read (corrupt, truncated, missing): restore falls back to an older one."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
