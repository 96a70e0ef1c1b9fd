"""The merge report: per linear layer, how much task interference a merge leaves, and why.

``merge(..., report=True)``, ``swudi-merge --report`` and :func:`swudi_jax.model.score.score`
fill one :class:`MergeReport`. Per linear layer (maths of :mod:`swudi_jax.maths.diagnostics`):

- ``per_task_sum`` / ``per_task_merged``: I_i(θ) = wi ‖(θ − τi) τiᵀ‖²_F for θ = Σ τj (plain task
  arithmetic at scale 1) and θ = τm = W_merged − W0 (the merge as written, scale included);
  their sums and ``ratio`` = I(τm) / I(Σ τ) (< 1: the merge removed interference);
- ``spectral`` (methods with a spectral filter: SWUDI, SWUDI-A, pinv): the kept rank K, the
  share of C's trace kept, λ_max and the filter's effective rank Σ h;
- ``kept`` (methods that sparsify first: TIES, DARE, mergekit's task-arithmetic family): the
  kept density per task and the sign-conflict share of what they keep;
- ``score`` (with per-task input Grams): L and E of the residual-energy diagnostic
  ρ = 1 − L/E for the merge and for each expert alone.

Overall figures sum over layers: I(τm) and I(Σ τ) (each layer in its own units: the squared
scale of its task vectors), ρ = 1 − ΣL/ΣE; ``mean_layer_ratio`` averages the layers' ratios.
The collector (:class:`ReportCollector`) is shown each linear group by the merger after its
compiled call: one more compiled call over the same stacks, which changes no merged byte.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from swudi_jax.maths import diagnostics
from swudi_jax.methods.spec import Resolved
from swudi_jax.model.batching import hashable, pad_layers, stack_grams
from swudi_jax.model.compilations import compiler_options
from swudi_jax.model.layout import LeafPlan

SCHEMA = "swudi_jax.merge_report/1"
"""The ``schema`` value of :meth:`MergeReport.to_dict` (README, "The merge report")."""


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and math.isfinite(num / den) else None


@dataclass(frozen=True)
class LayerReport:
    """One linear layer's figures (module docstring); ``index`` is the layer of a scanned stack."""

    path: str
    index: int | None
    shape: tuple[int, int]
    per_task_sum: tuple[float, ...]
    per_task_merged: tuple[float, ...]
    spectral: Mapping[str, float] | None = None
    kept: Mapping[str, Any] | None = None
    score: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path if self.index is None else f"{self.path}[{self.index}]"

    @property
    def interference_sum(self) -> float:
        return float(sum(self.per_task_sum))

    @property
    def interference_merged(self) -> float:
        return float(sum(self.per_task_merged))

    @property
    def ratio(self) -> float | None:
        return _ratio(self.interference_merged, self.interference_sum)

    @property
    def rho(self) -> dict[str, Any] | None:
        """{"merged": ρ(τm), "experts": [ρ(τj)]} (None where E = 0), or None without Grams."""
        if self.score is None:
            return None
        e = self.score["energy"]
        return {"merged": None if e <= 0 else 1 - self.score["loss_merged"] / e,
                "experts": [None if e <= 0 else 1 - loss / e for loss in self.score["loss_experts"]]}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(name=self.name, shape=list(self.shape), per_task_sum=list(self.per_task_sum),
                   per_task_merged=list(self.per_task_merged), interference_sum=self.interference_sum,
                   interference_merged=self.interference_merged, ratio=self.ratio, rho=self.rho)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerReport":
        return cls(d["path"], d["index"], tuple(d["shape"]), tuple(d["per_task_sum"]), tuple(d["per_task_merged"]),
                   d.get("spectral"), d.get("kept"), d.get("score"))


