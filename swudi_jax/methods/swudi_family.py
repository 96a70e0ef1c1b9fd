"""The rest of the SWUDI authors' options for SWUDI and SWUDI-A, the output-side filter and the
whole-model time alignment.

Source: Wei et al., "Closed-Form Spectral Regularization for Multi-Task Model Merging"
(arXiv 2606.07289) and its reference code (MLLMerging, ``yongxianwei_merging``: ``swudi_merge``
and ``aswudi_merge``); checked against its outputs in tests/test_golden_family.py.

With C = Σ wi τiᵀτi = V diag(λ) Vᵀ (λ clamped at 1e-8), D = Σ wi τiτiᵀτi, θ0 the anchor and
the estimator θ_h = θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λ) Vᵀ, SWUDI's filter becomes

    h_k = [ 1  (filter="none")  |  (1 − e^{−λ_k t_ℓ})^γ · λ_k/(λ_k + α)  (filter="exponential") ]
          · 1[k in the top ⌈r·n⌉] · (f + (1 − f) c_k^p)

- α = ``tikhonov_alpha`` (0: no ridge factor), γ = ``gamma``;
- t_ℓ = t · (λ̄_max / λ_max,ℓ)^ρ, ρ = ``alignment``, λ̄_max = ``alignment_reference``, the
  geometric mean of λ_max over the merged layers (:func:`alignment_reference_from_stacks`; ``merge`` runs it as SWUDI's whole-model preparation);
- consensus (p = ``consensus_power`` > 0, f = ``consensus_floor``): with
  w_ik = ‖τi V_k‖² / ‖τi‖², q_ik = w_ik / Σ_j w_jk, c_k = clip((1/Σ_i q_ik²) / N, 0, 1), the
  effective number of tasks using direction k over N;
- output side (``output_time`` = t_E): θ ← U diag(1 − e^{−σ t_E}) Uᵀ θ with
  E = Σ wi τi τiᵀ = U diag(σ) Uᵀ (m×m, σ clamped at 1e-8): :func:`output_filter`, which never
  forms E when N·n < m (E = A Aᵀ, A = [√w1 τ1 … √wN τN] of N·n columns, has rank ≤ N·n).

SWUDI-A's options (rank rules, ``rank_scale``, in-subspace filters) are in
:mod:`swudi_jax.maths.rank_rules_family`. The options' defaults are written once, in the
signatures of :func:`swudi_jax.methods.swudi.swudi` and :func:`~swudi_jax.methods.swudi.swudi_a`
(which the registry reads); their checks live here (:func:`check_swudi_options`,
:func:`check_swudi_a_options`), and every function here takes the options resolved.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths import filters, rank_rules_family, solvers
from swudi_jax.maths.spectral import (
    HIGHEST,
    apply_filter,
    compute_dtype,
    spectrum_and_projections,
    task_weights,
    weighted_rows,
    with_mean_fallback,
)
from swudi_jax.maths.validation import check_choice, check_number, is_concrete, static_or_traced
from swudi_jax.methods.spec import LOCAL, Combine

SWUDI_FILTERS = ("exponential", "none")
OUTPUT_PATHS = ("auto", "direct", "range")


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


# ------------------------------------------------------------------------ option checks


def check_swudi_options(opts: Mapping[str, Any]) -> None:
    """ValueError naming the option for a bad value of one of SWUDI's further options (all of
    :func:`~swudi_jax.methods.swudi.swudi`'s but time, rank_ratio, init and solver)."""
    check_number(opts["tikhonov_alpha"], "tikhonov_alpha", low=0.0, traceable=True)
    if opts["output_time"] is not None:
        check_number(opts["output_time"], "output_time", low=0.0)
    check_number(opts["consensus_power"], "consensus_power", low=0.0)
    check_number(opts["consensus_floor"], "consensus_floor", low=0.0, high=1.0)
    check_number(opts["gamma"], "gamma", low=0.0, traceable=True)
    check_choice(opts["filter"], "filter", SWUDI_FILTERS)
    check_number(opts["alignment"], "alignment", low=0.0, high=2.0)
    ref = opts["alignment_reference"]
    if ref is not None and is_concrete(ref):
        value = np.asarray(ref) if isinstance(ref, (int, float, np.number, np.ndarray, jnp.ndarray)) else np.asarray(None)
        if isinstance(ref, bool) or value.shape != () or value.dtype.kind not in "iuf" or not np.isfinite(value) \
                or value <= 0:
            raise ValueError(f"alignment_reference must be one finite number > 0 (λ̄_max), got {ref!r}")


