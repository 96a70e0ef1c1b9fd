"""``out_format: peft``: a merge of PEFT LoRA adapters written as one PEFT adapter.

When every expert is a LoRA adapter over the base (:func:`~swudi_jax.checkpoint.lora_factors.adapter_readers`),
each tensor an adapter touches has a merged update that is, exactly, a product of factors:

- a filtered spectral method (swudi, swudi_a, pinv, iwudi) on a linear weight: θ = B′A′ with
  B′ = [w1 B1 … wN BN] of rank R = Σ rᵢ over the adapters touching it
  (:func:`swudi_jax.scale.lora.spectral_factors`; an adapter that does not touch it is a zero
  task vector, counted in N as in the densified merge);
- a method whose merged task vector is a fixed combination Σ cᵢ τᵢ (task_arithmetic, linear,
  average, task_arithmetic_paper: :attr:`~swudi_jax.methods.spec.MethodSpec.combination`), and
  the weighted mean task vector that a spectral method gives every other tensor: the
  concatenated adapter [c1 B1 … cN BN], [A1; …; AN] (what PEFT's
  ``add_weighted_adapter(combination_type="cat")`` builds);
- a module one adapter replaces whole (``modules_to_save``): merged densified as in the dense
  merge and stored whole, under ``modules_to_save``.

The merge scale s is folded into B′. Each module's rank is its R (``rank_pattern``), or, with
``adapter_rank: r``, min(R, r) by the best rank-r approximation of B′A′
(:func:`swudi_jax.scale.lora.truncate_factors`): the error ‖B′A′ − BrAr‖_F = (Σ_{j>r} s_j²)^½ of
every truncated module is written to ``truncation.json`` and its largest relative value printed.
Tensors no adapter touches keep the base's value, so the adapter leaves them out. A merged
update where R exceeds min(m, n) (no saving) is stored as its exact SVD factors, rank min(m, n).

Refused before any compute, naming what does not fit: an expert that is not an adapter over
the base, a method whose result is not in the adapters' span (TIES, DARE, WUDI, ... : only
the above), adapters that disagree on ``fan_in_fan_out``, and a ``linear`` merge whose weights
do not sum to 1 (its merged weights are then not the base plus a low-rank update).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swudi_jax.checkpoint.config import MergeConfig, numpy_dtype
from swudi_jax.checkpoint.io import peft
from swudi_jax.checkpoint.io.peft_writer import AdapterModule, AdapterWriter
from swudi_jax.checkpoint.io.reader import CheckpointReader, naming_file
from swudi_jax.checkpoint.lora_factors import (adapter_readers, check_factors_finite, expert_weights, factorable,
                                               maths_pair, stored_pair)
from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.checkpoint.output_checks import checked_outputs
from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.methods.registry import available_methods, get_method
from swudi_jax.methods.spec import Resolved
from swudi_jax.model.layout import LeafPlan
from swudi_jax.model.merger import TensorOptions, layer_options, merge_group
from swudi_jax.scale.lora import combine_factors, fits_factors, runs_on_factors, spectral_factors, truncate_factors

TRUNCATION_NAME = "truncation.json"
DenseRead = Callable[[list[str]], tuple[dict, list[dict]]]
"""``read(keys)``: the base's and the experts' (densified) arrays of ``keys``."""
SUM_TOLERANCE = 1e-6
"""How far from 1 the coefficients of a merge on the models' weights may sum."""


def adapter_methods() -> list[str]:
    """The registered methods whose merge of adapters is an adapter (see the module docstring)."""
    return [n for n in available_methods() if get_method(n).spectral_filter is not None
            or get_method(n).combination is not None]


def check_adapter_output(config: MergeConfig, experts: Sequence[CheckpointReader]) -> list[peft.LoraReader | None]:
    """The experts' adapter readers, or a ValueError saying why the merge cannot be an adapter."""
    if config.modules is not None:
        raise ValueError("out_format peft writes one adapter over base_model; `slices`/`modules` configs build each "
                         "output layer from its own models: merge them to a dense checkpoint")
    readers = adapter_readers(config, experts)
    if readers is None:
        raise ValueError("out_format peft writes the merge as one LoRA adapter over base_model: every model must be "
                         f"a PEFT adapter over that base (./adapter or base+./adapter); got {list(config.models)}")
    resolved = config.method
    if resolved.spec.combination is None and not runs_on_factors(resolved):
        raise ValueError(f"out_format peft: the merge of {resolved.spec.name!r} is not in the adapters' span, so it is "
                         f"not a LoRA adapter; methods that write one: {adapter_methods()}")
    flags = {r.config.fan_in_fan_out for r in readers if r is not None}
    if len(flags) > 1:
        raise ValueError("out_format peft: the adapters disagree on fan_in_fan_out "
                         f"({[(str(r.path), r.config.fan_in_fan_out) for r in readers if r is not None]})")
    return readers


