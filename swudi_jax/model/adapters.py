"""LoRA experts in memory for :func:`swudi_jax.merge`: :class:`~swudi_jax.scale.lora.Adapter` values
and Flax NNX models built with ``nnx.LoRALinear`` or ``nnx.LoRA(base_module=...)``.

Every expert is read as an :class:`ExpertDelta`: leaves given whole (``dense``; the base's
elsewhere) plus low-rank deltas ``factors`` {path: (left, right, s)} with ΔW = s · left @ right
in the leaf's stored layout. A dense pytree is all ``dense``; an :class:`Adapter` all ``factors``.

A Flax NNX expert whose state holds ``nnx.LoRAParam`` variables at paths the base lacks is the
plain model (``nnx.Linear`` layers) plus adapters: ``<layer>/lora/lora_a``, ``.../lora_b`` of an
``nnx.LoRALinear`` adapt ``<layer>/kernel``; ``<layer>/lora_a``, ``<layer>/lora_b`` of an
``nnx.LoRA`` wrapping ``<layer>/base_module`` adapt ``<layer>/kernel``, its ``base_module``
leaves being ``<layer>``'s. ``nnx.LoRA`` computes x @ a @ b (no α/r scale): ΔW = a @ b on the
(in, out) kernel. A wrapped kernel that differs from the base's is a full fine-tune plus an
adapter: that leaf's task vector is (kernel − θ0) + a @ b, densified, with a warning.

With a filtered spectral method (:func:`~swudi_jax.scale.lora.runs_on_factors`: swudi, swudi_a,
pinv, iwudi) a leaf that every expert adapts by factors alone (no whole leaf given), that is one
2-D linear weight (:func:`factorable`) and where N·r_max ≤ n, merges from the factors
(:func:`merge_from_factors`): θ = θ0 + s·B′A′ through the (Σ rᵢ)² problem of
:func:`~swudi_jax.scale.lora.spectral_factors`, never forming an expert's m × n ΔW nor the n × n
operator C (the maths: :mod:`swudi_jax.scale.lora`, MATH.md section 8). Every other leaf is
densified, θ0 + s·left@right (:func:`densified`), and merged as a dense expert's; so is every leaf
of a list that mixes dense and LoRA experts, and of a merge with ``report=True`` or a whole-model
pass (SWUDI's alignment), which read every expert's dense task vectors.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import HIGHEST, compute_dtype, is_floating
from swudi_jax.maths.validation import as_float_array, check_finite
from swudi_jax.methods.spec import Resolved
from swudi_jax.model.flat import check_compatible, flatten, signature
from swudi_jax.model.inputs import as_params, imported_nnx
from swudi_jax.model.layout import LeafPlan
from swudi_jax.scale.lora import Adapter, fits_factors, runs_on_factors, spectral_factors


class ExpertDelta(NamedTuple):
    """One expert as the merge reads it (module docstring).

    Attributes:
      dense: {path: leaf} given whole; the base's leaf elsewhere.
      factors: {path: (left, right, s)}: ΔW = s · left @ right in the leaf's stored layout, added
        to ``dense``'s leaf (or the base's).
    """

    dense: Mapping[str, Any]
    factors: Mapping[str, tuple[Any, Any, float]]


def factorable(plan: LeafPlan) -> bool:
    """A linear plan whose maths matrix is the 2-D tensor itself or its transpose."""
    return (plan.kind == "linear" and len(plan.shape) == 2 and plan.layers == 1 and plan.scan_axis is None
            and tuple(plan.maths_shape) == (tuple(plan.shape)[::-1] if plan.transpose else tuple(plan.shape))
            and (plan.input_axes == 1 if plan.transpose else plan.input_axes == 0))


def maths_pair(plan: LeafPlan, left: Any, right: Any) -> tuple[Any, Any]:
    """(B, A) with the maths-layout ΔW (m outputs, n inputs) = B A, from a stored-layout left @ right."""
    return (right.T, left.T) if plan.transpose else (left, right)


@jax.jit
def plus_product(base, left, right, scale):
    """base + scale · left @ right."""
    return base + scale * jnp.matmul(left, right, precision=HIGHEST)


def _scales(scale: Any, factors: Mapping[str, Any], who: str) -> dict[str, float]:
    """Each factor path's s from an :class:`Adapter`'s ``scale`` (a float or {path: float}, default 1)."""
    given = scale if isinstance(scale, Mapping) else {p: scale for p in factors}
    unknown = sorted(set(given) - set(factors))
    if unknown:
        raise ValueError(f"{who}: the adapter's scale names path(s) {unknown} it has no factors for")
    out = {}
    for path in factors:
        s = given.get(path, 1.0)
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not math.isfinite(s):
            raise ValueError(f"{who}: the adapter's scale of {path!r} must be a finite number, got {s!r}")
        out[path] = float(s)
    return out


def _checked_pair(path: str, pair: Any, who: str, base_flat: Mapping[str, Any],
                  plans: Mapping[str, LeafPlan]) -> tuple[Any, Any]:
    """(left, right) of one leaf, checked against the base leaf and its plan; a ValueError naming
    ``who``, the path and the shapes otherwise."""
    if path not in base_flat:
        near = sorted(p for p in base_flat if p.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1])[:4]
        raise ValueError(f"{who}: adapter path {path!r} is not a parameter of the base (paths as sj.plan prints them"
                         + (f"; e.g. {near}" if near else "") + ")")
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"{who}: {path!r}: expected a pair (left, right), got {type(pair).__name__}")
    left, right = (as_float_array(x, f"{who}: {path!r} {side}") for x, side in zip(pair, ("left", "right")))
    leaf, plan = base_flat[path], plans[path]
    shapes = f"left {tuple(left.shape)} @ right {tuple(right.shape)}, the base leaf {tuple(leaf.shape)}"
    if leaf.ndim != 2 or not is_floating(leaf.dtype):
        raise ValueError(f"{who}: {path!r} is not a 2-D floating weight ({shapes}, {np.dtype(leaf.dtype)}): an "
                         "adapter's left @ right is a matrix")
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0] \
            or (left.shape[0], right.shape[1]) != tuple(leaf.shape):
        raise ValueError(f"{who}: {path!r}: the factors do not give the leaf's shape ({shapes}; stored layout: a Flax "
                         "kernel (in, out) takes lora_a (in, r) @ lora_b (r, out), a torch weight (out, in) B @ A)")
    if plan.kind == "linear" and not factorable(plan):
        raise ValueError(f"{who}: {path!r} is a scan-stacked or folded-axis linear leaf ({shapes}; maths shape "
                         f"{tuple(plan.maths_shape)}, {plan.layers} layer(s)): an adapter there has no factor path")
    check_finite(left, f"{who}: {path!r} left")
    check_finite(right, f"{who}: {path!r} right")
    return left, right


def checked_adapter(factors: Any, scale: Any, index: int, base_flat: Mapping[str, Any],
                    plans: Mapping[str, LeafPlan]) -> dict[str, tuple[Any, Any, float]]:
    """An adapter's {path: (left, right, s)}, every path, shape and value checked (:class:`Adapter`).

    Raises:
      ValueError naming the expert, the path and the shapes: an unknown path, factors whose
      product is not the leaf's shape, a leaf that is not a 2-D floating weight, a scan-stacked
      or folded-axis linear leaf, NaN/Inf.
    """
    who = f"expert {index}"
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError(f"{who}: an Adapter's factors must be a non-empty {{path: (left, right)}} mapping, got "
                         f"{type(factors).__name__}")
    scales = _scales(scale, factors, who)
    return {path: (*_checked_pair(path, pair, who, base_flat, plans), scales[path]) for path, pair in factors.items()}


def _lora_paths(obj: Any) -> set[str]:
    """The flat paths of an NNX object's ``nnx.LoRAParam`` variables (none for anything else)."""
    nnx = imported_nnx()
    if nnx is None:
        return set()
    if isinstance(obj, nnx.Module):
        states = [nnx.state(obj)]
    elif isinstance(obj, nnx.State):
        states = [obj]
    elif isinstance(obj, tuple) and obj and type(obj[0]).__name__ == "GraphDef":
        states = [s for s in obj[1:] if isinstance(s, nnx.State)]
    else:
        return set()
    return {"/".join(str(getattr(k, "key", k)) for k in path) for s in states for path, v in nnx.to_flat_state(s)
            if isinstance(v, nnx.LoRAParam)}


