"""SWUDI, SWUDI-A, the pseudo-inverse and the general filtered estimator: the closed form.

Source: Wei et al., "Closed-Form Spectral Regularization for Multi-Task Model Merging"
(arXiv 2606.07289). With C = Σ wi τiᵀτi = V diag(λ) Vᵀ and D = Σ wi τiτiᵀτi,

    θ_h = θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λs) Vᵀ

- SWUDI:   h = (1 − e^{−λt}) · 1[top ⌈r·n⌉]        (gradient flow to time t, then top-K)
- SWUDI-A: h = 1[top K_ℓ], K_ℓ from a rank rule on λ (participation_sqrt by default)
- pinv:    h ≡ 1, θ* = D C⁺ on clamped eigenvalues

Each function takes ``tau`` (N, m, n) in maths layout (m outputs, n inputs), float32 or
float64, returns the merged task vector (m, n) in ``tau``'s dtype, is jit-compiled and works
under ``jax.vmap`` over a leading layer axis.

``solver`` picks how C's eigenpairs are found (:mod:`swudi_jax.maths.solvers`); every choice gives
the same θ to float rounding: "full" one ``eigh`` of C; "lowrank" the R×R problem of C's
non-zero eigenpairs when R = N·m ≤ n; "topk" the K largest by subspace iteration (SWUDI, and
SWUDI-A with the trace rules participation / stable_rank); "auto" picks "lowrank" when
N·m < n, else "topk" when n ≥ 1024 and K ≤ n/10, else "full".
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from swudi_jax.maths import filters, rank_rules_family, solvers
from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.maths.spectral import INIT_MODES, Spectrum, anchor, filtered_merge, filtered_solution
from swudi_jax.maths.spectral import interference_operator, normal_equation, right_hand_side, spectrum
from swudi_jax.maths.spectral import task_weights, with_mean_fallback
from swudi_jax.maths.validation import check_choice, check_number, check_task_vectors, static_or_traced
from swudi_jax.maths.placement import auto_axes_boundary
from swudi_jax.methods import swudi_family
from swudi_jax.methods.results import finite_result
from swudi_jax.methods.spec import MethodSpec, Preparation, SpectralFilter, expert_weighted, keyword_defaults

SOURCE = "Wei et al., Closed-Form Spectral Regularization for Multi-Task Model Merging (arXiv 2606.07289)"

VISION_PRESET = {"time": 1300.0, "rank_ratio": 0.65}
"""The paper's defaults for CLIP ViT experts."""
LLM_PRESET = {"time": 300.0, "rank_ratio": 0.85}
"""The paper's defaults for full-parameter LLM deltas."""


def _check_init(init: str) -> None:
    check_choice(init, "init", INIT_MODES)


def resolve_solver(solver: str, shape: tuple[int, int, int], top: int | None) -> str:
    """Validate ``solver`` for a stack of ``shape`` and turn "auto" into a concrete choice.

    ``top`` is the number of leading eigenpairs the estimator needs (None: all of them, so
    "topk" is not available).
    """
    check_choice(solver, "solver", solvers.SOLVERS)
    if solver == "auto":
        return solvers.choose_solver(shape, top)
    n_tasks, m, n = shape
    if solver == "lowrank" and n_tasks * m > n:
        raise ValueError(
            f"solver='lowrank' needs N·m <= n (C of rank below n), got N·m = {n_tasks}·{m} > n = {n}"
        )
    if solver == "topk" and top is None:
        raise ValueError(
            "solver='topk' needs an estimator that is zero outside the top-K eigenpairs "
            "(SWUDI, or SWUDI-A with rank_rule in "
            f"{solvers.TRACE_RANK_RULES}); use 'full', 'lowrank' or 'auto'"
        )
    return solver


@functools.partial(jax.jit, static_argnames=("filter_fn", "init", "solver"))
def _spectral_merge(tau, filter_fn, init, solver):
    return filtered_merge(tau, lambda lam, shape: filter_fn(lam), init, solver)


