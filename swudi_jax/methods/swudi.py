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
"""

from __future__ import annotations

import functools

import jax

from swudi_jax import filters
from swudi_jax.spectral import INIT_MODES, filtered_merge, normal_equation, spectrum
from swudi_jax.validation import check_choice, check_number, check_task_vectors

VISION_PRESET = {"time": 1300.0, "rank_ratio": 0.65}
"""The paper's defaults for CLIP ViT experts."""
LLM_PRESET = {"time": 300.0, "rank_ratio": 0.85}
"""The paper's defaults for full-parameter LLM deltas."""


def _check_init(init: str) -> None:
    check_choice(init, "init", INIT_MODES)


@functools.partial(jax.jit, static_argnames=("filter_fn", "init"))
def _spectral_merge(tau, filter_fn, init):
    return filtered_merge(tau, lambda lam, shape: filter_fn(lam), init)


def spectral_merge(tau, filter_fn: filters.Filter, *, init: str = "sum") -> jax.Array:
    """The filtered estimator θ_h for any filter ``h = filter_fn(λ)`` (λ ascending, clamped).

    Args:
      tau: task vectors (N, m, n), maths layout.
      filter_fn: a function of the eigenvalues returning h ∈ [0, 1] per direction, e.g.
        ``filters.product(filters.exponential(1300.), filters.top_ratio(.65))``.
      init: anchor θ0: "sum" (Σ τi), "mean" (Σ τi / N) or "zero".
    Returns:
      The merged task vector (m, n).
    """
    tau = check_task_vectors(tau)
    if not callable(filter_fn):
        raise ValueError(f"filter_fn must be a callable h(eigenvalues), got {filter_fn!r}")
    _check_init(init)
    return _spectral_merge(tau, filter_fn, init)


@functools.partial(jax.jit, static_argnames=("time", "rank_ratio", "init"))
def _swudi(tau, time, rank_ratio, init):
    h = filters.product(filters.exponential(time), filters.top_ratio(rank_ratio))
    return filtered_merge(tau, lambda lam, shape: h(lam), init)


def swudi(tau, *, time: float = 1300.0, rank_ratio: float = 0.65, init: str = "sum") -> jax.Array:
    """SWUDI: h(λ) = (1 − exp(−λ t)) on the K = ⌈r·n⌉ largest eigenvalues, 0 elsewhere.

    Defaults are the paper's vision preset (t = 1300, r = 0.65); for LLM full-parameter
    deltas use ``**LLM_PRESET`` (t = 300, r = 0.85).

    Args:
      tau: task vectors (N, m, n), maths layout.
      time: gradient-flow time t ≥ 0 (t = 0 returns the anchor).
      rank_ratio: r ∈ (0, 1], the kept fraction of directions.
      init: anchor θ0: "sum", "mean" or "zero".
    Returns:
      The merged task vector (m, n).
    """
    tau = check_task_vectors(tau)
    check_number(time, "time", low=0.0)
    check_number(rank_ratio, "rank_ratio", low=0.0, high=1.0, low_open=True)
    _check_init(init)
    return _swudi(tau, float(time), float(rank_ratio), init)


def _check_rank_options(rank_rule: str, min_rank: int, max_rank_ratio: float) -> None:
    filters.get_rank_rule(rank_rule)
    check_number(min_rank, "min_rank", low=1, integer=True)
    check_number(max_rank_ratio, "max_rank_ratio", low=0.0, high=1.0, low_open=True)


def _rank_filter(rank_rule, min_rank, max_rank_ratio):
    rule = filters.get_rank_rule(rank_rule)

    def make_h(lam, shape):
        k = filters.adaptive_rank(lam, rule, shape, min_rank=min_rank, max_rank_ratio=max_rank_ratio)
        return filters.hard_rank(k)(lam)

    return make_h


@functools.partial(jax.jit, static_argnames=("rank_rule", "min_rank", "max_rank_ratio", "init"))
def _swudi_a(tau, rank_rule, min_rank, max_rank_ratio, init):
    return filtered_merge(tau, _rank_filter(rank_rule, min_rank, max_rank_ratio), init)


def swudi_a(
    tau,
    *,
    rank_rule: str = "participation_sqrt",
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
    init: str = "sum",
) -> jax.Array:
    """SWUDI-A: the hard filter h = 1[top K_ℓ] with K_ℓ picked per layer by a rank rule.

    Default rule participation_sqrt: K = ⌈(Σ√λ)²/Σλ⌉; others: entropy, participation,
    stable_rank, gavish_donoho, cumulative_variance (see :mod:`swudi_jax.filters`). K is
    clamped to [min_rank, max(min_rank, round(max_rank_ratio·n))].

    Args:
      tau: task vectors (N, m, n), maths layout.
      rank_rule: name of the rank rule.
      min_rank, max_rank_ratio: clamps on K.
      init: anchor θ0: "sum", "mean" or "zero".
    Returns:
      The merged task vector (m, n).
    """
    tau = check_task_vectors(tau)
    _check_rank_options(rank_rule, min_rank, max_rank_ratio)
    _check_init(init)
    return _swudi_a(tau, rank_rule, int(min_rank), float(max_rank_ratio), init)


@functools.partial(jax.jit, static_argnames=("rank_rule", "min_rank", "max_rank_ratio"))
def _adaptive_rank(tau, rank_rule, min_rank, max_rank_ratio):
    spec = spectrum(normal_equation(tau).c)
    rule = filters.get_rank_rule(rank_rule)
    return filters.adaptive_rank(
        spec.eigenvalues, rule, tau.shape[1:], min_rank=min_rank, max_rank_ratio=max_rank_ratio
    )


def swudi_a_rank(
    tau, *, rank_rule: str = "participation_sqrt", min_rank: int = 1, max_rank_ratio: float = 1.0
) -> jax.Array:
    """The K that :func:`swudi_a` keeps for this layer (an int32 scalar)."""
    tau = check_task_vectors(tau)
    _check_rank_options(rank_rule, min_rank, max_rank_ratio)
    return _adaptive_rank(tau, rank_rule, int(min_rank), float(max_rank_ratio))


@jax.jit
def _pinv(tau):
    return filtered_merge(tau, lambda lam, shape: filters.identity()(lam), "sum")


def pinv_merge(tau) -> jax.Array:
    """The pseudo-inverse closed form θ* = D C⁺ (h ≡ 1) on eigenvalues clamped at 1e-8.

    Directions with tiny λ amplify rounding (the paper reports θ* below WUDI for this
    reason); it is the t → ∞, r = 1 limit of SWUDI.
    """
    return _pinv(check_task_vectors(tau))
