"""What a merge left of the task interference, one layer at a time: the merge report's maths.

One linear layer in maths layout, task vectors τi (N, m, n), wi = 1/max(‖τi‖²_F, 1e-12), any
merged task vector θ (m, n) (design MATH.md §1–3, §6):

    I_i(θ) = wi ‖(θ − τi) τiᵀ‖²_F               task i's interference (SWUDI's objective, per task)
    I(θ)   = Σi I_i(θ);   I(Σ τj) is what plain task arithmetic at scale 1 leaves

The spectrum of C = Σi wi τiᵀτi under a method's filter h = make_h(λ) (λ ascending, clamped
at 1e-8, Σλ = N): the kept rank K = #{h > 0}, the share of C's trace on those directions
Σ_{h>0} λ / Σ λ, λ_max, and the filter's effective rank Σ h (its degrees of freedom: K for a
hard top-K filter, less for a soft one).

What a sparsifying method keeps, δi (N, ...): the kept density #{δi ≠ 0}/size per task and
the sign-conflict share, the fraction of entries where some δi > 0 and some δj < 0.

With per-task input Grams Gk (N, n, n) (design §6; ωk = 1): the residual loss
L(X) = Σk tr((X − τk) Gk (X − τk)ᵀ) and energy E = Σk tr(τk Gk τkᵀ), so that
ρ(X) = 1 − L(X)/E, for X = θ and for each expert's own X = τj.

Every function is pure and jit/vmap-able, takes compute-dtype arrays and runs its matmuls at
``precision=HIGHEST``; none forms more than one m×m or n×n product per task at a time.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import eigh_tridiagonal

from swudi_jax.maths import solvers
from swudi_jax.maths.filters import EIG_FLOOR
from swudi_jax.maths.gram import symmetric_gram
from swudi_jax.maths.linalg import HIGHEST
from swudi_jax.maths.spectral import NORM_FLOOR, FilterFactory, squared_norms, task_sum, task_weights, weighted_rows


def task_interference(thetas: jnp.ndarray, tau: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """I_i(θk) = wi ‖(θk − τi) τiᵀ‖²_F for k merged task vectors θk (k, m, n): shape (k, N).

    One task at a time (``lax.map``), by the cheaper association: the m×m products
    (θk − τi) τiᵀ when m ≤ n, else ⟨Xkᵀ Xk, Gi⟩ with Xk = θk − τi and the n×n Gram
    Gi = τiᵀ τi formed once for every θk (a 30522 × 384 embedding never forms a 30522²
    matrix; symmetric Grams cost about half a general product).
    """
    m, n = thetas.shape[1:]

    def one(task):
        t, w = task
        x = thetas - t
        if m <= n:
            p = jnp.matmul(x, t.T, precision=HIGHEST)
            return w * jnp.sum(p * p, axis=(1, 2))
        gram = symmetric_gram(t)  # tr(X G Xᵀ) = ⟨XᵀX, G⟩: two symmetric Grams, no general product
        # ≥ 0 (two PSD matrices); rounding can dip below where the true value is ~0
        return w * jnp.maximum(jnp.stack([jnp.sum(symmetric_gram(xk) * gram) for xk in x]), 0)

    return lax.map(one, (tau, weights)).T


def interference_pair(theta: jnp.ndarray, tau: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """{"per_task_sum": I_i(Σj τj), "per_task_merged": I_i(θ)}, each (N,)."""
    both = task_interference(jnp.stack([task_sum(tau), theta]), tau, task_weights(tau))
    return {"per_task_sum": both[0], "per_task_merged": both[1]}


def eigenvalues(c: jnp.ndarray) -> jnp.ndarray:
    """The eigenvalues of a symmetric matrix, ascending, without its eigenvectors: one
    tridiagonal reduction and bisection (``jnp.linalg.eigvalsh`` computes the eigenvectors too,
    ~10× the time for n = 1536 on a CPU)."""
    _, d, e, _ = lax.linalg.tridiagonal(c)
    return jnp.sort(eigh_tridiagonal(d, e, eigvals_only=True))


def clamped_spectrum(tau: jnp.ndarray, expert_weights: jnp.ndarray | None = None) -> jnp.ndarray:
    """The n eigenvalues of C for the task vectors ai·τi (ai: ``expert_weights``, default 1),
    ascending, clamped at 1e-8: from the N·m × N·m Gram M Mᵀ when N·m < n (C's other
    eigenvalues are 0), else from C = Σi ci τiᵀτi, ci = ai²/max(ai²‖τi‖², 1e-12), summed one
    task at a time (no weighted copy of the stack)."""
    n_tasks, m, n = tau.shape
    a2 = jnp.ones((n_tasks,), tau.dtype) if expert_weights is None else jnp.square(expert_weights.astype(tau.dtype))
    coeffs = a2 / jnp.maximum(a2 * squared_norms(tau), NORM_FLOOR)
    if n_tasks * m < n:
        small = eigenvalues(symmetric_gram(weighted_rows(tau, coeffs).T))
        return solvers.pad_spectrum(jnp.maximum(small, EIG_FLOOR), n)

    def one(acc, task):
        t, c = task
        return acc + c * symmetric_gram(t), None

    gram, _ = lax.scan(one, jnp.zeros((n, n), tau.dtype), (tau, coeffs))
    return jnp.maximum(eigenvalues(gram), EIG_FLOOR)


def spectral_statistics(tau: jnp.ndarray, make_h: FilterFactory,
                        expert_weights: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
    """The filter ``make_h`` on C's clamped spectrum (of the task vectors the method sees,
    ai·τi): kept_rank K, trace_kept, lambda_max, effective_rank (module docstring)."""
    lam = clamped_spectrum(tau, expert_weights)
    h = make_h(lam, tau.shape[1:]).astype(lam.dtype)
    kept = h > 0
    return {
        "kept_rank": jnp.sum(kept),
        "trace_kept": jnp.sum(jnp.where(kept, lam, 0)) / jnp.sum(lam),
        "lambda_max": lam[-1],
        "effective_rank": jnp.sum(h),
    }


def kept_statistics(kept: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """{"density": (N,) share of each δi's entries that are non-zero, "sign_conflict": share of
    entries where the kept values have both signs}."""
    flat = kept.reshape(kept.shape[0], -1)
    conflict = jnp.any(flat > 0, axis=0) & jnp.any(flat < 0, axis=0)
    return {"density": jnp.mean(flat != 0, axis=1), "sign_conflict": jnp.mean(conflict)}


def residual_terms(theta: jnp.ndarray, tau: jnp.ndarray, grams: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """{"energy": E, "loss_merged": L(θ), "loss_experts": (N,) L(τj)} (module docstring).

    (derived) L(X) = tr(X Ḡ Xᵀ) − 2⟨X, P⟩ + E with Ḡ = Σk Gk and P = Σk τk Gk, so the N + 1
    losses cost one m·n² product each. Losses are clamped at 0 (a sum of PSD quadratic forms).
    """
    m, n = theta.shape

    def one(acc, task):
        t, g = task
        tg = jnp.matmul(t, g, precision=HIGHEST)
        return (acc[0] + g, acc[1] + tg, acc[2] + jnp.sum(tg * t)), None

    zero = jnp.zeros((), theta.dtype)
    (g_sum, p, energy), _ = lax.scan(one, (jnp.zeros((n, n), theta.dtype), jnp.zeros((m, n), theta.dtype), zero),
                                     (tau, grams))

    def loss(x):
        quad = jnp.sum(jnp.matmul(x, g_sum, precision=HIGHEST) * x)
        return jnp.maximum(quad - 2.0 * jnp.sum(x * p) + energy, 0)

    return {"energy": energy, "loss_merged": loss(theta), "loss_experts": lax.map(loss, tau)}


__all__ = [
    "clamped_spectrum",
    "eigenvalues",
    "interference_pair",
    "kept_statistics",
    "residual_terms",
    "spectral_statistics",
    "task_interference",
]
