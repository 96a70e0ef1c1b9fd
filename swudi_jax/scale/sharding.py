"""The multi-device path for big layers: a layer's output rows split across devices.

A stack of task vectors τ (N, m, n) is sharded along m (the output rows) over the ``"rows"`` axis
of a :class:`jax.sharding.Mesh`. Each device holds τ[:, rows, :] and computes, with the same
pure functions as the single-device path (:mod:`swudi_jax.maths.spectral`):

- ‖τi‖² = Σ_devices ‖τi[rows]‖²                      (one psum of N numbers) → wi
- C = Σ_devices Σi wi τi[rows]ᵀ τi[rows]             (one psum of an n×n matrix)
- D[rows] = Σi wi τi[rows] (τiᵀ τi)                   (the row-local association; the per-task
                                                     Gram τiᵀτi is one psum of n×n per task)
- θ0[rows] = Σi τi[rows]
- one eigendecomposition of C (replicated: every device solves the same n×n problem)
- θ[rows] = θ0[rows] + (D[rows] V diag(h/λs) − θ0[rows] V diag(h)) Vᵀ

so θ comes back row-sharded and no device ever holds another device's rows of D or θ.

With ``solver="lowrank"`` (N·m < n: C has rank ≤ N·m) C is never formed: the weighted rows
M (N·m × n, smaller than C's n × n) are all-gathered, every device takes C's non-zero
eigenpairs from the N·m × N·m Gram M Mᵀ (:func:`swudi_jax.solvers.range_eigh`, replicated),
and D[rows] = Σi wi (τi[rows] τiᵀ) τi from the gathered rows, with no n × n collective.

Any mesh with an axis named ``"rows"`` is accepted, with ``Auto`` or ``Explicit`` axes:
:func:`make_row_mesh`'s, ``jax.make_mesh((k,), ("rows",))``'s, an N-D mesh such as
``jax.make_mesh((2, 4), ("data", "rows"))`` (the rows split over ``"rows"``; the devices
along the other axes each hold a copy of their rows' work), or the context mesh
(``jax.set_mesh``) when none is named. The shard_map runs on that mesh itself; the input is
placed by rows first (``jax.device_put`` eagerly, ``jax.sharding.reshard`` or a sharding
constraint under ``jax.jit``), so θ comes back on the caller's mesh.
Zero rows change none of ‖τi‖², C, D or θ0, so a row count that does not divide over the
devices is padded with zero rows and the padding stripped from the result (which is then
returned replicated, with a warning: JAX arrays cannot be sharded unevenly).

Many hosts
----------
The same code runs on a multi-process JAX runtime. On every host, before anything else::

    jax.distributed.initialize()      # coordinator address, process count and id from
                                      # the cluster environment (SLURM, TPU pods) or args
    mesh = make_row_mesh()            # jax.devices() now lists every host's devices
    tau = jax.make_array_from_callback(shape, row_sharding(mesh), load_rows)
    theta = merge_sharded(tau, mesh, method="swudi")

where ``load_rows(index)`` reads only the rows ``index`` of the (N, m, n) stack that this
host's devices own (e.g. from a safetensors file). The psums above become cross-host
collectives; ``theta.addressable_shards`` holds this host's rows, to be written by each
host for its rows. Inputs that are not fully addressable skip the host-side NaN check.
``swudi-merge`` run as several processes does exactly this for the layers it merges on the
global mesh (:mod:`swudi_jax.checkpoint.global_groups`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from swudi_jax.maths import solvers
from swudi_jax.maths.linalg import HIGHEST, compute_dtype
from swudi_jax.maths.placement import place
from swudi_jax.maths.spectral import (
    NORM_FLOOR,
    Spectrum,
    anchor,
    filtered_estimate,
    interference_operator,
    project,
    spectrum,
    squared_norms,
    task_mean,
    weighted_rows,
)
from swudi_jax.methods.registry import DEFAULT_METHOD, resolve, spectral
from swudi_jax.methods.spec import MethodSpec, Resolved
from swudi_jax.maths.validation import as_float_array, check_choice, check_finite, is_concrete

ROW_AXIS = "rows"
"""Name of the mesh axis the output rows are split over."""
DEFAULT_SHARD_BYTES = 256 * 2**20
"""Stacks of at least this many bytes are worth splitting across devices."""
SHARDED_SOLVERS = ("auto", "full", "lowrank", "topk")


def make_row_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"rows"`` over ``devices`` (default: all of ``jax.devices()``)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_row_mesh needs at least one device")
    return Mesh(np.array(devices), (ROW_AXIS,))


def row_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Split the output-row axis over the mesh: axis 1 of a (N, m, n) stack, axis 0 of (m, n)."""
    spec = PartitionSpec(None, ROW_AXIS, None) if ndim == 3 else PartitionSpec(ROW_AXIS, None)
    return NamedSharding(mesh, spec)


