"""Whole-model merging over pytrees: task vectors, per-leaf plans, one vmapped call per group.

``merge(base, experts, method)`` views every pytree as a flat path → array map
(:mod:`swudi_jax.model.flat`), validates everything before compute, classifies each leaf
(:class:`swudi_jax.model.layout.LeafRules`), stacks the linear weights of one maths shape,
runs the method under ``jax.vmap`` in one jit-compiled call per group (chunked by
``max_group_bytes``) and returns ``base + scale · merged task vector`` with the structure and
dtypes of ``base``. The flat level (:func:`plan_tree`, :func:`merge_group`) is what the
streaming checkpoint pipeline calls group by group.

The merger knows no method by name: it reads the method's
:class:`~swudi_jax.methods.spec.MethodSpec` — its kind, its whole-model preparation, its
per-leaf inputs, its array options and whether it has a spectral filter (which lets big
layers run with their rows split over several devices).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from swudi_jax.maths.linalg import compute_dtype, is_floating, round_to
from swudi_jax.maths.placement import explicit_sharding, place
from swudi_jax.maths.validation import check_choice, check_finite, is_concrete
from swudi_jax.methods.registry import DEFAULT_METHOD, resolve
from swudi_jax.methods.spec import CHUNK_LEAVES, LOCAL, ChunkSource, Combine, MethodSpec, Resolved
from swudi_jax.model.batching import (compile_groups, compile_key, group_size, hashable, host_array, host_group,
                                      is_flat, pad_layers, padded_sizes, stack_grams, stack_group, unstack_group)
from swudi_jax.model import adapters
from swudi_jax.model.compilations import compiler_options
from swudi_jax.model.flat import check_compatible, flatten, signature, unflatten
from swudi_jax.model.inputs import ModelInput, as_params
from swudi_jax.model.layout import (DEFAULT_HEAD_PATTERNS, LeafPlan, LeafRules, describe_groups, group_nbytes,
                                     logical_paths, to_maths)
from swudi_jax.model.report import ReportCollector
from swudi_jax.scale.sharding import merge_sharded, row_mesh, should_shard

DEFAULT_MAX_GROUP_BYTES = 1 << 30
"""Stacked bytes (base and experts) of one compiled call before a group is split."""

MULTI_DEVICE = (True, False, "auto")

# ----------------------------------------------------------------------------- models


def check_expert_count(method: MethodSpec, n: int) -> None:
    """The method's expert count bounds (:attr:`MethodSpec.n_experts`), as a ValueError."""
    low, high = method.n_experts
    if n < low or (high is not None and n > high):
        want = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        raise ValueError(f"merging needs {want} experts, got {n} (method {method.name!r}; the base is not counted)")


def check_models(base_flat: Mapping[str, Any], expert_flats: Sequence[Mapping[str, Any]],
                 method: MethodSpec | None = None) -> None:
    """Same paths, shapes and dtypes in every model; the method's expert count (at least two
    without a method); no NaN/Inf.

    Raises:
      ValueError naming the expert, the parameter path and what differs.
    """
    if method is not None:
        check_expert_count(method, len(expert_flats))
    elif len(expert_flats) < 2:
        raise ValueError(f"merging needs at least 2 experts, got {len(expert_flats)}")
    check_compatible(signature(base_flat), [signature(f) for f in expert_flats],
                     [f"expert {i}" for i in range(len(expert_flats))], "the base")
    for who, flat in [("base", base_flat)] + [(f"expert {i}", f) for i, f in enumerate(expert_flats)]:
        for path, leaf in flat.items():
            host = host_array(leaf)  # on the host: checked in NumPy, no per-shape compilation
            check_finite(leaf if host is None else host, f"{who}: parameter {path!r}")


def _expert_flats(experts: Any) -> list[dict[str, Any]]:
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence):
        raise ValueError(f"experts must be a list of pytrees (one per expert), got {type(experts).__name__}")
    return [flatten(as_params(e, f"expert {i}").params, f"expert {i}")[0] for i, e in enumerate(experts)]


def task_vectors(base: Any, experts: Sequence[Any]) -> list[Any]:
    """τi = θi − θ0 for each expert, as pytrees shaped like ``base``.

    Floating leaves are subtracted; integer and boolean leaves (which merging passes
    through) give zeros. Inputs are checked as in :func:`merge`; NNX and TrainState inputs give
    their parameters' pure trees (:func:`~swudi_jax.model.inputs.as_params`).
    """
    base_flat, treedef = flatten(as_params(base, "base").params, "base")
    expert_flats = _expert_flats(experts)
    check_models(base_flat, expert_flats)

    def diff(e, b):
        return jnp.asarray(e) - jnp.asarray(b) if is_floating(b.dtype) else jnp.zeros_like(b)

    return [unflatten(treedef, {p: diff(flat[p], base_flat[p]) for p in base_flat}, base_flat)
            for flat in expert_flats]


# ----------------------------------------------------------------------------- plans


