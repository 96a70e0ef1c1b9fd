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

C is one (n, N·m) × (N·m, n) product or a sum of per-task Grams, and D is accumulated task by
task; only very tall layers (m ≫ n, where the N Grams are smaller than the stack) keep the N
n×n Grams, to form D V_K = Σi wi τi (Gi V_K) without D (:func:`projects_per_task`).
Symmetric products (C = MᵀM, the per-task Grams) are formed by
:func:`swudi_jax.maths.gram.symmetric_gram` (upper triangle by column blocks, lower its mirror:
56% of a plain product's flops for n = 3072), and the association of C and D with the fewest flops
is picked from the layer's shape (:func:`shares_gram`). With a top-K filter (SWUDI) the
reconstruction uses only the K eigenvectors it needs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
from jax import lax

from swudi_jax.maths import solvers
from swudi_jax.maths.filters import EIG_FLOOR
from swudi_jax.maths.gram import gram_flops, matmul_flops, symmetric_gram
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
    """C = Σi wi τiᵀ τi = MᵀM with M the row stack of √wi τi: shape (n, n), exactly symmetric
    (one :func:`~swudi_jax.maths.gram.symmetric_gram` of M: its upper triangle, mirrored)."""
    _check_weights(tau, weights)
    return symmetric_gram(weighted_rows(tau, weights))


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
            gram = symmetric_gram(t.T)
            term = jnp.matmul(gram, t, precision=HIGHEST)
        else:
            gram = jnp.matmul(t.T, t, precision=HIGHEST)
            term = jnp.matmul(t, gram, precision=HIGHEST)
        return acc + w * term, None

    d, _ = lax.scan(one_task, jnp.zeros((m, n), tau.dtype), (tau, weights))
    return d


def cd_flops(shape: tuple[int, int, int], shared: bool) -> int:
    """Flops of C and D for a stack of ``shape`` (N, m, n), apart or sharing the Grams.

    Apart: C = MᵀM (one symmetric Gram of N·m rows) and D = Σi wi (τiτiᵀ)τi for m ≤ n, or
    τi(τiᵀτi) for m > n. Shared: Gi = τiᵀτi per task (symmetric), C = Σ wi Gi, D = Σ wi τi Gi.
    """
    n_tasks, m, n = shape
    if shared:
        return n_tasks * (gram_flops(m, n) + matmul_flops(m, n, n))
    if m <= n:
        d = gram_flops(n, m) + matmul_flops(m, m, n)
    else:
        d = gram_flops(m, n) + matmul_flops(m, n, n)
    return gram_flops(n_tasks * m, n) + n_tasks * d


def shares_gram(shape: tuple[int, int, int]) -> bool:
    """Whether :func:`interference_and_rhs` forms C and D from shared per-task Grams: when
    that costs fewer flops (:func:`cd_flops`): square and tall layers yes, wide ones
    (n ≳ 1.5–2·m) no."""
    return cd_flops(shape, True) < cd_flops(shape, False)


def interference_and_rhs(tau: jnp.ndarray, weights: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """C and D together, sharing one Gram Gi = τiᵀ τi per task where that is cheaper.

    Apart, C = MᵀM costs ~N·m·n² flops (a symmetric Gram) and D ~3·N·m·n·min(m, n);
    together, C = Σi wi Gi and D = Σi wi τi Gi cost ~3·N·m·n², fewer for square and tall
    layers (:func:`shares_gram` compares the exact counts). One n×n Gram lives at a time.
    C is returned exactly symmetric.
    """
    _check_weights(tau, weights)
    _, m, n = tau.shape
    if not shares_gram(tau.shape):
        return interference_operator(tau, weights), right_hand_side(tau, weights)

    def one_task(acc, task):
        t, w = task
        gram = symmetric_gram(t)
        return (acc[0] + w * gram, acc[1] + w * jnp.matmul(t, gram, precision=HIGHEST)), None

    zeros = (jnp.zeros((n, n), tau.dtype), jnp.zeros((m, n), tau.dtype))
    (c, d), _ = lax.scan(one_task, zeros, (tau, weights))
    return c, d  # a sum of exactly symmetric Grams: exactly symmetric


def interference_and_grams(tau: jnp.ndarray, weights: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """C = Σi wi Gi and the per-task Grams Gi = τiᵀ τi stacked (N, n, n), for
    :func:`projected_rhs`; C is formed as in :func:`interference_and_rhs`'s shared path (the
    same products and sums, so the same bits)."""
    _check_weights(tau, weights)
    n = tau.shape[-1]

    def one_task(c, task):
        t, w = task
        gram = symmetric_gram(t)
        return c + w * gram, gram

    return lax.scan(one_task, jnp.zeros((n, n), tau.dtype), (tau, weights))


def projected_rhs(tau: jnp.ndarray, weights: jnp.ndarray, grams: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """D V = Σi wi τi (Gi V) for k eigenvectors V (n, k): shape (m, k), D itself never formed."""
    _check_weights(tau, weights)
    n_tasks, _, n = tau.shape
    if grams.shape != (n_tasks, n, n) or v.ndim != 2 or v.shape[0] != n:
        raise ValueError(f"need grams (N, n, n) = {(n_tasks, n, n)} and eigenvectors (n, k) with n = {n} for tau "
                         f"{tuple(tau.shape)}; got grams {tuple(grams.shape)}, eigenvectors {tuple(v.shape)}")

    def one_task(acc, task):
        t, w, gram = task
        return acc + w * jnp.matmul(t, jnp.matmul(gram, v, precision=HIGHEST), precision=HIGHEST), None

    d_v, _ = lax.scan(one_task, jnp.zeros((tau.shape[1], v.shape[1]), tau.dtype), (tau, weights, grams))
    return d_v


PER_TASK_SAVING = 1 / 3
""":func:`projects_per_task` needs at least this share of D V's flops saved: the per-task products
are smaller and run slower. Measured in float32 on 2 CPU cores (jax 0.10.2), SWUDI r = 0.65,
vmapped as the merge runs it: 30522×384, 5 tasks (37 % fewer flops) 9–13 % faster (two interleaved
runs); 1536×384, 5 tasks (25 % fewer) 12 % slower; 3072×768, 8 tasks (23 % fewer) 3.5 % slower."""

TALL = 2
""":func:`projects_per_task` needs m ≥ TALL·n: the N kept Grams (N·n²) then hold at most half the
stack's memory (square layers at small k would hold as much as the stack, 512 MiB for 8 tasks of
4096², and measured 1.04–1.21× slower on 768²)."""


def projects_per_task(shape: tuple[int, int, int], k: int) -> bool:
    """Whether D V for k eigenvectors is formed as Σi wi τi (Gi V) (:func:`projected_rhs`, keeping
    the Grams) rather than as D = Σi wi τi Gi then [D; θ0] V: when that saves at least
    :data:`PER_TASK_SAVING` of the flops, i.e. very tall layers with k well below n, such as
    MiniLM's 30522×384 word embeddings under SWUDI's k = ⌈0.65·n⌉. Both ways share C's Grams
    (:func:`shares_gram`), whose flops are left out of the comparison. Layers with m < TALL·n
    (:data:`TALL`) always form D."""
    n_tasks, m, n = shape
    if m < TALL * n or not shares_gram(shape):
        return False
    via_d = n_tasks * matmul_flops(m, n, n) + matmul_flops(2 * m, n, k)
    per_task = n_tasks * (matmul_flops(n, n, k) + matmul_flops(m, n, k)) + matmul_flops(m, n, k)
    return per_task <= (1 - PER_TASK_SAVING) * via_d


UNROLLED_TASK_SUM = 32
"""Up to this many task vectors, :func:`task_sum` is a chain of adds; beyond, one matmul."""


def task_sum(tau: jnp.ndarray) -> jnp.ndarray:
    """Σi τi over the leading (task) axis, fast on every backend.

    XLA's CPU backend runs ``jnp.sum(tau, axis=0)`` (a reduction over the outer axis) 20–50×
    slower than N − 1 elementwise adds (0.36 s vs 0.017 s for a (5, 30522, 384) stack), so
    the sum is N − 1 fused adds (N ≤ 32) or one (1 × N)(N × m·n) product.
    """
    n_tasks = tau.shape[0]
    if n_tasks <= UNROLLED_TASK_SUM:
        total = tau[0]
        for i in range(1, n_tasks):
            total = total + tau[i]
        return total
    flat = tau.reshape(n_tasks, -1)
    return jnp.matmul(jnp.ones((n_tasks,), tau.dtype), flat, precision=HIGHEST).reshape(tau.shape[1:])


def task_mean(tau: jnp.ndarray) -> jnp.ndarray:
    """Σi τi / N (see :func:`task_sum`)."""
    return task_sum(tau) / tau.shape[0]


def anchor(tau: jnp.ndarray, init: str) -> jnp.ndarray:
    """θ0: "sum" Σi τi (task arithmetic with coefficient 1), "mean" Σi τi / N, "zero" 0."""
    if init == "sum":
        return task_sum(tau)
    if init == "mean":
        return task_mean(tau)
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
    return apply_filter(theta0, d_v, theta0_v, spec, h)


def project(d: jnp.ndarray, theta0: jnp.ndarray, v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(D V, θ0 V) in one stacked product [D; θ0] V."""
    projected = jnp.matmul(jnp.concatenate([d, theta0], axis=0), v, precision=HIGHEST)
    return projected[: d.shape[0]], projected[d.shape[0]:]


def apply_filter(theta0: jnp.ndarray, d_v: jnp.ndarray, theta0_v: jnp.ndarray, spec: Spectrum,
                 h: jnp.ndarray) -> jnp.ndarray:
    """θ_h = θ0 + (D V diag(h/λ) − θ0 V diag(h)) Vᵀ from the projections D V and θ0 V (m, k) on the
    k eigenpairs in ``spec`` and the filter ``h`` (k,) on them."""
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
    theta = apply_filter(theta0, d_v, theta0_v, spec, h)
    return jnp.where(jnp.max(sq_norms) < NORM_FLOOR, mean, theta)


def with_mean_fallback(tau: jnp.ndarray, theta: jnp.ndarray) -> jnp.ndarray:
    """The mean task vector where every ‖τi‖² < 1e-12 (nothing to merge), else θ."""
    degenerate = jnp.max(squared_norms(tau)) < NORM_FLOOR
    return jnp.where(degenerate, task_mean(tau), theta)


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
    return _spectrum_of(interference_operator(work, weights), solver, n_top)


def _spectrum_of(c: jnp.ndarray, solver: str, n_top: int | None) -> Spectrum:
    """C's eigenpairs by the "topk" or "full" solver (:func:`solve_spectrum`)."""
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


def spectrum_and_projections(work: jnp.ndarray, weights: jnp.ndarray, init: str = "sum", solver: str = "full",
                             n_top: int | None = None) -> tuple[Spectrum, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(spectrum, θ0, D V, θ0 V) of one layer's stack ``work`` (compute dtype) with its task weights.

    V holds the eigenvectors kept: by ``solver`` (:func:`solve_spectrum`), all n for "full", the
    N·m non-zero ones for "lowrank", the ``n_top`` largest for "topk" and for "full" with
    ``n_top`` (a filter that vanishes outside them). D is formed, or, where that costs fewer
    flops (:func:`projects_per_task`: very tall layers, k well below n), D V = Σi wi τi (Gi V)
    is formed from C's kept Grams without D.
    """
    n = work.shape[-1]
    k = n if n_top is None or solver == "lowrank" else min(n_top, n)
    per_task = solver != "lowrank" and projects_per_task(work.shape, k)
    if solver == "lowrank":
        spec, rhs = solve_spectrum(work, weights, solver), right_hand_side(work, weights)
    else:  # rhs: D, or the per-task Grams where D V is formed task by task
        c, rhs = interference_and_grams(work, weights) if per_task else interference_and_rhs(work, weights)
        spec = _spectrum_of(c, solver, n_top)
    if solver == "full" and k < n:
        # h vanishes outside the n_top largest eigenvalues: only their eigenvectors add to θ
        spec = Spectrum(spec.eigenvalues[n - k:], spec.eigenvectors[:, n - k:])
    theta0, v = anchor(work, init), spec.eigenvectors
    if per_task:
        return spec, theta0, projected_rhs(work, weights, rhs, v), jnp.matmul(theta0, v, precision=HIGHEST)
    return (spec, theta0, *project(rhs, theta0, v))


def filtered_merge(tau: jnp.ndarray, make_h: FilterFactory, init: str = "sum",
                   solver: str = "full", n_top: int | None = None) -> jnp.ndarray:
    """The general filtered estimator for one layer, in the input dtype.

    Stacks τ in the compute dtype, forms C (or its factor), D, θ0, solves for the spectrum
    (:func:`solve_spectrum`), evaluates the filter on the clamped spectrum, forms θ_h and
    falls back to the mean for an all-zero stack. With ``n_top`` given the filter must
    vanish outside the ``n_top`` largest eigenvalues (SWUDI's top-K): "topk" computes only
    those eigenpairs, "full" computes all and reconstructs θ from those n_top eigenvectors.
    Where it costs fewer flops (:func:`projects_per_task`: tall layers, k well below n) D is
    not formed (:func:`spectrum_and_projections`).
    """
    work = tau.astype(compute_dtype(tau.dtype))
    w = task_weights(work)
    spec, theta0, d_v, theta0_v = spectrum_and_projections(work, w, init, solver, n_top)
    theta = filtered_estimate(theta0, d_v, theta0_v, spec, make_h, work.shape[1:], squared_norms(work), task_mean(work))
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
    "PER_TASK_SAVING",
    "Spectrum",
    "TALL",
    "anchor",
    "apply_filter",
    "cd_flops",
    "filter_on_spectrum",
    "filtered_estimate",
    "filtered_merge",
    "filtered_solution",
    "gram_gradient",
    "interference_and_grams",
    "interference_and_rhs",
    "interference_operator",
    "normal_equation",
    "project",
    "projected_rhs",
    "projects_per_task",
    "right_hand_side",
    "shares_gram",
    "solve_spectrum",
    "spectrum",
    "spectrum_and_projections",
    "squared_norms",
    "task_mean",
    "task_sum",
    "task_weights",
    "weighted_rows",
    "with_mean_fallback",
    "wudi_loss",
]
