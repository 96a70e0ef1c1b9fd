"""The eager layer functions' last check: a finite result, or a ValueError naming the cause.

The task vectors are checked finite where they enter (:func:`swudi_jax.maths.validation.check_task_vectors`),
yet finite inputs can overflow: the interference operator C = Σ wi τiᵀτi squares the entries,
(as do the task weights' norms ‖τi‖²), so |τ| ≈ 1e20 already exceeds float32's largest value (≈ 3.4e38) and the closed form returns
NaN. Called eagerly, a layer function refuses such a result, as ``swudi-merge`` refuses a
non-finite merged tensor. Under ``jax.jit`` or ``jax.vmap`` (the merger's path) the values are
tracers and cannot be read: the result is returned unchecked, and the merger checks its outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.maths.validation import all_finite, is_concrete, non_finite


def finite_result(result: jax.Array, tau: jax.Array, method: str) -> jax.Array:
    """``result`` of an eager call of ``method`` on the (finite) task vectors ``tau``, or a
    ValueError saying that the merge overflowed, with the largest |τ| and the compute dtype."""
    if not (is_concrete(result) and is_concrete(tau)) or all_finite(result):
        return result
    count = non_finite(result)[0]
    dtype = jnp.dtype(compute_dtype(jnp.asarray(tau).dtype))  # float32 unless jax_enable_x64
    peak = float(jnp.max(jnp.abs(tau)))
    raise ValueError(
        f"{method}: the merged task vector has {count} non-finite value(s) (NaN/Inf) although the task vectors "
        f"are finite: the merge overflowed in {dtype} (entries up to |τ| = {peak:.3g} enter the squared norms "
        f"‖τi‖² and the Gram C = Σ wi τiᵀτi squared; {dtype} holds at most {float(jnp.finfo(dtype).max):.3g}); "
        "scale the task vectors down, or pass them in float64 with jax_enable_x64")


__all__ = ["finite_result"]
