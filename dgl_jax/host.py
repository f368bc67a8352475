"""Host-side settings of a training process.

:func:`keep_freed_memory` stops glibc's ``malloc`` from handing large freed blocks back to the kernel. XLA:CPU
allocates every jitted call's temporaries and outputs afresh; with glibc's defaults each block above 32 MiB
is a new ``mmap`` whose pages fault in on first touch, every step (``benchmarks/step_time.py`` measures the
page faults and system time; the figures are in the README).
Kept, the same pages are reused and the faults disappear. The command line applies it by default
(``--malloc keep``); library users call it themselves, early, before the first computation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _mallopt():
    """glibc's ``mallopt``, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Asks glibc's ``malloc`` to keep freed memory for reuse: one arena, no ``mmap``-backed blocks, no trim
    below 2 GiB of free heap. Process-wide; the process keeps its peak heap. Returns True when applied, False
    where it does not apply (not Linux, not glibc, or refused)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
