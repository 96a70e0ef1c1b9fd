"""Score any merged model after the fact: the merge report of a merge made by any tool.

``score(base, experts, merged, grams)`` fills the :class:`~swudi_jax.model.report.MergeReport`
that ``merge(..., report=True)`` returns, from the three models alone: per linear layer the
interference of Σ τi and of the merged model's task vector, and with per-task input Grams the
residual-energy diagnostic ρ = 1 − L/E of the merge and of each expert on its own (design
MATH.md §6). It needs nothing of the method, so it scores mergekit's merges, a merge from
another library or a hand-edited model the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.model.batching import compile_groups, stack_group
from swudi_jax.model.flat import check_compatible, flatten, signature
from swudi_jax.model.layout import LeafRules
from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES, check_models
from swudi_jax.model.report import MergeReport, ReportCollector


def score(
    base: Any,
    experts: Sequence[Any],
    merged: Any,
    grams: Mapping[str, Any] | None = None,
    *,
    method: str | None = None,
    rules: LeafRules | None = None,
    dtype: Any = None,
    max_group_bytes: int | None = DEFAULT_MAX_GROUP_BYTES,
    **rule_options: Any,
) -> MergeReport:
    """The merge report of ``merged`` against ``base`` and ``experts`` (any pytrees of one structure).

    Args:
      base, experts, merged: the pre-trained model, the N experts and the merged model.
      grams: {path: (N, n, n)} per-task input Grams (e.g. ``Calibration.mean_grams()``; a
        scanned stack's (layers, N, n, n)); the layers in it get ρ for the merge and for each
        expert. None: interference only.
      method: the name the report gives the merge (a label).
      rules: the leaf rules, or their keywords (``layout="torch"``, ``exclude=...``; see
        :class:`~swudi_jax.model.layout.LeafRules`), as given to ``merge``.
      dtype: the compute dtype (None: float32, float64 for float64 inputs).
      max_group_bytes: cap on the stacked bytes of one compiled call.
    Raises:
      ValueError naming the path: models that differ in paths, shapes or dtypes, NaN/Inf,
      Grams for a parameter that is not a linear weight or of the wrong shape.
    """
    if rules is None:
        rules = LeafRules(**rule_options)
    elif rule_options:
        raise ValueError(f"give the leaf rules either as rules= or as keywords, not both ({sorted(rule_options)})")
    base_flat, _ = flatten(base, "base")
    expert_flats = [flatten(e, f"expert {i}")[0] for i, e in enumerate(experts)]
    merged_flat, _ = flatten(merged, "merged")
    check_models(base_flat, expert_flats)
    check_compatible(signature(base_flat), [signature(merged_flat)], ["the merged model"], "the base")
    plans = [p for p in rules.plan_tree(signature(base_flat)) if p.kind == "linear"]
    unknown = sorted(set(grams or {}) - {p.path for p in plans})
    if unknown:
        raise ValueError(f"grams has {unknown[:5]}, which are not linear weights of the base "
                         f"(linear weights: {[p.path for p in plans][:5]}...)")
    collector = ReportCollector(None, len(expert_flats), grams=grams)
    work = compute_dtype(*(p.dtype for p in plans[:1]), requested=dtype)
    for group in compile_groups(plans, max_group_bytes, copies=len(expert_flats) + 2):
        base_stack, models = stack_group(group, base_flat, [*expert_flats, merged_flat], False)  # merged last
        collector.observe(group, base_stack, models[:, :-1], models[:, -1], work=work)
    return dataclasses.replace(collector.result(), method=method)


__all__ = ["score"]