def check_swudi_a_options(opts: Mapping[str, Any]) -> None:
    """ValueError naming the option for a bad ``rank_rule``, ``rank_scale`` or in-subspace filter option."""
    rank_rules_family.parse_rank_rule(opts["rank_rule"])
    check_number(opts["rank_scale"], "rank_scale", low=0.0, low_open=True)
    rank_rules_family.check_subspace_filter_options(
        opts["filter"], opts["time"], opts["wiener_scale"], opts["wiener_power"], opts["wiener_floor"])


def is_default_value(value: Any, default: Any) -> bool:
    """True when an option value equals its default (an array never counts as a default)."""
    if default is None or value is None:
        return value is default
    if hasattr(value, "shape"):
        return False
    return value == default


def swudi_a_uses_defaults(opts: Mapping[str, Any]) -> bool:
    """True when SWUDI-A's options give the original hard SWUDI-A with a built-in rule."""
    return (opts["rank_rule"] in filters.RANK_RULES and opts["filter"] == "none"
            and float(opts["rank_scale"]) == 1.0)


# ----------------------------------------------------------------------- output side


@functools.partial(jax.jit, static_argnames=("time", "path"))
def output_filter(theta: jnp.ndarray, tau: jnp.ndarray, weights: jnp.ndarray, time: float,
                  path: str = "auto") -> jnp.ndarray:
    """The output-side filter θ ← U diag(g(σ)) Uᵀ θ, g(σ) = 1 − e^{−σ t_E}, on the eigenpairs of
    E = Σ wi τi τiᵀ = A Aᵀ, A = [√w1 τ1, …, √wN τN] (m × N·n), σ clamped at 1e-8.

    path "direct": one ``eigh`` of the m×m E (the reference's computation). "range": E's
    non-zero eigenpairs from the (N·n)×(N·n) Gram AᵀA (:func:`swudi_jax.solvers.range_eigh`),
    then θ ← g₀ θ + U diag(g − g₀) Uᵀ θ with g₀ = g(1e-8) the value the clamped null directions
    get: exact, with O(m·(N·n)²) work and no m×m array. "auto": "range" when N·n < m.
    A single output row (m = 1) is returned unchanged, as in the reference.
    """
    check_choice(path, "path", OUTPUT_PATHS)
    n_tasks, m, n = tau.shape
    if m <= 1:
        return theta
    cols = jnp.swapaxes(tau * jnp.sqrt(weights)[:, None, None], 0, 1).reshape(m, n_tasks * n)
    if path == "auto":
        path = "range" if n_tasks * n < m else "direct"
    if path == "direct":
        e = _mm(cols, cols.T)
        sigma, u = jnp.linalg.eigh(0.5 * (e + e.T))
        g = -jnp.expm1(-jnp.maximum(sigma, filters.EIG_FLOOR) * time)
        return _mm(u, g[:, None] * _mm(u.T, theta))
    if n_tasks * n > m:
        raise ValueError(f"path='range' needs N·n <= m, got N·n = {n_tasks}·{n} > m = {m}")
    sigma, u = solvers.range_eigh(cols.T)
    g0 = -jnp.expm1(-jnp.asarray(filters.EIG_FLOOR, theta.dtype) * time)
    g = -jnp.expm1(-sigma * time)
    return g0 * theta + _mm(u, (g - g0)[:, None] * _mm(u.T, theta))


# ------------------------------------------------------------------------ alignment


def _lambda_max(work: jnp.ndarray) -> jnp.ndarray:
    rows = weighted_rows(work, task_weights(work))
    small = _mm(rows, rows.T) if rows.shape[0] < rows.shape[1] else _mm(rows.T, rows)
    return jnp.maximum(jnp.linalg.eigvalsh(0.5 * (small + small.T))[-1], filters.EIG_FLOOR)


@jax.jit
def layer_lambda_max(tau: jnp.ndarray) -> jnp.ndarray:
    """λ_max(C) of one layer (clamped at 1e-8), from the smaller of C = MᵀM and M Mᵀ
    (M the stacked √wi τi); vmap-able over a leading layer axis."""
    return _lambda_max(tau.astype(compute_dtype(tau.dtype)))


