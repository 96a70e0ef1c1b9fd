"""The precision and dtype rules every matmul of the maths follows.

Matmuls run at ``precision=HIGHEST``: accelerators would otherwise use reduced-precision
passes (TF32 on GPUs, bf16 on TPUs), and the small eigenvalues of C decide the filter.
Work happens in float32, or float64 when the input is float64 (``jax_enable_x64``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def matmul(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a @ b at ``precision=HIGHEST``."""
    return jnp.matmul(a, b, precision=HIGHEST)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the maths runs in: float64 stays float64, everything else float32."""
    return jnp.promote_types(dtype, jnp.float32)


__all__ = ["HIGHEST", "compute_dtype", "matmul"]
