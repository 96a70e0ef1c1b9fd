"""RegMean: the closed-form regression merge of linear layers.

Source: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models"
(ICLR 2023). Per linear layer (maths layout y = W x) with per-task input Grams Gk = Σ x xᵀ:

    G̃k = α Gk + (1 − α) diag(Gk)                      (off-diagonals scaled by α)
    W  = (Σk Wk G̃k)(Σk G̃k)⁻¹
    Δ  = (Σk Δk G̃k)(Σk G̃k)⁻¹                          (task-vector form, since W0 cancels)

With α = 1 (and optional task weights ωk in both sums) Δ is the unconstrained minimiser of
the output-space loss Σk ωk ‖(Δ − Δk) Xk‖², i.e. the upper bound on the diagnostic ρ of
:mod:`swudi_jax.methods.output_space`. Non-linear parameters are averaged by the model-level
merge (the registry's "mean" leaves). RegMean++ uses the same formula with Grams taken from
the merged model's activations (see :mod:`swudi_jax.model.sequential`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from swudi_jax.methods.output_space import check_grams, check_weights, weights_or_ones
from swudi_jax.methods.spec import MethodSpec
from swudi_jax.maths.linalg import HIGHEST, compute_dtype
from swudi_jax.maths.validation import check_number, check_task_vectors

DEFAULT_ALPHA = 0.95
"""The reference off-diagonal scaling of RegMean."""


def scale_off_diagonal(grams: jnp.ndarray, alpha) -> jnp.ndarray:
    """G̃ = α G + (1 − α) diag(G) for a stack (..., n, n)."""
    diag = jnp.diagonal(grams, axis1=-2, axis2=-1)
    eye = jnp.eye(grams.shape[-1], dtype=grams.dtype)
    return alpha * grams + (1.0 - alpha) * diag[..., None, :] * eye


def regmean_solve(numerator: jnp.ndarray, denominator: jnp.ndarray, fallback: jnp.ndarray,
                  ridge) -> jnp.ndarray:
    """Δ = numerator · denominator⁻¹ (m×n times n×n, denominator symmetric PSD).

    Input features no task ever activates (zero diagonal: a zero row and column) are
    decoupled and take the ``fallback`` column (the mean task vector); ``ridge`` adds
    ridge·tr/n to the diagonal.
    """
    n = denominator.shape[-1]
    diag = jnp.diagonal(denominator)
    dead = diag <= jnp.finfo(denominator.dtype).eps ** 2 * jnp.max(diag)
    eye = jnp.eye(n, dtype=denominator.dtype)
    shift = ridge * jnp.trace(denominator) / n
    a = denominator + shift * eye + jnp.where(dead, 1.0, 0.0)[:, None] * eye
    rhs = jnp.where(dead[None, :], fallback, numerator)
    return jnp.linalg.solve(a, rhs.T).T


def check_denominator_regular(grams, weights, alpha: float, layer: str) -> None:
    """With α = 1 and no ridge, a singular Σk ωk Gk (on the features any task sees) is an error."""
    denominator = np.einsum("k,kpq->pq", np.asarray(weights, np.float64), np.asarray(grams, np.float64))
    live = np.diag(denominator) > np.finfo(np.float32).eps ** 2 * np.max(np.diag(denominator))
    lam = np.linalg.eigvalsh(denominator[np.ix_(live, live)]) if live.any() else np.ones(1)
    if lam[0] <= live.sum() * np.finfo(np.asarray(grams).dtype).eps * lam[-1]:
        raise ValueError(
            f"{layer}: the sum of the input Grams is singular (condition {lam[-1] / max(lam[0], 1e-300):.3g}) "
            f"with alpha = {alpha} and ridge = 0: fewer independent calibration tokens than input "
            f"features; pass alpha < 1 or ridge > 0"
        )


def regmean_merge(tau, grams, weights, alpha, ridge=0.0, cross=None) -> jnp.ndarray:
    """The RegMean closed form on validated compute-dtype arrays (jit/vmap-able).

    ``cross`` (K, n, m) = Xk Tkᵀ replaces the local numerator Δk G̃k by Tk Xkᵀ for general
    (e.g. the expert model's own) targets: Δ = (Σk ωk Tk Xkᵀ)(Σk ωk G̃k)⁻¹.
    """
    scaled = scale_off_diagonal(grams, alpha)
    denominator = jnp.einsum("k,kpq->pq", weights, scaled, precision=HIGHEST)
    if cross is None:
        numerator = jnp.einsum("k,kin,knp->ip", weights, tau, scaled, precision=HIGHEST)
    else:
        numerator = jnp.einsum("k,kni->in", weights, cross, precision=HIGHEST)
    fallback = jnp.einsum("k,kin->in", weights, tau) / jnp.sum(weights)
    return regmean_solve(numerator, denominator, fallback, ridge)


@functools.partial(jax.jit, static_argnames=("alpha", "ridge"))
def _regmean(tau, grams, weights, alpha, ridge):
    return regmean_merge(tau, grams, weights, alpha, ridge)


def regmean(tau: ArrayLike, grams: ArrayLike, *, alpha: float = DEFAULT_ALPHA, weights: ArrayLike | None = None,
            ridge: float = 0.0,
            layer: str = "layer") -> jax.Array:
    """RegMean merged task vector Δ = (Σk ωk Δk G̃k)(Σk ωk G̃k)⁻¹ of one linear layer.

    G̃k = α Gk + (1 − α) diag(Gk). Jin et al., ICLR 2023. With α < 1 the denominator is
    positive definite whenever every input feature is seen; features no task sees take
    the mean task vector's column.

    Args:
      tau: (K, m, n) task vectors in maths layout (m outputs, n inputs).
      grams: (K, n, n) per-task input Grams Gk = Σ x xᵀ.
      alpha: off-diagonal scaling α ∈ [0, 1] (0.95, the reference default).
      weights: optional (K,) task weights ωk (default 1, as in the paper).
      ridge: relative ridge ≥ 0 on the denominator (needed for α = 1 with rank-deficient
        Grams: with α = 1 and ridge = 0 a singular denominator raises, when concrete).
      layer: name used in error messages.
    Returns:
      The merged task vector (m, n) in ``tau``'s dtype.
    """
    tau = check_task_vectors(tau)
    grams = check_grams(grams, tau)
    weights = check_weights(weights, tau.shape[0])
    check_number(alpha, "alpha", low=0.0, high=1.0)
    check_number(ridge, "ridge", low=0.0)
    dtype = compute_dtype(tau.dtype, grams.dtype)
    w = weights_or_ones(weights, tau.shape[0], dtype)
    if alpha == 1 and ridge == 0 and not isinstance(grams, jax.core.Tracer):
        check_denominator_regular(grams, w, alpha, layer)
    merged = _regmean(jnp.asarray(tau, dtype), jnp.asarray(grams, dtype), w, float(alpha), float(ridge))
    return merged.astype(jax.dtypes.canonicalize_dtype(tau.dtype))


def _validate_options(options) -> None:
    check_number(options["alpha"], "alpha", low=0.0, high=1.0)
    check_number(options["ridge"], "ridge", low=0.0)


REGMEAN = MethodSpec(
    name="regmean",
    fn=regmean,
    kind="data",
    defaults={"alpha": DEFAULT_ALPHA, "ridge": 0.0},
    source="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    validate=_validate_options,
)


__all__ = [
    "DEFAULT_ALPHA",
    "REGMEAN",
    "check_denominator_regular",
    "regmean",
    "regmean_merge",
    "regmean_solve",
    "scale_off_diagonal",
]
