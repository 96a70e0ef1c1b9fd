"""mergekit's interpolation methods by mergekit's names and semantics (layer level, in JAX).

slerp, nuslerp, multislerp, karcher, model_stock, nearswap, as mergekit 0.1.5 computes them
(``merge_methods/{slerp,nuslerp,multislerp,karcher,model_stock,nearswap}.py``; read, not
copied), each from its published definition:

- slerp (Shoemake 1985): θ = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1, cos Ω = ⟨v0/‖v0‖,
  v1/‖v1‖⟩ over the whole flattened tensor, v0 the base (t = 0); linear interpolation when
  |cos Ω| > 0.9995; norms ≤ 1e-8 count as 1.
- nuslerp: slerp of the two task vectors (with a base) or weights (without) at
  t = w1/(w0 + w1) (0.5 when |w0 + w1| < 1e-6), of the whole flattened tensor
  (``flatten``, default) or per vector along the last axis (axis 0 with ``row_wise``);
  vectors with 1 − cos² ≤ 1e-16 are interpolated linearly.
- multislerp (Goddard 2024): barycentric interpolation on the sphere: ui = xi/(‖xi‖ + 1e-8),
  μ = normalise(Σ wi ui), tangent T = Σ wi (ui − ⟨ui, μ⟩μ), result
  (cos‖T‖ μ + sin‖T‖ T/‖T‖)·Σ wi ‖xi‖ (‖T‖ taken + 1e-8), xi task vectors with a base.
- karcher (Karcher mean on the sphere, arXiv 2603.04972 per mergekit): the weighted
  Riemannian mean of the unit directions by fixed-point iteration (≤ max_iter steps, stop
  when the tangent norm < tol), times Σ αi ‖θi‖; αi = 1/N over all inputs (a configured
  base_model is one of them: mergekit adds it to the inputs). No task vectors.
- model_stock (Jang et al., arXiv 2403.19522): t = N cos θ / (1 + (N − 1) cos θ), cos θ the
  mean pairwise cosine of the experts' task vectors (whole tensor, or per row along the last
  axis with ``filter_wise``), θ = t·mean(θi) + (1 − t)·θ0; t = 0 where the denominator is < 1e-6.
- nearswap: w = clip(t / max(|θ0 − θ1|, 1e-6), 0, 1), θ = w θ1 + (1 − w) θ0.

Layout: ``row_wise`` and ``filter_wise`` refer to the tensor as stored by PyTorch/HF
(out, in) — the project's maths layout; transpose a Flax kernel first.

dtypes: each method computes as mergekit's PyTorch code does in the inputs' dtype: in
float32 (float64 for float64 inputs), every operation's result rounded to bf16/float16 when
the inputs are (:func:`~swudi_jax.methods.sparsify.rounder`), with PyTorch's rules for a
scalar operand (a Python number on the right of ``*``/``/`` stays float32, one added or
compared is rounded first; ``t / x`` is ``reciprocal(x)·t``; a float32 0-dim tensor on the
left of ``*`` is rounded first) and true division (:func:`~swudi_jax.maths.linalg.divide`).
slerp works in float32 and rounds once, as mergekit's; karcher's norms are float32. On the
cross-check cases every bf16/float16 entry equals mergekit 0.1.5's
(``benchmarks/mergekit_crosscheck``). With float32 inputs (``dtype: float32``) nothing is
rounded: the more precise result.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import HIGHEST, compute_dtype, divide
from swudi_jax.methods.sparsify import rounder
from swudi_jax.maths.validation import is_concrete


def _norm(x: jax.Array, axis=-1, keepdims=False) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims))


def _scalar(value: Any, name: str) -> jax.Array:
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value, np.float64))):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return jnp.asarray(value, jnp.float32)


def _check_pair(v0: jax.Array, v1: jax.Array, names=("v0", "v1")) -> None:
    if tuple(v0.shape) != tuple(v1.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")


# ----------------------------------------------------------------------------- slerp


@partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def _slerp(v0, v1, t, *, dot_threshold, eps):
    work = compute_dtype(v0.dtype)
    a, b = v0.reshape(-1).astype(work), v1.reshape(-1).astype(work)
    t = t.astype(work)
    na, nb = _norm(a), _norm(b)
    na, nb = jnp.where(na > eps, na, 1), jnp.where(nb > eps, nb, 1)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0, dot))
    s = jnp.where(lin, 1, jnp.sin(theta))
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / s)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / s)
    return (ca * a + cb * b).reshape(v0.shape).astype(v0.dtype)


def slerp(v0: jax.Array, v1: jax.Array, t: Any, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> jax.Array:
    """mergekit ``slerp`` of one tensor: v0 is the base model's (t = 0), v1 the other's.

    Args:
      v0, v1: weights of one shape. t: the interpolation factor (scalar; may be traced, so a
        per-layer t vmaps with the layers).
    Returns:
      The interpolated weights, in v0's dtype.
    """
    _check_pair(v0, v1)
    return _slerp(v0, v1, _scalar(t, "t"), dot_threshold=float(dot_threshold), eps=float(eps))


# ----------------------------------------------------------------------------- nuslerp


def nuslerp_t(weight: Any) -> jax.Array | np.ndarray:
    """nuslerp's t = w2 / (w1 + w2) (0.5 when |w1 + w2| < 1e-6): in float64 on the host, as
    mergekit computes it in Python, when the weights are concrete; else in float32."""
    if is_concrete(weight):
        w = np.broadcast_to(np.asarray(weight, np.float64), (2,))
        total = w[0] + w[1]
        return np.float32(0.5 if abs(total) < 1e-6 else w[1] / total)
    w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (2,))
    total = w[0] + w[1]
    return jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(jnp.abs(total) < 1e-6, 1, total))


@partial(jax.jit, static_argnames=("row_wise", "flatten", "eps"))
def _nuslerp(models, t, base, *, row_wise, flatten, eps):
    r, work = rounder(models.dtype), compute_dtype(models.dtype)
    x = models.astype(work)
    if base is not None:
        x = r(x - base.astype(work)[None])
    t = t.astype(work)
    shape = x.shape[1:]
    if flatten:
        x = x.reshape(2, -1)
    elif row_wise:
        x = jnp.swapaxes(x, 1, -1)
    v0, v1 = x[0], x[1]
    u0 = r(divide(v0, r(jnp.maximum(r(_norm(v0, keepdims=True)), 1e-7))))
    u1 = r(divide(v1, r(jnp.maximum(r(_norm(v1, keepdims=True)), 1e-7))))
    cos = jnp.clip(r(jnp.sum(r(u0 * u1), axis=-1, keepdims=True)), -1, 1)
    colinear = r(1 - r(jnp.square(cos))) <= eps**2
    theta = r(jnp.arccos(jnp.where(colinear, 0, cos)))
    s = r(jnp.sin(theta))
    out = r(divide(r(r(r(jnp.sin(r((1 - t) * theta))) * v0) + r(r(jnp.sin(r(t * theta))) * v1)), jnp.where(colinear, 1, s)))
    out = jnp.where(colinear, r(r((1 - t) * v0) + r(t * v1)), out)
    if not flatten and row_wise:
        out = jnp.swapaxes(out, 0, -1)
    out = out.reshape(shape)
    if base is not None:
        out = r(out + base.astype(work))
    return out.astype(models.dtype)


def nuslerp(models: jax.Array, weight: Any, base: jax.Array | None = None, *, row_wise: bool = False,
            flatten: bool = True, eps: float = 1e-8, t: Any = None) -> jax.Array:
    """mergekit ``nuslerp`` of one tensor (exactly two non-base models).

    Args:
      models: θ1, θ2 stacked (2, ...). weight: (2,) per-model weights (required; t = w2/(w1+w2)).
      t: the interpolation factor, when already computed from the weights (:func:`nuslerp_t`).
      base: θ0 (...) or None; with a base the task vectors are interpolated and θ0 added.
      row_wise: interpolate vectors along axis 0 instead of the last axis (``flatten=False``).
      flatten: interpolate the whole flattened tensor (mergekit's default).
    """
    if models.ndim < 1 or models.shape[0] != 2:
        raise ValueError(f"nuslerp takes exactly 2 models stacked on axis 0, got shape {tuple(models.shape)}")
    if base is not None:
        _check_pair(models[0], base, ("each model", "base"))
    t = nuslerp_t(weight) if t is None else t
    return _nuslerp(models, jnp.asarray(t, jnp.float32), base, row_wise=bool(row_wise),
                    flatten=bool(flatten), eps=float(eps))


# ----------------------------------------------------------------------------- multislerp


@partial(jax.jit, static_argnames=("normalize_weights", "eps"))
def _multislerp(models, weight, base, *, normalize_weights, eps):
    r, work = rounder(models.dtype), compute_dtype(models.dtype)
    n = models.shape[0]
    x = models.astype(work)
    if base is not None:
        x = r(x - base.astype(work)[None])
    flat = x.reshape(n, -1)
    w = r(weight.astype(work))
    if normalize_weights:
        w = r(divide(w, r(jnp.sum(w))))
    eps_r = r(jnp.asarray(eps, work))  # PyTorch adds a Python scalar in the tensor's dtype
    norms = r(_norm(flat, keepdims=True))
    units = r(divide(flat, r(norms + eps_r)))
    mean = r(jnp.sum(r(units * w[:, None]), axis=0))
    mean_norm = r(_norm(mean))
    degenerate = mean_norm < eps_r
    mean = r(divide(mean, jnp.where(degenerate, 1, mean_norm)))
    dots = r(jnp.sum(r(units * mean), axis=-1, keepdims=True))
    tangent = r(units - r(dots * mean))
    t = r(jnp.sum(r(tangent * w[:, None]), axis=0))
    tn = r(r(_norm(t)) + eps_r)
    out = r(r(mean * r(jnp.cos(tn))) + r(t * r(r(jnp.sin(tn)) / tn)))
    out = r(out * r(jnp.sum(r(norms[:, 0] * w))))
    fallback = r(r(flat[0] * w[0]) + r(flat[1] * w[1])) if n == 2 else jnp.full_like(out, jnp.nan)
    out = jnp.where(degenerate, fallback, out).reshape(models.shape[1:])
    if base is not None:
        out = r(out + base.astype(work))
    return out.astype(models.dtype)


def multislerp(models: jax.Array, weight: Any, base: jax.Array | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8) -> jax.Array:
    """mergekit ``multislerp`` of one tensor (N ≥ 1 non-base models).

    One model returns its own weights. When Σ wi ui vanishes (antipodal inputs balanced by
    their weights) two models fall back to the linear combination; with more models mergekit
    raises, and this returns NaN (a ValueError when called on concrete arrays).

    Args:
      models: θi (N, ...). weight: (N,) per-model weights (required). base: θ0 or None.
      normalize_weights: divide the weights by their sum (default True).
    """
    if models.ndim < 1 or models.shape[0] < 1:
        raise ValueError(f"multislerp takes models stacked on axis 0, got shape {tuple(models.shape)}")
    if models.shape[0] == 1:
        return models[0]
    if base is not None:
        _check_pair(models[0], base, ("each model", "base"))
    weight = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), (models.shape[0],))
    out = _multislerp(models, weight, base, normalize_weights=bool(normalize_weights), eps=float(eps))
    if is_concrete(out) and models.shape[0] > 2 and bool(jnp.any(jnp.isnan(out))):
        raise ValueError("multislerp: the weighted sum of the unit task vectors is zero (antipodal inputs "
                         "balanced by their weights); use different weights")
    return out


# ----------------------------------------------------------------------------- karcher


def _karcher_step(units, na, valid, tol, r, work):
    """One fixed-point step's new mean (or None to stop) as mergekit takes it: per model in
    order, the tangent term α·θ/sin θ·(u − ⟨μ, u⟩μ) added in the merge dtype (skipped when
    θ < tol); the norms, and the exponential map's scalars, in float32."""

    def step(_, carry):
        mean, done = carry
        tangent = jnp.zeros_like(mean)
        for i in range(units.shape[0]):
            dot = jnp.clip(r(jnp.dot(mean, units[i], precision=HIGHEST)), -1.0, 1.0)
            theta = r(jnp.arccos(dot))
            coef = r(na[i] * r(theta / jnp.where(theta == 0, 1, r(jnp.sin(theta)))))
            term = r(coef * r(units[i] - r(dot * mean)))
            tangent = jnp.where(valid[i] & (theta >= tol), r(tangent + term), tangent)
        tn = _norm(tangent)
        stop = done | (tn < tol)
        # a float32 0-dim tensor on the left of PyTorch's multiply is cast to the other's dtype first
        new = r(r(r(jnp.cos(tn)) * mean) + r(r(jnp.sin(tn)) * r(divide(tangent, jnp.where(tn < tol, 1, tn)))))
        un = _norm(new)
        new = jnp.where(un > tol, r(divide(new, jnp.where(un > tol, un, 1))), new)
        return jnp.where(stop, mean, new), stop

    return step


@partial(jax.jit, static_argnames=("max_iter", "tol"))
def _karcher(models, alphas, *, max_iter, tol):
    r, work = rounder(models.dtype), compute_dtype(models.dtype)
    n = models.shape[0]
    flat = models.reshape(n, -1).astype(work)
    a = alphas.astype(work)
    norms = _norm(flat, axis=-1)
    units = r(divide(flat, jnp.where(norms == 0, 1, norms)[:, None]))
    valid = norms > tol
    va = jnp.where(valid, a, 0)
    na = va / jnp.where(jnp.sum(va) == 0, 1, jnp.sum(va))
    mean = jnp.zeros_like(units[0])
    for i in range(n):
        mean = jnp.where(valid[i], r(mean + r(na[i] * units[i])), mean)
    mean_norm = _norm(mean)
    first = units[jnp.argmax(valid)]
    mean = jnp.where(mean_norm < tol, first, r(divide(mean, jnp.where(mean_norm < tol, 1, mean_norm))))
    mean, _ = jax.lax.fori_loop(0, max_iter, _karcher_step(units, na, valid, tol, r, work),
                                (mean, jnp.asarray(False)))
    scale = jnp.zeros((), work)
    for i in range(n):
        scale = scale + a[i] * norms[i]
    out = r(r(scale) * mean)
    out = jnp.where(jnp.any(valid), out, jnp.zeros_like(out))
    return out.reshape(models.shape[1:]).astype(models.dtype)


def karcher(models: jax.Array, weight: Any = None, *, max_iter: int = 10, tol: float = 1e-5) -> jax.Array:
    """mergekit ``karcher`` of one tensor: the weighted Karcher mean of all inputs' directions.

    Inputs whose norm is ≤ tol are left out of the direction (their α still counts in the
    norm factor Σ αi‖θi‖); all of them ≤ tol gives zeros.

    Args:
      models: θi (N, ...) — every input model: mergekit adds a configured ``base_model``
        to the inputs when the models do not list it, and karcher then averages it too.
      weight: αi (N,); None is mergekit's 1/N each (mergekit offers no per-model weight).
      max_iter, tol: mergekit's defaults 10 and 1e-5.
    """
    if models.ndim < 1 or models.shape[0] < 1:
        raise ValueError(f"karcher takes models stacked on axis 0, got shape {tuple(models.shape)}")
    n = models.shape[0]
    if n == 1:
        return models[0]
    alphas = jnp.full((n,), 1.0 / n, jnp.float32) if weight is None else jnp.broadcast_to(
        jnp.asarray(weight, jnp.float32), (n,))
    if not isinstance(max_iter, (int, np.integer)) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    return _karcher(models, alphas, max_iter=int(max_iter), tol=float(tol))


# ----------------------------------------------------------------------------- model stock


@partial(jax.jit, static_argnames=("filter_wise",))
def _model_stock(base, models, *, filter_wise):
    r, work = rounder(models.dtype), compute_dtype(models.dtype)
    n = models.shape[0]
    w0, ws = base.astype(work), models.astype(work)
    if filter_wise:
        if w0.ndim == 1:
            w0, ws = w0[None], ws[:, None]
    else:
        w0, ws = w0.reshape(-1), ws.reshape(n, -1)
    x = r(ws - w0[None])                                   # (N, ..., C)
    norms = r(_norm(x))                                    # (N, ...)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = r(jnp.maximum(r(norms[i] * norms[j]), 1e-6))
            cos.append(jnp.clip(r(divide(r(jnp.sum(r(x[i] * x[j]), axis=-1)), prod)), -1, 1))
    cos_theta = r(jnp.mean(jnp.stack(cos), axis=0))[..., None]
    den = r(1 + r((n - 1) * cos_theta))
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0, r(divide(r(n * cos_theta), jnp.where(singular, 1, den))))
    total = ws[0]
    for i in range(1, n):
        total = r(total + ws[i])
    out = r(r(t * r(divide(total, jnp.asarray(n, work)))) + r(r(1 - t) * w0))
    return out.reshape(base.shape).astype(models.dtype)


