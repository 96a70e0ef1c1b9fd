"""Checks at the boundary, once, before any compute (in the manner of ``chex.assert_*``).

Every failure is a ``ValueError`` that names the argument and the offending value. Inside
jit-compiled code only static facts (shapes, dtypes) can be checked; values (NaN/Inf) are
checked whenever the array is concrete.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import is_floating


def is_concrete(x: Any) -> bool:
    """True for arrays whose values can be read on the host (not a tracer under jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(x: Any, name: str) -> jnp.ndarray:
    """``x`` as an array with a floating dtype, or a ValueError naming ``name``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise ValueError(f"{name} must be an array, got {type(x).__name__}") from exc
    if not is_floating(x.dtype):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype} (shape {tuple(x.shape)})")
    return x


def _host_view(x: Any) -> Any:
    """A NumPy view isfinite can read: narrow floats (bfloat16, float16, float8) as float32."""
    host = np.asarray(x)
    return host.astype(np.float32) if host.dtype.kind == "V" or host.dtype.itemsize < 4 else host


def all_finite(x: Any) -> bool:
    """One boolean for a concrete floating array: NumPy arrays on the host, device arrays
    reduced where they live (no full copy to the host). Non-floating arrays are finite."""
    if isinstance(x, np.ndarray):
        if not (is_floating(x.dtype) or x.dtype.kind == "V"):
            return True
        return bool(np.isfinite(_host_view(x)).all())
    if not is_floating(x.dtype):
        return True
    return bool(jnp.all(jnp.isfinite(x)))


def non_finite(x: Any) -> tuple[int, tuple[int, ...]] | None:
    """(count, index of the first) of the NaN/Inf values of a concrete array, or None."""
    if not is_concrete(x) or all_finite(x):
        return None
    bad = ~np.isfinite(_host_view(x))
    return int(bad.sum()), tuple(int(i) for i in np.argwhere(bad)[0])


def check_finite(x: Any, name: str) -> None:
    """Raise if a concrete array holds NaN or Inf, saying how many and where the first is.

    Values of traced arrays (inside ``jax.jit`` or ``jax.vmap``) cannot be read, so a
    jit-compiled layer function cannot raise on them: the checks run where data enters
    (the public functions on concrete arrays, :func:`swudi_jax.merge`, the checkpoint
    pipeline).
    """
    found = non_finite(x)
    if found is not None:
        raise ValueError(f"{name} contains {found[0]} non-finite value(s) (NaN/Inf); first at index {found[1]}")


def check_task_vectors(tau: Any, name: str = "tau", *, ndim: int | None = 3) -> jnp.ndarray:
    """A stack of task vectors: rank ``ndim`` (N, m, n) if given, N ≥ 2, floating, finite."""
    tau = as_float_array(tau, name)
    if ndim is not None and tau.ndim != ndim:
        layout = "(N, m, n) in maths layout (N experts, m outputs, n inputs)" if ndim == 3 else f"rank {ndim}"
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(tau.shape)}")
    if tau.ndim < 1 or tau.shape[0] < 2:
        raise ValueError(f"{name} must stack at least 2 task vectors on axis 0, got shape {tuple(tau.shape)}")
    if any(s == 0 for s in tau.shape):
        raise ValueError(f"{name} has an empty axis: shape {tuple(tau.shape)}")
    check_finite(tau, name)
    return tau


def check_choice(value: Any, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_like_default(value: Any, name: str, default: Any, *, per_expert: bool = False) -> None:
    """A user's option value of its default's kind, before any method-specific check: true or
    false for a bool default; a finite number for a number default (an integer for an int
    default), or, for a ``per_expert`` option, a list of one such number per model. Options
    whose default is None or a string are the method's validator's to check; traced values
    (per-tensor values under ``vmap``) were checked where they entered."""
    if default is None or isinstance(default, str) or not is_concrete(value):
        return
    if isinstance(default, (bool, np.bool_)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if not isinstance(default, (int, float, np.number)):
        return
    integer = isinstance(default, (int, np.integer))
    kind = "an integer" if integer else "a finite number"
    values = np.asarray(value, dtype=object) if isinstance(value, (list, tuple)) else np.asarray(value)
    ok_shape = values.ndim == 0 or (per_expert and values.ndim == 1 and values.size > 0)
    items = values.reshape(-1).tolist() if ok_shape else []
    numbers = all(isinstance(v, (int, np.integer) if integer else (int, float, np.number)) and not isinstance(v, bool)
                  for v in items)
    if not ok_shape or not numbers or not all(math.isfinite(float(v)) for v in items):
        per_model = " or a list of one per model" if per_expert else ""
        raise ValueError(f"{name} must be {kind}{per_model}, got {value!r}")


def static_or_traced(value: Any) -> Any:
    """A checked number as a Python float (a hashable static value), a traced one as it is."""
    return float(value) if is_concrete(value) else value


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, traceable: bool = False) -> None:
    """A finite real (or int) within [low, high] (``low_open`` makes the lower bound strict).

    A traced value (an argument of the caller's ``jax.jit``) is accepted as a real scalar when
    ``traceable`` (its bounds cannot be read then: out-of-range values give out-of-range
    results), else refused with a message saying the option must be a static Python number."""
    if not is_concrete(value):
        if not traceable:
            raise ValueError(f"{name} must be a static Python number, got a traced value ({value.aval}): it decides "
                             f"a shape, a loop count or a branch; close over it, or mark it static "
                             f"(jax.jit(fn, static_argnames=({name!r},)))")
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.number) or jnp.iscomplexobj(value):
            raise ValueError(f"{name} must be a real scalar, got a traced {value.aval}")
        return
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


__all__ = [
    "all_finite",
    "as_float_array",
    "check_choice",
    "check_finite",
    "check_number",
    "check_task_vectors",
    "is_concrete",
    "non_finite",
    "static_or_traced",
]