def plan_tree(
    flat_shapes_dtypes: Mapping[str, tuple[Sequence[int], Any]],
    rules: LeafRules | None = None,
    *,
    method: str | MethodSpec | Resolved | None = None,
    **rule_options: Any,
) -> list[LeafPlan]:
    """One :class:`LeafPlan` per path of ``{path: (shape, dtype)}``, in the given order.

    Args:
      flat_shapes_dtypes: {path: (shape, dtype)}.
      rules: the leaf rules; or give them as keywords (``layout="torch"``, ``exclude=...``:
        the fields of :class:`LeafRules`).
      method: if given, checked to be a known method.
    """
    if method is not None:
        resolve(method)
    if rules is None:
        rules = LeafRules(**rule_options)
    elif rule_options:
        raise ValueError(f"give the leaf rules either as rules= or as keywords, not both ({sorted(rule_options)})")
    return rules.plan_tree(flat_shapes_dtypes)


def chunk_plans(plans: Sequence[LeafPlan], leaves: str) -> list[LeafPlan]:
    """The plans whose stacks a whole-model pass reading ``leaves`` (:data:`CHUNK_LEAVES`) sees."""
    check_choice(leaves, "leaves", CHUNK_LEAVES)
    kinds = ("linear", "mean") if leaves == "merged" else ("linear",)
    return [p for p in plans if p.kind in kinds]


def chunk_stack(plan: LeafPlan, stack: np.ndarray, leaves: str) -> Any:
    """One leaf's task-vector stack (N, *shape) as the selection ``leaves`` gives it: as is for
    "merged", (layers, N, m, n) maths layout for "linear_maths"."""
    return to_maths(plan, stack) if leaves == "linear_maths" else stack


def model_task_vector_chunks(
    plans: Sequence[LeafPlan], base_flat: Mapping[str, Any], expert_flats: Sequence[Mapping[str, Any]]
) -> ChunkSource:
    """``chunks(leaves="merged")``: yields each selected leaf's task-vector stack in float32, one
    at a time (``leaves``: see :data:`~swudi_jax.methods.spec.CHUNK_LEAVES`)."""

    def chunks(leaves: str = "merged"):
        for plan in chunk_plans(plans, leaves):
            base = np.asarray(base_flat[plan.path], np.float32)
            yield chunk_stack(plan, np.stack([np.asarray(e[plan.path], np.float32) - base for e in expert_flats]), leaves)

    return chunks


def prepare(resolved: Resolved, chunks: ChunkSource, combine: Callable[[str], Combine] | None = None) -> Resolved:
    """``resolved`` with what the method's whole-model pass adds to its options (unchanged when
    it needs none); ``chunks(leaves)`` gives the stacks the pass asks for (:attr:`Preparation.leaves`),
    ``combine(leaves)`` how they meet when ``chunks`` holds only this process's share (default:
    :data:`~swudi_jax.methods.spec.LOCAL`, every chunk is here)."""
    preparation = resolved.spec.preparation(resolved.options)
    if preparation is None:
        return resolved
    joined = LOCAL if combine is None else combine(preparation.leaves)
    return resolved.with_options(preparation.run(functools.partial(chunks, preparation.leaves), joined))


# ----------------------------------------------------------------------------- one group

_COMPILED: dict[tuple, Callable] = {}


def over_layers(fn, array_axes: tuple):
    """``fn`` over the leading (layer) axis of (x, base, *arrays): ``jax.vmap``, or for a group of
    one layer a plain call (XLA CPU runs a batch of one 10–15% slower than the unbatched op)."""
    batched = jax.vmap(fn, in_axes=(0, 0, *array_axes))

    def run(x, base, *arrays):
        if x.shape[0] != 1:
            return batched(x, base, *arrays)
        single = [a if ax is None else jnp.take(a, 0, axis=ax) for a, ax in zip(arrays, array_axes)]
        return fn(x[0], base[0], *single)[None]

    return run


def _group_fn(method: MethodSpec, apply_method: bool, static: tuple, array_names: tuple, array_axes: tuple,
              work: Any, has_base: bool = True):
    """The jit-compiled (base, experts, scale, *arrays) → merged weights of one group, computed in ``work``."""
    cache_key = (method, apply_method, static, array_names, array_axes, str(work), has_base)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    static_options = dict(static)
    on_models = method.operand == "models"
    base_kw = on_models and "base" in method.inputs

    def one(x, base_w, *arrays):
        extra = {"base": base_w if has_base else None} if base_kw else {}
        return method.fn(x, **static_options, **extra, **dict(zip(array_names, arrays)))

    def run(base, experts, scale, *arrays):
        base_w = base.astype(work)
        models = experts.astype(work)
        if apply_method and on_models:  # the method returns the merged weights themselves
            return over_layers(one, array_axes)(models, base_w, *arrays).astype(base.dtype)
        tau = round_to(models - base_w[:, None], work)  # PyTorch rounds the difference
        if apply_method:
            merged = over_layers(one, array_axes)(tau, base_w, *arrays)
        else:  # the mean task vector, of the weighted ones when the method has per-expert weights
            if array_names == ("weight",):
                w = arrays[0].astype(work)  # (G, N) per layer, or (1, N, size) per element of a flat group
                tau = tau * w.reshape(w.shape + (1,) * (tau.ndim - w.ndim))
            merged = jnp.mean(tau, axis=1)
        return (base_w + jnp.asarray(scale, work) * merged.astype(work)).astype(base.dtype)

    _COMPILED[cache_key] = jax.jit(run, compiler_options=compiler_options(work))
    return _COMPILED[cache_key]


