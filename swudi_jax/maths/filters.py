"""Per-direction spectral filters h(λ) and the per-layer rank rules of SWUDI-A.

A *filter* is a pure function ``h(lam) -> array`` of the eigenvalues of the interference
operator C, given **ascending** (as ``jnp.linalg.eigh`` returns them) and already clamped
at ``EIG_FLOOR``; it returns a weight in [0, 1] per direction. Filters compose by product
(:func:`product`). h ≡ 1 gives the pseudo-inverse solution θ* = D C⁺, h ≡ 0 the anchor θ0.

A *rank rule* maps the same eigenvalues to an integer K (a traced int32 scalar, so it
works under ``jit`` and ``vmap``) for SWUDI-A's hard top-K filter.

References: Wei et al., "Closed-Form Spectral Regularization for Multi-Task Model
Merging" (arXiv 2606.07289), and its reference code (MLLMerging, ``yongxianwei_merging``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from swudi_jax.maths.validation import check_number, is_concrete

Filter = Callable[[jnp.ndarray], jnp.ndarray]
RankRule = Callable[[jnp.ndarray], jnp.ndarray]

EIG_FLOOR = 1e-8
"""Eigenvalues are clamped at this value before any division or rank rule."""


def _check_nonnegative(name: str, value: float) -> None:
    """A finite number >= 0, or a traced real scalar (under the caller's ``jax.jit``; unread)."""
    if not is_concrete(value):
        check_number(value, name, traceable=True)
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


# ----------------------------------------------------------------------------- filters


def exponential(time: float) -> Filter:
    """Gradient flow dθ/dτ = −(θC − D) stopped at τ = t:  h(λ) = 1 − exp(−λ t)."""
    _check_nonnegative("time", time)

    def h(lam):
        return -jnp.expm1(-lam * time)

    return h


def aligned_exponential(time: float, alignment: float, reference) -> Filter:
    """The exponential filter at a layer's own time (SWUDI's ``alignment``, derived from the
    reference's time alignment): h(λ) = 1 − exp(−λ t_ℓ), t_ℓ = t · (λ̄_max / λ_max)^ρ, with
    λ_max the largest of the (ascending) λ and λ̄_max = ``reference`` (a number or a traced
    scalar), so layers of larger spectra flow for less time."""
    _check_nonnegative("time", time)
    _check_nonnegative("alignment", alignment)

    def h(lam):
        ref = jnp.asarray(reference, lam.dtype)
        return -jnp.expm1(-lam * (time * (ref / jnp.maximum(lam[-1], EIG_FLOOR)) ** alignment))

    return h


def landweber(step: float, steps: int, *, halved: bool = False) -> Filter:
    """k plain gradient-descent steps of size η on L(θ) = Σ wi‖(θ − τi)τiᵀ‖²:

    h(λ) = 1 − (1 − 2ηλ)^k, or 1 − (1 − ηλ)^k when the gradient is taken as θC − D
    (``halved=True``). Converges (|1 − 2ηλ| < 1) only for η < 1/λ_max.
    """
    _check_nonnegative("step", step)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    factor = step if halved else 2.0 * step

    def h(lam):
        return 1.0 - (1.0 - factor * lam) ** steps

    return h


def tikhonov(alpha: float) -> Filter:
    """Ridge regularisation θ = D (C + αI)⁻¹ relative to the anchor:  h(λ) = λ / (λ + α)."""
    _check_nonnegative("alpha", alpha)

    def h(lam):
        return lam / (lam + alpha)

    return h


def power(gamma: float, base: Filter | None = None) -> Filter:
    """A sharpened or softened filter:  h(λ) = g(λ)^γ, with g = ``base`` or, by default,
    g(λ) = λ / λ_max (the spectrum's own shape)."""
    _check_nonnegative("gamma", gamma)

    def h(lam):
        g = lam / jnp.max(lam) if base is None else base(lam)
        return jnp.clip(g, 0.0, 1.0) ** gamma

    return h


def top_k(k: int) -> Filter:
    """Hard truncation: h = 1 on the k largest eigenvalues, 0 elsewhere (λ ascending).

    The cut directions keep the anchor's component in the estimator; they are not zeroed.
    """
    if not (isinstance(k, int) and k >= 0):
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    return hard_rank(k)


def rank_from_ratio(ratio: float, n: int) -> int:
    """K = ⌈r·n⌉, computed as the reference does (the product in float, then ceil)."""
    _check_ratio("rank_ratio", ratio)
    return min(n, max(1, math.ceil(ratio * n)))


def top_ratio(ratio: float) -> Filter:
    """Hard truncation keeping K = ⌈r·n⌉ directions, r ∈ (0, 1]."""
    _check_ratio("rank_ratio", ratio)

    def h(lam):
        return top_k(rank_from_ratio(ratio, lam.shape[-1]))(lam)

    return h


def hard_rank(rank: int | jnp.ndarray) -> Filter:
    """The top-K mask h = 1[index ≥ n − K] for a static or traced K (SWUDI-A's K_ℓ)."""

    def h(lam):
        n = lam.shape[-1]
        return (jnp.arange(n) >= n - rank).astype(lam.dtype)

    return h


def identity() -> Filter:
    """h ≡ 1: the pseudo-inverse solution θ* = D C⁺."""

    def h(lam):
        return jnp.ones_like(lam)

    return h


def product(*filters: Filter) -> Filter:
    """The product filter h(λ) = Π_j h_j(λ) (e.g. exponential × top-K is SWUDI)."""
    if not filters:
        raise ValueError("product() needs at least one filter")

    def h(lam):
        out = filters[0](lam)
        for f in filters[1:]:
            out = out * f(lam)
        return out

    return h


# -------------------------------------------------------------------------- rank rules


def _ceil_rank(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.ceil(x).astype(jnp.int32)


def participation_sqrt(lam: jnp.ndarray, shape=None) -> jnp.ndarray:
    """K = ⌈(Σ√λ)² / Σλ⌉ (the SWUDI-A default)."""
    return _ceil_rank(jnp.sum(jnp.sqrt(lam)) ** 2 / jnp.sum(lam))


def entropy(lam: jnp.ndarray, shape=None) -> jnp.ndarray:
    """K = ⌈exp(−Σ p log p)⌉ with p = λ / Σλ (effective rank, Roy & Vetterli)."""
    p = lam / jnp.sum(lam)
    return _ceil_rank(jnp.exp(-jnp.sum(p * jnp.log(p))))


def participation(lam: jnp.ndarray, shape=None) -> jnp.ndarray:
    """K = ⌈(Σλ)² / Σλ²⌉ (participation ratio)."""
    return _ceil_rank(jnp.sum(lam) ** 2 / jnp.sum(lam**2))


def stable_rank(lam: jnp.ndarray, shape=None) -> jnp.ndarray:
    """K = ⌈Σλ² / λ_max²⌉ (stable rank of C)."""
    return _ceil_rank(jnp.sum(lam**2) / jnp.max(lam) ** 2)


def cumulative_variance(fraction: float = 0.9) -> RankRule:
    """K = the smallest count whose top-K share of Σλ reaches ``fraction``."""
    _check_ratio("fraction", fraction)

    def rule(lam, shape=None):
        share = jnp.cumsum(lam[::-1]) / jnp.sum(lam)
        return (jnp.sum(share < fraction) + 1).astype(jnp.int32)

    return rule


def _lower_median(x: jnp.ndarray) -> jnp.ndarray:
    """The lower middle value for an even count (as ``torch.median``); ``jnp.median`` averages."""
    return jnp.sort(x)[(x.shape[-1] - 1) // 2]


def gavish_donoho(lam: jnp.ndarray, shape) -> jnp.ndarray:
    """Optimal hard threshold for singular values (Gavish & Donoho 2014), unknown noise:

    y = √λ, β = min(m, n)/max(m, n), ω(β) = √(2(β+1) + 8β/((β+1) + √(β²+14β+1))) / μ_β,
    with μ_β the Marchenko–Pastur median approximation, K = max(1, #{y > ω·median(y)}).
    ``shape`` is the layer's (m, n).
    """
    m, n = shape
    beta = min(m, n) / max(m, n)
    if beta < 0.9999:
        mu = math.sqrt(max((1.0 - beta) ** 2 + beta, 1e-3))
    else:
        mu = math.sqrt(2.0 + math.sqrt(3.0))
    omega = math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta**2 + 14.0 * beta + 1.0))) / mu
    y = jnp.sqrt(lam)
    count = jnp.sum(y > omega * _lower_median(y))
    return jnp.maximum(count, 1).astype(jnp.int32)