@dataclass(frozen=True)
class MergeReport:
    """The report of one merge: what was merged and one :class:`LayerReport` per linear layer."""

    method: str | None
    options: Mapping[str, Any]
    scale: float | None
    experts: tuple[str, ...]
    layers: tuple[LayerReport, ...]
    notes: tuple[str, ...] = field(default=())

    def overall(self) -> dict[str, Any]:
        """Whole-model figures: interference sums and ratio, mean layer ratio, ρ over scored layers."""
        n = len(self.experts)
        per_sum = [sum(layer.per_task_sum[i] for layer in self.layers) for i in range(n)]
        per_merged = [sum(layer.per_task_merged[i] for layer in self.layers) for i in range(n)]
        ratios = [r for r in (layer.ratio for layer in self.layers) if r is not None]
        out = {"interference_sum": float(sum(per_sum)), "interference_merged": float(sum(per_merged)),
               "ratio": _ratio(sum(per_merged), sum(per_sum)), "mean_layer_ratio": float(np.mean(ratios)) if ratios else None,
               "per_task_sum": per_sum, "per_task_merged": per_merged, "per_task_ratio": list(map(_ratio, per_merged, per_sum)),
               "rho": None}
        scored = [layer.score for layer in self.layers if layer.score is not None]
        if scored:
            energy = sum(s["energy"] for s in scored)
            out["rho"] = {"merged": _ratio(energy - sum(s["loss_merged"] for s in scored), energy),
                          "experts": [_ratio(energy - sum(s["loss_experts"][i] for s in scored), energy) for i in range(n)],
                          "layers": len(scored)}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``merge_report.json`` (schema :data:`SCHEMA`, no NaN: null instead)."""
        return jsonable({"schema": SCHEMA, "method": self.method, "options": dict(self.options), "scale": self.scale,
                         "experts": list(self.experts), "overall": self.overall(),
                         "layers": [layer.to_dict() for layer in self.layers], "notes": list(self.notes)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MergeReport":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a merge report of schema {SCHEMA!r} (schema: {d.get('schema')!r})")
        return cls(d["method"], d["options"], d["scale"], tuple(d["experts"]),
                   tuple(LayerReport.from_dict(layer) for layer in d["layers"]), tuple(d["notes"]))

    def worst(self, k: int = 5) -> list[LayerReport]:
        """The ``k`` layers with the most interference left after the merge (largest I(τm))."""
        return sorted(self.layers, key=lambda layer: -layer.interference_merged)[:k]

    def summary(self, k: int = 5) -> str:
        """A few lines: the overall ratio (and ρ) and the ``k`` layers with the most interference left."""
        o = self.overall()
        total = o["interference_merged"] or 1.0
        lines = [f"merge report ({self.method}): interference of the merge / of the plain sum = {_fmt(o['ratio'])} "
                 f"over {len(self.layers)} linear layers (mean layer ratio {_fmt(o['mean_layer_ratio'])})"]
        if o["rho"] is not None:
            experts = ", ".join(_fmt(r) for r in o["rho"]["experts"])
            lines.append(f"residual energy captured rho: merge {_fmt(o['rho']['merged'])}; experts alone {experts}")
        lines += [f"note: {note}" for note in self.notes if note.startswith("not reported")]
        lines.append(f"the {min(k, len(self.layers))} layers with the most interference left:")
        for layer in self.worst(k):
            lines.append(f"  {layer.name}: {_fmt(layer.interference_merged)} ({layer.interference_merged / total:.0%} "
                         f"of the total), ratio {_fmt(layer.ratio)}")
        return "\n".join(lines)

    def table(self) -> str:
        """One line per layer: shape, I(Σ τ), I(τm), ratio and what the method reports."""
        head = f"{'layer':<48} {'shape':>11} {'I(sum)':>10} {'I(merged)':>10} {'ratio':>7}  details"
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            rows.append(f"{layer.name:<48} {'x'.join(map(str, layer.shape)):>11} {_fmt(layer.interference_sum):>10} "
                        f"{_fmt(layer.interference_merged):>10} {_fmt(layer.ratio):>7}  {_details(layer)}")
        return "\n".join(rows)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _details(layer: LayerReport) -> str:
    parts = []
    if layer.spectral is not None:
        s = layer.spectral
        parts.append(f"K={s['kept_rank']}/{layer.shape[1]} trace kept {s['trace_kept']:.3f} "
                     f"lambda_max {s['lambda_max']:.3g} eff. rank {s['effective_rank']:.1f}")
    if layer.kept is not None:
        parts.append(f"density {'/'.join(f'{d:.2f}' for d in layer.kept['density'])} "
                     f"sign conflict {layer.kept['sign_conflict']:.3f}")
    if layer.rho is not None:
        parts.append(f"rho {_fmt(layer.rho['merged'])}")
    return "; ".join(parts)


def jsonable(value: Any) -> Any:
    """An option value as JSON: numbers, strings, booleans, None and lists of them (arrays as lists)."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, float, np.number)):
        value = value.item() if isinstance(value, np.number) else value
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(value, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


# ----------------------------------------------------------------------------- collecting


_COMPILED: dict[tuple, Callable] = {}


def _stats_fn(resolved: Resolved | None, names: tuple, axes: tuple, spectral: bool, kept: bool, scored: bool, work):
    """The jit-compiled (base, experts, merged, grams, *arrays) → {statistic: (G, ...)} of one group."""
    spec = None if resolved is None else resolved.spec
    static = {} if resolved is None else resolved.static(names)
    key = (spec, hashable(static), names, axes, spectral, kept, scored, str(work),
           repr(sorted(resolved.options.items())) if spectral else None)
    if key in _COMPILED:
        return _COMPILED[key]
    make_h = spec.spectral_filter({k: v for k, v in resolved.options.items() if k not in spec.varying}).make_h \
        if spectral else None

    def one(tau, theta, grams, *arrays):
        inputs = dict(zip(names, arrays))
        out = diagnostics.interference_pair(theta, tau)
        if spectral:  # the filter sees the task vectors the method sees (its per-expert weights applied)
            out.update(diagnostics.spectral_statistics(tau, make_h, inputs.get("weight")))
        if kept:
            out.update(diagnostics.kept_statistics(spec.kept(tau, **static, **inputs)))
        if scored:
            out.update(diagnostics.residual_terms(theta, tau, grams.astype(tau.dtype)))
        return out

    def run(base, experts, merged, grams, *arrays):
        base_w = base.astype(work)
        tau = experts.astype(work) - base_w[:, None]
        theta = merged.astype(work) - base_w
        return jax.vmap(one, in_axes=(0, 0, 0 if scored else None, *axes))(tau, theta, grams, *arrays)

    _COMPILED[key] = jax.jit(run, compiler_options=compiler_options(work))
    return _COMPILED[key]


class ReportCollector:
    """Builds a :class:`MergeReport` from the linear groups a merge shows it (:meth:`observe`).

    Args:
      resolved: the merge's resolved method (None: a merged model scored after the fact).
      n_experts: N.
      expert_names: how the report names the experts (default "expert 0", ...).
      grams: {path: (N, n, n) or (layers, N, n, n)} per-task input Grams (any mapping, e.g.
        over a checkpoint reader): layers found in it are scored (ρ).
    """

    def __init__(self, resolved: Resolved | None, n_experts: int, expert_names: Sequence[str] | None = None,
                 grams: Mapping[str, Any] | None = None):
        self.resolved, self.n_experts, self.grams = resolved, n_experts, grams
        self.expert_names = tuple(expert_names or (f"expert {i}" for i in range(n_experts)))
        self.layers: list[LayerReport] = []
        self.notes: list[str] = []
        self.left_out: dict[str, list[str]] = {}

    def leave_out(self, paths: Sequence[str], why: str) -> None:
        """Note linear weights the merge does not show to the report (a note per reason, naming them)."""
        if paths:
            self.left_out.setdefault(why, []).extend(paths)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _spectral(self) -> bool:
        spec = None if self.resolved is None else self.resolved.spec
        if spec is None or spec.spectral_filter is None:
            return False
        try:
            spec.spectral_filter({k: v for k, v in self.resolved.options.items() if k not in spec.varying})
        except ValueError as exc:
            self._note(f"kept rank not reported: {exc}")
            return False
        return True

    def _group_grams(self, plans: Sequence[LeafPlan], size: int) -> Any:
        if self.grams is None:
            return None
        missing = [p.path for p in plans if p.path not in self.grams]
        if missing:
            self._note(f"not scored (no input Grams): {', '.join(missing)}")
            return None
        return pad_layers(stack_grams(plans, self.grams, self.n_experts), size)

    def observe(self, plans: Sequence[LeafPlan], base: Any, experts: Any, merged: Any,
                inputs: tuple[list, list, list] | None = None, work: Any = np.float32, has_base: bool = True) -> None:
        """Add one linear group: stacks base (G, m, n), experts (G, N, m, n) and the merged
        weights (G, m, n) in maths layout (entries past the group's layers are padding), and
        the arrays, names and vmap axes fed to the method beside them."""
        if not has_base:
            self._note("no base model: task vectors and interference are not defined")
            return
        arrays, names, axes = inputs or ([], [], [])
        spec = None if self.resolved is None else self.resolved.spec
        on_tasks = spec is not None and spec.operand == "task_vectors"
        grams = self._group_grams(plans, experts.shape[0])
        fn = _stats_fn(self.resolved, tuple(names), tuple(axes), self._spectral(),
                       on_tasks and spec.kept is not None, grams is not None, np.dtype(work))
        stats = jax.device_get(fn(base, experts, merged, grams, *arrays))
        row = 0
        for plan in plans:
            for index in range(plan.layers):
                self.layers.append(_layer(plan, index if plan.layers > 1 else None, stats, row))
                row += 1

    def result(self) -> MergeReport:
        """The report of everything observed so far, layers in path order (numbers by value)."""
        r = self.resolved
        layers = sorted(self.layers, key=lambda x: (_natural(x.path), -1 if x.index is None else x.index))
        options = {} if r is None else {k: jsonable(v) for k, v in r.options.items()}
        left = [f"not reported ({why}): {', '.join(paths)}" for why, paths in self.left_out.items()]
        return MergeReport(None if r is None else r.spec.name, options, None if r is None else r.scale,
                           self.expert_names, tuple(layers), tuple(self.notes + left))


def _natural(path: str) -> tuple:
    """A sort key that orders the numbers in a path by value ("layers.2" before "layers.10")."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path) if p)


def _layer(plan: LeafPlan, index: int | None, stats: Mapping[str, np.ndarray], row: int) -> LayerReport:
    def pick(name):
        return np.asarray(stats[name][row]).tolist()

    spectral = kept = score = None
    if "kept_rank" in stats:
        spectral = {k: pick(k) for k in ("kept_rank", "trace_kept", "lambda_max", "effective_rank")}
    if "density" in stats:
        kept = {"density": pick("density"), "sign_conflict": pick("sign_conflict")}
    if "energy" in stats:
        score = {k: pick(k) for k in ("energy", "loss_merged", "loss_experts")}
    return LayerReport(plan.path, index, tuple(plan.maths_shape), tuple(pick("per_task_sum")),
                       tuple(pick("per_task_merged")), spectral, kept, score)


__all__ = ["SCHEMA", "LayerReport", "MergeReport", "ReportCollector", "jsonable"]
