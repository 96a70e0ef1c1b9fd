"""mergekit's selection-based methods: ``ram``, ``ramplus_tl``, ``arcee_fusion`` (layer level, JAX).

As mergekit 0.1.5 computes them (``merge_methods/ram.py``, ``arcee_fusion.py``; read, not
copied):

- ram (Reinforced Agent Merging, arXiv 2601.13572): an entry of τi counts when |τi| > ε
  (default 1e-5); with c = #{i : |τi| > ε} per entry, entries touched by one model keep
  that model's value and shared ones are averaged over the models that touch them:
  M = Σi [|τi| > ε] τi (1[c = 1] + 1[c > 1]/c).
- ramplus_tl (RAM+, tensor-local): model i's unique entries are scaled by
  λi = 1 + r·clip(ρi, 0, α), ρi = #(its shared entries) / max(#(its unique entries), ε);
  defaults r = 0.1, α = 0.2, ε = 1e-5.
- arcee_fusion (two models, base required): importance = |θ1 − θ0| · KL(p‖q) with
  p = softmax(θ1) + 1e-8, q = softmax(θ0) + 1e-8 along the last axis (one KL per row);
  threshold = median + 1.5·(Q3 − Q1) of the importances, each quantile the sorted value at
  index ⌊q·(n − 1)⌋; θ = θ0 + (θ1 − θ0)·[importance ≥ threshold]. mergekit estimates the
  quantiles from 1,000,000 entries drawn with replacement when a tensor is larger; here a
  PRNG key draws them (mergekit's torch draws cannot be reproduced), and tensors up to that
  size are exact.

dtypes: computed in float32 (float64 for float64 inputs), each PyTorch operation's result
rounded to the inputs' bf16/float16 as mergekit's code rounds it: RAM's shared-entry average
and sum; RAM+'s float32 λ promotes its sum to float32, so θ0 + M is rounded once (mergekit
returns float32 there); arcee_fusion's softmax, KL, importance and threshold in the merge
dtype, and θ0 + (θ1 − θ0)·mask rounded once (mergekit's mask is float32).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.maths.linalg import compute_dtype, divide
from swudi_jax.methods.sparsify import from_host, host_bytes, rounder, to_host

QUANTILE_SAMPLE_SIZE = 1_000_000


@partial(jax.jit, static_argnames=("plus",))
def _ram(tau, base, epsilon, r, alpha, *, plus):
    work = compute_dtype(tau.dtype)
    rnd = rounder(tau.dtype)
    n = tau.shape[0]
    x = tau.reshape(n, -1).astype(work)
    touched = jnp.abs(x) > rnd(epsilon.astype(work))  # PyTorch compares with the scalar in the tensor's dtype
    count = jnp.sum(touched, axis=0)
    unique, shared = count == 1, count > 1
    x = jnp.where(touched, x, 0)
    scale = jnp.ones((n, 1), work)
    if plus:
        n_shared = jnp.sum(touched & shared, axis=1).astype(jnp.float32)
        n_unique = jnp.sum(touched & unique, axis=1).astype(jnp.float32)
        rho = divide(n_shared, jnp.maximum(n_unique, epsilon))
        scale = (1 + r * jnp.clip(rho, 0, alpha))[:, None].astype(work)
    # the shared entries' division happens in the merge dtype in mergekit (bf16: rounded);
    # plain RAM's sum too, while RAM+'s float32 λ promotes the rest to float32
    parts = jnp.where(unique, x * scale, 0) + jnp.where(shared, rnd(x / jnp.maximum(count, 1)), 0)
    merged = jnp.sum(parts, axis=0)
    merged = merged if plus else rnd(merged)
    merged = merged.reshape(tau.shape[1:])
    if base is not None:  # RAM+ in mergekit: θ0 + M in float32, rounded once when saved
        return (base.astype(work) + merged).astype(base.dtype)
    return merged.astype(tau.dtype)


def ram(tau: jax.Array, *, epsilon: Any = 1e-5) -> jax.Array:
    """mergekit ``ram`` of one tensor: the merged task vector M (the weight is θ0 + M).

    Args:
      tau: task vectors (N, ...). epsilon: the "touched" threshold on |τi| (default 1e-5).
    """
    return _ram(tau, None, jnp.asarray(epsilon, jnp.float32), jnp.float32(0), jnp.float32(0), plus=False)


def ramplus_tl(tau: jax.Array, *, r: Any = 0.1, alpha: Any = 0.2, epsilon: Any = 1e-5,
               base: jax.Array | None = None) -> jax.Array:
    """mergekit ``ramplus_tl`` of one tensor: RAM with each model's unique entries scaled by λi.

    Returns M, or with ``base`` the merged weights θ0 + M: mergekit's float32 λ promotes M to
    float32, so θ0 + M is rounded once to θ0's dtype (M alone would be rounded twice)."""
    return _ram(tau, base, jnp.asarray(epsilon, jnp.float32), jnp.asarray(r, jnp.float32),
                jnp.asarray(alpha, jnp.float32), plus=True)