def _nnx_layers(flat: Mapping[str, Any], lora_paths: set[str], who: str) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(the expert's other leaves at the plain model's paths, {kernel path: (lora_a, lora_b)})."""
    dense = {p: v for p, v in flat.items() if p not in lora_paths}
    factors = {}
    for module in sorted({p.rsplit("/", 1)[0] for p in lora_paths}):
        if f"{module}/lora_a" not in flat or f"{module}/lora_b" not in flat:
            raise ValueError(f"{who}: the nnx.LoRAParam variables under {module!r} are not an nnx.LoRA's lora_a and "
                             f"lora_b ({sorted(p for p in lora_paths if p.startswith(module + '/'))})")
        wrapped = f"{module}/base_module/"
        if any(p.startswith(wrapped) for p in dense):  # nnx.LoRA(base_module=layer) in place of the layer
            dense = {(f"{module}/{p[len(wrapped):]}" if p.startswith(wrapped) else p): v for p, v in dense.items()}
            target = f"{module}/kernel"
        elif module == "lora" or module.endswith("/lora"):  # nnx.LoRALinear: the Linear's kernel
            target = module[:-len("lora")] + "kernel"
        else:
            raise ValueError(f"{who}: {module!r} is an nnx.LoRA without a base_module: no base weight it adapts")
        factors[target] = (flat[f"{module}/lora_a"], flat[f"{module}/lora_b"])
    return dense, factors


def _nnx_expert(flat: Mapping[str, Any], lora_paths: set[str], index: int, base_flat: Mapping[str, Any],
                plans: Mapping[str, LeafPlan]) -> ExpertDelta:
    """An NNX model with ``nnx.LoRALinear`` / ``nnx.LoRA`` layers as the plain model plus adapters."""
    who = f"expert {index}"
    dense, factors = _nnx_layers(flat, lora_paths, who)
    check_compatible(signature(base_flat), [signature(dense)], [f"{who} (its nnx.LoRA layers read as adapters)"])
    checked = checked_adapter(factors, 1.0, index, base_flat, plans)
    for path in checked:
        if np.array_equal(np.asarray(dense[path]), np.asarray(base_flat[path])):
            del dense[path]  # the base's kernel: a pure adapter
        else:
            warnings.warn(f"{who}: the kernel under the nnx.LoRA at {path!r} differs from the base's: a full "
                          "fine-tune plus an adapter; its task vector (kernel − base) + lora_a @ lora_b is densified",
                          stacklevel=5)
    return ExpertDelta(dense, checked)


def read_experts(experts: Any, base_flat: Mapping[str, Any], plans: Sequence[LeafPlan],
                 base_kind: str | None = None) -> list[ExpertDelta]:
    """Each expert as an :class:`ExpertDelta`: an :class:`Adapter`, an NNX model with LoRA layers
    the base lacks (module docstring), or any input :func:`~swudi_jax.model.inputs.as_params` takes.

    Raises:
      ValueError for an expert given in another form than the base (``base_kind``, the base's
      :attr:`~swudi_jax.model.inputs.ModelInput.kind`) whose paths differ from the base's, naming both forms.
    """
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence):
        raise ValueError(f"experts must be a list of pytrees (one per expert), got {type(experts).__name__}")
    by_path = {p.path: p for p in plans}
    out = []
    for i, expert in enumerate(experts):
        if isinstance(expert, Adapter):
            out.append(ExpertDelta({}, checked_adapter(expert.factors, expert.scale, i, base_flat, by_path)))
            continue
        given = as_params(expert, f"expert {i}")
        flat = flatten(given.params, f"expert {i}")[0]
        lora_paths = _lora_paths(expert)
        if lora_paths and set(flat) != set(base_flat):
            out.append(_nnx_expert(flat, lora_paths, i, base_flat, by_path))
            continue
        if base_kind is not None and given.kind != base_kind:
            _check_form(flat, given.kind, base_flat, base_kind, i)
        out.append(ExpertDelta(flat, {}))
    return out


def _check_form(flat: Mapping[str, Any], kind: str, base_flat: Mapping[str, Any], base_kind: str, i: int) -> None:
    """Paths that differ between an expert and a base given in two forms, refused naming the forms."""
    if set(flat) == set(base_flat):
        return
    try:
        check_compatible(signature(base_flat), [signature(flat)], [f"expert {i}"], "the base", dtypes=False)
    except ValueError as exc:
        raise ValueError(f"{exc} (expert {i} is given as {kind}, the base as {base_kind}: an NNX module, State or "
                         "split merges its nnx.Param variables only, a pytree every leaf; give every model in one "
                         "form)") from None


def factor_paths(plans: Sequence[LeafPlan], deltas: Sequence[ExpertDelta], resolved: Resolved) -> frozenset[str]:
    """The leaves that merge from the factors (module docstring); none unless ``resolved`` runs on them."""
    if not runs_on_factors(resolved) or any(not d.factors for d in deltas):
        return frozenset()
    out = []
    for plan in plans:
        pairs = [d.factors.get(plan.path) for d in deltas]
        if not factorable(plan) or any(p is None for p in pairs) or any(plan.path in d.dense for d in deltas):
            continue
        if fits_factors(len(deltas), max(p[0].shape[1] for p in pairs), plan.maths_shape[1]):
            out.append(plan.path)
    return frozenset(out)


def densified(delta: ExpertDelta, base_flat: Mapping[str, Any], skip: Collection[str] = ()) -> dict[str, Any]:
    """The expert's flat parameters: ``dense`` over the base, plus s·left@right on each factor leaf
    (in the leaf's compute dtype, rounded to its dtype); the leaves in ``skip`` (merged from the
    factors) are the base's (a zero task vector here)."""
    if not delta.factors:  # a dense expert as given: a missing leaf is refused by the caller, never filled in
        return dict(delta.dense)
    flat = {**base_flat, **delta.dense}
    for path, (left, right, s) in delta.factors.items():
        if path in skip:
            continue
        leaf = flat[path]
        work = compute_dtype(leaf.dtype, left.dtype, right.dtype)
        flat[path] = plus_product(jnp.asarray(leaf, work), jnp.asarray(left, work), jnp.asarray(right, work),
                                  jnp.asarray(s, work)).astype(leaf.dtype)
    return flat


