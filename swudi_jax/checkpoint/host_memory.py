"""Freed tensor buffers handed back to the operating system during a ``swudi-merge`` run (glibc).

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with a mapping of its own and
unmaps it on free. The threshold starts at 128 KiB and, by default, rises to the size of each
such block freed, up to 32 MiB: once a merge has freed its first 12 MB tensor buffer, later
buffers of up to that size are carved from the heap, whose freed space fragments and stays
resident — the process's peak then counts tensors it no longer holds. Setting the threshold
(``mallopt(M_MMAP_THRESHOLD, ...)``) turns that adjustment off. The program does this once at
start (``swudi_jax_cli.main``: ``swudi-merge``, ``python -m swudi_jax_cli``); the library never
does, ``swudi_jax.checkpoint.cli.main`` called in-process included (it would change its caller's
process). A threshold set through the environment (``MALLOC_MMAP_THRESHOLD_``) is left as it is,
and so is any C library that is not glibc. Measured in ``benchmarks/README.md`` ("Against mergekit-yaml").
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""
MMAP_THRESHOLD = 1 << 20
"""Buffers of at least 1 MiB get their own mapping (a tensor's, not the interpreter's small objects)."""


def return_freed_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1


__all__ = ["MMAP_THRESHOLD", "return_freed_buffers"]