@jax.jit
def _importance(base, other):
    """|θ1 − θ0|·KL(p‖q) per row, each PyTorch operation rounded to the inputs' dtype."""
    r, work = rounder(base.dtype), compute_dtype(base.dtype)
    b, o = base.astype(work), other.astype(work)
    eps = r(jnp.asarray(1e-8, work))  # PyTorch adds a Python scalar in the tensor's dtype

    def softmax(v):
        e = jnp.exp(v - jnp.max(v, axis=-1, keepdims=True))
        return r(divide(e, jnp.sum(e, axis=-1, keepdims=True)))

    p, q = r(softmax(o) + eps), r(softmax(b) + eps)
    kl = r(jnp.sum(r(p * r(jnp.log(r(p / q)))), axis=-1, keepdims=True))
    return r(jnp.abs(r(o - b)) * kl)


def _host_sorted_at(data, *, positions: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    values = from_host(data, dtype)
    flat = values.reshape(-1, values.shape[-1])
    out = np.stack([np.partition(row, positions)[list(positions)] for row in flat])
    return host_bytes(out.reshape(values.shape[:-1] + (len(positions),)))


def _sorted_at(values: jax.Array, positions: tuple[int, ...]) -> jax.Array:
    """``jnp.sort(values)[positions]`` (1-D ``values``; NaN last, as the sort puts it) by a host
    selection (NumPy's ``partition``, linear time): XLA's CPU sort of 10⁶ importances took 0.28 s,
    this 0.016 s."""
    result = jax.eval_shape(to_host, jax.ShapeDtypeStruct((len(positions),), values.dtype))
    data = jax.pure_callback(partial(_host_sorted_at, positions=tuple(positions), dtype=np.dtype(values.dtype)),
                             result, to_host(values), vmap_method="expand_dims")
    return jax.lax.bitcast_convert_type(data, values.dtype)  # bytes both ways (sparsify.to_host)


@jax.jit
def _fuse(base, other, importance, sample):
    r = rounder(base.dtype)
    last = sample.shape[0] - 1
    q1, med, q3 = _sorted_at(sample, (int(0.25 * last), int(0.5 * last), int(0.75 * last)))
    threshold = r(med + r(1.5 * r(q3 - q1)))
    work = importance.dtype
    b, o = base.astype(work), other.astype(work)
    # mergekit's mask is float32: θ0 + (θ1 − θ0)·mask is float32, rounded once when saved
    return (b + r(o - b) * (importance >= threshold)).astype(base.dtype)


def arcee_fusion(base: jax.Array, other: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """mergekit ``arcee_fusion`` of one tensor: θ0 plus θ1's most important changes.

    Args:
      base: θ0. other: θ1, the one other model (same shape).
      key: PRNG key for the quantile sample of tensors above 1,000,000 entries (required
        only for those).
    """
    if tuple(base.shape) != tuple(other.shape):
        raise ValueError(f"base and other must have one shape, got {tuple(base.shape)} and {tuple(other.shape)}")
    importance = _importance(base, other)
    flat = importance.reshape(-1)
    if flat.shape[0] > QUANTILE_SAMPLE_SIZE:
        if key is None:
            raise ValueError(f"arcee_fusion samples {QUANTILE_SAMPLE_SIZE} importances of a tensor this size "
                             f"({flat.shape[0]} entries): give a PRNG key")
        flat = flat[jax.random.randint(key, (QUANTILE_SAMPLE_SIZE,), 0, flat.shape[0])]
    return _fuse(base, other, importance, flat)


__all__ = ["arcee_fusion", "ram", "ramplus_tl"]