def merge_from_factors(plan: LeafPlan, base: Any, pairs: Sequence[tuple[Any, Any]], resolved: Resolved,
                       weights: Sequence[float] | None, dtype: Any) -> jax.Array:
    """θ0 + s·B′A′ of one leaf from its experts' stored-layout (left, right) pairs (scale folded
    into left), in ``dtype``, returned in the base's dtype (:func:`~swudi_jax.scale.lora.spectral_factors`)."""
    maths = [maths_pair(plan, jnp.asarray(left, dtype), jnp.asarray(right, dtype)) for left, right in pairs]
    b, a = spectral_factors(maths, resolved, tuple(plan.maths_shape), weights)
    left, right = (a.T, b.T) if plan.transpose else (b, a)
    merged = plus_product(jnp.asarray(base, dtype), left.astype(dtype), right.astype(dtype),
                          jnp.asarray(resolved.scale, dtype))
    return merged.astype(base.dtype)


def factor_pairs(deltas: Sequence[ExpertDelta], path: str, dtype: Any) -> list[tuple[jax.Array, jax.Array]]:
    """Each expert's (s·left, right) of ``path`` in ``dtype``."""
    return [(jnp.asarray(left, dtype) * jnp.asarray(s, dtype), jnp.asarray(right, dtype))
            for left, right, s in (d.factors[path] for d in deltas)]


__all__ = ["ExpertDelta", "checked_adapter", "densified", "factor_pairs", "factor_paths", "factorable",
           "maths_pair", "merge_from_factors", "plus_product", "read_experts"]
