"""Where a figure comes from: the git commit, the machine and the package versions it was measured with.

Every results JSON of ``benchmarks/``, ``experiments/`` and ``python -m dgl_jax sweep`` records these, so that a
number can be traced to the code that produced it (and marked stale when that code changes).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ray")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("experiments/results", "benchmarks/results")
"""The folders the measurements write into: what they hold is output, not code, so it does not make a tree dirty."""


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None


def git_sha() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package was imported from, or ``None`` outside one."""
    return _git("rev-parse", "HEAD") or None


def git_dirty(root: Path = ROOT) -> bool | None:
    """Whether tracked files of the checkout at ``root`` (default: this package's) other than those under
    :data:`RESULTS` differ from ``HEAD`` (``None`` outside a checkout): a figure measured on a dirty tree is
    not exactly reproducible from :func:`git_sha`. A results file a resumed run is filling does not count."""
    excluded = [f":(exclude){p}" for p in RESULTS]
    out = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded, root=root)
    return None if out is None else bool(out)


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Python's and the installed packages' versions (``None`` for a package that is not installed)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The host and the JAX devices a figure was measured on, with :func:`versions`."""
    import jax

    dev = jax.devices()[0]
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax_backend": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(),
    }


def provenance() -> dict[str, Any]:
    """``git_sha``, ``git_dirty`` and ``machine``: the keys every results JSON carries."""
    return {"git_sha": git_sha(), "git_dirty": git_dirty(), "machine": machine()}


def command(prog: str, argv: Sequence[str] | None = None) -> str:
    """The shell line that re-runs a script: ``prog``, then ``argv`` (default ``sys.argv[1:]``) with each
    argument quoted as a POSIX shell needs (``--runs 'sequential (same total epochs)'``)."""
    return " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
