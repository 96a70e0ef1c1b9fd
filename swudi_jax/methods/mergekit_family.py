"""mergekit's task-vector methods by mergekit's names and semantics (layer level, in JAX).

Semantics as mergekit 0.1.5 computes them (``merge_methods/generalized_task_arithmetic.py``,
``linear.py``, ``sce.py``, ``passthrough.py``, ``sparsify.py``; read, not copied), each from
its paper. One code path, :func:`generalized_task_arithmetic`, serves the whole family:

    δi = sparsify(τi; di, γi, εi, rescale)          (none for task_arithmetic)
    δi ← wi·δi                                      (per-model weight, rounded to the dtype)
    consensus:    M = Σi mi δi,  Z = Σi mi wi (0 → 1),  mi = [sign δi = γ]   (TIES elect)
    no consensus: M = Σi δi,     Z = Σi wi (|Z| < 1e-8 → 1)
    M ← M / Z if normalize;   M ← λ·M;   merged weight θ = θ0 + M

========================  ==================  =========  ==========  =======  ============
method                    sparsifier          consensus  normalize   rescale  extra
========================  ==================  =========  ==========  =======  ============
task_arithmetic           —                   —          False       —        —
ties                      magnitude           sum        True        False    —
dare_ties                 random              sum        False       True     key
dare_linear               random              —          False       True     key
breadcrumbs               magnitude_outliers  —          False       False    gamma = 0.01
breadcrumbs_ties          magnitude_outliers  sum        False       False    gamma = 0.01
della                     della_magprune      sum        True        True     epsilon = 0.15, key
della_linear              della_magprune      —          False       True     epsilon = 0.15, key
========================  ==================  =========  ==========  =======  ============

Shared defaults: ``weight`` is required per model (mergekit has no default), ``density`` = 1
(no sparsification), ``lambda`` = 1, ``int8_mask`` = False (it only changes the storage
dtype of mergekit's mask: no numerical effect, so it is not an argument here). ``rescale:
true`` is the L1-norm rescale of mergekit 0.1.5 (see :mod:`swudi_jax.methods.sparsify`).
A base model is required; a base listed among the models is the base, not an expert.

dtypes: these functions compute in the task vectors' dtype, as mergekit computes in the
merge's ``dtype`` (or the inputs' promoted dtype): bf16/float16 inputs give bf16/float16
arithmetic with one rounding per PyTorch operation (each done in float32 and rounded, made
explicit with ``lax.reduce_precision`` because XLA may keep excess precision; sums
accumulate in float32 and round once). As mergekit's CPU path: magnitudes are ranked in
float32; a bf16 tensor's random keep probabilities (d, and DELLA's rank formula) are built
in bf16, a float16 tensor's in float32, and float16 random sparsifiers rescale in float32.
On tie-free inputs this is bit-exact against mergekit 0.1.5 (see
``benchmarks/mergekit_crosscheck``); where equal magnitudes straddle a cut, mergekit's
unstable torch sort picks arbitrarily and we keep the earlier entry.
:func:`linear` computes in float32 (float64 for float64 inputs) and casts back, as mergekit.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.methods import consensus as _consensus
from swudi_jax.methods import sparsify as _sparsify
from swudi_jax.maths.linalg import HIGHEST, compute_dtype, is_floating
from swudi_jax.maths.validation import is_concrete

SUM_EPS = 1e-8


# ----------------------------------------------------------------------------- the family


@partial(jax.jit, static_argnames=("consensus", "normalize"))
def _combine(delta, weight, lam, *, consensus, normalize):
    """Weights, consensus, normalisation, λ: in the work dtype, rounded per operation to delta's dtype."""
    rnd = _sparsify.rounder(delta.dtype)
    work = compute_dtype(delta.dtype)
    w = rnd(weight.astype(work))
    d = rnd(delta.astype(work) * w.reshape((-1,) + (1,) * (delta.ndim - 1)))
    if consensus is not None:
        merged, divisor = _consensus.disjoint_merge(d, w, consensus, rnd)
    else:
        merged = rnd(jnp.sum(d, axis=0))
        total = rnd(jnp.sum(w))
        divisor = jnp.where(jnp.abs(total) < SUM_EPS, 1, total)
    if normalize:
        merged = rnd(merged / divisor)
    return rnd(merged * jnp.asarray(lam, work)).astype(delta.dtype)