def alignment_reference(lambda_max: Iterable[float] | jnp.ndarray) -> float:
    """λ̄_max = exp(mean log λ_max,ℓ), the geometric mean over the merged layers."""
    values = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in lambda_max]) \
        if not hasattr(lambda_max, "shape") else np.ravel(np.asarray(lambda_max, np.float64))
    if values.size == 0:
        raise ValueError("alignment_reference needs at least one layer's λ_max")
    return float(np.exp(np.mean(np.log(np.maximum(values, filters.EIG_FLOOR)))))


def alignment_reference_from_stacks(stacks: Iterable[Any], combine: Combine = LOCAL) -> float:
    """λ̄_max from task-vector stacks of the merged **linear** layers in **maths layout**, each
    (N, m, n) or (L, N, m, n) for L layers of one shape (bias / norm leaves must not be passed:
    they are not merged spectrally, and a transposed weight has another λ_max). ``combine``: the
    stacks are one process's share of the model; every λ_max is gathered in model order first."""
    values = []
    for stack in stacks:
        stack = jnp.asarray(stack)
        if stack.ndim not in (3, 4):
            raise ValueError(f"each stack must be (N, m, n) or (L, N, m, n) in maths layout, got shape {stack.shape}")
        values.append(np.asarray(jax.vmap(layer_lambda_max)(stack if stack.ndim == 4 else stack[None])))
    return alignment_reference(combine.in_order(values))


def needs_alignment_reference(method_name: str, opts: Mapping[str, Any]) -> bool:
    """True when a whole-model merge must compute λ̄_max (:func:`alignment_reference_from_stacks`) first."""
    return (method_name == "swudi" and float(opts["alignment"]) > 0.0 and opts["filter"] == "exponential"
            and opts["alignment_reference"] is None)


def sharded_path_supports(method_name: str, opts: Mapping[str, Any]) -> bool:
    """True when the sharded / LoRA paths, which run a filter h(λ) of the eigenvalues alone, can
    take these options: not SWUDI's consensus or output side (they read τ), not SWUDI-A's
    D-aware and loss rules (they read D V and θ0 V)."""
    if method_name == "swudi":
        return float(opts["consensus_power"]) == 0.0 and opts["output_time"] is None
    if method_name == "swudi_a":
        return not rank_rules_family.needs_projections(opts["rank_rule"])
    return True


def swudi_h(lam: jnp.ndarray, *, time: float, rank_ratio: float, tikhonov_alpha: float, gamma: float,
            filter: str, alignment: float, alignment_reference) -> jnp.ndarray:
    """SWUDI's filter on the full ascending clamped spectrum λ (length n), without consensus, as a
    product of :mod:`swudi_jax.maths.filters`: h = [1 | (1 − e^{−λ t_ℓ})^γ · λ/(λ+α)] · 1[top ⌈r·n⌉],
    t_ℓ = t (λ̄_max/λ_max)^ρ (the power for γ ≠ 1, the ridge factor for α > 0 only)."""
    parts = [filters.identity()]
    if filter != "none":
        if alignment > 0.0 and alignment_reference is None:
            raise ValueError("alignment > 0 needs alignment_reference (λ̄_max, the geometric mean of every "
                             "merged layer's λ_max: swudi_family.alignment_reference_from_stacks); "
                             "swudi_jax.merge computes it")
        flow = (filters.aligned_exponential(time, alignment, alignment_reference) if alignment > 0.0
                else filters.exponential(time))
        parts = [flow if is_concrete(gamma) and abs(gamma - 1.0) <= 1e-8 else filters.power(gamma, flow)]
        if not is_concrete(tikhonov_alpha) or tikhonov_alpha > 0.0:  # traced: λ/(λ + 0) = 1 on the clamped λ > 0
            parts.append(filters.tikhonov(tikhonov_alpha))
    return filters.product(*parts, filters.top_ratio(rank_ratio))(lam)


