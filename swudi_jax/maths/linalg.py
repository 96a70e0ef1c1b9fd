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
        and every integer computes in float32 — except for a method defined in the inputs'
        own promoted dtype (``defined_in`` holds it: mergekit's methods), which computes in
        it, as mergekit computes in the stored dtype when its config names none.
      requested: a dtype (or its name) the merge asks for (``merge(dtype=…)``, a config's
        ``dtype``); it replaces the inputs' rule.
      defined_in: the dtype names the method is defined in (:attr:`MethodSpec.compute_dtypes`);
        a request outside them computes in float32. None: any request, and the float32 rule
        for the inputs.
      canonical: as JAX runs it: float64 becomes float32 unless ``jax_enable_x64`` is on.
        False gives the dtype asked for (to decide whether x64 must be turned on).
    """
    if requested is not None:
        wanted = jnp.dtype(requested)
        if defined_in is not None and wanted.name not in defined_in:
            wanted = jnp.dtype(jnp.float32)
    elif defined_in is not None and dtypes and all(is_floating(d) for d in dtypes) \
            and (stored := jnp.dtype(functools.reduce(jnp.promote_types, dtypes))).name in defined_in:
        wanted = stored
    else:
        narrow = [jnp.float32 if is_floating(d) and np.dtype(d).itemsize < 4 else d for d in dtypes]  # float8 too
        wanted = functools.reduce(jnp.promote_types, narrow, jnp.dtype(jnp.float32))
    return np.dtype(jax.dtypes.canonicalize_dtype(wanted)) if canonical else np.dtype(wanted)


def divide(x: jax.Array, y: jax.Array) -> jax.Array:
    """x / y correctly rounded, as PyTorch divides: XLA rewrites a division by a broadcast
    (a scalar, a per-row norm) into a multiplication by its reciprocal, which is off by one
    unit in the last place for some entries; the broadcast divisor is hidden behind an
    optimization barrier so that every entry is divided."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    shape = jnp.broadcast_shapes(x.shape, y.shape)
    if y.shape != shape:
        y = jax.lax.optimization_barrier(jnp.broadcast_to(y, shape))
    return x / y


def round_to(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` rounded to the precision of ``dtype`` (nearest, ties to even), kept in x's dtype;
    the identity unless ``dtype`` is bfloat16 or float16.

    PyTorch computes each half-precision operation in float32 and rounds its result; XLA may
    keep excess precision between fused operations (and may drop a convert pair), so where a
    result depends on that rounding it is made explicit: ``lax.reduce_precision``, which
    XLA never removes, and for float16 its subnormals (|x| < 2⁻¹⁴, multiples of 2⁻²⁴, which
    ``reduce_precision`` would flush to zero) by rounding x·2²⁴ to an integer.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return x
    info = jnp.finfo(dtype)
    rounded = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    if dtype == jnp.dtype(jnp.float16):
        tiny = float(info.smallest_subnormal)
        rounded = jnp.where(jnp.abs(x) < float(info.smallest_normal), jnp.round(x / tiny) * tiny, rounded)
    return rounded


def sum_leading(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Σ over axis 0 (the models) as sequential adds, x[0] + x[1] + ... (a sequential reduce's
    order, and PyTorch's over a short leading axis), accumulated in ``dtype`` (None: x's). XLA
    CPU runs a float32 reduce over the leading axis fused with a broadcast multiply (Σi wi·δi)
    in time quadratic in the rows — 41 s for (3, 16000, 768), 0.4 s for (3, 1024, 768) — while
    these adds take linear time (``benchmarks/README.md``, "Against mergekit-yaml"); each slice's
    conversion fuses into its add, so a bf16 stack summed in float32 is never widened whole."""
    return functools.reduce(jnp.add, [x[i].astype(dtype or x.dtype) for i in range(x.shape[0])])


__all__ = ["HIGHEST", "compute_dtype", "divide", "is_floating", "matmul", "round_to", "sum_leading"]
