"""Eigensolvers for the interference operator C beyond one dense ``eigh``.

Two fast paths, each giving the same merged θ as the full ``eigh`` to float rounding
(MATH.md section 8; the algebra below is ours):

- **range** ("lowrank"): when C = MᵀM with M of R < n rows (the N·m rows of the stacked
  weighted task vectors, or Σ rᵢ rows built from LoRA factors), C has rank ≤ R and its
  non-zero eigenpairs come from the R×R Gram M Mᵀ = U diag(λ) Uᵀ as (λ, V = Mᵀ U diag(λ^-1/2)).
  The n − R null directions of C are orthogonal to every row of D and θ0, so any filter
  value h on them multiplies zero: the estimator needs only V. (A thin QR of Mᵀ would give
  V orthonormal to working precision, but LAPACK's QR is ~100× slower than the Gram
  product on CPU, and the Gram has the full path's own accuracy.)
- **top** ("topk"): only the K largest eigenpairs, by randomised subspace iteration
  (Halko, Martinsson & Tropp 2011, Alg. 4.4 with a Rayleigh–Ritz step): a block of
  b = K + p vectors, Y = C Q, Q ← qr(Y), Ritz pairs from Qᵀ C Q, stop when every kept pair
  has ‖C v − λ v‖ ≤ tol·λ_max; if it does not within ``max_iters``, the full ``eigh`` is
  used instead. (``jax.lax.linalg.eigh(subset_by_index=...)`` would do this directly but
  raises NotImplementedError on CPU and GPU in jax 0.10.)

Both return eigenvalues ascending, clamped at ``EIG_FLOOR``, like
:func:`swudi_jax.maths.spectral.spectrum`. :func:`pad_spectrum` rebuilds the full length-n
clamped spectrum (missing eigenvalues at the floor, exactly what the full path sees for
C's zero eigenvalues in exact arithmetic) so filters and rank rules are evaluated on the
same numbers as the full path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
from jax import lax

from swudi_jax.maths.filters import EIG_FLOOR
from swudi_jax.maths.linalg import matmul as _mm

SOLVERS = ("auto", "full", "lowrank", "topk")
TOPK_MIN_DIM = 1024
""""auto" uses the top-K path only for n ≥ this and K ≤ n / 10."""
TRACE_RANK_RULES = ("participation", "stable_rank")
"""SWUDI-A rank rules computable from tr C, ‖C‖²_F and λ_max, so usable with the top-K path."""


def pad_spectrum(eigenvalues: jnp.ndarray, n: int) -> jnp.ndarray:
    """The length-n ascending clamped spectrum: ``n − k`` copies of the floor, then the k given."""
    missing = n - eigenvalues.shape[-1]
    return jnp.concatenate([jnp.full((missing,), EIG_FLOOR, eigenvalues.dtype), eigenvalues])


def range_eigh(rows: jnp.ndarray):
    """Non-zero eigenpairs of C = MᵀM from the small Gram M Mᵀ, without forming C.

    With M Mᵀ = U diag(λ) Uᵀ (R × R), C's non-zero eigenpairs are (λ, V = Mᵀ U diag(λ^-1/2)):
    C V = Mᵀ (M Mᵀ) U diag(λ^-1/2) = V diag(λ). In floating point V loses orthogonality by
    ~eps·√(λ_max/λ), so V is re-orthonormalised (Cholesky of VᵀV) and one Rayleigh–Ritz
    step on that basis (eigh of (M V)ᵀ(M V)) gives eigenpairs as accurate as the full
    ``eigh``. Costs a few R²·n products and three R×R factorisations instead of n³.

    Args:
      rows: M, shape (R, n) with R ≤ n (e.g. the stacked, weighted task vectors).
    Returns:
      ``(eigenvalues, eigenvectors)``: R eigenvalues ascending, clamped at 1e-8, and the
      (n, R) eigenvectors. C's remaining n − R eigenvalues are zero. Eigenvalues within
      rounding of zero (≤ R·eps·λ_max, the ``numpy.linalg.matrix_rank`` convention: M of
      lower rank than R, zero-padded LoRA ranks) mark null directions of C: their
      eigenvectors are returned as zero columns, so they add exactly nothing to the
      estimator, as in exact arithmetic (D and θ0 have no component there).
    """
    r, n = rows.shape
    if r > n:
        raise ValueError(f"range_eigh needs at most n = {n} rows, got {r}")
    tol = r * jnp.finfo(rows.dtype).eps

    # first pass: eigenvectors of the Gram M Mᵀ mapped through Mᵀ (basis = Mᵀ, all R rows)
    gram = _mm(rows, rows.T)
    lam, u = jnp.linalg.eigh(0.5 * (gram + gram.T))
    null = lam <= tol * jnp.max(lam)
    v0 = _mm(rows.T, u) * jnp.where(null, 0.0, lax.rsqrt(jnp.where(null, 1.0, lam)))
    # V = Mᵀ U diag(λ^-1/2) loses orthogonality by ~eps·√(λ_max/λ); one Cholesky
    # re-orthonormalisation and a Rayleigh–Ritz step give the full eigh's accuracy
    overlap = _mm(v0.T, v0) + jnp.diag(null.astype(rows.dtype))
    chol = jnp.linalg.cholesky(overlap)
    basis = jax.scipy.linalg.solve_triangular(chol, v0.T, lower=True).T
    projected = _mm(rows, basis)
    small = _mm(projected.T, projected)
    lam, u = jnp.linalg.eigh(0.5 * (small + small.T))
    null = lam <= tol * jnp.max(lam)
    return jnp.maximum(lam, EIG_FLOOR), jnp.where(null, 0.0, _mm(basis, u))


def default_oversampling(k: int) -> int:
    """Extra block vectors for subspace iteration: p = max(10, K)."""
    return max(10, k)


def default_tolerance(dtype) -> float:
    """Residual tolerance relative to λ_max: 100 ulp of the compute dtype."""
    return 100.0 * float(jnp.finfo(dtype).eps)


def _top_of_full(c, k):
    lam, v = jnp.linalg.eigh(c)
    return lam[-k:], v[:, -k:]


class SubspaceResult(NamedTuple):
    """Ritz pairs from :func:`subspace_iteration` and whether they passed the residual check."""

    eigenvalues: jnp.ndarray
    eigenvectors: jnp.ndarray
    converged: jnp.ndarray
    iterations: jnp.ndarray


def subspace_iteration(
    c: jnp.ndarray,
    k: int,
    *,
    oversampling: int | None = None,
    max_iters: int = 200,
    tol: float | None = None,
    seed: int = 0,
) -> SubspaceResult:
    """Randomised subspace iteration for the K largest eigenpairs of a symmetric PSD C.

    Block of b = K + p random vectors (fixed ``seed``: deterministic); each iteration
    Y = C Q, a Rayleigh–Ritz step on Qᵀ Y (the Ritz pairs of the current subspace), then
    Q ← qr(Y). It stops when ‖C vⱼ − λⱼ vⱼ‖ ≤ tol·λ_max for the K kept pairs, or after
    ``max_iters``. Convergence is geometric in λ_{b+1}/λ_K: fast when the spectrum decays
    past K, hopeless on a flat one. Needs K + p < n.

    Args:
      c: (n, n) symmetric PSD matrix.
      k: number of eigenpairs (static).
      oversampling: p (default max(10, K)).
      max_iters: iteration cap.
      tol: residual tolerance relative to λ_max (default 100 ulp of c's dtype).
      seed: PRNG seed of the starting block.
    Returns:
      A :class:`SubspaceResult`: K Ritz values ascending (not clamped), (n, K) Ritz vectors,
      the residual check's verdict and the number of iterations taken.
    """
    n = c.shape[-1]
    block = k + (default_oversampling(k) if oversampling is None else oversampling)
    if not (1 <= k and block < n):
        raise ValueError(f"subspace_iteration needs 1 <= K and K + p < n = {n}, got K = {k}, K + p = {block}")
    tol = default_tolerance(c.dtype) if tol is None else tol

    start = jax.random.normal(jax.random.PRNGKey(seed), (n, block), c.dtype)
    q0 = jnp.linalg.qr(_mm(c, start), mode="reduced")[0]

    def keep_going(state):
        it, _, _, _, converged = state
        return (it < max_iters) & ~converged

    def step(state):
        it, q, _, _, _ = state
        y = _mm(c, q)
        lam, u = jnp.linalg.eigh(_mm(q.T, y))
        lam, u = lam[-k:], u[:, -k:]
        v, cv = _mm(q, u), _mm(y, u)
        residual = jnp.max(jnp.linalg.norm(cv - v * lam, axis=0))
        converged = residual <= tol * jnp.maximum(lam[-1], EIG_FLOOR)
        return it + 1, jnp.linalg.qr(y, mode="reduced")[0], lam, v, converged

    init = (jnp.int32(0), q0, jnp.zeros((k,), c.dtype), jnp.zeros((n, k), c.dtype), jnp.bool_(False))
    iterations, _, lam, v, converged = lax.while_loop(keep_going, step, init)
    return SubspaceResult(lam, v, converged, iterations)


def top_eigh(c: jnp.ndarray, k: int, **options):
    """The K largest eigenpairs of a symmetric PSD C: :func:`subspace_iteration`, and the
    full ``eigh`` where its residual check fails (or where K + p ≥ n).

    The fallback is a ``while_loop`` that runs 0 or 1 times rather than a ``lax.cond``: under
    ``vmap`` a batched ``cond`` would run the full ``eigh`` for every layer, the loop only
    when some layer needs it.

    Args:
      c: (n, n) symmetric PSD matrix.
      k: number of eigenpairs, 1 ≤ k ≤ n (static).
      **options: ``oversampling``, ``max_iters``, ``tol``, ``seed`` of :func:`subspace_iteration`.
    Returns:
      ``(eigenvalues, eigenvectors)``: K eigenvalues ascending, clamped at 1e-8, and the
      (n, K) eigenvectors.
    """
    n = c.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n = {n}], got {k}")
    p = options.get("oversampling")
    if k + (default_oversampling(k) if p is None else p) >= n:
        lam, v = _top_of_full(c, k)
        return jnp.maximum(lam, EIG_FLOOR), v
    lam, v, converged, _ = subspace_iteration(c, k, **options)

    def fall_back(_):
        return (*_top_of_full(c, k), jnp.bool_(True))

    lam, v, _ = lax.while_loop(lambda s: ~s[2], fall_back, (lam, v, converged))
    return jnp.maximum(lam, EIG_FLOOR), v


# ------------------------------------------------------------------------ trace rank rules


def trace_rank(rule: str, c: jnp.ndarray, lam_max: jnp.ndarray) -> jnp.ndarray:
    """SWUDI-A rank rules from traces (no full spectrum), as an int32 scalar:

    participation ⌈(tr C)² / ‖C‖²_F⌉ and stable_rank ⌈‖C‖²_F / λ_max²⌉ (Σλ = tr C and
    Σλ² = ‖C‖²_F; the full path's clamping at 1e-8 changes these sums by at most n·1e-8).
    """
    frob2 = jnp.sum(c * c)
    if rule == "participation":
        value = jnp.trace(c) ** 2 / frob2
    elif rule == "stable_rank":
        value = frob2 / lam_max**2
    else:
        raise ValueError(f"rank_rule {rule!r} needs the full spectrum; the top-K path supports {TRACE_RANK_RULES}")
    return jnp.ceil(value).astype(jnp.int32)


# --------------------------------------------------------------------------- the choice


def choose_solver(shape: tuple[int, int, int], top: int | None = None,
                  available: tuple[str, ...] = SOLVERS) -> str:
    """The solver "auto" picks for a stack of shape (N, m, n), among ``available``:

    - "lowrank" when N·m < n (C's rank is below n: an exact R×R eigenproblem, R = N·m);
    - else "topk" when the estimator needs only the top ``top`` eigenpairs, n ≥ 1024 and
      ``top`` ≤ n / 10;
    - else "full".
    """
    n_tasks, m, n = shape
    if "lowrank" in available and n_tasks * m < n:
        return "lowrank"
    if "topk" in available and top is not None and n >= TOPK_MIN_DIM and top <= n / 10:
        return "topk"
    return "full"


__all__ = [
    "SOLVERS",
    "TOPK_MIN_DIM",
    "TRACE_RANK_RULES",
    "choose_solver",
    "default_oversampling",
    "default_tolerance",
    "pad_spectrum",
    "SubspaceResult",
    "range_eigh",
    "subspace_iteration",
    "top_eigh",
    "trace_rank",
]