def spectral_filter(method_name: str, opts: Mapping[str, Any]):
    """``make_h(λ, (m, n))`` of SWUDI or SWUDI-A with the family's options, for the paths that
    run a filter of the eigenvalues alone (row-sharded, LoRA factors); ValueError naming the
    options those paths cannot take (:func:`sharded_path_supports`)."""
    if not sharded_path_supports(method_name, opts):
        raise ValueError(f"the sharded and LoRA paths run a filter of the eigenvalues alone; {method_name} with "
                         "consensus_power > 0, output_time or a D-aware / loss rank_rule needs the dense layer path "
                         "(multi_device=False)")
    if method_name == "swudi":
        ref = opts.get("alignment_reference")
        if ref is not None:
            ref = float(ref)
        keys = ("tikhonov_alpha", "gamma", "filter", "alignment")
        extra = {k: (opts[k] if k == "filter" else float(opts[k])) for k in keys}
        if float(extra["alignment"]) > 0.0 and extra["filter"] == "exponential" and ref is None:
            raise ValueError("alignment > 0 needs alignment_reference (λ̄_max over the merged layers)")
        time, ratio = float(opts["time"]), float(opts["rank_ratio"])
        return lambda lam, shape: swudi_h(lam, time=time, rank_ratio=ratio, alignment_reference=ref, **extra)
    rule, min_rank, max_ratio = opts["rank_rule"], int(opts["min_rank"]), float(opts["max_rank_ratio"])
    f = swudi_a_float_options(opts)

    def make_h(lam, shape):
        k = rank_rules_family.family_rank(lam, shape, rule, min_rank=min_rank, max_rank_ratio=max_ratio,
                                          rank_scale=f["rank_scale"])
        return rank_rules_family.subspace_filter(lam, k, f["filter"], time=f["time"], wiener_scale=f["wiener_scale"],
                                                 wiener_power=f["wiener_power"], wiener_floor=f["wiener_floor"])

    return make_h


# ------------------------------------------------------------------- the layer pipeline


def consensus_weights(work: jnp.ndarray, v: jnp.ndarray, power: float, floor: float) -> jnp.ndarray:
    """f + (1 − f) c_k^p per eigenvector column of ``v`` (see the module docstring)."""
    norms = jnp.maximum(jnp.sum(work * work, axis=(1, 2)), 1e-12)
    sq = jnp.sum(jnp.einsum("imn,nk->imk", work, v, precision=HIGHEST) ** 2, axis=1)  # (N, k)
    share = sq / norms[:, None]
    share = share / jnp.maximum(jnp.sum(share, axis=0), 1e-12)
    effective = 1.0 / jnp.maximum(jnp.sum(share * share, axis=0), 1e-12)
    c = jnp.clip(effective / work.shape[0], 0.0, 1.0)
    return floor + (1.0 - floor) * c**power


@functools.partial(jax.jit, static_argnames=(
    "time", "rank_ratio", "init", "solver", "tikhonov_alpha", "output_time", "consensus_power",
    "consensus_floor", "gamma", "filter", "alignment"))
def swudi_family_layer(tau, alignment_reference=None, traced=None, *, time=None, rank_ratio, init, solver,
                       tikhonov_alpha=None, output_time, consensus_power, consensus_floor, gamma=None, filter, alignment):
    """SWUDI with every option (formula in the module docstring); options already checked.
    ``traced``: {name: value} of the options given as traced values (:data:`TRACEABLE`), whose
    static keywords are then left out (:func:`split_traced`)."""
    traced = traced or {}
    time, tikhonov_alpha, gamma = (traced.get(k, v) for k, v in
                                   (("time", time), ("tikhonov_alpha", tikhonov_alpha), ("gamma", gamma)))
    n = tau.shape[-1]
    work = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(work)
    k_top = filters.rank_from_ratio(rank_ratio, n)
    spec, theta0, dv, t0v = spectrum_and_projections(work, w, init, solver, k_top if solver == "topk" else None)
    lam_full = solvers.pad_spectrum(spec.eigenvalues, n)
    h = swudi_h(lam_full, time=time, rank_ratio=rank_ratio, tikhonov_alpha=tikhonov_alpha, gamma=gamma,
                filter=filter, alignment=alignment, alignment_reference=alignment_reference)
    k = spec.eigenvalues.shape[-1]
    h = h[n - k:]
    if consensus_power > 0.0:
        h = h * consensus_weights(work, spec.eigenvectors, consensus_power, consensus_floor)
    theta = apply_filter(theta0, dv, t0v, spec, h)
    if output_time is not None:
        theta = output_filter(theta, work, w, output_time)
    return with_mean_fallback(work, theta).astype(tau.dtype)


@functools.partial(jax.jit, static_argnames=(
    "rank_rule", "min_rank", "max_rank_ratio", "init", "solver", "rank_scale", "filter", "time",
    "wiener_scale", "wiener_power", "wiener_floor"))
