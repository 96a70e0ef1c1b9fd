"""swudi-merge hands freed tensor buffers back to the OS (glibc's mmap threshold, fixed at start)."""

import ctypes
import sys

import numpy as np
import pytest

from swudi_jax.checkpoint import host_memory


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt")
def test_freed_buffers_leave_the_process_once_the_threshold_is_fixed(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert host_memory.return_freed_buffers() is True
    big = np.ones(4 << 20)  # 32 MB, freed: glibc's default would now serve 8 MB buffers from its heap
    del big
    before = _rss_bytes()
    buffers = [np.ones(1 << 20) for _ in range(50)]  # 50 × 8 MB
    assert _rss_bytes() - before > 300 << 20
    del buffers
    assert _rss_bytes() - before < 40 << 20  # returned, not kept in the heap


def test_a_threshold_from_the_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert host_memory.return_freed_buffers() is False