def generalized_task_arithmetic(
    tau: jax.Array,
    weight: Any,
    *,
    density: Any = 1.0,
    sparsification: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool | str | None = False,
    lam: Any = 1.0,
    gamma: Any = 0.0,
    epsilon: Any = 0.0,
    key: jax.Array | None = None,
    uniforms: Any = None,
    windows: Any = None,
) -> jax.Array:
    """mergekit's generalised task arithmetic of one tensor: the merged task vector M.

    Args:
      tau: task vectors τi = θi − θ0, (N, ...), in the compute dtype.
      weight: wi, scalar or (N,) (array values may be traced: per-tensor values under vmap).
      density, gamma, epsilon: the sparsifier's per-model parameters, scalar or (N,).
      sparsification: None or one of :data:`swudi_jax.methods.sparsify.SPARSIFIERS`.
      consensus: None, "sum" (TIES) or "count".
      normalize: divide by the (agreeing) weights' sum.
      rescale: True ("l1"), False, or a norm name (see :mod:`swudi_jax.methods.sparsify`).
      lam: λ, the final scale (a scalar, may be traced).
      key / uniforms: randomness of the random sparsifiers. windows: exact rank windows.
    Returns:
      M (...,) in ``tau``'s dtype; the merged weight is ``θ0 + M``.
    """
    if tau.ndim < 1 or tau.shape[0] < 1:
        raise ValueError(f"tau must stack at least one task vector on axis 0, got shape {tau.shape}")
    if not is_floating(tau.dtype):
        raise ValueError(f"tau must have a floating dtype, got {tau.dtype}")
    if consensus is not None and consensus not in _consensus.CONSENSUS:
        raise ValueError(f"consensus must be None or one of {list(_consensus.CONSENSUS)}, got {consensus!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be true or false, got {normalize!r}")
    n = tau.shape[0]
    weight = _sparsify.per_model(weight, n, "weight")
    if isinstance(weight, np.ndarray) and not np.all(np.isfinite(weight)):
        raise ValueError(f"weight must be finite, got {weight.tolist()}")
    if is_concrete(lam) and not np.isfinite(float(np.asarray(lam))):
        raise ValueError(f"lambda must be finite, got {lam!r}")
    if sparsification is not None:
        tau = _sparsify.sparsify(
            tau, sparsification, density, gamma=gamma, epsilon=epsilon, rescale=rescale,
            key=key, uniforms=uniforms, windows=windows,
        )
    return _combine(tau, jnp.asarray(weight, jnp.float32), lam, consensus=consensus, normalize=bool(normalize))


def task_arithmetic(tau, weight, *, normalize=False, lam=1.0):
    """mergekit ``task_arithmetic`` (Ilharco et al., arXiv 2212.04089): M = λ Σ wi τi [/ Σ wi]."""
    return generalized_task_arithmetic(tau, weight, normalize=normalize, lam=lam)


def ties(tau, weight, *, density=1.0, normalize=True, rescale=False, lam=1.0, windows=None):
    """mergekit ``ties`` (Yadav et al., arXiv 2306.01708): magnitude trim, sum election, disjoint mean."""
    return generalized_task_arithmetic(
        tau, weight, density=density, sparsification="magnitude", consensus="sum",
        normalize=normalize, rescale=rescale, lam=lam, windows=windows,
    )


def dare_ties(tau, weight, *, density=1.0, normalize=False, rescale=True, lam=1.0, key=None, uniforms=None):
    """mergekit ``dare_ties`` (Yu et al., arXiv 2311.03099): random drop, sum election."""
    return generalized_task_arithmetic(
        tau, weight, density=density, sparsification="random", consensus="sum",
        normalize=normalize, rescale=rescale, lam=lam, key=key, uniforms=uniforms,
    )


def dare_linear(tau, weight, *, density=1.0, normalize=False, rescale=True, lam=1.0, key=None, uniforms=None):
    """mergekit ``dare_linear``: random drop, then the weighted sum."""
    return generalized_task_arithmetic(
        tau, weight, density=density, sparsification="random", consensus=None,
        normalize=normalize, rescale=rescale, lam=lam, key=key, uniforms=uniforms,
    )


def breadcrumbs(tau, weight, *, density=1.0, gamma=0.01, normalize=False, rescale=False, lam=1.0, windows=None):
    """mergekit ``breadcrumbs`` (Davari & Belilovsky, arXiv 2312.06795): drop outliers and small entries."""
    return generalized_task_arithmetic(
        tau, weight, density=density, gamma=gamma, sparsification="magnitude_outliers",
        consensus=None, normalize=normalize, rescale=rescale, lam=lam, windows=windows,
    )