def model_stock(base: jax.Array, models: jax.Array, *, filter_wise: bool = False) -> jax.Array:
    """mergekit ``model_stock`` of one tensor (base required, ≥ 2 experts).

    Args:
      base: θ0 (...). models: the experts θi (N, ...), N ≥ 2.
      filter_wise: one t per vector along the last axis (per output row of an (out, in)
        weight) instead of one per tensor.
    """
    if models.ndim < 1 or models.shape[0] < 2:
        raise ValueError(f"model_stock needs at least 2 experts besides the base, got shape {tuple(models.shape)}")
    _check_pair(models[0], base, ("each model", "base"))
    return _model_stock(base, models, filter_wise=bool(filter_wise))


# ----------------------------------------------------------------------------- nearswap


@jax.jit
def _nearswap(v0, v1, t):
    r, work = rounder(v0.dtype), compute_dtype(v0.dtype)
    a, b = v0.astype(work), v1.astype(work)
    # PyTorch's t / tensor is reciprocal(tensor) · t
    w = jnp.clip(r(r(1 / r(jnp.maximum(jnp.abs(r(a - b)), 1e-6))) * t.astype(work)), 0, 1)
    return r(r(w * b) + r(r(1 - w) * a)).astype(v0.dtype)


def nearswap(v0: jax.Array, v1: jax.Array, t: Any) -> jax.Array:
    """mergekit ``nearswap``: take the other model's value where it is within t of the base's.

    Args:
      v0: the base model's weights. v1: the other model's. t: the similarity threshold
        (required; scalar, may be traced).
    """
    _check_pair(v0, v1)
    return _nearswap(v0, v1, _scalar(t, "t"))


__all__ = ["karcher", "model_stock", "multislerp", "nearswap", "nuslerp", "nuslerp_t", "slerp"]