@auto_axes_boundary
def spectral_merge(tau: ArrayLike, filter_fn: filters.Filter, *, init: str = "sum", solver: str = "auto") -> jax.Array:
    """The filtered estimator θ_h for any filter ``h = filter_fn(λ)`` (λ ascending, clamped).

    Args:
      tau: task vectors (N, m, n), maths layout.
      filter_fn: a function of the eigenvalues returning h ∈ [0, 1] per direction, e.g.
        ``filters.product(filters.exponential(1300.), filters.top_ratio(.65))``.
      init: anchor θ0: "sum" (Σ τi), "mean" (Σ τi / N) or "zero".
      solver: "auto", "full" or "lowrank" (an arbitrary filter may be non-zero anywhere,
        so "topk" is not offered).
    Returns:
      The merged task vector (m, n).
    """
    tau = check_task_vectors(tau)
    if not callable(filter_fn):
        raise ValueError(f"filter_fn must be a callable h(eigenvalues), got {filter_fn!r}")
    _check_init(init)
    return finite_result(_spectral_merge(tau, filter_fn, init, resolve_solver(solver, tau.shape, None)), tau,
                         "spectral_merge")


def swudi_filter(time: float, rank_ratio: float) -> filters.Filter:
    """SWUDI's filter h = (1 − e^{−λt}) · 1[top ⌈r·n⌉]."""
    return filters.product(filters.exponential(time), filters.top_ratio(rank_ratio))


@functools.partial(jax.jit, static_argnames=("rank_ratio", "init", "solver"))
def _swudi(tau, time, rank_ratio, init, solver):
    h = swudi_filter(time, rank_ratio)
    n_top = filters.rank_from_ratio(rank_ratio, tau.shape[-1])
    return filtered_merge(tau, lambda lam, shape: h(lam), init, solver, n_top)


@auto_axes_boundary
def swudi(tau: ArrayLike, *, time: float = 1300.0, rank_ratio: float = 0.65, init: str = "sum",
          solver: str = "auto", tikhonov_alpha: float = 0.0, output_time: float | None = None,
          consensus_power: float = 0.0, consensus_floor: float = 0.0, gamma: float = 1.0,
          filter: str = "exponential", alignment: float = 0.0,
          alignment_reference: float | ArrayLike | None = None) -> jax.Array:
    """SWUDI: h(λ) = (1 − exp(−λ t)) on the K = ⌈r·n⌉ largest eigenvalues, 0 elsewhere.

    Defaults are the paper's vision preset (t = 1300, r = 0.65); for LLM full-parameter
    deltas use ``**LLM_PRESET`` (t = 300, r = 0.85).

    Args:
      tau: task vectors (N, m, n), maths layout.
      time: gradient-flow time t ≥ 0 (t = 0 returns the anchor); may be traced (an argument of
        the caller's ``jax.jit``), as may ``tikhonov_alpha`` and ``gamma``. The options that set a
        shape, a loop or a branch (``rank_ratio``: the rank K = ⌈r·n⌉; the others) must be static
        Python values: a traced one is refused naming it.
      rank_ratio: r ∈ (0, 1], the kept fraction of directions.
      init: anchor θ0: "sum", "mean" or "zero".
      solver: "auto", "full", "lowrank" or "topk" (see the module docstring).
      tikhonov_alpha, output_time, consensus_power, consensus_floor, gamma, filter, alignment,
        alignment_reference: the reference's further options (defaults: off), see
        :mod:`swudi_jax.methods.swudi_family`: h = (1 − e^{−λ t_ℓ})^γ · λ/(λ + α) on the top K
        (h = 1 there for filter="none"), times the consensus weight f + (1 − f)c_k^p; the
        output-side filter with time t_E; t_ℓ = t·(λ̄_max/λ_max,ℓ)^ρ with ρ = ``alignment``
        and λ̄_max = ``alignment_reference`` (whole-model; ``merge`` computes it).
    Returns:
      The merged task vector (m, n).
    """
    tau = check_task_vectors(tau)
    extra = dict(tikhonov_alpha=tikhonov_alpha, output_time=output_time, consensus_power=consensus_power,
                 consensus_floor=consensus_floor, gamma=gamma, filter=filter, alignment=alignment,
                 alignment_reference=alignment_reference)
    _validate_swudi({"time": time, "rank_ratio": rank_ratio, "init": init, "solver": solver, **extra})
    top = filters.rank_from_ratio(float(rank_ratio), tau.shape[-1])
    solver = resolve_solver(solver, tau.shape, top)
    if _paper_swudi(extra):
        return finite_result(_swudi(tau, static_or_traced(time), float(rank_ratio), init, solver), tau, "swudi")
    if float(alignment) > 0.0 and filter == "exponential" and alignment_reference is None:
        raise ValueError("alignment > 0 needs alignment_reference (λ̄_max, the geometric mean of every merged "
                         "layer's λ_max: swudi_family.alignment_reference_from_stacks); swudi_jax.merge computes it")
    static, traced = swudi_family.split_traced({"time": static_or_traced(time), **swudi_family.swudi_float_options(extra)})
    merged = swudi_family.swudi_family_layer(tau, alignment_reference, traced, rank_ratio=float(rank_ratio), init=init,
                                             solver=solver, **static)
    return finite_result(merged, tau, "swudi")


