"""Few compiled calls per model: how leaves are batched into groups, and host-side stacking.

A compiled group call is keyed by its input shapes, so every distinct shape costs one XLA
compilation. Two rules keep that to one compilation per shape group:

- **Flat means.** For methods that are not elementwise, every non-linear floating leaf
  (biases, norms, embeddings) gets the mean task vector, an elementwise formula
  ``θ0 + s · mean_i(θi − θ0)`` that does not care about shapes: such leaves are bucketed by
  dtype, raveled and concatenated into one flat vector per chunk, so all biases and norms of
  a model merge in one call instead of one per shape.
- **Equal chunks.** A group cut into chunks (``max_group_bytes``) is cut into chunks of equal
  leaf count where the leaves are the same size, and every chunk is padded to the largest
  chunk of its key (:func:`padded_sizes`: layers of a linear group, repeating the chunk's last
  layer; elements of a flat group, with zeros), so every chunk of one group has the same
  shapes and reuses one executable. Padded entries are dropped from the result.

When a group's arrays are on the host (NumPy, read from disk, or JAX arrays on the CPU
backend) the layout transforms (:func:`swudi_jax.model.layout.to_maths`, ``from_maths``) are
done in NumPy: one contiguous stack goes to the device, one result comes back, and no eager
JAX operation (each of which is a small compilation per shape) runs.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.model.layout import LeafPlan, array_namespace, chunk_by_bytes, from_maths, group_plans, to_maths

# ----------------------------------------------------------------------------- grouping


def is_flat(plans: Sequence[LeafPlan], apply_method: bool) -> bool:
    """True when the group merges as one flat vector (mean leaves under a non-elementwise method)."""
    return not apply_method and bool(plans) and all(p.kind == "mean" for p in plans)


def compile_key(plans: Sequence[LeafPlan], elementwise: bool) -> tuple:
    """The key chunks share an executable under: ("flat", dtype) for flat means, else the group key."""
    if plans[0].kind == "mean" and not elementwise:
        return ("flat", np.dtype(plans[0].dtype).name)
    return plans[0].group


def group_size(plans: Sequence[LeafPlan], elementwise: bool) -> int:
    """A chunk's size along its stacked axis: elements of a flat group, else layers."""
    if plans[0].kind == "mean" and not elementwise:
        return sum(math.prod(p.shape) for p in plans)
    return sum(p.layers for p in plans)


