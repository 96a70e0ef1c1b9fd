"""Shared fixtures: the SWUDI authors' golden outputs and random task-vector stacks."""

from __future__ import annotations

import os
from pathlib import Path

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
