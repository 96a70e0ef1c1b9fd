"""The layers every process of a distributed merge merges together, rows over the global mesh.

For each layer of a global group (:mod:`swudi_jax.checkpoint.work_split`), every process reads the
tensors (base and experts; only the rows of its own devices go to them) and the task vectors
τi = wi (θi − θ0) become one global (N, m, n) array whose output rows are split over all
processes' devices (:func:`jax.make_array_from_callback`); :func:`swudi_jax.scale.sharding.merge_sharded`
runs the method with its collectives across the processes and returns θ's rows where they were
computed. Each process then forms θ0 + s·θ for the rows its devices hold, casts them to the output
dtype, checks them finite and writes them straight into the output shard at their offsets, when
the tensor stores those rows contiguously (``(out, in)`` weights, scan stacks on axis 0). Other
layouts (``(in, out)`` kernels) gather the layer's rows and one process writes the whole tensor.
A row count the devices do not divide is merged on zero-padded rows and comes back whole on
every process (:func:`~swudi_jax.scale.sharding.merge_sharded`); each process then writes an
even share of the rows.

Every step a single process can fail alone (reading and checking the inputs, checking and
writing the outputs) ends in a check-in of all processes (:meth:`~swudi_jax.checkpoint.distributed.Team.together`),
so that no process is left waiting in a collective for one that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.checkpoint.output_checks import checked_outputs
from swudi_jax.methods.spec import Resolved
from swudi_jax.model.layout import LeafPlan, from_maths, to_maths
from swudi_jax.model.merger import layer_options
from swudi_jax.scale.sharding import make_row_mesh, merge_sharded, row_sharding


def rows_contiguous(plan: LeafPlan) -> bool:
    """Whether each maths row of each layer of ``plan`` is one run of the stored tensor's elements."""
    return not plan.transpose and plan.scan_axis in (None, 0)


def _task_vectors(plan: LeafPlan, base: np.ndarray, experts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(layers, m, n) base and (layers, N, m, n) task vectors θi − θ0, in maths layout, on the host."""
    base_m = np.asarray(to_maths(plan, base[None]))[:, 0]
    experts_m = np.asarray(to_maths(plan, np.stack(experts)))
    return base_m, experts_m - base_m[:, None]


def _global(tau: np.ndarray, mesh, even: bool) -> jax.Array:
    """``tau`` (N, m, n) as one array over every process's devices: rows split, or whole on each."""
    sharding = row_sharding(mesh) if even else NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_callback(tau.shape, sharding, lambda index: tau[index])


def _own_rows(merged: jax.Array, m: int, index: int, count: int) -> list[tuple[int, np.ndarray]]:
    """(first row, rows) of θ this process writes: its devices' rows, or its even share of a whole θ."""
    shards = merged.addressable_shards
    if merged.sharding.is_fully_replicated:
        start, stop = index * m // count, (index + 1) * m // count
        return [(start, np.asarray(shards[0].data)[start:stop])] if stop > start else []
    out = {}
    for shard in shards:
        rows = shard.index[0]
        out[rows.start or 0] = np.asarray(shard.data)
    return sorted(out.items())


def _merge_layer(tau: np.ndarray, mesh, resolved: Resolved) -> jax.Array:
    even = tau.shape[1] % mesh.devices.size == 0
    return merge_sharded(_global(tau, mesh, even), mesh, resolved.without(resolved.spec.varying))


def _theta(base: np.ndarray, merged: np.ndarray, scale: float) -> np.ndarray:
    """θ0 + s·θ in the compute dtype (``base``'s), as the single-process sharded path forms it."""
    work = base.dtype
    return (base + work.type(scale) * merged.astype(work)).astype(work)


def _whole(merged: jax.Array) -> np.ndarray:
    """Every row of θ on this process (the layouts whose rows are not contiguous)."""
    if merged.sharding.is_fully_replicated:
        return np.asarray(merged.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(merged, tiled=True))


def merge_global_group(plans: Sequence[LeafPlan], read: Callable[[], tuple], resolved: Resolved, tensor_options: Any,
                       out_dtypes: Mapping[str, np.dtype], writer, team, method: str) -> None:
    """Merge one global group with every process (see the module docstring) and write each
    process's rows. ``read()`` gives the group's (base, experts, grams) arrays in the compute dtype."""
    mesh = make_row_mesh()
    with team.together("reading a global group"):
        base_arrays, expert_arrays, _ = read()
    weights = None
    if "weight" in resolved.spec.per_expert:
        weights = [v["weight"] for v in layer_options(resolved, plans, len(expert_arrays), tensor_options)]
    k = 0
    for leaf_number, plan in enumerate(plans):
        key, dtype = plan.path, out_dtypes[plan.path]
        base_m, tau = _task_vectors(plan, base_arrays[key], [e[key] for e in expert_arrays])
        m, n_in = plan.maths_shape
        layers = []
        for layer in range(plan.layers):
            if weights is not None:
                tau[layer] *= np.asarray(weights[k], tau.dtype)[:, None, None]
            k += 1
            merged = _merge_layer(tau[layer], mesh, resolved)
            if not rows_contiguous(plan):
                layers.append(_whole(merged))
                continue
            with team.together("writing a global group"):
                for start, rows in _own_rows(merged, m, team.index, team.count):
                    theta = _theta(base_m[layer, start:start + len(rows)], rows, resolved.scale)
                    writer.write_slice(key, (layer * m + start) * n_in, checked_outputs({key: theta}, {key: dtype}, method)[key])
        if layers:
            with team.together("writing a global group"):
                if leaf_number % team.count == team.index:
                    theta = from_maths(plan, _theta(base_m, np.stack(layers), resolved.scale))
                    writer.write(key, checked_outputs({key: theta}, {key: dtype}, method)[key])


def merge_global_groups(groups: Sequence[int], read: Callable[[int], tuple], plan: MergePlan, resolved: Resolved,
                        tensor_options: Any, writer, team) -> None:
    """:func:`merge_global_group` for each of ``groups`` (indices into ``plan.groups``), in order."""
    for g in groups:
        merge_global_group(plan.groups[g], lambda g=g: read(g), resolved, tensor_options, plan.out_dtypes, writer, team,
                           plan.config.merge_method)


__all__ = ["merge_global_group", "merge_global_groups", "rows_contiguous"]
