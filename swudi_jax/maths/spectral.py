"""Layer maths of the spectral merge: interference operator C, right-hand side D, anchor θ0,
one symmetric eigendecomposition and the filtered estimator θ_h.

Everything here is a pure function of a stack of task vectors ``tau`` of shape (N, m, n) in
maths layout (m outputs, n inputs, y = W x), is jit- and vmap-able, and runs its matmuls at
``precision=HIGHEST`` (GPUs would otherwise use TF32, and small eigenvalues decide the filter).

    wi  = 1 / max(‖τi‖²_F, 1e-12)
    C   = Σi wi τiᵀ τi              (n×n, symmetric PSD, tr C = N)
    D   = Σi wi τi τiᵀ τi           (m×n)
    θ_h = θ0 + (D C⁺ − θ0) V diag(h) Vᵀ
        = θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λs) Vᵀ,   λs = max(λ, 1e-8)

No N-fold stack of n×n matrices is materialised: C is one (n, N·m) × (N·m, n) product and
D is accumulated task by task.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
from jax import lax

from swudi_jax.maths import solvers
from swudi_jax.maths.filters import EIG_FLOOR
from swudi_jax.maths.linalg import HIGHEST, compute_dtype

NORM_FLOOR = 1e-12
"""‖τi‖² below this counts as a zero task vector (weights and the mean fallback)."""

INIT_MODES = ("sum", "mean", "zero")


def squared_norms(tau: jnp.ndarray) -> jnp.ndarray:
    """‖τi‖²_F for each task: shape (N,)."""
    return jnp.sum(tau * tau, axis=tuple(range(1, tau.ndim)))


def task_weights(tau: jnp.ndarray) -> jnp.ndarray:
    """wi = 1 / max(‖τi‖²_F, 1e-12): shape (N,)."""
    return 1.0 / jnp.maximum(squared_norms(tau), NORM_FLOOR)


def weighted_rows(tau: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """M, the row stack of √wi τi: shape (N·m, n), so that C = MᵀM."""
    n_tasks, m, n = tau.shape
    return (tau * jnp.sqrt(weights)[:, None, None]).reshape(n_tasks * m, n)


def _check_weights(tau: jnp.ndarray, weights: jnp.ndarray) -> None:
    """Static shape check (free under jit): one weight per task vector."""
    if tau.ndim != 3 or weights.shape != tau.shape[:1]:
        raise ValueError(
            f"weights must have shape (N,) = {tuple(tau.shape[:1])} for tau of shape {tuple(tau.shape)}, "
            f"got {tuple(weights.shape)}"
        )


def interference_operator(tau: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """C = Σi wi τiᵀ τi = MᵀM with M the row stack of √wi τi: shape (n, n)."""
    _check_weights(tau, weights)
    stacked = weighted_rows(tau, weights)
    return jnp.matmul(stacked.T, stacked, precision=HIGHEST)


def right_hand_side(tau: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """D = Σi wi τi τiᵀ τi: shape (m, n), accumulated one task at a time.

    The cheaper association is picked by shape: (τi τiᵀ) τi when m ≤ n, τi (τiᵀ τi) otherwise,
    so the largest temporary is min(m, n)² per task.
    """
    _check_weights(tau, weights)
    _, m, n = tau.shape

    def one_task(acc, task):
        t, w = task
        if m <= n:
            gram = jnp.matmul(t, t.T, precision=HIGHEST)
            term = jnp.matmul(gram, t, precision=HIGHEST)
        else:
            gram = jnp.matmul(t.T, t, precision=HIGHEST)
            term = jnp.matmul(t, gram, precision=HIGHEST)
        return acc + w * term, None

    d, _ = lax.scan(one_task, jnp.zeros((m, n), tau.dtype), (tau, weights))
    return d


def interference_and_rhs(tau: jnp.ndarray, weights: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """C and D together, sharing one Gram Gi = τiᵀ τi per task where that is cheaper.

    Apart, C = MᵀM costs 2·N·m·n² flops and D 4·N·m·n·min(m, n); together, C = Σi wi Gi and
    D = Σi wi τi Gi cost 4·N·m·n², fewer whenever n < 2m (a third fewer for square layers).
    Wide layers (n ≥ 2m) keep the two separate products. One n×n Gram lives at a time.
    C is returned exactly symmetric, as the single product MᵀM is.
    """
    _check_weights(tau, weights)
    _, m, n = tau.shape
    if n >= 2 * m:
        return interference_operator(tau, weights), right_hand_side(tau, weights)

    def one_task(acc, task):
        t, w = task
        gram = jnp.matmul(t.T, t, precision=HIGHEST)
        return (acc[0] + w * gram, acc[1] + w * jnp.matmul(t, gram, precision=HIGHEST)), None

    zeros = (jnp.zeros((n, n), tau.dtype), jnp.zeros((m, n), tau.dtype))
    (c, d), _ = lax.scan(one_task, zeros, (tau, weights))
    return 0.5 * (c + c.T), d  # per-task Grams are symmetric only to rounding; C exactly


def anchor(tau: jnp.ndarray, init: str) -> jnp.ndarray:
    """θ0: "sum" Σi τi (task arithmetic with coefficient 1), "mean" Σi τi / N, "zero" 0."""
    if init == "sum":
        return jnp.sum(tau, axis=0)
    if init == "mean":
        return jnp.mean(tau, axis=0)
    if init == "zero":
        return jnp.zeros(tau.shape[1:], tau.dtype)
    raise ValueError(f"unknown init {init!r}; choose one of {INIT_MODES}")


class Spectrum(NamedTuple):
    """Eigenpairs of C: ``eigenvalues`` ascending and clamped at 1e-8, ``eigenvectors`` as columns."""

    eigenvalues: jnp.ndarray
    eigenvectors: jnp.ndarray


def spectrum(c: jnp.ndarray) -> Spectrum:
    """One symmetric eigendecomposition C = V diag(λ) Vᵀ, λ ascending, clamped at 1e-8."""
    lam, v = jnp.linalg.eigh(c)
    return Spectrum(jnp.maximum(lam, EIG_FLOOR), v)


class NormalEquation(NamedTuple):
    """The per-layer quantities every spectral estimator starts from."""

    c: jnp.ndarray
    d: jnp.ndarray
    theta0: jnp.ndarray


def normal_equation(tau: jnp.ndarray, init: str = "sum") -> NormalEquation:
    """C, D and the anchor θ0 for a stack of task vectors in the compute dtype."""
    tau = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(tau)
    return NormalEquation(*interference_and_rhs(tau, w), anchor(tau, init))


def filtered_solution(
    theta0: jnp.ndarray, d: jnp.ndarray, spec: Spectrum, h: jnp.ndarray
) -> jnp.ndarray:
    """θ_h = θ0 + (D V diag(h/λs) − θ0 V diag(h)) Vᵀ, with one stacked product [D; θ0] V."""
    lam, v = spec
    if theta0.shape != d.shape or d.ndim != 2:
        raise ValueError(f"theta0 {tuple(theta0.shape)} and d {tuple(d.shape)} must have one shape (m, n)")
    if v.ndim != 2 or v.shape[0] != d.shape[1] or lam.shape != v.shape[1:] or h.shape not in ((), lam.shape):
        raise ValueError(
            f"need eigenvectors (n, k) with n = {d.shape[1]}, eigenvalues and h of shape (k,); got eigenvectors "
            f"{tuple(v.shape)}, eigenvalues {tuple(lam.shape)}, h {tuple(h.shape)}"
        )
    d_v, theta0_v = project(d, theta0, v)
    return _apply_filter(theta0, d_v, theta0_v, spec, h)


def project(d: jnp.ndarray, theta0: jnp.ndarray, v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(D V, θ0 V) in one stacked product [D; θ0] V."""
    projected = jnp.matmul(jnp.concatenate([d, theta0], axis=0), v, precision=HIGHEST)
    return projected[: d.shape[0]], projected[d.shape[0]:]