def _balanced(chunks: list[list[LeafPlan]]) -> list[list[LeafPlan]]:
    """Greedy byte chunks of one key recut into chunks of (nearly) equal leaf count, when all
    leaves are the same size (so no chunk grows past the largest greedy chunk)."""
    if len(chunks) < 2:
        return chunks
    plans = [p for c in chunks for p in c]
    if len({p.nbytes for p in plans}) != 1:
        return chunks
    per = -(-len(plans) // len(chunks))
    return [plans[i:i + per] for i in range(0, len(plans), per)]


def compile_groups(plans: Iterable[LeafPlan], max_group_bytes: int | None = None, *, copies: int = 1,
                   elementwise: bool = False) -> list[list[LeafPlan]]:
    """The groups to merge, one compiled call each (compare :func:`~swudi_jax.model.layout.group_plans`).

    Mean leaves of one dtype form one group (chunked by ``copies × bytes ≤ max_group_bytes``)
    unless the method is ``elementwise`` (then it is applied leaf shape by leaf shape); the
    other keys are chunked as by ``group_plans``, then evened out. Every plan lands in exactly
    one group; groups keep the first-seen order of their keys.
    """
    plans = list(plans)
    by_key: dict[tuple, list[LeafPlan]] = {}
    for p in plans:
        by_key.setdefault(compile_key([p], elementwise), []).append(p)
    groups: list[list[LeafPlan]] = []
    for key, members in by_key.items():
        if key[0] == "flat":
            groups.extend(chunk_by_bytes(members, max_group_bytes, copies=copies))
        else:
            groups.extend(_balanced(group_plans(members, max_group_bytes, copies=copies)))
    return groups


def padded_sizes(groups: Sequence[Sequence[LeafPlan]], elementwise: bool) -> list[int]:
    """For each group, the size its chunk is padded to: the largest chunk of its compile key."""
    keys = [compile_key(g, elementwise) if g else None for g in groups]
    largest: dict[Any, int] = {}
    for key, g in zip(keys, groups):
        if g:
            largest[key] = max(largest.get(key, 0), group_size(g, elementwise))
    return [largest[k] if k is not None else 0 for k in keys]


# ----------------------------------------------------------------------------- host stacking


def host_array(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array without a copy when it already lives on the host (a NumPy array,
    or a JAX array on CPU devices); None for device arrays (GPU, TPU)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        try:
            if all(d.platform == "cpu" for d in x.devices()):
                return np.asarray(x)
        except Exception:  # noqa: BLE001 - a deleted or abstract array: not on the host
            return None
    return None


def host_group(plans: Sequence[LeafPlan], base_arrays: Mapping[str, Any],
               expert_arrays: Sequence[Mapping[str, Any]]) -> tuple[dict, list[dict]] | None:
    """The group's arrays as NumPy views, or None if any of them is on an accelerator."""
    base, experts = {}, [{} for _ in expert_arrays]
    for p in plans:
        b = host_array(base_arrays[p.path])
        if b is None:
            return None
        base[p.path] = b
        for out, arrays in zip(experts, expert_arrays):
            e = host_array(arrays[p.path])
            if e is None:
                return None
            out[p.path] = e
    return base, experts


def _entries(plan: LeafPlan, x: Any, flat: bool) -> Any:
    """One model's leaf as entries of the stacked axis: raveled (count,) in a flat group,
    (layers, m, n) in maths layout for a linear leaf, (1, *shape) otherwise."""
    if flat:
        return x.reshape(-1)
    return to_maths(plan, x[None])[:, 0] if plan.kind == "linear" else x[None]


def _aligned(shape: tuple[int, ...], dtype: Any, zero: bool = False) -> np.ndarray:
    """An uninitialised (or zeroed) array whose data starts on a 64-byte boundary: JAX's CPU
    client then adopts it without a copy (``jax.device_put``), so the stack exists once."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = (np.zeros if zero else np.empty)(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _stack_on_host(models: Iterator[list[np.ndarray]], first: list[np.ndarray], n: int, flat: bool, size: int):
    """:func:`stack_group`'s NumPy stacks: each model's entries written once into one aligned buffer."""
    count, inner, dtype = sum(len(r) for r in first), first[0].shape[1:], first[0].dtype
    b_out = _aligned((1, size) if flat else (size, *inner), dtype, zero=flat)
    e_out = _aligned((1, n, size) if flat else (size, n, *inner), dtype, zero=flat)
    targets = [b_out[0] if flat else b_out] + [e_out[0, i] if flat else e_out[:, i] for i in range(n)]
    for target, entries in zip(targets, models):
        np.concatenate(entries, out=target[:count])
        if not flat:
            target[count:] = target[count - 1]
    return b_out, e_out


def stack_group(plans: Sequence[LeafPlan], base: Mapping[str, Any], experts: Sequence[Mapping[str, Any]],
                flat: bool, size: int | None = None) -> tuple[Any, Any]:
    """(base (size, ...), experts (size, N, ...)): the one stacking of a group's leaves.

    Linear (and per-shape mean) leaves: one entry per layer in maths layout
    (:func:`~swudi_jax.model.layout.to_maths`), the last entry repeated up to ``size``; flat
    means: (1, L) and (1, N, L), raveled leaves concatenated and zero-padded to ``size``
    elements (None: no padding). NumPy arrays are stacked on the host in one contiguous,
    aligned buffer each (:func:`host_group` gives them); other arrays on their device.
    """
    def entries(arrays):
        return [_entries(p, arrays[p.path], flat) for p in plans]

    first = entries(base)
    size = sum(len(r) for r in first) if size is None else size
    if all(isinstance(a[p.path], np.ndarray) for a in (base, *experts) for p in plans):
        return _stack_on_host(itertools.chain([first], map(entries, experts)), first, len(experts), flat, size)
    rows = [jnp.concatenate([jnp.asarray(r) for r in model]) for model in itertools.chain([first], map(entries, experts))]
    if flat:
        rows = [jnp.pad(r, (0, size - r.shape[0])) for r in rows]
        return rows[0][None], jnp.stack(rows[1:])[None]
    return pad_layers(rows[0], size), pad_layers(jnp.stack(rows[1:], axis=1), size)


def unstack_group(plans: Sequence[LeafPlan], merged: Any, flat: bool) -> dict[str, Any]:
    """The inverse of :func:`stack_group` on the merged
    (size, ...) result: NumPy arrays stay on the host as views where possible, JAX arrays on
    their device."""
    out, start = {}, 0
    for p in plans:
        if flat:
            count = math.prod(p.shape)
            out[p.path] = merged[0, start:start + count].reshape(p.shape)
            start += count
        elif p.kind == "linear":
            out[p.path] = from_maths(p, merged[start:start + p.layers])
            start += p.layers
        else:
            out[p.path] = merged[start]
            start += 1
    return out


def stack_grams(plans: Sequence[LeafPlan], grams: Mapping[str, Any] | None, n_experts: int) -> jnp.ndarray:
    """The group's per-task input Grams stacked as its layers are: (layers, N, n, n), from
    ``grams[path]`` of shape (N, n, n) or, for a scanned stack, (layers, N, n, n).

    Raises:
      ValueError naming the path: Grams missing or of the wrong shape.
    """
    stacked = []
    for plan in plans:
        if grams is None or plan.path not in grams:
            raise ValueError(f"{plan.path!r}: this method needs the per-task input Gram matrices of the layer "
                             f"(grams[{plan.path!r}] of shape (N, n, n)), none given")
        g = jnp.asarray(grams[plan.path])
        g = g[None] if g.ndim == 3 else g
        n = plan.maths_shape[1]
        if g.shape != (plan.layers, n_experts, n, n):
            want = (n_experts, n, n) if plan.layers == 1 else (plan.layers, n_experts, n, n)
            raise ValueError(f"grams[{plan.path!r}] has shape {tuple(jnp.shape(grams[plan.path]))}, expected {want}")
        stacked.append(g)
    return jnp.concatenate(stacked, axis=0)


def hashable(value: Any) -> Any:
    """Nested lists, tuples and mappings of option values as a hashable compile-cache key part."""
    if isinstance(value, (list, tuple)):
        return tuple(hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


def pad_layers(array: Any, size: int) -> Any:
    """A per-layer input (G, ...) padded to ``size`` entries by repeating its last entry."""
    if array.shape[0] >= size:
        return array
    xp = array_namespace(array)
    return xp.concatenate([array, xp.repeat(array[-1:], size - array.shape[0], axis=0)])


__all__ = [
    "compile_groups",
    "compile_key",
    "group_size",
    "hashable",
    "host_array",
    "host_group",
    "is_flat",
    "padded_sizes",
    "stack_grams",
    "stack_group",
    "unstack_group",
]