def _check_multi_device(multi_device: Any) -> None:
    if multi_device not in MULTI_DEVICE or isinstance(multi_device, int) and not isinstance(multi_device, bool):
        raise ValueError(f"multi_device must be True, False or 'auto', got {multi_device!r}")


def takes_sharded_path(multi_device: bool | str, resolved: Resolved, layer_shape: tuple[int, ...]) -> bool:
    """Whether a linear layer of ``layer_shape`` (N, m, n) runs the row-sharded path over all of
    ``jax.devices()`` (every process's, in a multi-process run): True forces it, "auto" takes it
    for big layers when the method's spectral filter accepts these options (else the dense path,
    which takes every option)."""
    _check_multi_device(multi_device)
    method = resolved.spec
    if method.spectral_filter is None or multi_device is False:
        return False
    if multi_device is True:
        return True
    if not should_shard(layer_shape, jax.device_count()):
        return False
    try:
        method.spectral_filter({k: v for k, v in resolved.options.items() if k not in method.varying})
    except ValueError:  # options only the dense layer path runs
        return False
    return True


def _merge_layers_sharded(base, experts, resolved: Resolved, weights: Sequence[Any] | None = None,
                          mesh: Mesh | None = None) -> jax.Array:
    """θ0 + s·merge_sharded(wi·τi) for each layer of a (G, N, m, n) stack, rows over ``mesh``
    (None: :func:`~swudi_jax.scale.sharding.row_mesh`'s choice) and each θ left there
    (``weights``: the per-expert weights of each layer, (N,) each, or None)."""
    work = compute_dtype(base.dtype)
    whole = resolved.without(resolved.spec.varying)
    layers = []
    for g in range(experts.shape[0]):
        base_g = base[g].astype(work)
        tau = experts[g].astype(work) - base_g[None]
        if weights is not None:
            tau = tau * jnp.asarray(weights[g], work)[:, None, None]
        merged = merge_sharded(tau, mesh, whole)
        base_g = jax.device_put(base_g, merged.sharding)
        layers.append((base_g + resolved.scale * merged.astype(work)).astype(base.dtype))
    return jnp.stack(layers)


def _flat_weights(plans: Sequence[LeafPlan], per_layer: Sequence[Mapping[str, Any]], n_experts: int,
                  size: int) -> np.ndarray:
    """The per-expert weights of a flat mean group as (1, N, size) float32: each leaf's (N,)
    weights repeated over its elements, zero over the padding (whose task vectors are zero)."""
    out = np.zeros((1, n_experts, size), np.float32)
    start, layer = 0, 0
    for p in plans:
        count = math.prod(p.shape)
        w = np.stack([np.asarray(v["weight"], np.float32) for v in per_layer[layer:layer + p.layers]], axis=1)
        if p.scan_axis is not None:  # (N, layers) along the leaf's layer axis
            w = w.reshape((n_experts,) + tuple(p.layers if a == p.scan_axis else 1 for a in range(len(p.shape))))
        else:
            w = w.reshape((n_experts,) + (1,) * len(p.shape))
        out[0, :, start:start + count] = np.broadcast_to(w, (n_experts, *p.shape)).reshape(n_experts, count)
        start += count
        layer += p.layers
    return out


TensorOptions = Callable[[str, "int | None"], Mapping[str, Any]]
"""``tensor_options(path, layer)`` → {option: value} for one tensor (``layer``: the index in a
scanned stack, None for an unstacked leaf): the per-tensor values of the method's
:attr:`~MethodSpec.varying` options (mergekit's filters and gradients); options it leaves
out take the merge's value."""


def _per_expert(value: Any, n: int, name: str, where: str) -> np.ndarray:
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
        return np.full((n,), arr)
    if arr.shape != (n,):
        raise ValueError(f"{where}: option {name!r} takes one value per expert ({n}), got {np.asarray(value).tolist()}")
    return arr


def layer_options(resolved: Resolved, plans: Sequence[LeafPlan], n_experts: int,
                  tensor_options: TensorOptions | None = None) -> list[dict[str, Any]]:
    """Each layer's resolved options: ``resolved.options`` with its varying options replaced by
    the tensor's values (per-expert ones as (N,) float64 arrays), one dict per layer of the group."""
    method, opts = resolved.spec, resolved.options
    out = []
    for p in plans:
        for layer in range(p.layers):
            values = dict(opts)
            if tensor_options is not None:
                override = tensor_options(p.path, layer if p.layers > 1 else None) or {}
                unknown = sorted(set(override) - set(method.varying))
                if unknown:
                    raise ValueError(f"{p.path!r}: option(s) {unknown} of method {method.name!r} cannot vary "
                                     f"per tensor; those that can: {list(method.varying) or 'none'}")
                values.update(override)
            for name in method.per_expert:
                values[name] = _per_expert(values[name], n_experts, name, repr(p.path))
            out.append(values)
    return out


def expert_weights(resolved: Resolved, plan: LeafPlan, n_experts: int,
                   tensor_options: TensorOptions | None) -> np.ndarray | None:
    """One tensor's per-expert ``weight`` (N,), for methods that weigh the experts, else None."""
    if "weight" not in resolved.spec.per_expert:
        return None
    return np.asarray(layer_options(resolved, [plan], n_experts, tensor_options)[0]["weight"], np.float64)