def _apply_filter(theta0, d_v, theta0_v, spec: Spectrum, h):
    coeffs = d_v * (h / spec.eigenvalues) - theta0_v * h
    return theta0 + jnp.matmul(coeffs, spec.eigenvectors.T, precision=HIGHEST)


def filtered_estimate(theta0: jnp.ndarray, d_v: jnp.ndarray, theta0_v: jnp.ndarray, spec: Spectrum,
                      make_h: "FilterFactory", shape: tuple[int, int], sq_norms: jnp.ndarray,
                      mean: jnp.ndarray) -> jnp.ndarray:
    """The last step of every filtered estimator (one device, rows over devices, LoRA factors).

    θ_h = θ0 + (D V diag(h/λs) − θ0 V diag(h)) Vᵀ with h = ``make_h`` on the clamped
    spectrum (:func:`filter_on_spectrum`), from the projections D V and θ0 V; the mean task
    vector ``mean`` instead where every ‖τi‖² < 1e-12 (nothing to merge).
    """
    h = filter_on_spectrum(make_h, spec, shape)
    theta = _apply_filter(theta0, d_v, theta0_v, spec, h)
    return jnp.where(jnp.max(sq_norms) < NORM_FLOOR, mean, theta)


def with_mean_fallback(tau: jnp.ndarray, theta: jnp.ndarray) -> jnp.ndarray:
    """The mean task vector where every ‖τi‖² < 1e-12 (nothing to merge), else θ."""
    degenerate = jnp.max(squared_norms(tau)) < NORM_FLOOR
    return jnp.where(degenerate, jnp.mean(tau, axis=0), theta)


