"""Sign consensus (TIES's "elect") and the disjoint merge, as mergekit defines them.

Source: Yadav et al., "TIES-Merging" (NeurIPS 2023, arXiv 2306.01708), steps 2–3, in
mergekit's generalised form (``mergekit/merge_methods/generalized_task_arithmetic.py``,
read, not copied). For weighted, sparsified deltas δi = wi·τ̂i (N, ...):

- election ``"sum"`` (TIES): γ = +1 where Σi δi ≥ 0, else −1 (an exact tie elects +);
- election ``"count"``: γ = +1 where Σi sign(δi) ≥ 0, else −1;
- agreement mask: mi = [sign(δi) = γ] (a zero entry never agrees);
- disjoint merge: Σi mi δi, and its normaliser Σi mi wi (1 where that is 0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from swudi_jax.maths.linalg import compute_dtype, sum_leading

CONSENSUS = ("sum", "count")


def elect_sign(delta: jax.Array, method: str = "sum") -> jax.Array:
    """γ ∈ {+1, −1} per entry (...,), in ``delta``'s dtype (the sum accumulated in float32 for
    bf16/f16 deltas, as PyTorch's sum)."""
    if method == "sum":  # sequential adds: fused elementwise, no widened copy of the stack
        score = sum_leading(delta, compute_dtype(delta.dtype))
    elif method == "count":
        score = sum_leading(jnp.sign(delta))
    else:
        raise ValueError(f"consensus must be one of {list(CONSENSUS)}, got {method!r}")
    one = jnp.ones((), delta.dtype)
    return jnp.where(score >= 0, one, -one)


def agreement_mask(delta: jax.Array, method: str = "sum") -> jax.Array:
    """mi = [sign(δi) = γ], boolean (N, ...)."""
    return jnp.sign(delta) == elect_sign(delta, method)[None]


def disjoint_merge(delta: jax.Array, weight: jax.Array, method: str = "sum",
                   rnd: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(Σi mi δi, Σi mi wi with 0 → 1): the merged delta and its normaliser, both (...,), summed
    in the work dtype (:func:`~swudi_jax.maths.linalg.compute_dtype` of delta's: float32 for a
    bf16 stack, which stays bf16 in memory).

    Args:
      delta: weighted deltas wi·τ̂i (N, ...).
      weight: wi (N,), in ``delta``'s dtype.
      method: "sum" or "count" election.
      rnd: rounds each sum to the storage precision (see
        :func:`swudi_jax.methods.sparsify.rounder`); identity if None.
    """
    rnd = rnd or (lambda x: x)
    mask = agreement_mask(delta, method)
    w = weight.reshape((-1,) + (1,) * (delta.ndim - 1))
    work = compute_dtype(delta.dtype)
    merged = rnd(sum_leading(jnp.where(mask, delta, jnp.zeros_like(delta)), work))
    divisor = rnd(sum_leading(jnp.where(mask, w, jnp.zeros_like(w)), work))
    return merged, jnp.where(divisor == 0, jnp.ones_like(divisor), divisor)


__all__ = ["CONSENSUS", "agreement_mask", "disjoint_merge", "elect_sign"]