def should_shard(shape: Sequence[int], n_devices: int, threshold_bytes: int = DEFAULT_SHARD_BYTES,
                 itemsize: int = 4) -> bool:
    """Whether a stack of ``shape`` (N, m, n) should take the sharded path: more than one
    device and at least ``threshold_bytes`` of task vectors (float32 by default)."""
    return n_devices > 1 and math.prod(shape) * itemsize >= threshold_bytes


def _local_merge(tau_rows, make_h, init, shape, solver, n_top):
    """The estimator on one device's rows; the collectives are the psums over ``rows``."""
    work = tau_rows.astype(compute_dtype(tau_rows.dtype))
    sq = lax.psum(squared_norms(work), ROW_AXIS)
    w = 1.0 / jnp.maximum(sq, NORM_FLOOR)
    zero_rows = lax.pcast(jnp.zeros(work.shape[1:], work.dtype), (ROW_AXIS,), to="varying")
    if solver == "lowrank":
        everyone = lax.all_gather(work, ROW_AXIS, axis=1, tiled=True)  # (N, m, n): all rows
        spec = Spectrum(*solvers.range_eigh(weighted_rows(everyone, w)))

        def one_task(acc, task):
            t, t_all, wi = task
            return acc + wi * jnp.matmul(jnp.matmul(t, t_all.T, precision=HIGHEST), t_all, precision=HIGHEST), None

        d_rows, _ = lax.scan(one_task, zero_rows, (work, everyone, w))
    else:
        c = lax.psum(interference_operator(work, w), ROW_AXIS)

        def one_task(acc, task):
            t, wi = task
            gram = lax.psum(jnp.matmul(t.T, t, precision=HIGHEST), ROW_AXIS)
            return acc + wi * jnp.matmul(t, gram, precision=HIGHEST), None

        d_rows, _ = lax.scan(one_task, zero_rows, (work, w))
        spec = Spectrum(*solvers.top_eigh(c, n_top)) if solver == "topk" else spectrum(c)
    theta0 = anchor(work, init)
    theta = filtered_estimate(theta0, *project(d_rows, theta0, spec.eigenvectors), spec, make_h, shape, sq,
                              task_mean(work))
    return theta.astype(tau_rows.dtype)


def _check_mesh(mesh: Any) -> Mesh:
    if not isinstance(mesh, Mesh) or ROW_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis named {ROW_AXIS!r} (make_row_mesh(), "
                         f"jax.make_mesh((k,), ({ROW_AXIS!r},)) or an N-D mesh naming one axis {ROW_AXIS!r}), got {mesh!r}")
    return mesh


