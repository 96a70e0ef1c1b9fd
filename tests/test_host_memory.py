"""swudi-merge hands freed tensor buffers back to the OS (glibc's mmap threshold, fixed at start).

The check runs in its own interpreter: changing the allocator of the test process would touch
every later test."""

import ctypes
import os
import subprocess
import sys

import pytest

CHECK = """
import numpy as np
from swudi_jax.checkpoint import host_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
assert host_memory.return_freed_buffers() is True
big = np.ones(4 << 20)  # 32 MB, freed: glibc's default would now serve 8 MB buffers from its heap
del big
before = rss()
buffers = [np.ones(1 << 20) for _ in range(50)]  # 50 x 8 MB
assert rss() - before > 300 << 20
del buffers
assert rss() - before < 40 << 20, rss() - before  # returned, not kept in the heap
"""


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt")
def test_freed_buffers_leave_the_process_once_the_threshold_is_fixed():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_threshold_from_the_environment_is_left_alone():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    code = "from swudi_jax.checkpoint import host_memory; assert host_memory.return_freed_buffers() is False"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
