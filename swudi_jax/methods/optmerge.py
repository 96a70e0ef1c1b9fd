"""OptMerge: WUDI's loss with per-task SVD-truncated targets and projectors (an ICLR 2026
baseline; the SWUDI authors' reference calls it ``wudi2``).

Source: the SWUDI authors' reference code (MLLMerging, ``yongxianwei_merging.wudi_merge_v2``,
ported there from MLLMerging/InternVL ``model_merging.wudi_merging2``). Per layer, with
τ̄ = Σ τi / N, K = max(1, ⌊min(m, n) / N⌋) (or max(1, ⌊min(m, n)·r⌋) for ``rank_ratio`` r),
clipped to min(m, n):

    Ti = [τi − τ̄]_K + τ̄          (target: rank-K SVD truncation of the residual, plus the mean)
    Pi = diag(s_1..K) V_Kᵀ         (projector: τi's top-K singular values and right vectors)
    L(θ) = Σi wi ‖(θ − Ti) Piᵀ‖²_F,   wi = 1/‖τi‖²_F,

minimised by Adam (lr 1e-5, 300 steps) from θ0 = Σ τi. (derived) PiᵀPi = V_K diag(s²) V_Kᵀ =: Bi,
the rank-K truncation of τiᵀτi, so L is WUDI's quadratic with other targets and operators:

    L(θ) = Σi wi tr((θ − Ti) Bi (θ − Ti)ᵀ),   ∇L = 2(θC' − D'),   C' = Σ wi Bi,  D' = Σ wi Ti Bi.

The loop below uses that gradient (one n×n C' and one m×n D' formed once), which is the
autodiff gradient of L to rounding (tests check both in float64). The closed form
θ* = D' C'⁺ (+ θ0's component in the null space of C', where gradient flow never moves θ)
is :func:`optmerge_closed_form`; like WUDI, the 300 Adam steps at lr 1e-5 stop far from it,
so it does **not** reproduce OptMerge's output (it is a different estimator, the t → ∞ end of
the same filter family).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from swudi_jax.maths.spectral import (
    HIGHEST,
    Spectrum,
    anchor,
    compute_dtype,
    filtered_solution,
    task_weights,
    with_mean_fallback,
)
from swudi_jax.maths.validation import check_number, check_task_vectors
from swudi_jax.maths.placement import auto_axes_boundary
from swudi_jax.methods.results import finite_result
from swudi_jax.methods.spec import MethodSpec, expert_weighted

SOURCE = ("OptMerge (per-task SVD-truncated WUDI, ICLR 2026), as the SWUDI authors' reference code "
          "implements it (wudi_merge_v2, 'wudi2')")


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def check_optmerge_options(opts: Mapping[str, Any]) -> None:
    """ValueError naming the option for a bad ``rank_ratio``, ``steps`` or ``learning_rate``."""
    if opts["rank_ratio"] is not None:
        check_number(opts["rank_ratio"], "rank_ratio", low=0.0, high=1.0, low_open=True)
    check_number(opts["steps"], "steps", low=0, integer=True)
    check_number(opts["learning_rate"], "learning_rate", low=0.0, low_open=True)


def optmerge_rank(shape: tuple[int, int, int], rank_ratio: float | None = None) -> int:
    """K = max(1, ⌊min(m, n)/N⌋), or max(1, ⌊min(m, n)·r⌋) for a ratio r; at most min(m, n)."""
    n_tasks, m, n = shape
    low = min(m, n)
    k = max(1, low // n_tasks) if rank_ratio is None else max(1, int(low * float(rank_ratio)))
    return min(k, low)


class OptMergeQuadratic(NamedTuple):
    """OptMerge's loss as WUDI's quadratic: operator C' (n×n), right-hand side D' (m×n), the
    targets Ti (N, m, n) and projectors Pi (N, K, n) of the original form."""

    c: jnp.ndarray
    d: jnp.ndarray
    targets: jnp.ndarray
    projectors: jnp.ndarray


def optmerge_quadratic(work: jnp.ndarray, rank: int) -> OptMergeQuadratic:
    """Ti, Pi, C' = Σ wi PiᵀPi and D' = Σ wi Ti PiᵀPi for a stack in the compute dtype."""
    w = task_weights(work)
    mean = jnp.mean(work, axis=0)
    u_r, s_r, vt_r = jnp.linalg.svd(work - mean, full_matrices=False)
    targets = _mm(u_r[..., :rank] * s_r[..., None, :rank], vt_r[..., :rank, :]) + mean
    _, s, vt = jnp.linalg.svd(work, full_matrices=False)
    projectors = s[..., :rank, None] * vt[..., :rank, :]  # (N, K, n)
    grams = jnp.einsum("ikn,ikp->inp", projectors, projectors, precision=HIGHEST)
    c = jnp.einsum("i,inp->np", w, grams, precision=HIGHEST)
    d = jnp.einsum("i,imn,inp->mp", w, targets, grams, precision=HIGHEST)
    return OptMergeQuadratic(0.5 * (c + c.T), d, targets, projectors)


def optmerge_loss(theta: jnp.ndarray, tau: jnp.ndarray, rank: int) -> jnp.ndarray:
    """The original loss L(θ) = Σi wi ‖(θ − Ti) Piᵀ‖²_F (for checks; the loop uses ∇L = 2(θC' − D'))."""
    work = tau.astype(compute_dtype(tau.dtype))
    q = optmerge_quadratic(work, rank)
    w = lax.stop_gradient(task_weights(work))
    inner = jnp.einsum("imn,ikn->imk", theta[None] - q.targets, q.projectors, precision=HIGHEST)
    return jnp.sum(w * jnp.sum(inner * inner, axis=(1, 2)))


@functools.partial(jax.jit, static_argnames=("rank", "steps", "learning_rate"))
def _optmerge(tau, rank, steps, learning_rate):
    work = tau.astype(compute_dtype(tau.dtype))
    q = optmerge_quadratic(work, rank)
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        theta, state = carry
        grad = 2.0 * (_mm(theta, q.c) - q.d)
        updates, state = optimizer.update(grad, state, theta)
        return (optax.apply_updates(theta, updates), state), None

    theta0 = anchor(work, "sum")
    (theta, _), _ = lax.scan(step, (theta0, optimizer.init(theta0)), None, length=steps)
    return with_mean_fallback(work, theta).astype(tau.dtype)


@auto_axes_boundary
def optmerge(tau: ArrayLike, *, rank_ratio: float | None = None, steps: int = 300, learning_rate: float = 1e-5) -> jax.Array:
    """OptMerge: Adam(``learning_rate``) for ``steps`` full-batch steps on
    L(θ) = Σi wi ‖(θ − Ti) Piᵀ‖²_F from θ0 = Σ τi (module docstring), in one ``lax.scan``; the
    defaults are the reference's (``wudi_merge_v2``), and the registry reads them from this signature.

    Args:
      tau: task vectors (N, m, n), maths layout, float32 or float64.
      rank_ratio: None for K = max(1, ⌊min(m, n)/N⌋), else r ∈ (0, 1] for max(1, ⌊min(m, n)·r⌋).
      steps: Adam steps (300). learning_rate: Adam's step size (1e-5; betas 0.9/0.999, eps 1e-8).
    Returns:
      The merged task vector (m, n), in ``tau``'s dtype (the mean where every τi ≈ 0).
    """
    tau = check_task_vectors(tau)
    check_optmerge_options({"rank_ratio": rank_ratio, "steps": steps, "learning_rate": learning_rate})
    rank = optmerge_rank(tau.shape, rank_ratio)
    return finite_result(_optmerge(tau, rank, int(steps), float(learning_rate)), tau, "optmerge")


@functools.partial(jax.jit, static_argnames=("rank",))
def _optmerge_closed_form(tau, rank):
    work = tau.astype(compute_dtype(tau.dtype))
    q = optmerge_quadratic(work, rank)
    lam, v = jnp.linalg.eigh(q.c)
    tol = lam.shape[-1] * jnp.finfo(lam.dtype).eps * jnp.max(lam)
    h = (lam > tol).astype(lam.dtype)  # C' has rank ≤ N·K: its null directions keep θ0
    theta = filtered_solution(anchor(work, "sum"), q.d, Spectrum(jnp.maximum(lam, tol), v), h)
    return with_mean_fallback(work, theta).astype(tau.dtype)


@auto_axes_boundary
def optmerge_closed_form(tau: ArrayLike, *, rank_ratio: float | None = None) -> jax.Array:
    """The minimiser of OptMerge's loss nearest θ0 = Σ τi: θ = θ0 + (D'C'⁺ − θ0) P, P the
    projector on range(C') (the limit of gradient flow from θ0). Not OptMerge's output
    (300 Adam steps at lr 1e-5 stop far from it); offered for analysis."""
    tau = check_task_vectors(tau)
    check_optmerge_options({"rank_ratio": rank_ratio, "steps": 0, "learning_rate": 1.0})
    return finite_result(_optmerge_closed_form(tau, optmerge_rank(tau.shape, rank_ratio)), tau, "optmerge_closed_form")


OPTMERGE = expert_weighted(MethodSpec("optmerge", optmerge, "linear", source=SOURCE,
                                      validate=check_optmerge_options, aliases=("wudi2",)))

__all__ = [
    "OPTMERGE",
    "OptMergeQuadratic",
    "check_optmerge_options",
    "optmerge",
    "optmerge_closed_form",
    "optmerge_loss",
    "optmerge_quadratic",
    "optmerge_rank",
]