RANK_RULES: dict[str, RankRule] = {
    "participation_sqrt": participation_sqrt,
    "entropy": entropy,
    "participation": participation,
    "stable_rank": stable_rank,
    "gavish_donoho": gavish_donoho,
    "cumulative_variance": cumulative_variance(0.9),
}


def get_rank_rule(name: str) -> RankRule:
    """Look up a rank rule by name; a ``ValueError`` lists the known names."""
    if name not in RANK_RULES:
        raise ValueError(f"unknown rank_rule {name!r}; choose one of {sorted(RANK_RULES)}")
    return RANK_RULES[name]


def adaptive_rank(
    lam: jnp.ndarray,
    rule: RankRule,
    shape: tuple[int, int],
    *,
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
) -> jnp.ndarray:
    """K from ``rule`` on the clamped λ, clamped to [min_rank, max(min_rank, round(ratio·n))]."""
    n = lam.shape[-1]
    upper = max(min_rank, round(max_rank_ratio * n))
    return jnp.clip(rule(lam, shape), min_rank, min(upper, n)).astype(jnp.int32)


__all__ = [
    "EIG_FLOOR",
    "RANK_RULES",
    "Filter",
    "RankRule",
    "adaptive_rank",
    "aligned_exponential",
    "cumulative_variance",
    "entropy",
    "exponential",
    "gavish_donoho",
    "get_rank_rule",
    "hard_rank",
    "identity",
    "landweber",
    "participation",
    "participation_sqrt",
    "power",
    "product",
    "rank_from_ratio",
    "stable_rank",
    "tikhonov",
    "top_k",
    "top_ratio",
]
