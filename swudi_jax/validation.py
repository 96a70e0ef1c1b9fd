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
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype} (shape {tuple(x.shape)})")
    return x


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _on_accelerator(x: Any) -> bool:
    """A fully addressable jax.Array on a non-CPU device (where a host copy would cross a bus)."""
    return (isinstance(x, jax.Array) and getattr(x, "is_fully_addressable", True)
            and any(d.platform != "cpu" for d in x.devices()))


def check_finite(x: Any, name: str) -> None:
    """Raise if a concrete array holds NaN or Inf, saying how many and where the first is."""
    if not is_concrete(x):
        return
    if _on_accelerator(x) and bool(_all_finite(x)):
        return  # checked where the array lives: one bool comes back, not the whole array
    host = np.asarray(x)
    bad = ~np.isfinite(host)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/Inf); first at index {first}"
        )


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


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
    """A finite real (or int) within [low, high] (``low_open`` makes the lower bound strict)."""
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
