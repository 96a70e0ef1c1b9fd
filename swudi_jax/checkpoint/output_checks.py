"""Finite or refused: every merged tensor is checked before it is written.

The layer functions (``sj.swudi``, ``sj.ties``, ...) are ``jax.jit``-compiled. Called
eagerly, they check their inputs on the host (:func:`swudi_jax.validation.check_finite`);
inside an outer ``jax.jit`` or ``jax.vmap`` (as :func:`swudi_jax.model.merger.merge_group` runs
them) the values are tracers, which cannot be inspected, so nothing can raise there: NaN
or Inf in gives NaN or Inf out, and finite inputs can still overflow (task vectors ×1e14
square to 1e28 and beyond in float32). The checks are therefore outside the compiled code:

- the inputs, on the host, as each group is read (``checkpoint_merge._read_group``);
- the outputs, here: :func:`checked_outputs` casts each merged floating tensor of a group to
  its output dtype (in NumPy for results already on the host, else on the device; so an overflow
  of the cast, e.g. to float16, is caught too), reduces it to one "all finite" flag there, and fetches only the flags. A tensor
  with NaN/Inf stops the run with a ValueError naming it and the method; only then is that
  one tensor copied to the host to count and locate the bad values.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import is_floating


class NonFiniteOutput(ValueError):
    """A merged tensor holds NaN or Inf."""


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _narrowed(value: jax.Array, dtype: np.dtype) -> jax.Array:
    """``value`` cast to ``dtype`` on the device when that narrows it (where an overflow can appear);
    a widening cast keeps finite values finite and is left to the host."""
    return value.astype(dtype) if dtype.itemsize < value.dtype.itemsize else value


def checked_outputs(merged: Mapping[str, object], dtypes: Mapping[str, np.dtype], method: str) -> dict[str, np.ndarray]:
    """The group's merged tensors as host arrays in their output dtypes, all finite, or a NonFiniteOutput.

    Args:
      merged: {path: array} from :func:`swudi_jax.model.merger.merge_group` (device arrays for merged
        tensors; the base's host arrays for kept and passed-through ones, checked on reading).
      dtypes: {path: output dtype}.
      method: the merge method, named in the error.
    """
    on_device = {key: _narrowed(value, np.dtype(dtypes[key])) for key, value in merged.items()
                 if isinstance(value, jax.Array) and is_floating(value.dtype) and is_floating(dtypes[key])}
    if on_device:
        flags = np.asarray(jax.device_get(jnp.stack([_all_finite(v) for v in on_device.values()])))
        for (key, value), ok in zip(on_device.items(), flags):
            if not ok:
                _refuse(key, value, method)
    out = {}
    for key, value in merged.items():
        if key not in on_device and isinstance(value, np.ndarray) and is_floating(value.dtype) and is_floating(dtypes[key]):
            # a host result (merge_group(host_output=True)): cast and checked in NumPy (no per-shape compilation)
            with np.errstate(over="ignore", invalid="ignore"):
                out[key] = value.astype(dtypes[key], copy=False)
            if not np.isfinite(out[key]).all():
                _refuse(key, out[key], method)
        else:
            out[key] = np.asarray(on_device.get(key, value)).astype(dtypes[key], copy=False)
    return out


def _refuse(key: str, value, method: str) -> None:
    host = np.asarray(value).astype(np.float32)
    bad = ~np.isfinite(host)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise NonFiniteOutput(
        f"merged tensor {key!r} ({method}) has {int(bad.sum())} non-finite value(s) (NaN/Inf) out of "
        f"{bad.size}, first at index {first}, in {value.dtype}; the inputs were checked finite, so the "
        "merge overflowed (task vectors too large for the compute dtype? try dtype: float64, a smaller "
        "scale, or another method); nothing was written")


__all__ = [
    "NonFiniteOutput",
    "checked_outputs",
]
