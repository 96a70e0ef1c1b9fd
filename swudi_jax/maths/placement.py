"""Where arrays live: meshes with ``Explicit`` axes at the public boundary, and placing an
array on a sharding inside or outside ``jax.jit``.

``jax.make_mesh`` gives ``Explicit`` axes in current JAX: an array sharded over them carries
its sharding in its type (``jax.typeof(x)``), and an operation whose output sharding is
ambiguous — a matmul contracting a sharded axis, as the Gram C = Σ wi τiᵀτi does when the
rows of τ are split — raises ``ShardingTypeError`` instead of letting the compiler choose.
The layer functions are written as whole-array maths; :func:`auto_axes_boundary` runs them
with the input's mesh axes turned ``Auto`` (``jax.sharding.auto_axes``: the compiler
partitions the maths) and gives the result the input's sharding less its task axis, so
θ (m, n) from τ (N, m, n) split by rows comes back split by rows, on the caller's mesh.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import jax
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

F = TypeVar("F", bound=Callable[..., Any])


def has_explicit_axes(mesh: Any) -> bool:
    """True for a (concrete or abstract) mesh with at least one ``Explicit`` axis."""
    types = getattr(mesh, "axis_types", None) or ()
    return any(t == AxisType.Explicit for t in types)


def explicit_sharding(x: Any) -> NamedSharding | None:
    """The sharding in ``x``'s type when it is a JAX array or tracer on a mesh with
    ``Explicit`` axes (``x``'s abstract mesh and spec), else None."""
    if not isinstance(x, (jax.Array, jax.core.Tracer)):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not has_explicit_axes(mesh):
        return None
    return sharding


def place(x: Any, sharding: NamedSharding) -> Any:
    """``x`` with ``sharding``, inside or outside ``jax.jit``: ``jax.sharding.reshard`` on a
    mesh with ``Explicit`` axes (the sharding is part of the type), a sharding constraint on
    an ``Auto`` mesh."""
    if has_explicit_axes(sharding.mesh):
        return jax.sharding.reshard(x, sharding)
    return lax.with_sharding_constraint(x, sharding)


def _mesh_context(x: Any, mesh: Any) -> contextlib.AbstractContextManager:
    """The context ``jax.sharding.auto_axes`` reads its mesh from: the array's concrete mesh
    when called eagerly (``jax.set_mesh``), its abstract mesh under a trace."""
    if isinstance(x, jax.core.Tracer):
        return jax.sharding.use_abstract_mesh(mesh)
    return jax.set_mesh(x.sharding.mesh)


def auto_axes_boundary(fn: F) -> F:
    """``fn(tau, *args, **kwargs)``, a layer function reducing the task axis 0 of ``tau``,
    made to accept ``tau`` sharded over ``Explicit`` mesh axes: it runs with those axes
    ``Auto`` and returns on the same mesh with ``tau``'s spec less its first entry. Any other
    input (NumPy, single device, ``Auto`` meshes, vmapped or traced without ``Explicit``
    axes) calls ``fn`` unchanged."""

    @functools.wraps(fn)
    def wrapped(tau, *args, **kwargs):
        sharding = explicit_sharding(tau)
        if sharding is None:
            return fn(tau, *args, **kwargs)
        spec = tuple(sharding.spec) + (None,) * (tau.ndim - len(sharding.spec))
        with _mesh_context(tau, sharding.mesh):
            run = jax.sharding.auto_axes(lambda t: fn(t, *args, **kwargs), out_sharding=PartitionSpec(*spec[1:]))
            return run(tau)

    return wrapped  # type: ignore[return-value]


__all__ = ["auto_axes_boundary", "explicit_sharding", "has_explicit_axes", "place"]