def swudi_a_family_layer(tau, *, rank_rule, min_rank, max_rank_ratio, init, solver, rank_scale, filter, time,
                         wiener_scale, wiener_power, wiener_floor):
    """SWUDI-A with every rule and filter of the family (see
    :mod:`swudi_jax.maths.rank_rules_family`); options already checked; ``solver`` "full" or "lowrank"."""
    _, m, n = tau.shape
    work = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(work)
    spec, theta0, dv, t0v = spectrum_and_projections(work, w, init, solver)
    lam = spec.eigenvalues
    lam_full = solvers.pad_spectrum(lam, n)
    k = lam.shape[-1]
    pad = jnp.zeros((n - k,), lam.dtype)
    rhs_energy = jnp.concatenate([pad, jnp.sum(dv * dv, axis=0)])
    anchor_energy = jnp.concatenate([pad, jnp.sum(t0v * t0v, axis=0)])
    rank = rank_rules_family.family_rank(
        lam_full, (m, n), rank_rule, min_rank=min_rank, max_rank_ratio=max_rank_ratio, rank_scale=rank_scale,
        rhs_energy=rhs_energy, anchor_energy=anchor_energy)
    h = rank_rules_family.subspace_filter(lam_full, rank, filter, time=time, wiener_scale=wiener_scale,
                                          wiener_power=wiener_power, wiener_floor=wiener_floor)[n - k:]
    theta = apply_filter(theta0, dv, t0v, spec, h)
    return with_mean_fallback(work, theta).astype(tau.dtype)


@functools.partial(jax.jit, static_argnames=("rank_rule", "min_rank", "max_rank_ratio", "rank_scale", "init"))
def swudi_a_family_rank(tau, *, rank_rule, min_rank, max_rank_ratio, rank_scale, init="sum"):
    """The K :func:`swudi_a_family_layer` keeps (full ``eigh``), as an int32 scalar."""
    _, m, n = tau.shape
    work = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(work)
    spec, _, dv, t0v = spectrum_and_projections(work, w, init)
    return rank_rules_family.family_rank(
        spec.eigenvalues, (m, n), rank_rule, min_rank=min_rank, max_rank_ratio=max_rank_ratio,
        rank_scale=rank_scale, rhs_energy=jnp.sum(dv * dv, axis=0), anchor_energy=jnp.sum(t0v * t0v, axis=0))


TRACEABLE = ("time", "tikhonov_alpha", "gamma")
"""SWUDI's options that may be traced values: each enters h(λ) as a number, never as a shape or branch."""


def split_traced(opts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(static, traced): the :data:`TRACEABLE` options given as traced values go to ``traced``
    (a dynamic argument of the compiled layer), every other option stays static."""
    traced = {k: v for k, v in opts.items() if k in TRACEABLE and not is_concrete(v)}
    return {k: v for k, v in opts.items() if k not in traced}, traced


def swudi_float_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """SWUDI's extra static options as hashable Python numbers (not ``alignment_reference``);
    the :data:`TRACEABLE` ones given traced stay as they are."""
    return {
        "tikhonov_alpha": static_or_traced(opts["tikhonov_alpha"]),
        "output_time": None if opts["output_time"] is None else float(opts["output_time"]),
        "consensus_power": float(opts["consensus_power"]),
        "consensus_floor": float(opts["consensus_floor"]),
        "gamma": static_or_traced(opts["gamma"]),
        "filter": opts["filter"],
        "alignment": float(opts["alignment"]),
    }


def swudi_a_float_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """SWUDI-A's extra static options as hashable Python values."""
    return {
        "rank_scale": float(opts["rank_scale"]),
        "filter": opts["filter"],
        "time": float(opts["time"]),
        "wiener_scale": float(opts["wiener_scale"]),
        "wiener_power": float(opts["wiener_power"]),
        "wiener_floor": opts["wiener_floor"],
    }


__all__ = [
    "OUTPUT_PATHS",
    "SWUDI_FILTERS",
    "alignment_reference",
    "alignment_reference_from_stacks",
    "check_swudi_a_options",
    "check_swudi_options",
    "consensus_weights",
    "layer_lambda_max",
    "needs_alignment_reference",
    "output_filter",
    "sharded_path_supports",
    "spectral_filter",
    "swudi_a_family_layer",
    "swudi_a_family_rank",
    "swudi_a_uses_defaults",
    "swudi_family_layer",
    "swudi_h",
    "is_default_value",
]
