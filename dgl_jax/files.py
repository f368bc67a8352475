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

Run folders: :class:`FolderLock` (one process per run folder: an OS lock on ``<folder>/.lock`` holding the
owner's pid) and :func:`check_creatable` (can a folder be made there, before any work is done).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FolderLock",
    "FolderLockedError",
    "check_creatable",
    "json_clean",
    "json_ready",
    "save_figure",
    "write_atomic",
    "write_json",
]


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno and e.filename in (None, tmp):  # name the file being written
            raise OSError(e.errno, e.strerror, str(path)) from None
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


# ----------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------
class FolderLockedError(RuntimeError):
    """The folder is locked by another live process: ``pid`` (None when it could not be read)."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"folder {path.parent} is in use by {who} (lock file {path}); wait for it to end or stop it")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on ``folder`` for this process: ``fcntl.flock`` on ``<folder>/.lock``, which holds
    the owner's pid. The OS releases the lock when its process dies, however it dies, so a lock file
    left by a dead process (its pid no longer running) is stale and simply taken over. Where the file system
    has no ``flock`` (some network file systems) the pid alone decides: a lock file naming another live
    process is held. The lock file is never deleted (a deleted file could be locked twice)."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None
        self.stale_pid: int | None = None  # the dead owner of a stale lock taken over, if any

    def _read_pid(self, fd: int) -> int | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> FolderLock:
        """Takes the lock; raises :class:`FolderLockedError` if another live process holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: the pid decides
            fcntl = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                if fcntl is None:
                    raise OSError(errno.ENOSYS, "no flock")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = None
                for _ in range(20):  # the holder writes its pid right after locking
                    pid = self._read_pid(fd)
                    if pid:
                        break
                    time.sleep(0.01)
                raise FolderLockedError(self.path, pid) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                pid = self._read_pid(fd)  # no flock here: the pid decides
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise FolderLockedError(self.path, pid) from None
            old = self._read_pid(fd)
            self.stale_pid = old if old and old != os.getpid() else None
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Releases the lock (the file stays, emptied)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_creatable(folder: str | os.PathLike) -> str | None:
    """None if files can be written in ``folder`` (made if missing), else why not in a few words. Tried for
    real (a temporary folder made and removed in ``folder`` or its nearest existing parent), so read-only
    file systems, pseudo file systems (``/proc``), permissions and a path through a regular file all show."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    try:
        probe = tempfile.mkdtemp(dir=parent, prefix=".dgl_jax-probe-")
        os.rmdir(probe)
    except OSError as e:
        return f"cannot create anything in {parent}: {e.strerror or type(e).__name__}"
    return None
