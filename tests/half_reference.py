"""mergekit's interpolation methods in bfloat16 as PyTorch computes them, in plain NumPy.

With ``dtype: bfloat16`` mergekit runs nuslerp, multislerp, karcher, model_stock and
nearswap on bf16 tensors, so each PyTorch operation's result is rounded to bf16. The rules
transcribed here (each checked against PyTorch 2.x on the CPU):

- an operation on bf16 tensors computes in float32 and rounds its result (``r``); sums and
  norms accumulate in float32 and round once;
- a Python number on the right of ``*`` or ``/`` (or on the left of ``*``) stays a float32
  number; one added or subtracted, or compared, is first rounded to bf16;
- ``number / tensor`` is ``reciprocal(tensor) * number``;
- a float32 0-dim tensor on the right of ``*`` or ``/`` stays float32; on the left of ``*``
  it is first rounded to bf16 (karcher's ``cos(|T|) * mean``).

Values are float64 arrays holding bf16 numbers. Independent of swudi_jax.
"""

from __future__ import annotations

import math

import numpy as np
from mergekit_reference import bf16_round


def r(x):
    """float64 → the float32 result → rounded to bf16."""
    return bf16_round(np.asarray(x, np.float64).astype(np.float32))


def norm(x, axis=None, keepdims=False):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


def _slerp_rows(t, v0, v1, eps=1e-8):
    u0 = r(v0 / r(np.maximum(r(norm(v0, -1, True)), 1e-7)))
    u1 = r(v1 / r(np.maximum(r(norm(v1, -1, True)), 1e-7)))
    cos = np.clip(r(np.sum(r(u0 * u1), axis=-1, keepdims=True)), -1, 1)
    colinear = r(1 - r(cos * cos)) <= eps ** 2
    theta = r(np.arccos(np.where(colinear, 0, cos)))
    s = r(np.sin(theta))
    t32 = float(np.float32(t))
    curved = r(r(r(r(np.sin(r(float(np.float32(1 - t)) * theta))) * v0) + r(r(np.sin(r(t32 * theta))) * v1)) / s)
    straight = r(r(float(np.float32(1 - t)) * v0) + r(t32 * v1))
    return np.where(colinear, straight, curved)


def nuslerp(models, weights, base=None, row_wise=False, flatten=True):
    x0, x1 = (np.asarray(m, np.float64) for m in models)
    if base is not None:
        x0, x1 = r(x0 - base), r(x1 - base)
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if flatten:
        out = _slerp_rows(t, x0.ravel(), x1.ravel()).reshape(x0.shape)
    elif row_wise:
        out = _slerp_rows(t, x0.T, x1.T).T
    else:
        out = _slerp_rows(t, x0, x1)
    return r(out + base) if base is not None else out


def multislerp(models, weights, base=None, eps=1e-8):
    x = np.stack([np.asarray(m, np.float64) for m in models])
    if base is not None:
        x = r(x - base)
    flat = x.reshape(len(x), -1)
    w = r(np.asarray(weights, np.float64))
    w = r(w / r(np.sum(w)))
    e = r(eps)
    norms = r(norm(flat, -1, True))
    units = r(flat / r(norms + e))
    mean = r(np.sum(r(units * w[:, None]), axis=0))
    mean = r(mean / r(norm(mean)))
    dots = r(np.sum(r(units * mean), axis=-1, keepdims=True))
    tangent = r(np.sum(r(r(units - r(dots * mean)) * w[:, None]), axis=0))
    length = r(r(norm(tangent)) + e)
    out = r(r(mean * r(np.cos(length))) + r(tangent * r(r(np.sin(length)) / length)))
    out = r(out * r(np.sum(r(norms[:, 0] * w)))).reshape(x.shape[1:])
    return r(out + base) if base is not None else out


def karcher(models, max_iter=10, tol=1e-5):
    xs = [np.asarray(m, np.float64).ravel() for m in models]
    n = len(xs)
    norms = [float(np.float32(norm(x))) for x in xs]          # float32 norms
    units = [r(x / nm) for x, nm in zip(xs, norms)]
    live = [i for i in range(n) if norms[i] > tol]
    share = 1.0 / len(live)
    mean = np.zeros_like(units[0])
    for i in live:
        mean = r(mean + r(float(np.float32(share)) * units[i]))
    mn = float(np.float32(norm(mean)))
    mean = units[live[0]].copy() if mn < tol else r(mean / mn)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in live:
            dot = float(np.clip(r(np.dot(mean, units[i])), -1, 1))
            theta = float(r(math.acos(dot)))
            if theta < tol:
                continue
            coef = r(float(np.float32(share)) * r(theta / float(r(math.sin(theta)))))
            tangent = r(tangent + r(coef * r(units[i] - r(dot * mean))))
        length = float(np.float32(norm(tangent)))
        if length < tol:
            break
        mean = r(r(r(math.cos(length)) * mean) + r(r(math.sin(length)) * r(tangent / length)))
        un = float(np.float32(norm(mean)))
        mean = r(mean / un) if un > tol else mean
    scale = sum(np.float32(np.float32(1.0 / n) * np.float32(nm)) for nm in norms)
    return r(r(float(scale)) * mean).reshape(np.shape(models[0]))


def model_stock(base, models):
    base = np.asarray(base, np.float64).ravel()
    ws = [np.asarray(m, np.float64).ravel() for m in models]
    n = len(ws)
    off = [r(w - base) for w in ws]
    nrm = [r(norm(o)) for o in off]
    cos = [np.clip(r(r(np.sum(r(off[a] * off[b]))) / r(max(r(nrm[a] * nrm[b]), 1e-6))), -1, 1)
           for a in range(n) for b in range(a + 1, n)]
    c = r(np.mean(cos))
    den = r(1 + r((n - 1) * c))
    t = 0.0 if abs(den) < 1e-6 else r(r(n * c) / den)
    total = ws[0]
    for w in ws[1:]:
        total = r(total + w)
    return r(r(t * r(total / n)) + r(r(1 - t) * base))


def nearswap(base, other, t):
    a, b = np.asarray(base, np.float64), np.asarray(other, np.float64)
    w = np.clip(r(r(1 / r(np.maximum(np.abs(r(a - b)), 1e-6))) * float(np.float32(t))), 0, 1)
    return r(r(w * b) + r(r(1 - w) * a))
