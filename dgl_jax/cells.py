"""Resumable grids of experiment cells: each cell (a configuration x a seed) is written to the results JSON as
soon as it finishes, with its provenance, and re-running the same command skips the finished ones.

A grid is a JSON object::

    {"ident": {...},            # what the grid measures (budget, configuration): a re-run must match it
     "git_sha": "...",          # the commit of the newest cell; "git_shas": every commit the cells came from
     "seeds": [0, 1, 2], ...,   # whatever the caller's header adds
     "cells": {"<cell id>": {..., "wall_s": s, "git_sha": "...", "git_dirty": false, "machine": {...}}}}

so a table can be finished over several sittings, or on several machines, and each number still names the
code and the machine it came from.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dgl_jax import provenance
from dgl_jax.files import write_json

Cell = tuple[str, Callable[[], dict]]


class GridError(ValueError):
    """The results file cannot be resumed (unreadable, or it holds a grid of another identity)."""


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys where ``a`` and ``b`` differ, nested dictionaries as ``config.lr``."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def open_grid(path: str | Path, ident: Mapping[str, Any]) -> dict:
    """The grid stored at ``path`` with its finished cells, or a new empty one; :class:`GridError` when the file
    is unreadable or was written for another ``ident``."""
    path = Path(path)
    if not path.is_file():
        return {"ident": dict(ident), "cells": {}}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GridError(f"{path}: unreadable ({e}); move it away or use another output path") from None
    stored = old.get("ident")
    ident = json.loads(json.dumps(ident))  # tuples -> lists, as stored
    if stored is None:  # written before grids carried an identity: its top-level fields of the same names
        old["ident"] = ident  # stand for it, and it adopts the caller's
        stored, ident = {k: old[k] for k in ident if k in old}, {k: ident[k] for k in ident if k in old}
    if stored != ident:
        keys = ", ".join(_differences(stored, ident))
        raise GridError(f"{path} holds a grid of another configuration (differs in {keys}); use another output path")
    old.setdefault("cells", {})
    return old


def run_grid(
    path: str | Path,
    ident: Mapping[str, Any],
    cells: Sequence[Cell],
    header: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    derive: Callable[[dict], None] | None = None,
    written: Callable[[dict], None] | None = None,
) -> dict:
    """Runs every cell of ``cells`` (``(cell_id, fn)``; ``fn()`` returns the cell's JSON-able result) that
    ``path`` does not hold yet, writing the grid after each one; returns the grid.

    ``header`` is merged into the grid's top level (e.g. ``seeds``, ``command``) and written at once when the
    grid holds cells already; ``derive(grid)``, called before each write, refreshes what the grid derives
    from its cells (a summary); ``written(grid)``, called after each write, renders what follows the file
    (tables, plots: an error there loses no cell). On ``KeyboardInterrupt`` the cell in flight is lost
    (unless it checkpoints itself), the others are kept, one line says how to resume, and the interrupt
    propagates.
    """
    path = Path(path)
    grid = open_grid(path, ident)
    grid.update(header or {})

    def write() -> None:
        _stamp(grid, derive)
        write_json(path, grid)
        if written is not None:
            written(grid)

    if grid["cells"]:  # the header and derived fields of this run, before its first cell
        write()
    machine, sha, dirty = None, None, None
    done = lambda: sum(cid in grid["cells"] for cid, _ in cells)  # noqa: E731
    try:
        for i, (cid, fn) in enumerate(cells, 1):
            if cid in grid["cells"]:
                log(f"[{i}/{len(cells)}] {cid}: done already (in {path.name})")
                continue
            if machine is None:
                machine, sha, dirty = provenance.machine(), provenance.git_sha(), provenance.git_dirty()
            log(f"[{i}/{len(cells)}] {cid}: running")
            t0 = time.perf_counter()
            value = fn()
            grid["cells"][cid] = {
                **value,
                "wall_s": time.perf_counter() - t0,
                "git_sha": sha,
                "git_dirty": dirty,
                "machine": machine,
            }
            write()
    except KeyboardInterrupt:
        log(f"interrupted: {done()} of {len(cells)} cells saved in {path}; re-run the same command to resume")
        raise
    if grid["cells"] or not path.exists():
        write()
    else:
        _stamp(grid, derive)
    return grid


def _stamp(grid: dict, derive: Callable[[dict], None] | None = None) -> None:
    """Top-level ``git_sha`` (the newest cell's), ``git_shas`` (all of them), ``machines`` and what ``derive``
    adds."""
    cells = list(grid["cells"].values())
    shas = [c.get("git_sha") for c in cells]
    grid["git_sha"] = shas[-1] if shas else provenance.git_sha()
    grid["git_shas"] = sorted({s for s in shas if s})
    grid["machines"] = sorted({c["machine"]["cpu_model"] for c in cells if c.get("machine")})
    if derive is not None:
        derive(grid)


def mean_std(values: ArrayLike, axis: int = 0) -> tuple[Any, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of ``values`` over ``axis`` (the seeds),
    ignoring NaN: arrays of the remaining shape, or NaN, NaN when ``values`` is empty."""
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return np.nan, np.nan
    with warnings.catch_warnings():  # entries that are NaN in every seed stay NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(a, axis)
        std = np.nanstd(a, axis, ddof=1) if a.shape[axis] > 1 else np.zeros_like(mean)
    return mean, std
