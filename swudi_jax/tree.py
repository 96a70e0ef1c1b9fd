"""Whole-model merging over pytrees: task vectors, per-leaf plans, one vmapped call per group.

``merge(base, experts, method)`` views every pytree as a flat path → array map (dict keys,
sequence indices and attribute names joined by "/"; a flat dict's keys such as
``blocks.0.attn.weight`` are paths as they are), validates everything before compute,
classifies each leaf (:mod:`swudi_jax.layout`), stacks the linear weights of one maths
shape, runs the method under ``jax.vmap`` in one jit-compiled call per group (chunked by
``max_group_bytes``) and returns ``base + scale · merged task vector`` with the structure
and dtypes of ``base``. The flat level (:func:`plan_tree`, :func:`merge_group`) is what the
streaming checkpoint merger calls group by group.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.layout import (
    DEFAULT_HEAD_PATTERNS,
    LeafPlan,
    from_maths,
    group_plans,
    infer_layout,
    plan_leaf,
    to_maths,
)
from swudi_jax.methods.dare import leaf_key
from swudi_jax.methods.ties import ties_model_thresholds
from swudi_jax.registry import MergeMethod, default_scale, get_method, resolve_options
from swudi_jax.sharding import SPECTRAL_METHODS, make_row_mesh, merge_sharded, should_shard
from swudi_jax.spectral import compute_dtype
from swudi_jax.validation import check_finite, check_number

DEFAULT_MAX_GROUP_BYTES = 1 << 30
"""Stacked bytes (base and experts) of one compiled call before a group is split."""

# ----------------------------------------------------------------------------- flat views


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: Any, name: str = "params") -> tuple[dict[str, Any], Any]:
    """The flat path → leaf view of a pytree and its treedef (paths joined by "/")."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for keys, leaf in with_paths:
        path = "/".join(_key_name(k) for k in keys)
        if path in flat:
            raise ValueError(f"{name}: two leaves share the flat path {path!r}")
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)
        flat[path] = leaf
    return flat, treedef


def _listing(paths: Iterable[str], limit: int = 6) -> str:
    paths = sorted(paths)
    more = f" … and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(repr(p) for p in paths[:limit]) + more


def check_models(base_flat: Mapping[str, Any], expert_flats: Sequence[Mapping[str, Any]]) -> None:
    """Same paths, shapes and dtypes in every model; at least two experts; no NaN/Inf.

    Raises:
      ValueError naming the expert, the parameter path and what differs.
    """
    if len(expert_flats) < 2:
        raise ValueError(f"merging needs at least 2 experts, got {len(expert_flats)}")
    for i, flat in enumerate(expert_flats):
        missing, extra = set(base_flat) - set(flat), set(flat) - set(base_flat)
        if missing or extra:
            parts = [f"missing {_listing(missing)}" if missing else "", f"extra {_listing(extra)}" if extra else ""]
            raise ValueError(f"expert {i}: parameter paths differ from the base: {'; '.join(p for p in parts if p)}")
        for path, ref in base_flat.items():
            leaf = flat[path]
            if tuple(leaf.shape) != tuple(ref.shape):
                raise ValueError(f"expert {i}: {path!r} has shape {tuple(leaf.shape)}, the base has {tuple(ref.shape)}")
            if np.dtype(leaf.dtype) != np.dtype(ref.dtype):
                raise ValueError(f"expert {i}: {path!r} has dtype {leaf.dtype}, the base has {ref.dtype}")
    for who, flat in [("base", base_flat)] + [(f"expert {i}", f) for i, f in enumerate(expert_flats)]:
        for path, leaf in flat.items():
            if jnp.issubdtype(leaf.dtype, jnp.floating) and not _all_finite(leaf):
                check_finite(leaf, f"{who}: parameter {path!r}")


def _all_finite(leaf: Any) -> bool:
    """One boolean per leaf; device arrays are reduced where they live (no full copy to host)."""
    if isinstance(leaf, np.ndarray):
        return bool(np.isfinite(leaf).all())
    return bool(jnp.all(jnp.isfinite(leaf)))


def task_vectors(base: Any, experts: Sequence[Any]) -> list[Any]:
    """τi = θi − θ0 for each expert, as pytrees shaped like ``base``.

    Floating leaves are subtracted; integer and boolean leaves (which merging passes
    through) give zeros. Inputs are checked as in :func:`merge`.
    """
    base_flat, treedef = flatten(base, "base")
    expert_flats = _expert_flats(experts)
    check_models(base_flat, expert_flats)

    def diff(e, b):
        return jnp.asarray(e) - jnp.asarray(b) if jnp.issubdtype(b.dtype, jnp.floating) else jnp.zeros_like(b)

    return [
        jax.tree_util.tree_unflatten(treedef, [diff(flat[p], base_flat[p]) for p in base_flat])
        for flat in expert_flats
    ]