PAPER_OPTIONS = ("time", "rank_ratio", "init", "solver")
"""SWUDI's options in the paper; the others (:mod:`~swudi_jax.methods.swudi_family`'s) are off at their defaults."""


def _paper_swudi(opts: Mapping[str, Any]) -> bool:
    """True when every further option of :func:`swudi` is at its signature's default (the
    paper's SWUDI); ``alignment_reference`` matters only with ``alignment`` > 0."""
    further = keyword_defaults(swudi, exclude=PAPER_OPTIONS + ("alignment_reference",))
    return all(swudi_family.is_default_value(opts[k], v) for k, v in further.items())


def _check_rank_options(rank_rule: str, min_rank: int, max_rank_ratio: float) -> None:
    rank_rules_family.parse_rank_rule(rank_rule)
    check_number(min_rank, "min_rank", low=1, integer=True)
    check_number(max_rank_ratio, "max_rank_ratio", low=0.0, high=1.0, low_open=True)


def rank_filter(rank_rule: str, min_rank: int, max_rank_ratio: float):
    """SWUDI-A's filter factory ``make_h(λ, (m, n))``: 1 on the top K_ℓ, K_ℓ by the rule."""
    rule = filters.get_rank_rule(rank_rule)

    def make_h(lam, shape):
        k = filters.adaptive_rank(lam, rule, shape, min_rank=min_rank, max_rank_ratio=max_rank_ratio)
        return filters.hard_rank(k)(lam)

    return make_h


def _rank_cap(min_rank: int, max_rank_ratio: float, n: int) -> int:
    """The largest K SWUDI-A can keep: min(n, max(min_rank, round(max_rank_ratio·n)))."""
    return min(n, max(min_rank, round(max_rank_ratio * n)))


def swudi_a_top_count(rank_rule: str, min_rank: int, max_rank_ratio: float, n: int) -> int | None:
    """How many leading eigenpairs SWUDI-A needs: K_max for the trace rules (participation,
    stable_rank), None (all of them) for rules that read the whole spectrum."""
    if rank_rule not in solvers.TRACE_RANK_RULES:
        return None
    return _rank_cap(min_rank, max_rank_ratio, n)


def _swudi_a_top(tau, rank_rule, min_rank, max_rank_ratio, init):
    """SWUDI-A on the top K_max eigenpairs only, K from the traces of C (trace rules)."""
    work = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(work)
    c = interference_operator(work, w)
    k_max = _rank_cap(min_rank, max_rank_ratio, work.shape[-1])
    lam, v = solvers.top_eigh(c, k_max)
    k = jnp.clip(solvers.trace_rank(rank_rule, c, lam[-1]), min_rank, k_max)
    h = (jnp.arange(k_max) >= k_max - k).astype(work.dtype)
    theta = filtered_solution(anchor(work, init), right_hand_side(work, w), Spectrum(lam, v), h)
    return with_mean_fallback(work, theta).astype(tau.dtype)


@functools.partial(jax.jit, static_argnames=("rank_rule", "min_rank", "max_rank_ratio", "init", "solver"))
def _swudi_a(tau, rank_rule, min_rank, max_rank_ratio, init, solver):
    if solver == "topk":
        return _swudi_a_top(tau, rank_rule, min_rank, max_rank_ratio, init)
    return filtered_merge(tau, rank_filter(rank_rule, min_rank, max_rank_ratio), init, solver)


