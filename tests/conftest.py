"""Shared fixtures and helpers: the SWUDI authors' golden outputs, random task-vector stacks, expert
models, relative errors and folder snapshots (imported by the test modules as ``from conftest import ...``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
"""CI (which sets CI=true) runs every property test on the same examples, so a red run reruns red."""
if os.environ.get("CI"):
    settings.load_profile("ci")

# the CLI turns on JAX's persistent compilation cache (swudi_jax.compile_cache); the test
# suite must not write into the user's cache folder, so it runs with the cache off unless asked
os.environ.setdefault("SWUDI_JAX_COMPILE_CACHE", "off")

GOLDEN = Path(__file__).resolve().parent / "data" / "golden.npz"
"""Inputs and outputs of the SWUDI authors' PyTorch code (see data/GOLDEN_README.md)."""


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test module, drop JAX's compiled programs (``jax.clear_caches``).

    XLA's CPU backend keeps each compiled program in memory mappings of its own (about three), and
    JAX's caches keep every program a process has compiled. The whole suite in one process compiles
    tens of thousands of them: past Linux's ``vm.max_map_count`` (65530 by default) the next
    mapping fails inside LLVM and the run dies of SIGSEGV. No test reuses another module's programs.
    jax is only cleared when a test has imported it (a module that never does leaves it unimported)."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(GOLDEN))


def random_task_vectors(seed: int, n_tasks: int, m: int, n: int, rank: int | None = None,
                        noise: float = 0.05, dtype=np.float32) -> np.ndarray:
    """Low-rank-plus-noise task vectors (N, m, n), like fine-tuning deltas."""
    rng = np.random.default_rng(seed)
    rank = rank or max(1, min(m, n) // 4)
    out = []
    for _ in range(n_tasks):
        low = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(rank * n)
        out.append(low + noise * rng.normal(size=(m, n)) / np.sqrt(n))
    return np.stack(out).astype(dtype)


def tau64(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """``random_task_vectors`` in float64, shape (N, m, n)."""
    return random_task_vectors(seed, *shape, dtype=np.float64)


def rel_err(got, want) -> float:
    """‖got − want‖_F / ‖want‖_F in float64 (the denominator floored at 1e-300, so 0/0 reads 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def experts_of(base: dict[str, np.ndarray], rng: np.random.Generator, n: int = 3,
               size: float = 0.05) -> list[dict[str, np.ndarray]]:
    """n flat models base + size·N(0, 1) on every floating tensor (bfloat16 included), a copy of the others.

    The draws follow the order of ``base``'s keys, expert after expert."""
    return [{k: (v + size * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16
             else v.copy() for k, v in base.items()} for _ in range(n)]


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under root: a file's (bytes, mtime in ns); a symbolic link's (target,), never followed."""
    return {str(p): (os.readlink(p),) if p.is_symlink() else (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}