def _expert_flats(experts: Any) -> list[dict[str, Any]]:
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence):
        raise ValueError(f"experts must be a list of pytrees (one per expert), got {type(experts).__name__}")
    return [flatten(e, f"expert {i}")[0] for i, e in enumerate(experts)]


# ----------------------------------------------------------------------------- plans


def plan_tree(
    flat_shapes_dtypes: Mapping[str, tuple[Sequence[int], Any]],
    *,
    layout: str = "flax",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    method: str | MergeMethod | None = None,
    head_patterns: str | Iterable[str] | None = DEFAULT_HEAD_PATTERNS,
    input_axes: Mapping[str, int] | None = None,
    scan_patterns: str | Iterable[str] | None = None,
    scan_axis: int = 0,
    others: str = "mean",
) -> list[LeafPlan]:
    """One :class:`LeafPlan` per path, in the given order (``method``, if given, is checked).

    Args:
      flat_shapes_dtypes: {path: (shape, dtype)}.
      layout: "flax", "torch" or "auto" (:func:`swudi_jax.layout.infer_layout` on the paths).
      include, exclude, head_patterns, input_axes, scan_patterns, scan_axis,
      others: see :func:`swudi_jax.layout.plan_leaf`.
    """
    if method is not None:
        get_method(method)
    if layout == "auto":
        layout = infer_layout(flat_shapes_dtypes)
    return [
        plan_leaf(
            path, shape, dtype, layout=layout, include=include, exclude=exclude,
            head_patterns=head_patterns, input_axes=input_axes, scan_patterns=scan_patterns,
            scan_axis=scan_axis, others=others,
        )
        for path, (shape, dtype) in flat_shapes_dtypes.items()
    ]


def needs_model_thresholds(method: str | MergeMethod, options: Mapping[str, Any] | None = None) -> bool:
    """True when the merge needs :func:`ties_model_thresholds` over the whole model first."""
    method = get_method(method)
    opts = resolve_options(method, options)
    return method.name == "ties" and opts["trim"] == "model" and opts["thresholds"] is None


def model_task_vector_chunks(
    plans: Sequence[LeafPlan], base_flat: Mapping[str, Any], expert_flats: Sequence[Mapping[str, Any]]
) -> Callable[[], Iterable[np.ndarray]]:
    """A callable yielding each merged leaf's task-vector stack (N, ...) in float32, one at a time."""
    merged = [p.path for p in plans if p.kind in ("spectral", "mean")]

    def chunks():
        for path in merged:
            base = np.asarray(base_flat[path], np.float32)
            yield np.stack([np.asarray(e[path], np.float32) - base for e in expert_flats])

    return chunks


# ----------------------------------------------------------------------------- one group

_COMPILED: dict[tuple, Callable] = {}


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _group_fn(method: MergeMethod, apply_method: bool, static: tuple, array_names: tuple, array_axes: tuple):
    """The jit-compiled (base, experts, scale, *arrays) → merged weights of one group."""
    cache_key = (method.name, id(method.fn), apply_method, static, array_names, array_axes)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    static_options = dict(static)

    def one(tau, *arrays):
        return method.fn(tau, **static_options, **dict(zip(array_names, arrays)))

    def run(base, experts, scale, *arrays):
        work = compute_dtype(base.dtype)
        base_w = base.astype(work)
        tau = experts.astype(work) - base_w[:, None]
        if apply_method:
            merged = jax.vmap(one, in_axes=(0, *array_axes))(tau, *arrays)
        else:
            merged = jnp.mean(tau, axis=1)
        return (base_w + jnp.asarray(scale, work) * merged.astype(work)).astype(base.dtype)

    _COMPILED[cache_key] = jax.jit(run)
    return _COMPILED[cache_key]


def _check_shard(shard: Any) -> None:
    if shard not in (True, False, "auto") or isinstance(shard, int) and not isinstance(shard, bool):
        raise ValueError(f"shard must be True, False or 'auto', got {shard!r}")


def _use_sharding(shard: bool | str, method: MergeMethod, layer_shape: tuple[int, ...]) -> bool:
    _check_shard(shard)
    if method.name not in SPECTRAL_METHODS or shard is False:
        return False
    return shard is True or should_shard(layer_shape, jax.device_count())