def row_mesh(mesh: Mesh | None = None, like: Any = None) -> Mesh:
    """The mesh a layer's rows split over: ``mesh`` when given; else the mesh ``like`` (an
    array) is sharded over, when it has a ``"rows"`` axis; else the context mesh
    (``jax.set_mesh``) when it has one; else :func:`make_row_mesh` over all devices."""
    if mesh is not None:
        return _check_mesh(mesh)
    own = getattr(getattr(like, "sharding", None), "mesh", None)
    if isinstance(own, Mesh) and ROW_AXIS in own.axis_names:
        return own
    context = jax.sharding.get_mesh()
    if isinstance(context, Mesh) and ROW_AXIS in context.axis_names:
        return context
    return make_row_mesh()


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh, spec: MethodSpec, options: tuple, shape, padded_rows, solver, n_top):
    """The jit-compiled stack → θ on ``mesh``: the input placed by rows (zero rows appended
    first when the mesh does not divide m), one shard_map over the rows axis (the other axes
    of an N-D mesh hold copies), the padding stripped from a replicated result."""
    spectral_filter = spec.spectral_filter(dict(options))
    local = functools.partial(_local_merge, make_h=spectral_filter.make_h, init=spectral_filter.init, shape=shape[1:],
                              solver=solver, n_top=n_top)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(None, ROW_AXIS, None),
                           out_specs=PartitionSpec(ROW_AXIS, None))
    m = shape[1]

    def run(tau):
        if padded_rows != m:
            tau = jnp.pad(place(tau, replicated(mesh)), ((0, 0), (0, padded_rows - m), (0, 0)))
        theta = mapped(place(tau, row_sharding(mesh)))
        return theta if padded_rows == m else place(theta, replicated(mesh))[:m]

    return jax.jit(run, out_shardings=row_sharding(mesh, 2) if padded_rows == m else replicated(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _sharded_solver(solver: str, method: str, top: int | None, shape: tuple[int, int, int]) -> tuple[str, int | None]:
    """The solver for a stack of ``shape`` (N, m counted with padding rows, n) on the sharded path."""
    check_choice(solver, "solver", SHARDED_SOLVERS)
    rank, n = shape[0] * shape[1], shape[2]
    if solver == "lowrank" and rank > n:
        raise ValueError(f"solver='lowrank' needs N·m <= n (C of rank below n), got N·m = {rank} > n = {n}")
    if solver == "topk" and top is None:
        raise ValueError(f"solver='topk' needs a filter that is zero outside the top-K eigenpairs; "
                         f"method {method!r} with these options has none")
    if solver == "auto":
        solver = solvers.choose_solver(shape, top, available=SHARDED_SOLVERS)
    return solver, (top if solver == "topk" else None)


def merge_sharded(tau: Any, mesh: Mesh | None = None, method: str | MethodSpec | Resolved = DEFAULT_METHOD,
                  **options: Any) -> jax.Array:
    """Run a spectral layer method with ``tau``'s output rows split over ``mesh``.

    Same result as the single-device method to float rounding (the sums over rows are
    re-associated across devices). Collectives: one psum for the norms, one for C, one per
    task for its n×n Gram; the eigendecomposition is replicated.

    Args:
      tau: task vectors (N, m, n), maths layout; a NumPy array, an array on any device or
        sharding (placed by rows first), or a traced value under ``jax.jit`` (multi-host: see
        the module docstring).
      mesh: a mesh with an axis named ``"rows"``, ``Auto`` or ``Explicit`` axes:
        :func:`make_row_mesh`, ``jax.make_mesh((k,), ("rows",))``, or an N-D mesh such as
        ``jax.make_mesh((2, 4), ("data", "rows"))`` (the rows split over ``"rows"``; the
        devices along the other axes each compute the same rows). None: :func:`row_mesh` —
        ``tau``'s own mesh, else the context mesh (``jax.set_mesh``), else all devices.
      method: a method with a spectral filter (swudi, swudi_a, pinv, iwudi), by name, as a
        spec, or already resolved (:func:`swudi_jax.methods.registry.resolve`; then no options).
      **options: the method's options (as :func:`swudi_jax.swudi` etc.). Its ``solver`` here is
        "auto", "full", "lowrank" (N·m ≤ n: C's non-zero eigenpairs from the all-gathered
        rows' N·m × N·m Gram, m counted with padding rows) or "topk" (top-K subspace iteration
        on the replicated C, for SWUDI); "auto" picks "lowrank" when N·m < n, else "topk" when
        n ≥ 1024 and K ≤ n/10, else "full".
    Returns:
      The merged task vector (m, n) on ``mesh``: sharded by rows over its ``"rows"`` axis when
      that axis divides m; otherwise computed on zero-padded rows and returned replicated,
      with a warning.
    """
    mesh = row_mesh(mesh, like=tau)
    resolved = resolve(method, options)
    spectral_filter = spectral(resolved)
    tau = as_float_array(tau, "tau")
    if tau.ndim != 3 or tau.shape[0] < 2 or 0 in tau.shape:
        raise ValueError(f"tau must have shape (N >= 2, m, n) in maths layout, got shape {tuple(tau.shape)}")
    if is_concrete(tau) and getattr(tau, "is_fully_addressable", True):
        check_finite(tau, "tau")
    n_dev = mesh.shape[ROW_AXIS]
    m = tau.shape[1]
    padded_rows = -(-m // n_dev) * n_dev
    solver, n_top = _sharded_solver(resolved.options["solver"], resolved.spec.name, spectral_filter.top(tau.shape[2]),
                                    (tau.shape[0], padded_rows, tau.shape[2]))
    if padded_rows != m:
        warnings.warn(
            f"merge_sharded: m = {m} rows do not divide over {n_dev} devices; computed with "
            f"{padded_rows - m} zero rows of padding (exact) and returned replicated",
            stacklevel=2,
        )
    fn = _sharded_fn(mesh, resolved.spec, tuple(sorted(resolved.options.items())), tuple(tau.shape), padded_rows,
                     solver, n_top)
    if not is_concrete(tau):  # under the caller's jit: placed inside, under the caller's context mesh
        return fn(tau)
    target = row_sharding(mesh) if padded_rows == m else replicated(mesh)
    if not (isinstance(tau, jax.Array) and tau.sharding.is_equivalent_to(target, tau.ndim)):
        tau = jax.device_put(tau, target)  # NumPy, one device, another mesh or layout
    with jax.set_mesh(mesh):  # whatever mesh the caller's context holds, the shard_map's is this one
        return fn(tau)


__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ROW_AXIS",
    "replicated",
    "row_mesh",
    "make_row_mesh",
    "merge_sharded",
    "row_sharding",
    "should_shard",
]