def breadcrumbs_ties(tau, weight, *, density=1.0, gamma=0.01, normalize=False, rescale=False, lam=1.0,
                     windows=None):
    """mergekit ``breadcrumbs_ties``: breadcrumbs' sparsifier with TIES's sum election."""
    return generalized_task_arithmetic(
        tau, weight, density=density, gamma=gamma, sparsification="magnitude_outliers",
        consensus="sum", normalize=normalize, rescale=rescale, lam=lam, windows=windows,
    )


def della(tau, weight, *, density=1.0, epsilon=0.15, normalize=True, rescale=True, lam=1.0, key=None,
          uniforms=None):
    """mergekit ``della`` (Deep et al., arXiv 2406.11617): MAGPRUNE drop, sum election."""
    return generalized_task_arithmetic(
        tau, weight, density=density, epsilon=epsilon, sparsification="della_magprune",
        consensus="sum", normalize=normalize, rescale=rescale, lam=lam, key=key, uniforms=uniforms,
    )


def della_linear(tau, weight, *, density=1.0, epsilon=0.15, normalize=False, rescale=True, lam=1.0, key=None,
                 uniforms=None):
    """mergekit ``della_linear``: MAGPRUNE drop, then the weighted sum."""
    return generalized_task_arithmetic(
        tau, weight, density=density, epsilon=epsilon, sparsification="della_magprune",
        consensus=None, normalize=normalize, rescale=rescale, lam=lam, key=key, uniforms=uniforms,
    )


# ----------------------------------------------------------------------------- others


@partial(jax.jit, static_argnames=("normalize",))
def _linear(models, weight, *, normalize):
    work = compute_dtype(models.dtype)
    w = weight.astype(work)
    out = jnp.tensordot(w, models.astype(work), axes=(0, 0), precision=HIGHEST)
    if normalize:
        out = out / jnp.sum(w)
    return out.astype(models.dtype)


def linear(models: jax.Array, weight: Any, *, normalize: bool = True) -> jax.Array:
    """mergekit ``linear`` (model soups, Wortsman et al., arXiv 2203.05482): Σ wi θi [/ Σ wi].

    Acts on the weights of every input model. mergekit adds a configured ``base_model`` to
    the inputs when it is not listed among the models, so it then takes part like any model
    (and needs a weight). Computed in float32 (float64 for
    float64 inputs), cast to the inputs' dtype. A zero weight sum with ``normalize`` is a
    ValueError when the weights are concrete (mergekit would divide by zero).

    Args:
      models: θi (N, ...). weight: wi, scalar or (N,), required. normalize: default True.
    """
    weight = _sparsify.per_model(weight, models.shape[0], "weight")
    if isinstance(weight, np.ndarray):
        if not np.all(np.isfinite(weight)):
            raise ValueError(f"weight must be finite, got {weight.tolist()}")
        if normalize and weight.sum() == 0:
            raise ValueError(f"linear with normalize: the weights sum to 0 ({weight.tolist()})")
    return _linear(models, jnp.asarray(weight, jnp.float32), normalize=bool(normalize))


@jax.jit
def _sce(tau, select_topk):
    rnd = _sparsify.rounder(tau.dtype)
    x = tau.astype(compute_dtype(tau.dtype))
    x = jnp.where(_sparsify.variance_topk_mask(x, select_topk, rnd)[None], x, 0)
    agree = _consensus.agreement_mask(x, "sum")
    energy = rnd(jnp.mean(rnd(jnp.square(x)).reshape(x.shape[0], -1), axis=1))
    total = rnd(jnp.sum(energy))
    w = jnp.where(jnp.abs(total) < 1e-6, 1.0 / x.shape[0], rnd(energy / total))
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    erased = jnp.where(agree, w, 0)
    merged = rnd(jnp.sum(rnd(x * erased), axis=0))
    return rnd(merged / jnp.maximum(rnd(jnp.sum(erased, axis=0)), 1e-6)).astype(tau.dtype)