def _merge_layers_sharded(base, experts, name: str, scale: float, opts: Mapping[str, Any]) -> jax.Array:
    """θ0 + s·merge_sharded(τ) for each layer of a (G, N, m, n) stack, rows over all devices."""
    mesh = make_row_mesh()
    work = compute_dtype(base.dtype)
    layers = []
    for g in range(experts.shape[0]):
        base_g = base[g].astype(work)
        merged = merge_sharded(experts[g].astype(work) - base_g[None], mesh, name, **opts)
        layers.append((base_g + scale * merged.astype(work)).astype(base.dtype))
    return jnp.stack(layers)


def _stack(arrays: Sequence[Any]):
    """Stack on a new axis 0: on the host when every part is a NumPy array (read from disk),
    so that one copy goes to the device instead of N + 1; on the device otherwise."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    return jnp.stack([jnp.asarray(a) for a in arrays])


def _concat(parts: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Concatenate on axis 0 without a copy when there is one part."""
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _stack_grams(plans: Sequence[LeafPlan], grams: Mapping[str, Any] | None, n_experts: int) -> jnp.ndarray:
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


def merge_group(
    plans: Sequence[LeafPlan],
    base_arrays: Mapping[str, Any],
    expert_arrays: Sequence[Mapping[str, Any]],
    method: str | MergeMethod = "swudi",
    scale: float | None = None,
    options: Mapping[str, Any] | None = None,
    grams: Mapping[str, Any] | None = None,
    shard: bool | str = "auto",
) -> dict[str, jax.Array]:
    """Merge one group of leaves (one group key) in one compiled call.

    Linear weights are stacked in maths layout (G, N, m, n) and the method runs under
    ``jax.vmap``; other floating leaves get the mean task vector (or the method itself when
    it is elementwise); "keep" and "passthrough" leaves return the base array.
    A method with a ``seed`` option gets one PRNG key per leaf and layer
    (:func:`swudi_jax.methods.dare.leaf_key`). TIES with ``trim="model"`` needs
    ``options["thresholds"]`` from :func:`ties_model_thresholds` over the whole model.

    Args:
      plans: the group's plans (from :func:`swudi_jax.layout.group_plans`).
      base_arrays: {path: base array}; expert_arrays: one such dict per expert.
      method, scale, options: the merge method, its scale (None: its default) and options.
      grams: {path: (N, n, n)} input Grams, for "data" methods.
      shard: for swudi, swudi_a and pinv: True merges each layer with its rows split over
        all devices (:func:`swudi_jax.sharding.merge_sharded`), False never, "auto" when
        more than one device exists and a layer's task vectors reach
        ``sharding.DEFAULT_SHARD_BYTES``.
    Returns:
      {path: merged array} with the base's shapes and dtypes.
    """
    method = get_method(method)
    opts = resolve_options(method, options)
    scale = default_scale(method, opts) if scale is None else scale
    if not plans:
        return {}
    if len({p.group for p in plans}) != 1:
        raise ValueError(f"merge_group takes plans of one group key, got {sorted({p.group for p in plans})}")
    kind = plans[0].kind
    if kind in ("keep", "passthrough"):
        return {p.path: base_arrays[p.path] for p in plans}
    if len(expert_arrays) < 2:
        raise ValueError(f"merging needs at least 2 experts, got {len(expert_arrays)}")
    if needs_model_thresholds(method, opts):
        raise ValueError("ties with trim='model' needs options['thresholds'] from ties_model_thresholds() "
                         "over the whole model (or use trim='tensor')")
    apply_method = kind == "spectral" or method.kind == "elementwise"

    if kind == "spectral":
        experts = _concat([to_maths(p, _stack([e[p.path] for e in expert_arrays])) for p in plans])
        base = _concat([to_maths(p, _stack([base_arrays[p.path]]))[:, 0] for p in plans])
    else:
        experts = jnp.asarray(_stack([_stack([e[p.path] for e in expert_arrays]) for p in plans]))
        base = jnp.asarray(_stack([base_arrays[p.path] for p in plans]))

    static = {k: v for k, v in opts.items() if not (k in method.array_options and v is not None)}
    arrays, names, axes = [], [], []
    if apply_method:
        if method.kind == "data":
            arrays.append(_stack_grams(plans, grams, len(expert_arrays)))
            names.append("grams")
            axes.append(0)
        if "seed" in opts:
            arrays.append(jnp.stack([leaf_key(int(opts["seed"]), p.path, layer)
                                     for p in plans for layer in range(p.layers)]))
            names.append("key")
            axes.append(0)
        for name in method.array_options:
            if opts.get(name) is not None:
                arrays.append(jnp.asarray(opts[name]))
                names.append(name)
                axes.append(None)
    if kind == "spectral" and _use_sharding(shard, method, experts.shape[1:]):
        merged = _merge_layers_sharded(base, experts, method.name, scale, opts)
    else:
        fn = _group_fn(method, apply_method, _hashable(static), tuple(names), tuple(axes))
        merged = fn(base, experts, scale, *arrays)

    out, start = {}, 0
    for p in plans:
        if kind == "spectral":
            out[p.path] = from_maths(p, merged[start:start + p.layers])
            start += p.layers
        else:
            out[p.path] = merged[start]
            start += 1
    return out


