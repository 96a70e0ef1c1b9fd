"""Output-space projection merging: the diagonal QP, its basis variant and the diagnostic ρ.

Source: Evans et al., "Model Merging by Output-Space Projection" (arXiv 2605.29101). Only
the abstract-level description of that paper is known to us; the per-row closed form, the
ridge, the fallback and the energy basis below are our reconstruction (design MATH.md §6).

One linear layer in maths layout (y = W x, W ∈ R^{m×n}); K task vectors Δk, per-task input
Grams Gk = Σ x xᵀ (n×n) of the calibration inputs Xk, task weights ωk. The merge is
Δ = Σj diag(aj) Δj (one coefficient per output row per task) and the loss

    L(Δ) = Σk ωk ‖Δ Xk − Tk‖²_F,    E = Σk ωk ‖Tk‖²_F,    ρ(Δ) = 1 − L(Δ) / E

with local targets Tk = Δk Xk (the expert's residual on the inputs). L separates into m
independent K×K least-squares problems, one per output row i:

    H_i[j, l] = Σk ωk Δj[i,:] Gk Δl[i,:]ᵀ,   b_i[j] = Σk ωk Δj[i,:] Ck[:, i],   a_i = H_i⁻¹ b_i

where Ck = Xk Tkᵀ (n×m) is the input–target cross moment (Ck = Gk Δkᵀ for local targets).
At the optimum ρ = Σi b_iᵀ a_i / E ∈ [0, 1]. The "basis" variant rotates the outputs by an
orthonormal Q (Δj → QᵀΔj), solves the diagonal QP there and rotates back; L is invariant
under that rotation, so Q = I is the diagonal QP and ρ is comparable across bases.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from swudi_jax.methods.spec import MethodSpec
from swudi_jax.maths.linalg import HIGHEST, compute_dtype
from swudi_jax.maths.validation import as_float_array, check_finite, check_number, check_task_vectors

BASES = (None, "energy")
"""Named output bases: None (identity, the diagonal QP) and "energy" (see :func:`energy_basis`)."""

DEFAULT_FALLBACK_WEIGHT = 0.3
"""Task-arithmetic coefficient used for rows whose H_i is zero (the data does not see them)."""


class RowSystems(NamedTuple):
    """The m independent K×K systems of the diagonal QP and the total target energy E."""

    h: jnp.ndarray  # (m, K, K)
    b: jnp.ndarray  # (m, K)
    energy: jnp.ndarray  # scalar E


def weights_or_ones(weights, n_tasks: int, dtype) -> jnp.ndarray:
    return jnp.ones((n_tasks,), dtype) if weights is None else jnp.asarray(weights, dtype)


def row_systems(tau, grams, weights, cross=None, target_energy=None) -> RowSystems:
    """H (m, K, K), b (m, K) and E of the diagonal QP.

    (derived) H depends on the tasks' data only through Ḡ = Σk ωk Gk, and b only through
    P = Σk ωk Δk Gk (local targets) or C̄ = Σk ωk Ck (general targets):

        H_i[j, l] = Δj[i,:] Ḡ Δl[i,:]ᵀ,   b_i[j] = Δj[i,:] P[i,:]ᵀ  (or Δj[i,:] C̄[:, i])

    so the cost is two K·m·n² products, not K².

    Args:
      tau: (K, m, n) task vectors, maths layout.
      grams: (K, n, n) per-task input Grams Gk.
      weights: (K,) task weights ωk.
      cross: optional (K, n, m) cross moments Ck = Xk Tkᵀ for general targets; None means
        local targets (Ck = Gk Δkᵀ).
      target_energy: (K,) ‖Tk‖²_F, required with ``cross``.
    """
    mean_gram = jnp.einsum("k,kpq->pq", weights, grams, precision=HIGHEST)
    h = jnp.einsum("jip,pq,liq->ijl", tau, mean_gram, tau, precision=HIGHEST)
    if cross is None:
        own = jnp.einsum("kip,kpq->kiq", tau, grams, precision=HIGHEST)  # Δk Gk
        b = jnp.einsum("jiq,k,kiq->ij", tau, weights, own, precision=HIGHEST)
        energy = jnp.einsum("k,kiq,kiq->", weights, own, tau, precision=HIGHEST)
    else:
        b = jnp.einsum("jiq,k,kqi->ij", tau, weights, cross, precision=HIGHEST)
        energy = jnp.sum(weights * target_energy)
    return RowSystems(h, b, energy)


def _fallback_rows(h: jnp.ndarray) -> jnp.ndarray:
    """Rows whose H_i is (numerically) zero: no calibration input reaches them."""
    traces = jnp.trace(h, axis1=1, axis2=2)
    tiny = jnp.finfo(h.dtype).eps ** 2
    return traces <= tiny * jnp.max(traces)


def solve_rows(systems: RowSystems, ridge: float, fallback_weight: float) -> jnp.ndarray:
    """a_i = (H_i + ridge·tr(H_i)/K · I)⁻¹ b_i, batched over rows; zero rows get the fallback."""
    h, b, _ = systems
    n_tasks = h.shape[-1]
    eye = jnp.eye(n_tasks, dtype=h.dtype)
    zero = _fallback_rows(h)
    shift = ridge * jnp.trace(h, axis1=1, axis2=2) / n_tasks
    regular = h + shift[:, None, None] * eye
    regular = jnp.where(zero[:, None, None], eye, regular)
    rhs = jnp.where(zero[:, None], fallback_weight, b)
    return jnp.linalg.solve(regular, rhs[..., None])[..., 0]


def captured_fraction(systems: RowSystems, coeffs: jnp.ndarray) -> jnp.ndarray:
    """ρ = 1 − L/E for row coefficients a: Σi (2 b_iᵀa_i − a_iᵀH_i a_i) / E (NaN if E = 0).

    At the exact solution a_i = H_i⁻¹b_i this is Σi b_iᵀ a_i / E.
    """
    h, b, energy = systems
    quad = jnp.einsum("ij,ijl,il->", coeffs, h, coeffs, precision=HIGHEST)
    gain = 2.0 * jnp.sum(b * coeffs) - quad
    return jnp.where(energy > 0, gain / jnp.where(energy > 0, energy, 1.0), jnp.nan)


def rotate_outputs(tau: jnp.ndarray, basis: jnp.ndarray) -> jnp.ndarray:
    """Qᵀ Δj for every task: (K, m, n)."""
    return jnp.einsum("pi,jpn->jin", basis, tau, precision=HIGHEST)


def energy_basis(tau, grams, weights, target_gram=None) -> jnp.ndarray:
    """Eigenvectors (columns, ascending eigenvalue) of S = Σk ωk Rk Rkᵀ (m×m).

    For local targets Rk Rkᵀ = Δk Gk Δkᵀ; for general targets pass ``target_gram``
    (K, m, m) = Tk Tkᵀ. This is our natural candidate for the paper's "optimal basis"
    (the paper's own choice is not known to us).
    """
    if target_gram is None:
        s = jnp.einsum("k,kin,knp,kjp->ij", weights, tau, grams, tau, precision=HIGHEST)
    else:
        s = jnp.einsum("k,kij->ij", weights, target_gram, precision=HIGHEST)
    _, vectors = jnp.linalg.eigh(0.5 * (s + s.T))
    return vectors


def rotated_systems(tau, grams, weights, *, basis=None, cross=None, target_energy=None, target_gram=None):
    """``(Q or None, QᵀΔj, RowSystems)``: the row systems in the output basis ``basis``.

    ``basis`` is None (identity), "energy" (:func:`energy_basis`) or an (m, m) orthonormal
    array; the cross moments rotate with the targets (Ck → Ck Q).
    """
    rotation = None
    if isinstance(basis, str):
        rotation = energy_basis(tau, grams, weights, target_gram)
    elif basis is not None:
        rotation = basis
    work = tau if rotation is None else rotate_outputs(tau, rotation)
    work_cross = cross if (cross is None or rotation is None) else jnp.matmul(cross, rotation, precision=HIGHEST)
    return rotation, work, row_systems(work, grams, weights, work_cross, target_energy)


def qp_merge(tau, grams, weights, *, basis=None, ridge=1e-6, fallback_weight=DEFAULT_FALLBACK_WEIGHT,
             cross=None, target_energy=None, target_gram=None):
    """The (rotated) diagonal QP on already-validated compute-dtype arrays: (Δ, ρ, a).

    Pure and jit/vmap-able (``basis`` as a string is static). See :func:`rotated_systems`.
    """
    rotation, work, systems = rotated_systems(tau, grams, weights, basis=basis, cross=cross,
                                              target_energy=target_energy, target_gram=target_gram)
    coeffs = solve_rows(systems, ridge, fallback_weight)
    merged = jnp.einsum("ij,jin->in", coeffs, work, precision=HIGHEST)
    if rotation is not None:
        merged = jnp.matmul(rotation, merged, precision=HIGHEST)
    return merged, captured_fraction(systems, coeffs), coeffs


@functools.partial(jax.jit, static_argnames=("basis_name", "ridge", "fallback_weight"))
def _output_space_qp(tau, grams, weights, rotation, basis_name, ridge, fallback_weight):
    basis = basis_name if rotation is None else rotation
    merged, rho, _ = qp_merge(tau, grams, weights, basis=basis, ridge=ridge, fallback_weight=fallback_weight)
    return merged, rho


def check_grams(grams, tau: jnp.ndarray, name: str = "grams") -> jnp.ndarray:
    """(K, n, n) floating, finite Grams matching ``tau``'s task count and input size n."""
    grams = as_float_array(grams, name)
    n_tasks, _, n = tau.shape
    if grams.shape != (n_tasks, n, n):
        raise ValueError(
            f"{name} must have shape (K, n, n) = {(n_tasks, n, n)} to match tau {tuple(tau.shape)} "
            f"(one input Gram per task, n = input size), got {tuple(grams.shape)}"
        )
    check_finite(grams, name)
    return grams


def check_weights(weights, n_tasks: int, name: str = "weights"):
    """None, or (K,) finite non-negative task weights with a positive sum."""
    if weights is None:
        return None
    weights = as_float_array(weights, name)
    if weights.shape != (n_tasks,):
        raise ValueError(f"{name} must have shape ({n_tasks},) (one weight per task), got {tuple(weights.shape)}")
    check_finite(weights, name)
    host = np.asarray(weights) if not isinstance(weights, jax.core.Tracer) else None
    if host is not None and ((host < 0).any() or host.sum() <= 0):
        raise ValueError(f"{name} must be non-negative with a positive sum, got {host.tolist()}")
    return weights


def _check_basis(basis, m: int, dtype):
    if basis is None or isinstance(basis, str):
        if basis not in BASES:
            raise ValueError(f"basis must be None, 'energy' or an (m, m) orthonormal array, got {basis!r}")
        return None
    q = as_float_array(basis, "basis")
    if q.shape != (m, m):
        raise ValueError(f"basis must be an (m, m) = {(m, m)} orthonormal array, got shape {tuple(q.shape)}")
    check_finite(q, "basis")
    q = jnp.asarray(q, dtype)
    if not isinstance(q, jax.core.Tracer):
        err = float(jnp.max(jnp.abs(jnp.matmul(q.T, q, precision=HIGHEST) - jnp.eye(m, dtype=dtype))))
        if err > 1e3 * float(jnp.finfo(dtype).eps) * max(1.0, np.sqrt(m)):
            raise ValueError(f"basis must be orthonormal (QᵀQ = I); max |QᵀQ − I| = {err:.3g}")
    return q


def check_row_systems_regular(systems: RowSystems, layer: str) -> None:
    """With ridge = 0, a singular non-zero H_i is an error naming the row and the tasks involved."""
    h = np.asarray(systems.h, dtype=np.float64)
    traces = np.trace(h, axis1=1, axis2=2)
    n_tasks = h.shape[-1]
    live = traces > np.finfo(np.float32).eps ** 2 * max(traces.max(), 0.0)
    for row in np.flatnonzero(live):
        lam, vec = np.linalg.eigh(h[row])
        if lam[0] <= n_tasks * np.finfo(systems.h.dtype).eps * lam[-1] * 10:
            null = np.abs(vec[:, 0])
            tasks = np.flatnonzero(null > 0.1 * null.max()).tolist()
            raise ValueError(
                f"{layer}: output row {int(row)} has a singular {n_tasks}×{n_tasks} system "
                f"(tasks {tasks} have linearly dependent rows under the Grams; condition "
                f"{lam[-1] / max(lam[0], 1e-300):.3g}); pass ridge > 0"
            )


def output_space_qp(tau: ArrayLike, grams: ArrayLike, *, weights: ArrayLike | None = None,
                    basis: str | ArrayLike | None = None, ridge: float = 1e-6,
                    fallback_weight: float = DEFAULT_FALLBACK_WEIGHT, layer: str = "layer") -> tuple[jax.Array, jax.Array]:
    """Output-space projection merge of one linear layer: the diagonal QP and its ρ.

    Solves min over Δ = Σj diag(aj) Δj of L(Δ) = Σk ωk tr((Δ − Δk) Gk (Δ − Δk)ᵀ) as m
    batched K×K systems H_i a_i = b_i (module docstring), each with the relative ridge
    ``ridge·tr(H_i)/K``; rows with H_i = 0 take the task-arithmetic weight
    ``fallback_weight`` for every task. Evans et al., arXiv 2605.29101 (our reconstruction).

    Args:
      tau: (K, m, n) task vectors Δk = Wk − W0 in maths layout.
      grams: (K, n, n) per-task input Grams Gk = Σ x xᵀ.
      weights: optional (K,) task weights ωk (default 1).
      basis: None (the diagonal QP), "energy" (eigenvectors of Σk ωk Δk Gk Δkᵀ) or an
        (m, m) orthonormal Q: the QP is solved for QᵀΔj and the result rotated back.
      ridge: relative ridge ≥ 0; with 0 a singular non-zero H_i raises (when concrete).
      fallback_weight: coefficient for rows the calibration data does not reach.
      layer: name used in error messages.
    Returns:
      ``(merged_tau, rho)``: the merged task vector (m, n) in ``tau``'s dtype and the
      captured residual-energy fraction ρ = 1 − L(Δ)/E ∈ [0, 1] (NaN when E = 0).
    """
    tau = check_task_vectors(tau)
    grams = check_grams(grams, tau)
    weights = check_weights(weights, tau.shape[0])
    check_number(ridge, "ridge", low=0.0)
    check_number(fallback_weight, "fallback_weight")
    dtype = compute_dtype(tau.dtype, grams.dtype)
    rotation = _check_basis(basis, tau.shape[1], dtype)
    work, g = jnp.asarray(tau, dtype), jnp.asarray(grams, dtype)
    w = weights_or_ones(weights, tau.shape[0], dtype)
    if ridge == 0 and not isinstance(work, jax.core.Tracer):
        _, _, systems = rotated_systems(work, g, w, basis=basis if rotation is None else rotation)
        check_row_systems_regular(systems, layer)
    merged, rho = _output_space_qp(work, g, w, rotation, None if rotation is not None else basis,
                                   float(ridge), float(fallback_weight))
    return merged.astype(jax.dtypes.canonicalize_dtype(tau.dtype)), rho


def output_space(tau, grams, *, weights=None, basis=None, ridge: float = 1e-6,
                 fallback_weight: float = DEFAULT_FALLBACK_WEIGHT):
    """:func:`output_space_qp` without ρ: the merged task vector (m, n) (the registry's layer fn)."""
    merged, _ = output_space_qp(tau, grams, weights=weights, basis=basis, ridge=ridge,
                                fallback_weight=fallback_weight)
    return merged


def residual_loss(merged_tau, tau, grams, weights, cross=None, target_energy=None):
    """(L(Δ), E) on compute-dtype arrays: L = Σk ωk [tr(Δ Gk Δᵀ) − 2 tr(Δ Ck) + ‖Tk‖²]."""
    quad = jnp.einsum("k,in,knp,ip->", weights, merged_tau, grams, merged_tau, precision=HIGHEST)
    if cross is None:
        lin = jnp.einsum("k,in,knp,kip->", weights, merged_tau, grams, tau, precision=HIGHEST)
        energy = jnp.einsum("k,kin,knp,kip->", weights, tau, grams, tau, precision=HIGHEST)
    else:
        lin = jnp.einsum("k,in,kni->", weights, merged_tau, cross, precision=HIGHEST)
        energy = jnp.sum(weights * target_energy)
    return quad - 2.0 * lin + energy, energy


@jax.jit
def _score(merged_tau, tau, grams, weights):
    loss, energy = residual_loss(merged_tau, tau, grams, weights)
    return jnp.where(energy > 0, 1.0 - loss / jnp.where(energy > 0, energy, 1.0), jnp.nan)


def residual_energy_score(merged_tau: ArrayLike, tau: ArrayLike, grams: ArrayLike, *,
                          weights: ArrayLike | None = None) -> jax.Array:
    """ρ(Δ) = 1 − L(Δ)/E for any merged task vector Δ of one layer (any merging method).

    L(Δ) = Σk ωk tr((Δ − Δk) Gk (Δ − Δk)ᵀ), E = Σk ωk tr(Δk Gk Δkᵀ): the fraction of the
    experts' residual output energy on the calibration data that the merge reproduces.
    1 is a perfect fit, 0 is no better than the base weight (Δ = 0), and a merge that
    overshoots can score below 0. NaN when E = 0. Evans et al., arXiv 2605.29101.

    Args:
      merged_tau: (m, n) merged task vector, maths layout.
      tau: (K, m, n) the experts' task vectors.
      grams: (K, n, n) per-task input Grams.
      weights: optional (K,) task weights ωk (default 1).
    """
    tau = check_task_vectors(tau)
    grams = check_grams(grams, tau)
    weights = check_weights(weights, tau.shape[0])
    merged_tau = as_float_array(merged_tau, "merged_tau")
    if merged_tau.shape != tau.shape[1:]:
        raise ValueError(f"merged_tau must have shape (m, n) = {tau.shape[1:]}, got {tuple(merged_tau.shape)}")
    check_finite(merged_tau, "merged_tau")
    dtype = compute_dtype(tau.dtype, grams.dtype)
    w = weights_or_ones(weights, tau.shape[0], dtype)
    return _score(jnp.asarray(merged_tau, dtype), jnp.asarray(tau, dtype), jnp.asarray(grams, dtype), w)


def _validate_options(options) -> None:
    check_number(options["ridge"], "ridge", low=0.0)
    check_number(options["fallback_weight"], "fallback_weight")
    if options["basis"] not in BASES:
        raise ValueError(f"basis must be one of {list(BASES)} in a model-level merge, got {options['basis']!r}")


OUTPUT_SPACE = MethodSpec(
    name="output_space",
    fn=output_space,
    kind="data",
    defaults={"basis": None, "ridge": 1e-6, "fallback_weight": DEFAULT_FALLBACK_WEIGHT},
    source="Evans et al., Model Merging by Output-Space Projection (arXiv 2605.29101); "
    "diagonal QP per output row, our reconstruction",
    validate=_validate_options,
)


__all__ = [
    "BASES",
    "DEFAULT_FALLBACK_WEIGHT",
    "OUTPUT_SPACE",
    "RowSystems",
    "captured_fraction",
    "check_grams",
    "check_row_systems_regular",
    "check_weights",
    "energy_basis",
    "output_space",
    "output_space_qp",
    "qp_merge",
    "residual_energy_score",
    "residual_loss",
    "rotate_outputs",
    "rotated_systems",
    "row_systems",
    "solve_rows",
    "weights_or_ones",
]