@auto_axes_boundary
def swudi_a(
    tau: ArrayLike,
    *,
    rank_rule: str = "participation_sqrt",
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
    init: str = "sum",
    solver: str = "auto",
    rank_scale: float = 1.0,
    filter: str = "none",
    time: float = 1e6,
    wiener_scale: float = 1.0,
    wiener_power: float = 2.0,
    wiener_floor: str = "tail_mean",
) -> jax.Array:
    """SWUDI-A: the hard filter h = 1[top K_ℓ] with K_ℓ picked per layer by a rank rule.

    Default rule participation_sqrt: K = ⌈(Σ√λ)²/Σλ⌉; others: entropy, participation,
    stable_rank, gavish_donoho, cumulative_variance (see :mod:`swudi_jax.maths.filters`). K is
    clamped to [min_rank, max(min_rank, round(max_rank_ratio·n))].

    Args:
      tau: task vectors (N, m, n), maths layout.
      rank_rule: name of the rank rule.
      min_rank, max_rank_ratio: clamps on K.
      init: anchor θ0: "sum", "mean" or "zero".
      solver: "auto", "full", "lowrank" or "topk"; "topk" only with the rank rules
        computable from traces (participation, stable_rank), on K_max = round(max_rank_ratio·n)
        eigenpairs, so it pays off only for a small ``max_rank_ratio``.
      rank_scale, filter, time, wiener_scale, wiener_power, wiener_floor: the reference's
        further options (see :mod:`swudi_jax.maths.rank_rules_family`, which also holds the other
        rank rules: entropy_sq, cumvar_<f>, none, participation_sqrt_c2(_half),
        participation_sqrt_plus, d_aware_*, loss_elbow(_<f>), loss_residual_<f>,
        wudi_risk(_<ρ>)). A new rule or a non-default option needs the whole spectrum:
        solver "full" or "lowrank" ("auto" picks between them).
    Returns:
      The merged task vector (m, n).
    """
    tau = check_task_vectors(tau)
    extra = dict(rank_rule=rank_rule, rank_scale=rank_scale, filter=filter, time=time, wiener_scale=wiener_scale,
                 wiener_power=wiener_power, wiener_floor=wiener_floor)
    _validate_swudi_a({"min_rank": min_rank, "max_rank_ratio": max_rank_ratio, "init": init, "solver": solver, **extra})
    if not swudi_family.swudi_a_uses_defaults(extra):
        if solver == "topk":
            raise ValueError(f"solver='topk' is not available for rank_rule={rank_rule!r} with filter={filter!r}, "
                             f"rank_scale={rank_scale!r}: they need the whole spectrum (use 'auto', 'full' or 'lowrank')")
        solver = resolve_solver(solver, tau.shape, None)
        merged = swudi_family.swudi_a_family_layer(
            tau, rank_rule=rank_rule, min_rank=int(min_rank), max_rank_ratio=float(max_rank_ratio), init=init,
            solver=solver, **swudi_family.swudi_a_float_options(extra))
        return finite_result(merged, tau, "swudi_a")
    top = swudi_a_top_count(rank_rule, int(min_rank), float(max_rank_ratio), tau.shape[-1])
    solver = resolve_solver(solver, tau.shape, top)
    return finite_result(_swudi_a(tau, rank_rule, int(min_rank), float(max_rank_ratio), init, solver), tau, "swudi_a")


@functools.partial(jax.jit, static_argnames=("rank_rule", "min_rank", "max_rank_ratio"))
def _adaptive_rank(tau, rank_rule, min_rank, max_rank_ratio):
    spec = spectrum(normal_equation(tau).c)
    rule = filters.get_rank_rule(rank_rule)
    return filters.adaptive_rank(
        spec.eigenvalues, rule, tau.shape[1:], min_rank=min_rank, max_rank_ratio=max_rank_ratio
    )


def swudi_a_rank(
    tau: ArrayLike, *, rank_rule: str = "participation_sqrt", min_rank: int = 1, max_rank_ratio: float = 1.0,
    rank_scale: float = 1.0, init: str = "sum",
) -> jax.Array:
    """The K that :func:`swudi_a` keeps for this layer (an int32 scalar); ``init`` matters
    only for the WUDI-loss rules (they read θ0)."""
    tau = check_task_vectors(tau)
    _check_rank_options(rank_rule, min_rank, max_rank_ratio)
    check_number(rank_scale, "rank_scale", low=0.0, low_open=True)
    _check_init(init)
    if rank_rule in filters.RANK_RULES and float(rank_scale) == 1.0:
        return _adaptive_rank(tau, rank_rule, int(min_rank), float(max_rank_ratio))
    return swudi_family.swudi_a_family_rank(tau, rank_rule=rank_rule, min_rank=int(min_rank),
                                            max_rank_ratio=float(max_rank_ratio), rank_scale=float(rank_scale),
                                            init=init)


@functools.partial(jax.jit, static_argnames=("solver",))
def _pinv(tau, solver):
    return filtered_merge(tau, lambda lam, shape: filters.identity()(lam), "sum", solver)