@dataclass(frozen=True)
class Route:
    """How one touched tensor enters the adapter: "spectral", "combine" (with ``coefficients``)
    or "dense" (stored whole); ``rank`` is the written rank, ``full`` the exact one."""

    plan: LeafPlan
    how: str
    rank: int = 0
    full: int = 0
    embedding: bool = False
    coefficients: tuple[float, ...] = ()

    @property
    def module(self) -> str:
        return self.plan.path.removesuffix(".weight")


def _coefficients(resolved: Resolved, plan: LeafPlan, n: int, resolver: TensorOptions | None) -> np.ndarray:
    """c with the merged update Σ cᵢ τᵢ of this tensor (scale folded in; see the module docstring)."""
    spec = resolved.spec
    values = layer_options(resolved, [plan], n, resolver)[0]
    if spec.combination is not None and (spec.kind == "elementwise" or plan.kind == "linear"):
        c = np.asarray(spec.combination(values, n), np.float64)
        if spec.operand == "models":
            if abs(c.sum() - 1.0) > SUM_TOLERANCE:
                raise ValueError(f"out_format peft: {spec.name!r} gives {plan.path!r} the weights {c.tolist()}, which "
                                 "do not sum to 1: the merged weights are not the base plus a low-rank update")
            return c
        return c * resolved.scale
    if plan.kind == "linear":
        raise ValueError(f"out_format peft: {spec.name!r} does not merge the linear weight {plan.path!r} from "
                         f"the adapters' factors; methods that write an adapter: {adapter_methods()}")
    weights = values["weight"] if "weight" in spec.per_expert else np.ones(n)
    return np.asarray(weights, np.float64) / n * resolved.scale


def _route(plan: LeafPlan, readers, resolved: Resolved, resolver, target: int | None) -> Route | None:
    updates = [None if r is None else r.updates.get(plan.path) for r in readers]
    ranks = [0 if u is None else u.a.shape[0] for u in updates]
    embedding = any(u is not None and u.embedding for u in updates)
    if plan.kind == "linear" and runs_on_factors(resolved) and factorable(plan):
        m, n = plan.maths_shape
        full = sum(ranks) if fits_factors(len(readers), max(ranks), n) else min(m, n, sum(ranks))
        return Route(plan, "spectral", min(full, target or full), full, embedding)
    c = _coefficients(resolved, plan, len(readers), resolver)
    full = sum(r for r, ci in zip(ranks, c) if ci != 0.0)
    if not full:
        return None  # every touching adapter has weight 0: the base's value
    return Route(plan, "combine", min(full, target or full), full, embedding, tuple(float(x) for x in c))


def plan_routes(plan: MergePlan, readers, resolved: Resolved, resolver: TensorOptions | None) -> list[Route]:
    """Each tensor an adapter touches, with its route (untouched, kept and passed-through tensors
    keep the base's value and are left out)."""
    def touches(r, p):
        return r is not None and (p.path in r.updates or p.path in r.replaced)

    touched = [p for p in plan.plans if p.kind not in ("keep", "passthrough") and any(touches(r, p) for r in readers)]
    whole = {p.path.rsplit(".", 1)[0] for p in touched if any(r is not None and p.path in r.replaced for r in readers)}
    routes = []
    for p in touched:
        if p.path.rsplit(".", 1)[0] in whole or not p.path.endswith(".weight"):
            routes.append(Route(p, "dense"))
        else:
            route = _route(p, readers, resolved, resolver, plan.config.adapter_rank)
            routes.extend([route] if route is not None else [])
    check_factors_finite(readers, [r.plan.path for r in routes if r.how != "dense"])
    return routes


def _factors(route: Route, readers, resolved: Resolved, resolver, dtype):
    """(B, A) of the route's merged update in the stored tensor's orientation (ΔW = B A)."""
    p = route.plan
    updates = [None if r is None else r.updates.get(p.path) for r in readers]
    if route.how == "combine":
        return combine_factors([None if u is None else stored_pair(u, dtype) for u in updates], route.coefficients)
    pairs = [None if u is None else maths_pair(u, p, dtype) for u in updates]
    b, a = spectral_factors(pairs, resolved, p.maths_shape, expert_weights(resolved, p, len(readers), resolver))
    b = b * resolved.scale
    return (a.T, b.T) if p.transpose else (b, a)