# ----------------------------------------------------------------------------- whole model


def merge(
    base: Any,
    experts: Sequence[Any],
    method: str | MergeMethod = "swudi",
    *,
    layout: str = "flax",
    scale: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    grams: Mapping[str, Any] | None = None,
    head_patterns: str | Iterable[str] | None = DEFAULT_HEAD_PATTERNS,
    input_axes: Mapping[str, int] | None = None,
    scan_patterns: str | Iterable[str] | None = None,
    scan_axis: int = 0,
    others: str = "mean",
    max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES,
    shard: bool | str = "auto",
    **options: Any,
) -> Any:
    """Merge fine-tuned experts of one base model: θ = θ0 + s · merge(τ1, …, τN).

    Linear weights get the method (SWUDI by default) in maths layout; other floating leaves
    the mean task vector (elementwise methods apply themselves to them); ``exclude``d leaves
    keep the base value; integer and boolean leaves pass through. See
    :mod:`swudi_jax.layout` for the rules and the pattern syntax.

    Args:
      base: the pre-trained parameters, any pytree of arrays (Flax Linen params, NNX state
        as a pure dict, a flat dict of dotted names).
      experts: a list of ≥ 2 pytrees with the same paths, shapes and dtypes.
      method: a registered method name (:func:`swudi_jax.registry.available_methods`).
      layout: "flax" (kernels (in, out)), "torch" (HF weights (out, in)) or "auto"
        ("flax" if a leaf is named ``kernel``, else "torch" if one is named ``weight``).
      scale: s; None means the method's default (0.3 task arithmetic, 1 the others).
      include, exclude, head_patterns, input_axes, scan_patterns, scan_axis, others: the
        leaf rules of :func:`swudi_jax.layout.plan_leaf`.
      grams: {path: (N, n, n)} per-task input Grams for data methods.
      max_group_bytes: cap on the stacked bytes of one compiled call.
      shard: split big layers' rows over all devices (see :func:`merge_group`).
      **options: the method's options (e.g. ``time``, ``rank_ratio`` for SWUDI;
        ``density``, ``trim`` for TIES; ``drop``, ``seed`` for DARE).
    Returns:
      The merged parameters, with the structure and dtypes of ``base``.
    Raises:
      ValueError, before any compute, for an unknown method or option, fewer than two
      experts, differing paths, shapes or dtypes, NaN/Inf, or missing Grams.
    """
    method = get_method(method)
    opts = resolve_options(method, options)
    if scale is not None:
        check_number(scale, "scale")
    _check_shard(shard)
    base_flat, treedef = flatten(base, "base")
    expert_flats = _expert_flats(experts)
    check_models(base_flat, expert_flats)
    plans = plan_tree(
        {p: (leaf.shape, leaf.dtype) for p, leaf in base_flat.items()}, layout=layout, include=include,
        exclude=exclude, head_patterns=head_patterns, input_axes=input_axes,
        scan_patterns=scan_patterns, scan_axis=scan_axis, others=others,
    )
    if method.kind == "data":
        for plan in plans:
            if plan.kind == "spectral":
                _stack_grams([plan], grams, len(expert_flats))
    if needs_model_thresholds(method, opts):
        chunks = model_task_vector_chunks(plans, base_flat, expert_flats)
        opts["thresholds"] = ties_model_thresholds(chunks, opts["density"])
    merged: dict[str, Any] = {}
    for group in group_plans(plans, max_group_bytes, copies=len(expert_flats) + 1):
        merged.update(merge_group(group, base_flat, expert_flats, method, scale, opts, grams, shard))
    return jax.tree_util.tree_unflatten(treedef, [merged[p] for p in base_flat])


__all__ = [
    "DEFAULT_MAX_GROUP_BYTES",
    "check_models",
    "flatten",
    "merge",
    "merge_group",
    "model_task_vector_chunks",
    "needs_model_thresholds",
    "plan_tree",
    "task_vectors",
]
