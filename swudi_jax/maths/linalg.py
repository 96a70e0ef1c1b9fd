"""The precision and dtype rules every stage follows: one place decides them.

Matmuls run at ``precision=HIGHEST``: accelerators would otherwise use reduced-precision
passes (TF32 on GPUs, bf16 on TPUs), and the small eigenvalues of C decide the filter.
Work happens in float32, or float64 when the input is float64 (``jax_enable_x64``), or in a
dtype the merge asks for where the method is defined in it (:func:`compute_dtype`).
"Floating" means one thing everywhere (:func:`is_floating`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def matmul(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a @ b at ``precision=HIGHEST``."""
    return jnp.matmul(a, b, precision=HIGHEST)


def is_floating(dtype: Any) -> bool:
    """True for a real floating dtype: float16/32/64 and the ml_dtypes narrow floats (bfloat16,
    the float8 variants), whatever NumPy's ``kind`` letter for them; False for integers,
    booleans and complex numbers. Such leaves are merged; the others pass through."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def compute_dtype(*dtypes: Any, requested: Any = None, defined_in: Collection[str] | None = None,
                  canonical: bool = True) -> np.dtype:
    """The dtype the maths runs in: the one rule every stage asks.

    Args:
      *dtypes: the inputs' dtypes; with nothing ``requested`` the result is their promotion
        with float32: float64 stays float64, every narrower float (bfloat16, float16, float8)
        and every integer computes in float32.
      requested: a dtype (or its name) the merge asks for (``merge(dtype=…)``, a config's
        ``dtype``); it replaces the inputs' rule.
      defined_in: the dtype names the method is defined in (:attr:`MethodSpec.compute_dtypes`);
        a request outside them computes in float32. None: any.
      canonical: as JAX runs it: float64 becomes float32 unless ``jax_enable_x64`` is on.
        False gives the dtype asked for (to decide whether x64 must be turned on).
    """
    if requested is not None:
        wanted = jnp.dtype(requested)
        if defined_in is not None and wanted.name not in defined_in:
            wanted = jnp.dtype(jnp.float32)
    else:
        narrow = [jnp.float32 if is_floating(d) and np.dtype(d).itemsize < 4 else d for d in dtypes]  # float8 too
        wanted = functools.reduce(jnp.promote_types, narrow, jnp.dtype(jnp.float32))
    return np.dtype(jax.dtypes.canonicalize_dtype(wanted)) if canonical else np.dtype(wanted)


__all__ = ["HIGHEST", "compute_dtype", "is_floating", "matmul"]