def _truncated(route: Route, b, a, report: list) -> tuple:
    if route.rank >= b.shape[1]:
        return b, a
    b, a, s = truncate_factors(b, a, route.rank)
    s = np.asarray(s, np.float64)
    error, total = float(np.sqrt(np.sum(s[route.rank:] ** 2))), float(np.sqrt(np.sum(s ** 2)))
    report.append({"module": route.module, "rank": int(b.shape[1]), "exact_rank": int(s.shape[0]),
                   "error": error, "relative_error": error / total if total > 0 else 0.0})
    return b, a


def _factor_dtype(config: MergeConfig, readers) -> np.dtype:
    if config.out_dtype is not None:
        return numpy_dtype(config.out_dtype)
    dtypes = [u.a.dtype for r in readers if r is not None for u in r.updates.values()]
    return np.dtype(np.result_type(*dtypes)) if dtypes else np.dtype(np.float32)


def _common(values, fallback):
    values = {v for v in values if v is not None}
    return values.pop() if len(values) == 1 else fallback


def open_adapter_writer(plan: MergePlan, readers, routes: Sequence[Route], folder: Path) -> AdapterWriter:
    """The writer of the adapter these routes make, its config from the input adapters'."""
    config = plan.config
    modules = {r.module: AdapterModule(r.rank, tuple(r.plan.shape), r.embedding) for r in routes if r.how != "dense"}
    whole = {r.plan.path: (r.plan.shape, plan.out_dtypes[r.plan.path]) for r in routes if r.how == "dense"}
    inputs = [r.config for r in readers if r is not None]
    given_base = (config.given or {}).get("base_model") or str(config.base_model)
    return AdapterWriter(folder, modules, whole, _factor_dtype(config, readers),
                         fan_in_fan_out=any(c.fan_in_fan_out for c in inputs),
                         task_type=_common((c.task_type for c in inputs), None),
                         base_model_name_or_path=_common((c.base_model_name_or_path for c in inputs), given_base))


def _dense(route: Route, read: DenseRead, resolved: Resolved, resolver, work: str, config: MergeConfig):
    key = route.plan.path
    base_arrays, expert_arrays = read([key])
    merged = merge_group([route.plan], base_arrays, expert_arrays, resolved, None, config.multi_device, resolver,
                         work, config.has_base, host_output=True)
    return merged[key]


def merge_to_adapter(plan: MergePlan, experts: Sequence[CheckpointReader], read: DenseRead, resolved: Resolved,
                     resolver: TensorOptions | None, work: str, folder: Path, progress=iter) -> list[dict]:
    """Merge and write the adapter into ``folder`` (see the module docstring).

    Args:
      plan: the merge plan; experts: the experts' readers (adapters over the base).
      read: ``read(keys) -> (base arrays, expert arrays)``, checked finite, in the compute dtype
        (the dense merge's reading), for the tensors stored whole.
      resolved: the method after its whole-model pass; resolver: per-tensor option values.
      work: the compute dtype; folder: where the adapter goes; progress: wraps the loop.

    Returns:
      the truncation report, one entry per truncated module (also in ``truncation.json``).
    """
    config = plan.config
    readers = check_adapter_output(config, experts)
    routes = plan_routes(plan, readers, resolved, resolver)
    writer = open_adapter_writer(plan, readers, routes, folder)
    report: list[dict] = []
    try:
        for route in progress(routes):
            key = route.plan.path
            if route.how == "dense":
                merged = _dense(route, read, resolved, resolver, work, config)
                writer.write_tensor(key, checked_outputs({key: merged}, plan.out_dtypes, config.merge_method)[key])
                continue
            dtype = compute_dtype(route.plan.dtype, requested=work, defined_in=resolved.spec.compute_dtypes)
            b, a = _truncated(route, *_factors(route, readers, resolved, resolver, dtype), report)
            names = {f"{key} (lora_B)": np.asarray(b), f"{key} (lora_A)": np.asarray(a)}
            checked = checked_outputs(names, {k: np.dtype(dtype) for k in names}, config.merge_method)
            writer.write_factors(route.module, *checked.values())
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if report:
        _write_report(folder, report)
    return report


def _write_report(folder: Path, report: list[dict]) -> None:
    target = folder / TRUNCATION_NAME
    with naming_file(target):
        target.write_text(json.dumps(report, indent=2) + "\n")
    worst = max(report, key=lambda e: e["relative_error"])
    print(f"swudi-merge: {len(report)} module(s) truncated to rank <= {worst['rank']}; largest relative Frobenius "
          f"error {worst['relative_error']:.3e} ({worst['module']}); per module in {TRUNCATION_NAME}", file=sys.stderr)


__all__ = ["Route", "TRUNCATION_NAME", "adapter_methods", "check_adapter_output", "merge_to_adapter",
           "open_adapter_writer", "plan_routes"]
