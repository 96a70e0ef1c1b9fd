"""Spectral merging of LoRA experts from their factors, without forming the dense deltas.

Expert i's task vector is τi = Bi Ai with Bi (m × ri) and Ai (ri × n). With BiᵀBi = RiᵀRi
(Ri = diag(√μ) Wᵀ from the ri×ri eigendecomposition BiᵀBi = W diag(μ) Wᵀ) and M the row
stack of √wi Ri Ai (R × n, R = Σ ri),

    C  = Σ wi Aiᵀ (BiᵀBi) Ai = MᵀM                  (rank ≤ R)
    wi = 1 / max(tr((BiᵀBi)(AiAiᵀ)), 1e-12)          (= 1/‖Bi Ai‖²_F)
    D V  = Σ wi Bi (AiAiᵀ)(BiᵀBi)(Ai V)
    θ0 V = Σ Bi (Ai V)

and C's non-zero eigenpairs come from the R × R Gram M Mᵀ (:func:`swudi_jax.maths.solvers.range_eigh`;
the algebra is ours, MATH.md section 8). The only m × n arrays formed are θ0 and the result.
Null directions of C carry no part of D or θ0, so the result equals the dense method on the
stack Bi Ai to float rounding. When R > n the factors give no saving and the dense stack is
merged by the ordinary path.

Source of the estimator: Wei et al., "Closed-Form Spectral Regularization for Multi-Task
Model Merging" (arXiv 2606.07289); LoRA: Hu et al., ICLR 2022.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths import solvers
from swudi_jax.maths.linalg import HIGHEST, compute_dtype
from swudi_jax.maths.spectral import NORM_FLOOR, Spectrum, filtered_estimate, filtered_merge
from swudi_jax.maths.validation import as_float_array, check_finite
from swudi_jax.methods.registry import DEFAULT_METHOD, resolve, spectral
from swudi_jax.methods.spec import MethodSpec, Resolved


def check_lora_factors(factors: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Validate ``[(B1, A1), (B2, A2), ...]`` and stack them, zero-padding ranks to the largest.

    Zero columns of Bi and zero rows of Ai leave Bi Ai, C, D and θ0 unchanged. Raises a
    ``ValueError`` naming the expert whose factors are malformed or disagree in shape.

    Returns:
      ``(b, a)`` of shapes (N, m, r_max) and (N, r_max, n) in a common floating dtype.
    """
    if not isinstance(factors, (list, tuple)) or len(factors) < 2:
        raise ValueError(f"factors must be a list of at least 2 (B, A) pairs, got {type(factors).__name__}"
                         + (f" of length {len(factors)}" if isinstance(factors, (list, tuple)) else ""))
    pairs = []
    for i, pair in enumerate(factors):
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
        pairs.append((b, a))
    m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
    for i, (b, a) in enumerate(pairs):
        if (b.shape[0], a.shape[1]) != (m, n):
            raise ValueError(
                f"expert {i}: delta shape B·A = ({b.shape[0]}, {a.shape[1]}) disagrees with "
                f"expert 0's ({m}, {n})"
            )
    dtype = jax.dtypes.canonicalize_dtype(np.result_type(*[x.dtype for pair in pairs for x in pair]))
    r_max = max(b.shape[1] for b, _ in pairs)
    b = jnp.stack([jnp.pad(jnp.asarray(b, dtype), ((0, 0), (0, r_max - b.shape[1]))) for b, _ in pairs])
    a = jnp.stack([jnp.pad(jnp.asarray(a, dtype), ((0, r_max - a.shape[0]), (0, 0))) for _, a in pairs])
    return b, a


def lora_deltas(b: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """The dense task vectors τi = Bi Ai: (N, m, n) from (N, m, r) and (N, r, n)."""
    return jnp.einsum("kmr,krn->kmn", b, a, precision=HIGHEST)


def _anchor_scale(init: str, n_tasks: int) -> float:
    return {"sum": 1.0, "mean": 1.0 / n_tasks, "zero": 0.0}[init]


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def _merge_factors(b, a, spec: MethodSpec, options: tuple):
    spectral_filter = spec.spectral_filter(dict(options))
    init = spectral_filter.init
    out_dtype = b.dtype
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
    spec = Spectrum(lam, v)

    av = jnp.einsum("krn,nj->krj", a, v, precision=HIGHEST)
    scale = _anchor_scale(init, n_tasks)
    theta0_v = scale * jnp.einsum("kmr,krj->mj", b, av, precision=HIGHEST)
    inner_d = jnp.einsum("krs,kst->krt", aat, btb, precision=HIGHEST)
    d_v = jnp.einsum("kmr,krs,ksj->mj", b * w[:, None, None], inner_d, av, precision=HIGHEST)
    dense_sum = jnp.einsum("kmr,krn->mn", b, a, precision=HIGHEST)
    theta = filtered_estimate(scale * dense_sum, d_v, theta0_v, spec, spectral_filter.make_h, (m, n), sq_norms,
                              dense_sum / n_tasks)
    return theta.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def _merge_dense(b, a, spec: MethodSpec, options: tuple):
    spectral_filter = spec.spectral_filter(dict(options))
    return filtered_merge(lora_deltas(b, a), spectral_filter.make_h, spectral_filter.init, "full")


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
        ``min_rank``, ``max_rank_ratio``, ``init``).
    Returns:
      The merged task vector (m, n) in the factors' dtype.
    """
    resolved = resolve(method, options)  # validates the options before any compute
    spectral(resolved)  # a method with a filter, and options it runs
    b, a = check_lora_factors(factors)
    frozen = tuple(sorted(resolved.options.items()))
    if b.shape[0] * b.shape[2] > a.shape[2]:
        return _merge_dense(b, a, resolved.spec, frozen)
    return _merge_factors(b, a, resolved.spec, frozen)


__all__ = ["check_lora_factors", "lora_deltas", "merge_lora"]