FilterFactory = Callable[[jnp.ndarray, tuple[int, int]], jnp.ndarray]
"""``(eigenvalues, (m, n)) -> h``: builds the filter of one layer from its spectrum."""


def solve_spectrum(work: jnp.ndarray, weights: jnp.ndarray, solver: str = "full",
                   n_top: int | None = None) -> Spectrum:
    """The eigenpairs of C the estimator needs, by ``solver`` (see :mod:`swudi_jax.maths.solvers`):

    "full" all n (one ``eigh`` of C); "lowrank" the N·m non-zero ones from the Gram M Mᵀ
    (needs N·m ≤ n); "topk" the ``n_top`` largest by subspace iteration (filters must be
    zero outside them). Eigenvalues ascending and clamped at 1e-8 in every case.
    """
    if solver == "lowrank":
        return Spectrum(*solvers.range_eigh(weighted_rows(work, weights)))
    c = interference_operator(work, weights)
    if solver == "topk":
        return Spectrum(*solvers.top_eigh(c, n_top))
    if solver == "full":
        return spectrum(c)
    raise ValueError(f"unknown solver {solver!r}; choose one of {solvers.SOLVERS[1:]}")


def filter_on_spectrum(make_h: FilterFactory, spec: Spectrum, shape: tuple[int, int]) -> jnp.ndarray:
    """h for the k eigenpairs in ``spec``, evaluated on the full length-n clamped spectrum
    (the missing eigenvalues at the 1e-8 floor, as C's zero eigenvalues are in exact
    arithmetic), so filters and rank rules see the full path's numbers."""
    n, k = shape[-1], spec.eigenvalues.shape[-1]
    h = make_h(solvers.pad_spectrum(spec.eigenvalues, n), shape)
    return h[n - k:].astype(spec.eigenvalues.dtype)


def filtered_merge(tau: jnp.ndarray, make_h: FilterFactory, init: str = "sum",
                   solver: str = "full", n_top: int | None = None) -> jnp.ndarray:
    """The general filtered estimator for one layer, in the input dtype.

    Stacks τ in the compute dtype, forms C (or its factor), D, θ0, solves for the spectrum
    (:func:`solve_spectrum`), evaluates the filter on the clamped spectrum, forms θ_h and
    falls back to the mean for an all-zero stack. With ``solver="topk"`` the filter must
    vanish outside the ``n_top`` largest eigenvalues.
    """
    work = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(work)
    if solver == "lowrank":
        spec, d = solve_spectrum(work, w, solver, n_top), right_hand_side(work, w)
    else:
        c, d = interference_and_rhs(work, w)
        spec = Spectrum(*solvers.top_eigh(c, n_top)) if solver == "topk" else spectrum(c)
    theta0 = anchor(work, init)
    theta = filtered_estimate(theta0, *project(d, theta0, spec.eigenvectors), spec, make_h, work.shape[1:],
                              squared_norms(work), jnp.mean(work, axis=0))
    return theta.astype(tau.dtype)


def wudi_loss(theta: jnp.ndarray, tau: jnp.ndarray) -> jnp.ndarray:
    """WUDI's interference loss L(θ) = Σi wi ‖(θ − τi) τiᵀ‖²_F (Cheng et al., ICML 2025)."""
    if tau.ndim != 3 or theta.shape != tau.shape[1:]:
        raise ValueError(
            f"theta must have the shape (m, n) = {tuple(tau.shape[1:])} of one task vector in tau "
            f"{tuple(tau.shape)}, got {tuple(theta.shape)}"
        )
    w = lax.stop_gradient(task_weights(tau))
    residual = jnp.einsum("mn,kpn->kmp", theta, tau, precision=HIGHEST) - jnp.einsum(
        "kmn,kpn->kmp", tau, tau, precision=HIGHEST
    )
    return jnp.sum(w * jnp.sum(residual * residual, axis=(1, 2)))


def gram_gradient(theta: jnp.ndarray, c: jnp.ndarray, d: jnp.ndarray) -> jnp.ndarray:
    """∇L(θ) = 2(θC − D), the gradient of :func:`wudi_loss` through the normal equation."""
    return 2.0 * (jnp.matmul(theta, c, precision=HIGHEST) - d)


__all__ = [
    "INIT_MODES",
    "NormalEquation",
    "Spectrum",
    "anchor",
    "filter_on_spectrum",
    "filtered_merge",
    "filtered_estimate",
    "filtered_solution",
    "gram_gradient",
    "interference_and_rhs",
    "interference_operator",
    "normal_equation",
    "project",
    "right_hand_side",
    "solve_spectrum",
    "spectrum",
    "squared_norms",
    "task_weights",
    "weighted_rows",
    "with_mean_fallback",
    "wudi_loss",
]