def _group_inputs(resolved: Resolved, plans: Sequence[LeafPlan], grams: Mapping[str, Any] | None, n_experts: int,
                  tensor_options: TensorOptions | None = None) -> tuple[list, list, list]:
    """The arrays fed to the method beside the task vectors: (arrays, names, vmap axes).

    Grams for data methods, the varying options (per-expert (N,), per-tensor ()) and the
    spec's per-leaf inputs have one entry per layer of the group (vmapped); array options
    are shared by the whole group.
    """
    method, opts = resolved.spec, resolved.options
    arrays, names, axes = [], [], []
    if method.kind == "data":
        arrays.append(stack_grams(plans, grams, n_experts))
        names.append("grams")
        axes.append(0)
    per_layer = layer_options(resolved, plans, n_experts, tensor_options)
    for name in method.varying:
        if opts.get(name) is None and all(v.get(name) is None for v in per_layer):
            continue
        arrays.append(np.stack([np.asarray(v[name], np.float64) for v in per_layer]).astype(np.float32))
        names.append(name)
        axes.append(0)
    if method.leaf_inputs is not None:
        shapes = [p.maths_shape if p.kind == "linear" else p.shape for p in plans for _ in range(p.layers)]
        layers = [(p.path, layer) for p in plans for layer in range(p.layers)]
        inputs = [method.leaf_inputs(v, path, layer, tuple(shape))
                  for v, (path, layer), shape in zip(per_layer, layers, shapes)]
        for name in inputs[0]:
            arrays.append(jnp.stack([jnp.asarray(i[name]) for i in inputs]))
            names.append(name)
            axes.append(0)
    for name in method.array_options:
        if opts.get(name) is not None:
            arrays.append(jnp.asarray(opts[name]))
            names.append(name)
            axes.append(None)
    return arrays, names, axes


def _check_group(plans: Sequence[LeafPlan], flat: bool) -> None:
    keys = {compile_key([p], False) for p in plans} if flat else {p.group for p in plans}
    if len(keys) != 1:
        raise ValueError(f"merge_group takes plans of one group key, got {sorted({p.group for p in plans})}")


def _check_method_for_group(resolved: Resolved, n_experts: int, has_base: bool) -> None:
    method = resolved.spec
    check_expert_count(method, n_experts)
    if not has_base and method.base == "required":
        raise ValueError(f"method {method.name!r} needs a base model")
    preparation = method.preparation(resolved.options)
    if preparation is not None:
        raise ValueError(f"method {method.name!r}: {preparation.what}; merge() and merge_checkpoints() run this "
                         f"pass, merge_group() takes the Resolved value it returns (prepare())")


def _mean_inputs(resolved: Resolved, plans, n_experts: int, flat: bool, size: int,
                 tensor_options: TensorOptions | None) -> tuple[list, list, list]:
    """The inputs of a group the method does not merge itself: the per-expert weights of the
    mean task vector when the method has a ``weight`` option, else none."""
    if "weight" not in resolved.spec.per_expert:
        return [], [], []
    per_layer = layer_options(resolved, plans, n_experts, tensor_options)
    if flat:
        return [_flat_weights(plans, per_layer, n_experts, size)], ["weight"], [0]
    return [pad_layers(np.stack([v["weight"] for v in per_layer]).astype(np.float32), size)], ["weight"], [0]


def _call_inputs(resolved: Resolved, plans, n_experts: int, apply_method: bool, flat: bool, size: int,
                 grams, tensor_options) -> tuple[list, list, list]:
    """(arrays, names, vmap axes) fed to the group's compiled call beside the stacks, per-layer
    ones padded to ``size``: the method's inputs, or the mean's per-expert weights."""
    if not apply_method:
        return _mean_inputs(resolved, plans, n_experts, flat, size, tensor_options)
    arrays, names, axes = _group_inputs(resolved, plans, grams, n_experts, tensor_options)
    return [pad_layers(a, size) if ax == 0 else a for a, ax in zip(arrays, axes)], names, axes


def _run_group(resolved: Resolved, base, experts, apply_method: bool, inputs: tuple[list, list, list], work,
               has_base: bool):
    """One compiled call: the method (or the mean task vector) over the stacked group."""
    arrays, names, axes = inputs
    fn = _group_fn(resolved.spec, apply_method, hashable(resolved.static(names)), tuple(names), tuple(axes), work,
                   has_base)
    return fn(base, experts, resolved.scale, *arrays)


