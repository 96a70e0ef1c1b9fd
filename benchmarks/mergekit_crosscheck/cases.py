"""The cross-check cases: inputs made from a seed, and each method's parameters.

Shared by ``run_mergekit.py`` (runs in a separate venv holding mergekit and torch) and
``compare.py`` (runs swudi_jax); NumPy only.
"""

from __future__ import annotations

import numpy as np

N = 3
W = [1.0, 0.5, 0.7]

# name: (mergekit method, mergekit parameters); lam is mergekit's "lambda"
FAMILY = {
    "task_arithmetic": ("task_arithmetic", {"weight": W}),
    "task_arithmetic_norm_lam": ("task_arithmetic", {"weight": W, "normalize": True, "lambda": 0.8}),
    "ties": ("ties", {"weight": W, "density": [0.3, 0.5, 0.7]}),
    "ties_nonorm_rescale": ("ties", {"weight": W, "density": 0.4, "normalize": False, "rescale": True}),
    "dare_ties": ("dare_ties", {"weight": W, "density": [0.5, 0.6, 0.4]}),
    "dare_linear": ("dare_linear", {"weight": W, "density": 0.5}),
    "breadcrumbs": ("breadcrumbs", {"weight": W, "density": 0.5, "gamma": 0.1}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"weight": W, "density": [0.6, 0.5, 0.4], "gamma": 0.05}),
    "della": ("della", {"weight": W, "density": 0.5, "epsilon": 0.2}),
    "della_linear": ("della_linear", {"weight": W, "density": [0.4, 0.5, 0.6], "epsilon": 0.1, "lambda": 1.1}),
    "sce_topk": ("sce", {"select_topk": 0.5}),
    "sce": ("sce", {}),
}


def inputs(kind: str, shape=(48, 40), seed: int = 1234) -> dict[str, np.ndarray]:
    """base (shape), models (N, shape), uniforms (N, shape) as float32.

    kind "normal": Gaussian weights, task vectors 0.1·N(0, 1) with sign conflicts in the
    first two rows. kind "grid": every value a multiple of 1/64 with distinct magnitudes per
    task vector, exact in bfloat16 (no ties for torch's unstable sort to break).
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if kind == "normal":
        base = rng.normal(size=shape).astype(np.float32)
        tau = (rng.normal(size=(N,) + shape) * 0.1).astype(np.float32)
        tau[1, :2] = -tau[0, :2]
    elif kind == "grid":
        if size > 190:
            raise ValueError("grid inputs need at most 190 entries to stay exact in bfloat16")
        base = (rng.integers(-8, 9, size=shape) / 8).astype(np.float32)
        tau = np.stack([(rng.permutation(size) + 1).reshape(shape) * rng.choice([-1, 1], size=shape) / 64
                        for _ in range(N)]).astype(np.float32)
    else:
        raise ValueError(kind)
    return {"base": base, "models": (base[None] + tau).astype(np.float32),
            "uniforms": rng.random(size=(N,) + shape).astype(np.float32)}