@auto_axes_boundary
def pinv_merge(tau: ArrayLike, *, solver: str = "auto") -> jax.Array:
    """The pseudo-inverse closed form θ* = D C⁺ (h ≡ 1) on eigenvalues clamped at 1e-8.

    Directions with tiny λ amplify rounding (the paper reports θ* below WUDI for this
    reason); it is the t → ∞, r = 1 limit of SWUDI. ``solver``: "auto", "full" or
    "lowrank" (h ≡ 1 needs every direction, so "topk" is refused); "lowrank" treats C's
    null directions exactly, where the full path divides rounding noise by 1e-8.
    """
    tau = check_task_vectors(tau)
    _validate_pinv({"solver": solver})
    return finite_result(_pinv(tau, resolve_solver(solver, tau.shape, None)), tau, "pinv")


def _validate_swudi(options: Mapping[str, Any]) -> None:
    check_number(options["time"], "time", low=0.0, traceable=True)
    check_number(options["rank_ratio"], "rank_ratio", low=0.0, high=1.0, low_open=True)
    _check_init(options["init"])
    check_choice(options["solver"], "solver", solvers.SOLVERS)
    swudi_family.check_swudi_options(options)


def _validate_swudi_a(options: Mapping[str, Any]) -> None:
    _check_rank_options(options["rank_rule"], options["min_rank"], options["max_rank_ratio"])
    _check_init(options["init"])
    check_choice(options["solver"], "solver", solvers.SOLVERS)
    swudi_family.check_swudi_a_options(options)


def _validate_pinv(options: Mapping[str, Any]) -> None:
    check_choice(options["solver"], "solver", solvers.SOLVERS)


def _swudi_spectral_filter(options: Mapping[str, Any]) -> SpectralFilter:
    time, ratio = float(options["time"]), float(options["rank_ratio"])
    if not _paper_swudi(options):  # the family's eigenvalue-only options
        return SpectralFilter(swudi_family.spectral_filter("swudi", options), options["init"],
                              lambda n: filters.rank_from_ratio(ratio, n))
    h = swudi_filter(time, ratio)
    return SpectralFilter(lambda lam, shape: h(lam), options["init"], lambda n: filters.rank_from_ratio(ratio, n))


def _swudi_a_spectral_filter(options: Mapping[str, Any]) -> SpectralFilter:
    rule, min_rank, max_ratio = options["rank_rule"], int(options["min_rank"]), float(options["max_rank_ratio"])
    if not swudi_family.swudi_a_uses_defaults(options):  # the family's rules and in-subspace filters
        return SpectralFilter(swudi_family.spectral_filter("swudi_a", options), options["init"], lambda n: None)
    # K comes from the whole spectrum here (the single-device top-K path reads it from traces)
    return SpectralFilter(rank_filter(rule, min_rank, max_ratio), options["init"], lambda n: None)


def _pinv_spectral_filter(options: Mapping[str, Any]) -> SpectralFilter:
    return SpectralFilter(lambda lam, shape: filters.identity()(lam), "sum", lambda n: None)


def _swudi_prepare(options: Mapping[str, Any]) -> Preparation | None:
    """SWUDI's alignment (ρ > 0 without a given λ̄_max): the whole-model first pass computing
    λ̄_max, the geometric mean of λ_max over every merged linear layer."""
    if not swudi_family.needs_alignment_reference("swudi", options):
        return None
    return Preparation("alignment > 0 needs alignment_reference, λ̄_max over every merged linear layer",
                       lambda chunks, combine: {"alignment_reference":
                                                    swudi_family.alignment_reference_from_stacks(chunks(), combine)},
                       leaves="linear_maths")


SWUDI = expert_weighted(MethodSpec("swudi", swudi, "linear", source=SOURCE, validate=_validate_swudi,
                                   spectral_filter=_swudi_spectral_filter, array_options=("alignment_reference",),
                                   prepare=_swudi_prepare))
SWUDI_A = expert_weighted(MethodSpec("swudi_a", swudi_a, "linear", source=SOURCE, validate=_validate_swudi_a,
                                     spectral_filter=_swudi_a_spectral_filter))
PINV = expert_weighted(MethodSpec("pinv", pinv_merge, "linear", source=SOURCE + " (the h ≡ 1 closed form θ* = D C⁺)",
                                  validate=_validate_pinv, spectral_filter=_pinv_spectral_filter))


__all__ = [
    "LLM_PRESET",
    "PAPER_OPTIONS",
    "PINV",
    "SOURCE",
    "SWUDI",
    "SWUDI_A",
    "VISION_PRESET",
    "pinv_merge",
    "rank_filter",
    "resolve_solver",
    "spectral_merge",
    "swudi",
    "swudi_a",
    "swudi_a_rank",
    "swudi_a_top_count",
    "swudi_filter",
]
