"""Spectral merging of LoRA experts from their factors, without forming the dense deltas.

Expert i's task vector is τi = Bi Ai with Bi (m × ri) and Ai (ri × n). With BiᵀBi = RiᵀRi
(Ri = diag(√μ) Wᵀ from the ri×ri eigendecomposition BiᵀBi = W diag(μ) Wᵀ) and M the row
stack of √wi Ri Ai (R × n, R = Σ ri),

    C  = Σ wi Aiᵀ (BiᵀBi) Ai = MᵀM                  (rank ≤ R)
    wi = 1 / max(tr((BiᵀBi)(AiAiᵀ)), 1e-12)          (= 1/‖Bi Ai‖²_F)
    D V  = Σ wi Bi (AiAiᵀ)(BiᵀBi)(Ai V)
    θ0 V = c Σ Bi (Ai V)                             (c = 1 "sum", 1/N "mean", 0 "zero")

and C's non-zero eigenpairs (λ, V) come from the R × R Gram M Mᵀ
(:func:`swudi_jax.maths.solvers.range_eigh`; the algebra is ours, MATH.md section 8). Null
directions of C carry no part of D or θ0, so the filtered estimator
θ = θ0 + (D V diag(h/λ) − θ0 V diag(h)) Vᵀ is, exactly, one product of factors

    θ = B′ A′,   B′ = [B1 … BN]  (m × R),
    A′ = stack_i( c Ai + (wi (AiAiᵀ)(BiᵀBi)(Ai V) diag(h/λ) − c (Ai V) diag(h)) Vᵀ )  (R × n)

(A′ = stack_i(Ai) / N, the mean task vector, when every ‖τi‖² < 1e-12). The merged task
vector of SWUDI, SWUDI-A, pinv and IWUDI on LoRA experts therefore has rank ≤ Σ ri and is
computed in O(R²(m + n) + R³) without any m × n or n × n array (:func:`merge_lora_factors`);
:func:`merge_lora` forms B′A′. When R > n the factors give no saving and the dense stack is
merged by the ordinary path. :func:`truncate_factors` gives the best rank-r approximation of
B′A′ from the factors (Eckart–Young), :func:`combine_factors` the exact factors of a linear
combination Σ ci Bi Ai (task arithmetic, linear).

Source of the estimator: Wei et al., "Closed-Form Spectral Regularization for Multi-Task
Model Merging" (arXiv 2606.07289); LoRA: Hu et al., ICLR 2022.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths import solvers
from swudi_jax.maths.linalg import HIGHEST, compute_dtype
from swudi_jax.maths.spectral import NORM_FLOOR, Spectrum, filter_on_spectrum, filtered_merge
from swudi_jax.maths.validation import as_float_array, check_finite
from swudi_jax.methods.registry import DEFAULT_METHOD, resolve, spectral
from swudi_jax.methods.spec import MethodSpec, Resolved


class Adapter(NamedTuple):
    """A LoRA expert in memory, for :func:`swudi_jax.merge` (``sj.Adapter``): the base's parameters
    plus, on each leaf it names, the delta ΔW = scale · left @ right **in the leaf's stored layout**.

    Its parameters are θ0 + ΔW; a leaf it does not name has a zero task vector (θ0).

    Attributes:
      factors: ``{path: (left, right)}``, paths as :func:`swudi_jax.plan` prints them. A Flax
        kernel (in, out) takes left = ``lora_a`` (in × r), right = ``lora_b`` (r × out), the
        order of ``nnx.LoRA``'s x @ a @ b; a PyTorch-layout weight (out, in) takes PEFT's
        left = B (out × r), right = A (r × in). Ranks may differ between leaves and experts.
      scale: s, one float for every leaf or ``{path: float}`` (a path it leaves out: 1); PEFT's
        α/r (α/√r with rsLoRA). ``nnx.LoRA`` has no scale (1).

    With swudi, swudi_a, pinv or iwudi, a 2-D linear leaf every expert adapts merges from the
    factors: θ = θ0 + s·B′A′ of rank ≤ Σ rᵢ (this module's docstring; MATH.md section 8), the rest
    densified (:mod:`swudi_jax.model.adapters`).
    """

    factors: Mapping[str, tuple[Any, Any]]
    scale: float | Mapping[str, float] = 1.0


def _check_pair(i: int, pair: Any) -> tuple[Any, Any]:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"expert {i}: expected a pair (B (m×r), A (r×n)), got {type(pair).__name__}")
    b = as_float_array(pair[0], f"expert {i} B")
    a = as_float_array(pair[1], f"expert {i} A")
    if b.ndim != 2 or a.ndim != 2:
        raise ValueError(f"expert {i}: B and A must be 2-D, got B {tuple(b.shape)} and A {tuple(a.shape)}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"expert {i}: ranks disagree, B {tuple(b.shape)} has {b.shape[1]} columns but "
            f"A {tuple(a.shape)} has {a.shape[0]} rows"
        )
    if 0 in b.shape or 0 in a.shape:
        raise ValueError(f"expert {i}: empty factor, B {tuple(b.shape)}, A {tuple(a.shape)}")
    check_finite(b, f"expert {i} B")
    check_finite(a, f"expert {i} A")
    return b, a


def checked_factors(factors: Any) -> list[tuple[Any, Any]]:
    """Validate ``[(B1, A1), (B2, A2), ...]``: at least two pairs of 2-D floating arrays whose
    ranks agree within a pair and whose products B·A share one shape. Raises a ``ValueError``
    naming the expert whose factors are malformed or disagree in shape."""
    if not isinstance(factors, (list, tuple)) or len(factors) < 2:
        raise ValueError(f"factors must be a list of at least 2 (B, A) pairs, got {type(factors).__name__}"
                         + (f" of length {len(factors)}" if isinstance(factors, (list, tuple)) else ""))
    pairs = [_check_pair(i, pair) for i, pair in enumerate(factors)]
    m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
    for i, (b, a) in enumerate(pairs):
        if (b.shape[0], a.shape[1]) != (m, n):
            raise ValueError(
                f"expert {i}: delta shape B·A = ({b.shape[0]}, {a.shape[1]}) disagrees with "
                f"expert 0's ({m}, {n})"
            )
    return pairs


def stack_factors(pairs: Sequence[tuple[Any, Any] | None], shape: tuple[int, int],
                  dtype: Any = None) -> tuple[jnp.ndarray, jnp.ndarray, tuple[int, ...]]:
    """Stack factor pairs, zero-padding ranks to the largest; ``None`` is an expert whose task
    vector is zero (a LoRA adapter that does not touch this weight: rank 0).

    Zero columns of Bi and zero rows of Ai leave Bi Ai, C, D and θ0 unchanged.

    Returns:
      ``(b, a, ranks)``: (N, m, r_max) and (N, r_max, n) in ``dtype`` (default: the factors'
      common floating dtype) and each expert's rank.
    """
    m, n = shape
    given = [p for p in pairs if p is not None]
    if dtype is None:
        dtype = np.result_type(*[x.dtype for p in given for x in p]) if given else np.float32
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    ranks = tuple(0 if p is None else int(p[0].shape[1]) for p in pairs)
    r_max = max(max(ranks), 1)
    bs, as_ = [], []
    for pair, r in zip(pairs, ranks):
        b, a = (jnp.zeros((m, 0), dtype), jnp.zeros((0, n), dtype)) if pair is None else pair
        bs.append(jnp.pad(jnp.asarray(b, dtype), ((0, 0), (0, r_max - r))))
        as_.append(jnp.pad(jnp.asarray(a, dtype), ((0, r_max - r), (0, 0))))
    return jnp.stack(bs), jnp.stack(as_), ranks


def check_lora_factors(factors: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Validate ``[(B1, A1), (B2, A2), ...]`` (:func:`checked_factors`) and stack them,
    zero-padding ranks to the largest (:func:`stack_factors`).

    Returns:
      ``(b, a)`` of shapes (N, m, r_max) and (N, r_max, n) in a common floating dtype.
    """
    pairs = checked_factors(factors)
    b, a, _ = stack_factors(pairs, (pairs[0][0].shape[0], pairs[0][1].shape[1]))
    return b, a


def lora_deltas(b: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """The dense task vectors τi = Bi Ai: (N, m, n) from (N, m, r) and (N, r, n)."""
    return jnp.einsum("kmr,krn->kmn", b, a, precision=HIGHEST)


def _anchor_scale(init: str, n_tasks: int) -> float:
    return {"sum": 1.0, "mean": 1.0 / n_tasks, "zero": 0.0}[init]


def _factored_a(b, a, spec: MethodSpec, options: tuple):
    """A′ (N, r, n) in the compute dtype, with θ = Σi Bi A′i (see the module docstring)."""
    spectral_filter = spec.spectral_filter(dict(options))
    b, a = b.astype(compute_dtype(b.dtype)), a.astype(compute_dtype(a.dtype))
    n_tasks, m, r = b.shape
    n = a.shape[-1]
    btb = jnp.einsum("kmr,kms->krs", b, b, precision=HIGHEST)
    aat = jnp.einsum("krn,ksn->krs", a, a, precision=HIGHEST)
    sq_norms = jnp.einsum("krs,krs->k", btb, aat)
    w = 1.0 / jnp.maximum(sq_norms, NORM_FLOOR)
    # BiᵀBi = Riᵀ Ri with Ri = diag(√μ) Wᵀ from its r×r eigh, so C = MᵀM, M = stack(√wi Ri Ai)
    mu, wvec = jnp.linalg.eigh(btb)
    ri = jnp.sqrt(jnp.maximum(mu, 0.0))[:, :, None] * jnp.swapaxes(wvec, 1, 2)
    rows = jnp.einsum("krs,ksn->krn", ri * jnp.sqrt(w)[:, None, None], a, precision=HIGHEST)
    lam, v = solvers.range_eigh(rows.reshape(n_tasks * r, n))
    h = filter_on_spectrum(spectral_filter.make_h, Spectrum(lam, v), (m, n))
    c = _anchor_scale(spectral_filter.init, n_tasks)
    av = jnp.einsum("krn,nj->krj", a, v, precision=HIGHEST)
    inner_d = jnp.einsum("krs,kst->krt", aat, btb, precision=HIGHEST) * w[:, None, None]
    d_coef = jnp.einsum("krs,ksj->krj", inner_d, av, precision=HIGHEST)
    coef = d_coef * (h / lam) - c * av * h
    a_new = c * a + jnp.einsum("krj,nj->krn", coef, v, precision=HIGHEST)
    return jnp.where(jnp.max(sq_norms) < NORM_FLOOR, a / n_tasks, a_new)


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def _merged_a(b, a, spec: MethodSpec, options: tuple):
    return _factored_a(b, a, spec, options).astype(b.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def _merge_factors(b, a, spec: MethodSpec, options: tuple):
    """θ = Σi Bi A′i (m, n) in the factors' dtype."""
    a_new = _factored_a(b, a, spec, options)
    return jnp.einsum("kmr,krn->mn", b.astype(a_new.dtype), a_new, precision=HIGHEST).astype(b.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def _merge_dense(b, a, spec: MethodSpec, options: tuple):
    spectral_filter = spec.spectral_filter(dict(options))
    return filtered_merge(lora_deltas(b, a), spectral_filter.make_h, spectral_filter.init, "full")


def filter_options(resolved: Resolved) -> tuple:
    """The options the spectral filter reads, hashable (a jit static argument): the resolved
    ones less the per-expert and per-tensor ones (folded into the factors by the callers)."""
    return tuple(sorted((k, v) for k, v in resolved.options.items() if k not in resolved.spec.varying))


def runs_on_factors(resolved: Resolved) -> bool:
    """Whether :func:`spectral_factors` runs this method with these options: a filtered spectral
    estimator whose filter takes them, all compile-time constants (an array option such as a
    computed λ̄_max is not: the dense path runs it)."""
    if resolved.spec.spectral_filter is None:
        return False
    try:
        resolved.spec.spectral_filter(dict(filter_options(resolved)))
        hash(filter_options(resolved))
    except (ValueError, TypeError):
        return False
    return True


def _expert_weights(resolved: Resolved, n_tasks: int) -> np.ndarray | None:
    """The per-expert ``weight`` of an expert-weighted method (wi τi enters the merge), or None."""
    if "weight" not in resolved.spec.per_expert:
        return None
    weight = np.asarray(resolved.options["weight"], np.float64)
    if weight.ndim not in (0, 1) or (weight.ndim == 1 and weight.shape != (n_tasks,)):
        raise ValueError(f"option 'weight' takes one value per expert ({n_tasks}), got {weight.tolist()}")
    return np.broadcast_to(weight, (n_tasks,))


def fits_factors(n_tasks: int, r_max: int, n: int) -> bool:
    """Whether the factor path applies: the padded stack of N·r_max rows fits under n
    (:func:`~swudi_jax.maths.solvers.range_eigh`); otherwise the dense stack is no larger."""
    return n_tasks * r_max <= n


def spectral_factors(pairs: Sequence[tuple[Any, Any] | None], resolved: Resolved, shape: tuple[int, int],
                     weights: Sequence[float] | None = None) -> tuple[jax.Array, jax.Array]:
    """(B′, A′) of a filtered spectral method's merged task vector θ = B′A′ on LoRA experts.

    Args:
      pairs: per expert (Bi (m × ri), Ai (ri × n)) in maths layout, any scale folded in, or
        None for an expert whose task vector is zero here (counted in N: "mean" anchors and
        the mean fallback divide by it).
      resolved: the method (swudi, swudi_a, pinv, iwudi, or any spec with a spectral filter).
      shape: (m, n).
      weights: per-expert weights wi (the expert enters as wi τi), default 1.
    Returns:
      B′ (m × R) and A′ (R × n) with R = Σ ri, unpadded, in the factors' dtype. When N·r_max
      > n the dense stack is merged (:func:`~swudi_jax.maths.spectral.filtered_merge`) and
      θ returned as its SVD factors U√S, √S Vᵀ of rank min(m, n, R) (θ has rank ≤ R).
    """
    spectral(resolved)
    if weights is not None:
        pairs = [None if p is None else (jnp.asarray(p[0]) * float(w), p[1]) for p, w in zip(pairs, weights)]
    b, a, ranks = stack_factors(pairs, shape)
    options = filter_options(resolved)
    if not fits_factors(b.shape[0], b.shape[2], shape[1]):
        theta = _merge_dense(b, a, resolved.spec, options)
        return exact_factors(theta, sum(ranks))
    a_new = _merged_a(b, a, resolved.spec, options)
    keep = np.concatenate([np.arange(r) + i * b.shape[2] for i, r in enumerate(ranks)]).astype(np.int32)
    b_cat = jnp.swapaxes(b, 0, 1).reshape(shape[0], -1)
    return b_cat[:, keep], a_new.reshape(-1, shape[1])[keep]


def exact_factors(theta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """θ (m × n) of rank ≤ ``rank`` as factors U√S (m × k), √S Vᵀ (k × n), k = min(m, n, rank)."""
    u, s, vt = jnp.linalg.svd(theta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = jnp.sqrt(s[:k])
    return u[:, :k] * root, root[:, None] * vt[:k]


def combine_factors(pairs: Sequence[tuple[Any, Any] | None], coefficients: Sequence[float]) -> tuple[jax.Array, jax.Array]:
    """The exact factors of Σi ci Bi Ai: B′ = [c1 B1 … cN BN], A′ = [A1; …; AN] (rank Σ ri);
    ``None`` pairs (zero task vectors) and zero coefficients contribute nothing."""
    used = [(p, c) for p, c in zip(pairs, coefficients) if p is not None and float(c) != 0.0]
    if not used:
        raise ValueError("combine_factors: every pair is None or has a zero coefficient (the combination is zero)")
    dtype = jax.dtypes.canonicalize_dtype(np.result_type(*[x.dtype for p, _ in used for x in p]))
    b = jnp.concatenate([jnp.asarray(p[0], dtype) * jnp.asarray(c, dtype) for p, c in used], axis=1)
    a = jnp.concatenate([jnp.asarray(p[1], dtype) for p, _ in used], axis=0)
    return b, a


@jax.jit
def _core_svd(b, a):
    qb, rb = jnp.linalg.qr(b)
    qa, ra = jnp.linalg.qr(a.T)
    u, s, vt = jnp.linalg.svd(jnp.matmul(rb, ra.T, precision=HIGHEST), full_matrices=False)
    return jnp.matmul(qb, u, precision=HIGHEST), s, jnp.matmul(qa, vt.T, precision=HIGHEST)


def truncate_factors(b: Any, a: Any, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best rank-``rank`` approximation of B A (Eckart–Young), from the factors.

    With B = Qb Rb and Aᵀ = Qa Ra (thin QR), B A = Qb (Rb Raᵀ) Qaᵀ and the SVD of the small
    core Rb Raᵀ = U S Vᵀ gives B A's SVD (Qb U) S (Qa V)ᵀ without forming B A. The kept
    factors are Qb U_r √S_r and √S_r (Qa V_r)ᵀ; the error is ‖B A − Br Ar‖_F = (Σ_{j>r} s_j²)^½.

    Args:
      b: (m × R); a: (R × n); rank: r ≥ 1 (r ≥ the number of singular values keeps them all).
    Returns:
      ``(b_r, a_r, s)``: (m × k), (k × n) with k = min(r, len(s)), and every singular value
      s of B A, descending (the discarded ones are ``s[k:]``).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    dtype = compute_dtype(b.dtype, a.dtype)
    left, s, right = _core_svd(jnp.asarray(b, dtype), jnp.asarray(a, dtype))
    k = min(int(rank), s.shape[0])
    root = jnp.sqrt(s[:k])
    return left[:, :k] * root, (right[:, :k] * root).T, s


def merge_lora_factors(factors: Sequence[tuple[Any, Any]], method: str | MethodSpec | Resolved = DEFAULT_METHOD,
                       **options) -> tuple[jax.Array, jax.Array]:
    """Merge LoRA experts with a spectral method and return the result as factors (B′, A′).

    ``B′ @ A′`` equals :func:`merge_lora` (and the dense method on τi = Bi Ai) to float
    rounding; B′ = [w1 B1 … wN BN] (m × Σ ri) and A′ (Σ ri × n), see the module docstring.
    Arguments as :func:`merge_lora`.
    """
    resolved = resolve(method, options)  # validates the options before any compute
    spectral(resolved)
    pairs = checked_factors(factors)
    return spectral_factors(pairs, resolved, (pairs[0][0].shape[0], pairs[0][1].shape[1]),
                            _expert_weights(resolved, len(pairs)))


def merge_lora(factors: Sequence[tuple[Any, Any]], method: str | MethodSpec | Resolved = DEFAULT_METHOD,
               **options) -> jax.Array:
    """Merge LoRA experts given as factor pairs, with a spectral method, from the factors.

    Equal, to float rounding, to ``method`` applied to the dense stack τi = Bi Ai, but costs
    O(R²·(m + n) + R³) for R = Σ ri instead of an n×n eigendecomposition.

    Args:
      factors: ``[(B1, A1), ..., (BN, AN)]``, Bi (m × ri) and Ai (ri × n) in maths layout
        (PEFT's ``lora_B.weight`` and ``lora_A.weight``; fold LoRA's α/r scale into B).
        Ranks may differ between experts.
      method: a method with a spectral filter (swudi, swudi_a, pinv, iwudi), by name, as a
        spec, or already resolved (:func:`swudi_jax.methods.registry.resolve`; then no options).
      **options: the method's options (``time``, ``rank_ratio``, ``init``; ``rank_rule``,
        ``min_rank``, ``max_rank_ratio``, ``init``; ``weight``, one per expert).
    Returns:
      The merged task vector (m, n) in the factors' dtype.
    """
    resolved = resolve(method, options)  # validates the options before any compute
    spectral(resolved)  # a method with a filter, and options it runs
    pairs = checked_factors(factors)
    weights = _expert_weights(resolved, len(pairs))
    if weights is not None:
        pairs = [(jnp.asarray(b) * float(w), a) for (b, a), w in zip(pairs, weights)]
    b, a, _ = stack_factors(pairs, (pairs[0][0].shape[0], pairs[0][1].shape[1]))
    frozen = filter_options(resolved)
    if not fits_factors(b.shape[0], b.shape[2], a.shape[2]):
        return _merge_dense(b, a, resolved.spec, frozen)
    return _merge_factors(b, a, resolved.spec, frozen)


__all__ = ["Adapter", "check_lora_factors", "checked_factors", "combine_factors", "exact_factors", "filter_options", "fits_factors",
           "lora_deltas", "merge_lora", "merge_lora_factors", "runs_on_factors", "spectral_factors", "stack_factors",
           "truncate_factors"]