def merge_group(
    plans: Sequence[LeafPlan],
    base_arrays: Mapping[str, Any],
    expert_arrays: Sequence[Mapping[str, Any]],
    resolved: Resolved,
    grams: Mapping[str, Any] | None = None,
    multi_device: bool | str = "auto",
    tensor_options: TensorOptions | None = None,
    dtype: Any = None,
    has_base: bool = True,
    *,
    pad_to: int | None = None,
    host_output: bool = False,
    report: ReportCollector | None = None,
) -> dict[str, jax.Array]:
    """Merge one group of leaves (one group key) in one compiled call.

    Linear weights are stacked in maths layout (G, N, m, n) and the method runs under
    ``jax.vmap``; other floating leaves get the mean task vector (or the method itself when
    it is elementwise); "keep" and "passthrough" leaves return the base array. A method's
    whole-model pass (:meth:`MethodSpec.preparation`) must have run first (:func:`prepare`).

    Args:
      plans: the group's plans (from :func:`swudi_jax.model.layout.group_plans`).
      base_arrays: {path: base array}; expert_arrays: one such dict per expert.
      resolved: the method, its options and scale, resolved at the boundary
        (:func:`swudi_jax.methods.registry.resolve`, then :func:`prepare`).
      grams: {path: (N, n, n)} input Grams, for "data" methods.
      multi_device: for methods with a spectral filter (swudi, swudi_a, pinv): True merges
        each layer with its rows split over all devices
        (:func:`swudi_jax.scale.sharding.merge_sharded`), False never, "auto" when more than
        one device exists and a layer's task vectors reach ``sharding.DEFAULT_SHARD_BYTES``.
      tensor_options: per-tensor values of the method's varying options (:data:`TensorOptions`).
      dtype: the compute dtype asked for (None: the inputs' own dtype for a method defined in
        it, as mergekit computes in the stored dtype; else float32, float64 for float64
        inputs); a method not defined in a requested dtype computes in float32
        (:func:`~swudi_jax.maths.linalg.compute_dtype`).
      has_base: False when the merge has no base model (methods whose ``base`` is "optional"
        or "joins"); ``base_arrays`` then only give the shapes and dtypes (pass any model's).
      pad_to: pad the stacked axis to this size (:func:`swudi_jax.model.batching.padded_sizes`)
        so that every chunk of one group reuses one compiled executable; per-layer inputs
        (grams, per-tensor option values, leaf inputs) are padded like the layers, repeating
        the last layer's values.
      host_output: return NumPy arrays (the checkpoint writer's input) instead of JAX arrays.
      report: a :class:`~swudi_jax.model.report.ReportCollector`; a linear group's stacks, merged
        result and method inputs are shown to it (the merged arrays are not changed).

    Mean leaves under a method that is not elementwise may have several shapes (one dtype):
    they merge as one flat vector (:func:`swudi_jax.model.batching.compile_groups`); per-expert
    weights then enter as one (1, N, size) array, each leaf's weights repeated over its
    elements (zero over the padding). Arrays on the host are stacked and unstacked in NumPy
    (:mod:`swudi_jax.model.batching`).
    Returns:
      {path: merged array} with the base's shapes and dtypes.
    """
    return _start_group(plans, base_arrays, expert_arrays, resolved, grams, multi_device, tensor_options, dtype,
                        has_base, pad_to, host_output, report)()


def _start_group(plans, base_arrays, expert_arrays, resolved: Resolved, grams, multi_device, tensor_options, dtype,
                 has_base: bool, pad_to: int | None, host_output: bool,
                 report: ReportCollector | None) -> Callable[[], dict[str, Any]]:
    """:func:`merge_group` up to the compiled call's dispatch: returns the call that gives
    {path: merged array}, waiting for the result when the group was stacked on the host (NumPy or
    CPU arrays; device arrays are returned as JAX schedules them). JAX dispatches asynchronously,
    so the caller can stack and compile the next group while this one computes (:func:`_merge_groups`)."""
    if not isinstance(resolved, Resolved):
        raise ValueError(f"merge_group takes a resolved method (swudi_jax.methods.registry.resolve(name, options, "
                         f"scale)), got {type(resolved).__name__}")
    if not plans:
        return dict
    kind, method = plans[0].kind, resolved.spec
    apply_method = kind == "linear" or method.kind == "elementwise"
    flat = is_flat(plans, apply_method)
    _check_group(plans, flat)
    if kind in ("keep", "passthrough"):
        return functools.partial(dict, {p.path: base_arrays[p.path] for p in plans})
    _check_method_for_group(resolved, len(expert_arrays), has_base)
    size = max(pad_to or 0, group_size(plans, method.kind == "elementwise"))
    sharded = kind == "linear" and takes_sharded_path(multi_device, resolved, (len(expert_arrays), *plans[0].maths_shape))
    host = None if sharded else host_group(plans, base_arrays, expert_arrays)
    # host arrays: NumPy layout transforms, one transfer each way (the host stacks are freed here)
    base, experts = jax.device_put(stack_group(plans, *(host or (base_arrays, expert_arrays)), flat,
                                               None if sharded else size))
    mesh = row_mesh(like=base_arrays[plans[0].path]) if sharded else None
    merged = _merge_stacked(resolved, plans, base, experts, mesh, apply_method, flat, size, grams, tensor_options,
                            dtype, has_base, report)
    return functools.partial(_unstacked, plans, merged, flat, host is not None, host_output, base_arrays)


