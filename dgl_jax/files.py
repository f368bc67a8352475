"""Files written whole or not at all: a reader (or a crash) never sees half a JSON file or half a PNG.

Every writer goes through a temporary file in the destination's folder (same file system), flushed and
``fsync``-ed, then ``os.replace``-d over the destination (atomic on POSIX and Windows); the temporary is
removed if anything fails. Written files get mode ``0o644``.

* :func:`write_atomic`: text or bytes.
* :func:`write_json`: strict JSON (NaN/inf become ``null``, numpy scalars Python numbers), indent 2, a
  trailing newline.
* :func:`save_figure`: a matplotlib figure.
* :func:`json_ready` / :func:`json_clean`: the conversions, for callers writing JSON themselves (e.g. one
  line per record).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["json_clean", "json_ready", "save_figure", "write_atomic", "write_json"]


def _replace_via_temp(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp)`` on a fresh temporary path next to ``path``, then moves it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes on disk before the rename makes them visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` (``str`` as UTF-8, or ``bytes``) to ``path`` atomically."""
    blob = data.encode() if isinstance(data, str) else bytes(data)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(blob)

    _replace_via_temp(path, write)


def json_ready(x: Any) -> Any:
    """``x`` with numpy scalars turned into Python numbers and tuples into lists, recursively (dict keys and
    other values unchanged)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


def json_clean(x: Any) -> Any:
    """:func:`json_ready`, and NaN/inf become ``None``: ``json.dumps`` of the result is strict JSON."""
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as strict JSON (see :func:`json_clean`), indent 2 and a trailing newline, atomically."""
    write_atomic(path, json.dumps(json_clean(obj), indent=2) + "\n")


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Saves the matplotlib figure ``fig`` to ``path`` atomically (the format from ``path``'s suffix unless
    ``format=`` is given; other keywords go to ``fig.savefig``); returns ``path``. The figure stays open."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", None) or (path.suffix[1:] or None)
    return _replace_via_temp(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