def sce(tau: jax.Array, *, select_topk: Any = 1.0) -> jax.Array:
    """mergekit ``sce`` (Wan et al., FuseChat, arXiv 2408.07990): select, calculate, erase.

    Select: keep the ⌊select_topk · #{var ≠ 0}⌋ entries of largest variance across models
    (one mask for all). Calculate: wi = mean(τ̂i²) / Σj mean(τ̂j²) (1/N each when that sum is
    < 1e-6 — an absolute threshold, reached by small deltas). Erase: TIES sum election on τ̂.
    M = Σi wi mi τ̂i / max(Σi wi mi, 1e-6). No per-model weight, no λ; base required.

    Args:
      tau: τi (N, ...) in the compute dtype. select_topk: in [0, 1], default 1 (keep all).
    Returns:
      M (...,); the merged weight is θ0 + M.
    """
    if is_concrete(select_topk) and not 0 <= float(np.asarray(select_topk)) <= 1:
        raise ValueError(f"select_topk must lie in [0, 1], got {select_topk!r}")
    return _sce(tau, jnp.asarray(select_topk, jnp.float32))


def passthrough(model: jax.Array, scale: Any = None) -> jax.Array:
    """mergekit ``passthrough``: the one input tensor, times ``scale`` if given (no maths)."""
    if scale is None:
        return model
    return (model * jnp.asarray(scale, model.dtype)).astype(model.dtype)


# ----------------------------------------------------------------------------- the table

METHODS: dict[str, dict[str, Any]] = {
    "linear": dict(fn=linear, inputs="weights (base_model joins them)", base="an input",
                   params={"weight": ("per-model", "required"), "normalize": ("global", True)}),
    "task_arithmetic": dict(fn=task_arithmetic, inputs="task_vectors", base="required",
                            params={"weight": ("per-model", "required"), "normalize": ("global", False),
                                    "lambda": ("global", 1.0)}),
    "ties": dict(fn=ties, inputs="task_vectors", base="required",
                 params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                         "normalize": ("global", True), "rescale": ("global", False), "lambda": ("global", 1.0),
                         "int8_mask": ("global", False)}),
    "dare_ties": dict(fn=dare_ties, inputs="task_vectors", base="required", random=True,
                      params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                              "normalize": ("global", False), "rescale": ("global", True),
                              "lambda": ("global", 1.0), "int8_mask": ("global", False)}),
    "dare_linear": dict(fn=dare_linear, inputs="task_vectors", base="required", random=True,
                        params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                                "normalize": ("global", False), "rescale": ("global", True),
                                "lambda": ("global", 1.0), "int8_mask": ("global", False)}),
    "breadcrumbs": dict(fn=breadcrumbs, inputs="task_vectors", base="required",
                        params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                                "gamma": ("per-model", 0.01), "normalize": ("global", False),
                                "rescale": ("global", False), "lambda": ("global", 1.0),
                                "int8_mask": ("global", False)}),
    "breadcrumbs_ties": dict(fn=breadcrumbs_ties, inputs="task_vectors", base="required",
                             params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                                     "gamma": ("per-model", 0.01), "normalize": ("global", False),
                                     "rescale": ("global", False), "lambda": ("global", 1.0),
                                     "int8_mask": ("global", False)}),
    "della": dict(fn=della, inputs="task_vectors", base="required", random=True,
                  params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                          "epsilon": ("per-model", 0.15), "normalize": ("global", True),
                          "rescale": ("global", True), "lambda": ("global", 1.0), "int8_mask": ("global", False)}),
    "della_linear": dict(fn=della_linear, inputs="task_vectors", base="required", random=True,
                         params={"weight": ("per-model", "required"), "density": ("per-model", 1.0),
                                 "epsilon": ("per-model", 0.15), "normalize": ("global", False),
                                 "rescale": ("global", True), "lambda": ("global", 1.0),
                                 "int8_mask": ("global", False)}),
    "sce": dict(fn=sce, inputs="task_vectors", base="required",
                params={"select_topk": ("global", 1.0), "int8_mask": ("global", False)}),
    "passthrough": dict(fn=passthrough, inputs="one model", base="ignored",
                        params={"scale": ("per-model", None)}),
}
"""mergekit's parameters per method: name → (scope, default); "required" has no default.
"inputs" says what the function takes: task vectors τi = θi − θ0 (add θ0 to its result),
the models' weights θi, or one model's tensor. The interpolation methods are in
:mod:`swudi_jax.methods.interpolation`."""


__all__ = [
    "METHODS",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "generalized_task_arithmetic",
    "linear",
    "passthrough",
    "sce",
    "task_arithmetic",
    "ties",
]