def _merge_stacked(resolved: Resolved, plans, base, experts, mesh: Mesh | None, apply_method: bool, flat: bool,
                   size: int, grams, tensor_options, dtype, has_base: bool, report: ReportCollector | None):
    """The group's merged stack, by the row-sharded path over ``mesh`` (None: one compiled
    call); a linear group is then shown to ``report``."""
    method, n_experts, sharded = resolved.spec, experts.shape[1], mesh is not None
    work = compute_dtype(base.dtype, experts.dtype, requested=dtype, defined_in=method.compute_dtypes)
    size = experts.shape[0] if sharded else size
    inputs = None if sharded and report is None else _call_inputs(
        resolved, plans, n_experts, apply_method, flat, size, grams, tensor_options)
    if sharded:
        weights = None
        if "weight" in method.per_expert:
            weights = [v["weight"] for v in layer_options(resolved, plans, n_experts, tensor_options)]
        merged = _merge_layers_sharded(base, experts, resolved, weights, mesh)
    else:
        merged = _run_group(resolved, base, experts, apply_method, inputs, work, has_base)
    if report is not None and plans[0].kind == "linear":
        report.observe(plans, base, experts, merged, inputs, work, has_base)
    return merged


def _unstacked(plans, merged, flat: bool, from_host: bool, host_output: bool,
               base_arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The group's merged stack back as {path: array}: NumPy arrays for ``host_output``, else
    JAX arrays with the base leaf's sharding (the default device for a NumPy base); a group
    stacked on the host is unstacked there (no per-shape compilation)."""
    if from_host:
        merged = np.asarray(merged)
    elif flat and explicit_sharding(merged) is not None:  # its leaves are cut out of one vector: whole on each device
        merged = place(merged, NamedSharding(merged.sharding.mesh, PartitionSpec()))
    out = unstack_group(plans, merged, flat)
    if host_output:
        return {k: np.asarray(v) for k, v in out.items()}
    return {k: jax.device_put(v, _placement(base_arrays[k])) for k, v in out.items()}


def _placement(base_leaf: Any) -> Any:
    """Where a merged leaf goes: the base leaf's sharding when it is a JAX array, else the
    default device (None)."""
    return base_leaf.sharding if isinstance(base_leaf, jax.Array) and is_concrete(base_leaf) else None


# ----------------------------------------------------------------------------- whole model


def _leaf_rules(rules: LeafRules | None, structural: Mapping[str, Any]) -> LeafRules:
    if rules is None:
        return LeafRules(**structural)
    if LeafRules(**structural) != LeafRules():
        raise ValueError("give the leaf rules either as rules= or as keywords (layout=, exclude=, ...), not both")
    return rules


def merge(
    base: Any,
    experts: Sequence[Any],
    method: str | MethodSpec | Resolved = DEFAULT_METHOD,
    *,
    scale: float | None = None,
    rules: LeafRules | None = None,
    layout: str = "flax",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    head_patterns: str | Iterable[str] | None = DEFAULT_HEAD_PATTERNS,
    input_axes: Mapping[str, int] | None = None,
    scan_patterns: str | Iterable[str] | None = None,
    scan_axis: int = 0,
    others: str = "mean",
    grams: Mapping[str, Any] | None = None,
    max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES,
    multi_device: bool | str = "auto",
    tensor_options: TensorOptions | None = None,
    dtype: Any = None,
    report: bool = False,
    **options: Any,
) -> Any:
    """Merge fine-tuned experts of one base model: θ = θ0 + s · merge(τ1, …, τN).

    Linear weights get the method (SWUDI by default) in maths layout; other floating leaves
    the mean task vector (elementwise methods apply themselves to them); ``exclude``d leaves
    keep the base value; integer and boolean leaves pass through. See
    :mod:`swudi_jax.model.layout` for the rules and the pattern syntax.

    Args:
      base: the pre-trained parameters, any pytree of arrays (Flax Linen params, NNX state
        as a pure dict, a flat dict of dotted names).
      experts: a list of ≥ 2 pytrees with the same paths, shapes and dtypes, or LoRA experts
        (:class:`~swudi_jax.scale.lora.Adapter`; NNX models with ``nnx.LoRALinear`` / ``nnx.LoRA``
        layers over a plain base), merged from their factors where they can be (:mod:`swudi_jax.model.adapters`).
      method: a registered method name (:func:`swudi_jax.methods.registry.available_methods`),
        a :class:`MethodSpec` (registered or not), or a :class:`Resolved` value.
      scale: s; None: the method's default, 0.3 for ``task_arithmetic_paper`` and ``dare``
        (the papers' λ), 1 for mergekit's ``task_arithmetic`` and every other method.
      rules: the structural rules as one :class:`LeafRules` value, or give them as the
        keywords ``layout`` ("flax": kernels (in, out); "torch": HF weights (out, in);
        "auto": from the leaf names), ``include``, ``exclude``, ``head_patterns``,
        ``input_axes``, ``scan_patterns``, ``scan_axis`` and ``others`` (see
        :class:`LeafRules`). Every other keyword is a method option.
      grams: {path: (N, n, n)} per-task input Grams for data methods.
      max_group_bytes: cap on the stacked bytes of one compiled call (and of two in flight).
      multi_device: split big layers' rows over all devices (see :func:`merge_group`).
      tensor_options: per-tensor values of the method's varying options, ``(path, layer) ->
        {option: value}`` (see :func:`merge_group`); per-expert options such as ``weight``
        may also be given once as a list of N values.
      dtype: the compute dtype (None: as stored for mergekit's methods, else float32; see :func:`merge_group`).
      report: also return the :class:`~swudi_jax.model.report.MergeReport`: ``(merged, report)``.
      **options: the method's options (e.g. ``time``, ``rank_ratio`` for SWUDI;
        ``density``, ``trim`` for TIES; ``drop``, ``seed`` for DARE).
    Returns:
      The merged parameters, with the structure and dtypes of ``base`` (and the report).
    Raises:
      ValueError, before any compute, for an unknown method or option, fewer than two
      experts, differing paths, shapes or dtypes, NaN/Inf, missing Grams, or adapter factors
      whose path, shapes or leaf do not fit (naming the expert, the path and the shapes).
    """
    resolved = resolve(method, options, scale)
    _check_multi_device(multi_device)
    rules = _leaf_rules(rules, dict(layout=layout, include=include, exclude=exclude, head_patterns=head_patterns,
                                    input_axes=input_axes, scan_patterns=scan_patterns, scan_axis=scan_axis,
                                    others=others))
    given = as_params(base, "base")
    _warn_left_out(given)
    base_flat, treedef = flatten(given.params, "base")
    plans = rules.plan_tree({p: (leaf.shape, leaf.dtype) for p, leaf in base_flat.items()})
    deltas, on_factors, expert_flats = _read_experts(experts, base_flat, plans, resolved, report, grams, given.kind)
    resolved = prepare(resolved, model_task_vector_chunks(plans, base_flat, expert_flats))
    collector = ReportCollector(resolved, len(expert_flats)) if report else None
    merged = _merge_groups([p for p in plans if p.path not in on_factors], base_flat, expert_flats, resolved,
                           max_group_bytes, collector, grams=grams, multi_device=multi_device,
                           tensor_options=tensor_options, dtype=dtype)
    merged.update(_merge_from_factors(plans, on_factors, base_flat, deltas, resolved, tensor_options, dtype))
    out = given.rebuild(unflatten(treedef, merged, base_flat))
    return (out, collector.result()) if report else out


def _merge_groups(plans, base_flat, expert_flats, resolved: Resolved, max_group_bytes: int | None,
                  report: ReportCollector | None, *, grams, multi_device, tensor_options, dtype) -> dict[str, Any]:
    """{path: merged leaf} of a whole model, its compile groups largest first (stacked bytes). JAX
    dispatches a compiled call asynchronously, so the next group is stacked, traced and compiled
    while one computes, when the two groups' stacks fit in ``max_group_bytes`` together (else the
    first is collected before the next starts): the stacked bytes alive stay within the cap, as one
    group's do. Largest first, the small groups compile while big ones compute and the merge ends
    on a small computation (MiniLM's cold first call: 5.5 → 5.2 s, benchmarks/README.md)."""
    merged: dict[str, Any] = {}
    copies = len(expert_flats) + 1
    elementwise = resolved.spec.kind == "elementwise"
    groups = compile_groups(plans, max_group_bytes, copies=copies, elementwise=elementwise)
    cap = math.inf if max_group_bytes is None else max_group_bytes
    waiting: Callable[[], dict[str, Any]] = dict
    waiting_bytes = 0
    sized = [(copies * group_nbytes(g), g, size) for g, size in zip(groups, padded_sizes(groups, elementwise))]
    for stacked, group, size in sorted(sized, key=lambda entry: -entry[0]):
        if waiting_bytes + stacked > cap:
            merged.update(waiting())
            waiting, waiting_bytes = dict, 0
        started = _start_group(group, base_flat, expert_flats, resolved, grams, multi_device, tensor_options, dtype,
                               True, size, False, report)
        merged.update(waiting())
        waiting, waiting_bytes = started, stacked
    merged.update(waiting())
    return merged


def _read_experts(experts: Any, base_flat: Mapping[str, Any], plans: Sequence[LeafPlan], resolved: Resolved,
                  report: bool, grams: Mapping[str, Any] | None, base_kind: str):
    """(the experts as :class:`~swudi_jax.model.adapters.ExpertDelta`, the leaves merged from their
    LoRA factors, each expert's flat parameters with every other adapted leaf densified), checked:
    :func:`check_models`, and the Grams of a data method."""
    deltas = adapters.read_experts(experts, base_flat, plans, base_kind)
    check_expert_count(resolved.spec, len(deltas))
    on_factors = _factor_paths(plans, deltas, resolved, report)
    expert_flats = [adapters.densified(d, base_flat, on_factors) for d in deltas]
    check_models(base_flat, expert_flats, resolved.spec)
    if resolved.spec.kind == "data":
        for plan in plans:
            if plan.kind == "linear":
                stack_grams([plan], grams, len(expert_flats))
    return deltas, on_factors, expert_flats


def _factor_paths(plans: Sequence[LeafPlan], deltas: Sequence[adapters.ExpertDelta], resolved: Resolved,
                  report: bool) -> frozenset[str]:
    """The leaves :func:`merge` takes from the experts' LoRA factors
    (:func:`~swudi_jax.model.adapters.factor_paths`); none with a report or a whole-model pass,
    which read every expert's dense task vectors."""
    if report or resolved.spec.preparation(resolved.options) is not None:
        return frozenset()
    return adapters.factor_paths(plans, deltas, resolved)


def _merge_from_factors(plans: Sequence[LeafPlan], paths: frozenset[str], base_flat: Mapping[str, Any],
                        deltas: Sequence[adapters.ExpertDelta], resolved: Resolved,
                        tensor_options: TensorOptions | None, dtype: Any) -> dict[str, Any]:
    """{path: θ0 + s·B′A′} of the leaves in ``paths``, merged from the LoRA factors, placed as the base leaf."""
    out = {}
    for p in (p for p in plans if p.path in paths):
        base = base_flat[p.path]
        work = compute_dtype(base.dtype, requested=dtype, defined_in=resolved.spec.compute_dtypes)
        pairs = adapters.factor_pairs(deltas, p.path, work)
        weights = expert_weights(resolved, p, len(deltas), tensor_options)
        merged = adapters.merge_from_factors(p, base, pairs, resolved, weights, work)
        out[p.path] = jax.device_put(merged, _placement(base))
    return out


def _warn_left_out(given: ModelInput) -> None:
    if given.left_out:
        warnings.warn(f"not merged, taken from the base ({given.kind}): {'; '.join(given.left_out)}", stacklevel=3)


class TreePlan(NamedTuple):
    """What :func:`merge` would do with a model, as :func:`plan` finds it; ``print`` shows the
    table ``swudi-merge --dry-run`` prints.

    Attributes:
      plans: each leaf's :class:`LeafPlan`; groups: the compiled calls, in order.
      method: the method's name; layout: "flax" or "torch"; kind: what was given
        (:class:`~swudi_jax.model.inputs.ModelInput`); guesses: what the plan guessed
        (:func:`~swudi_jax.model.layout.plan_guesses`); left_out: what is not merged;
      factors: the leaves merged from the experts' LoRA factors (:func:`plan` given ``experts``).
    """

    plans: tuple[LeafPlan, ...]
    groups: tuple[tuple[LeafPlan, ...], ...]
    method: str
    layout: str
    kind: str
    guesses: tuple[str, ...]
    left_out: tuple[str, ...]
    elementwise: bool
    factors: tuple[str, ...] = ()

    def describe(self) -> str:
        lines = describe_groups(self.groups, self.method, self.elementwise, self.factors)
        summary = f"{len(self.plans)} leaves in {len(self.groups)} groups; method {self.method}, layout {self.layout}, " \
                  f"input {self.kind}" + (f"; {len(self.factors)} from LoRA factors" if self.factors else "")
        return "\n".join(lines + ["", summary] + [f"guess: {g}" for g in self.guesses]
                         + [f"left out: {x}" for x in self.left_out])

    def __str__(self) -> str:
        return self.describe()


def plan(
    base: Any,
    method: str | MethodSpec | Resolved = DEFAULT_METHOD,
    *,
    rules: LeafRules | None = None,
    n_experts: int = 2,
    max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES,
    experts: Sequence[Any] | None = None,
    **rule_options: Any,
) -> TreePlan:
    """What :func:`merge` would do with ``base`` (any input :func:`merge` takes): every leaf's
    kind, maths shape and group, and every guess it rests on — ``print(sj.plan(params))``
    shows the table ``swudi-merge --dry-run`` prints. Nothing is computed or warned.

    Args:
      base: the base model as it would be given to :func:`merge`.
      method: the method (name, spec or :class:`Resolved`).
      rules: the structural rules, or their keywords as in :func:`merge` (``layout``,
        ``scan_patterns``, ``input_axes``, ...).
      n_experts: the expert count the groups are sized for.
      max_group_bytes: as in :func:`merge`.
      experts: the experts, when given: the table marks the leaves merged from LoRA factors
        ("<method> (factors)") and ``n_experts`` is their count.
    """
    resolved = resolve(method)
    rules = rules if rules is not None else LeafRules(**rule_options)
    given = as_params(base, "base")
    base_flat, _ = flatten(given.params, "base")
    signature_ = {p: (leaf.shape, leaf.dtype) for p, leaf in base_flat.items()}
    plans, guesses = rules.plan_with_guesses(signature_)
    factors: frozenset[str] = frozenset()
    if experts is not None:
        deltas = adapters.read_experts(experts, base_flat, plans, given.kind)
        n_experts, factors = len(deltas), _factor_paths(plans, deltas, resolved, False)
    elementwise = resolved.spec.kind == "elementwise"
    groups = compile_groups(plans, max_group_bytes, copies=n_experts + 1, elementwise=elementwise)
    layout = rules.for_paths(logical_paths(signature_).values()).layout
    return TreePlan(tuple(plans), tuple(tuple(g) for g in groups), resolved.spec.name, layout, given.kind, guesses,
                    given.left_out, elementwise, tuple(p.path for p in plans if p.path in factors))

__all__ = [
    "DEFAULT_MAX_GROUP_BYTES",
    "TensorOptions",
    "check_expert_count",
    "check_models",
    "expert_weights",
    "layer_options",
    "merge",
    "merge_group",
    "takes_sharded_path",
    "plan",
    "TreePlan",
    "chunk_plans",
    "chunk_stack",
    "model_task_vector_chunks",
    "plan_tree",
    "prepare",
    "task_vectors",
]
