"""A plain NumPy float64 transcription of mergekit's merge methods, independent of swudi_jax.

Written from the methods' published definitions (TIES, DARE, Model Breadcrumbs, DELLA,
SCE/FuseChat, model soups, SLERP, Model Stock, multi-SLERP, Karcher mean) with mergekit's
documented conventions (per-model ``weight``/``density``, ``normalize``, ``lambda``, the
L1 ``rescale``, ties of the sign election go to +), entry by entry with Python loops and
the element-by-element sort of ``torch_sort_reference`` where the JAX code uses whole
partitions and masks, so that the two share no code.

Conventions the tests rely on:
- equal magnitudes at a cut are kept as PyTorch's CPU sort/topk leaves them
  (:mod:`torch_sort_reference`; magnitudes compared in float32, as mergekit sorts them);
- random keep decisions are ``u < p`` for given uniforms ``u`` (the same ones the JAX
  functions receive), so both sides drop the same entries;
- ``bf16_round`` rounds float64 values to bfloat16 (nearest, ties to even) for the bf16
  cases (mergekit builds a bf16 tensor's keep probabilities in bf16).
"""

from __future__ import annotations

import math

import numpy as np
from torch_sort_reference import argsort, topk


def bf16_round(x) -> np.ndarray:
    """Round to the nearest bfloat16 value (ties to even), returned as float64."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------- keep sets


def _magnitudes(values):
    """|value| in float32, as mergekit ranks them (``tensor.abs().float()``)."""
    return [float(np.float32(abs(v))) for v in values]


def keep_top_magnitudes(values, density):
    """TIES trim: keep max(1, int(d·D)) entries of largest |value| (d >= 1: all; d <= 0: none)."""
    size = len(values)
    if density >= 1:
        return [True] * size
    if density <= 0:
        return [False] * size
    count = max(1, int(density * size))
    chosen = set(argsort(_magnitudes(values), descending=True)[:count])
    return [j in chosen for j in range(size)]


def keep_breadcrumbs(values, density, gamma):
    """Breadcrumbs: drop the int(γ·D) largest |value| and the smallest, keep int(d·D)."""
    size = len(values)
    if density >= 1:
        return [True] * size
    target, top = int(density * size), int(gamma * size)
    bottom = max(0, size - target - top)
    chosen = set(argsort(_magnitudes(values))[bottom:bottom + target])
    return [j in chosen for j in range(size)]


def della_keep_probabilities(matrix, density, epsilon):
    """DELLA MAGPRUNE: per row, p = d − ε + 2ε·(rank − 1)/(n − 1), rank 1 = smallest |value|."""
    rows = np.atleast_2d(np.asarray(matrix, np.float64))
    probs = np.zeros(rows.shape)
    for i, row in enumerate(rows):
        n = len(row)
        by_size = sorted(range(n), key=lambda j: (abs(row[j]), j))
        for position, j in enumerate(by_size):
            share = position / (n - 1) if n > 1 else 0.0
            probs[i, j] = (density - epsilon) + 2 * epsilon * share
    return probs.reshape(np.shape(matrix))


def rescale_survivors(original, survivors, how, keep_prob=None):
    """l1/l2/linf: match the original norm (unless either norm < 1e-7); keep_prob: divide by p."""
    if how is None:
        return survivors
    if how == "keep_prob":
        return np.where(keep_prob > 0, survivors / np.where(keep_prob > 0, keep_prob, 1), survivors)
    norm = {"l1": lambda v: np.abs(v).sum(), "l2": lambda v: math.sqrt(float((v * v).sum())),
            "linf": lambda v: np.abs(v).max()}[how]
    before, after = norm(original), norm(survivors)
    if before < 1e-7 or after < 1e-7:
        return survivors
    return survivors * (before / after)


def sparsify_one(tv, kind, density, gamma=0.0, epsilon=0.0, uniforms=None, rescale=None, bf16=False):
    """One model's task vector (any shape) after mergekit's sparsifier ``kind``."""
    tv = np.asarray(tv, np.float64)
    if density >= 1:
        return tv.copy()
    flat = tv.reshape(-1)
    prob = None
    if kind == "magnitude":
        keep = np.array(keep_top_magnitudes(list(flat), density)).reshape(tv.shape)
    elif kind == "magnitude_outliers":
        keep = np.array(keep_breadcrumbs(list(flat), density, gamma)).reshape(tv.shape)
    elif kind == "random":
        prob = np.full(tv.shape, bf16_round(density) if bf16 else density)
        keep = uniforms < prob
    elif kind == "della_magprune":
        if density <= 0:
            return np.zeros_like(tv)
        prob = della_keep_probabilities(tv, density, epsilon)
        prob = bf16_round(prob) if bf16 else prob
        keep = uniforms < prob
    else:
        raise ValueError(kind)
    return rescale_survivors(tv, np.where(keep, tv, 0.0), rescale, prob)


# ----------------------------------------------------------------------------- task arithmetic family


FAMILY = {
    # name: (sparsifier, sign election, normalize default, rescale default)
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}


def task_family(name, tau, weights, densities=None, *, gammas=None, epsilons=None, normalize=None,
                rescale=None, lam=1.0, uniforms=None, election=None, bf16=False):
    """θ − θ0 for mergekit's method ``name`` on task vectors (N, ...), entry by entry."""
    kind, default_election, default_normalize, default_rescale = FAMILY[name]
    election = default_election if election is None else election
    normalize = default_normalize if normalize is None else normalize
    rescale = default_rescale if rescale is None else rescale
    how = "l1" if rescale is True else (None if rescale is False else rescale)
    n = len(tau)
    densities = [1.0] * n if densities is None else list(densities)
    deltas = []
    for i in range(n):
        tv = np.asarray(tau[i], np.float64)
        if kind is not None:
            tv = sparsify_one(tv, kind, densities[i], (gammas or [0.0] * n)[i], (epsilons or [0.0] * n)[i],
                              None if uniforms is None else uniforms[i], how, bf16)
        deltas.append(weights[i] * tv.reshape(-1))
    out = np.zeros(deltas[0].shape)
    for j in range(out.size):
        column = [deltas[i][j] for i in range(n)]
        if election is None:
            total, divisor = sum(column), sum(weights)
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        else:
            score = sum(column) if election == "sum" else sum(np.sign(v) for v in column)
            sign = 1.0 if score >= 0 else -1.0
            agreeing = [i for i in range(n) if np.sign(column[i]) == sign]
            total = sum(column[i] for i in agreeing)
            divisor = sum(weights[i] for i in agreeing) or 1.0
        out[j] = lam * (total / divisor if normalize else total)
    return out.reshape(np.shape(tau[0]))


def sce(tau, select_topk=1.0):
    """SCE (FuseChat): select by variance over models, weights ∝ mean square, TIES erase."""
    tau = np.asarray(tau, np.float64)
    n = len(tau)
    flat = tau.reshape(n, -1)
    if select_topk < 1:
        variance = [float(np.mean((flat[:, j] - flat[:, j].mean()) ** 2)) for j in range(flat.shape[1])]
        count = int(sum(v != 0 for v in variance) * select_topk) if select_topk > 0 else 0
        chosen = topk(variance, count)
        flat = np.array([[row[j] if j in chosen else 0.0 for j in range(len(row))] for row in flat])
    energy = [float(np.mean(row ** 2)) for row in flat]
    total = sum(energy)
    share = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        sign = 1.0 if flat[:, j].sum() >= 0 else -1.0
        agreeing = [i for i in range(n) if np.sign(flat[i, j]) == sign]
        num = sum(share[i] * flat[i, j] for i in agreeing)
        den = sum(share[i] for i in agreeing)
        out[j] = num / max(den, 1e-6)
    return out.reshape(tau.shape[1:])


def linear(models, weights, normalize=True):
    """Model soup: Σ wi θi (/ Σ wi)."""
    out = sum(w * np.asarray(m, np.float64) for w, m in zip(weights, models))
    return out / sum(weights) if normalize else out


# ----------------------------------------------------------------------------- spherical


def slerp(t, v0, v1, threshold=0.9995, eps=1e-8):
    """Shoemake's SLERP of two whole tensors (lerp when nearly parallel)."""
    a, b = np.asarray(v0, np.float64).ravel(), np.asarray(v1, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    cos = float(np.clip(np.dot(a / na, b / nb), -1, 1))
    if abs(cos) > threshold:
        out = (1 - t) * a + t * b
    else:
        omega = math.acos(cos)
        out = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    return out.reshape(np.shape(v0))


def _slerp_vectors(t, v0, v1):
    c = float(np.clip(np.dot(v0 / max(np.linalg.norm(v0), 1e-7), v1 / max(np.linalg.norm(v1), 1e-7)), -1, 1))
    if 1 - c * c <= 1e-16:
        return (1 - t) * v0 + t * v1
    omega = math.acos(c)
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def nuslerp(models, weights, base=None, row_wise=False, flatten=True):
    """NuSLERP: slerp at t = w2/(w1 + w2) of task vectors (with a base) or weights."""
    x0, x1 = (np.asarray(m, np.float64) for m in models)
    if base is not None:
        x0, x1 = x0 - base, x1 - base
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if flatten:
        out = _slerp_vectors(t, x0.ravel(), x1.ravel()).reshape(x0.shape)
    elif row_wise:
        out = np.stack([_slerp_vectors(t, x0[:, j], x1[:, j]) for j in range(x0.shape[1])], axis=1)
    else:
        out = np.stack([_slerp_vectors(t, x0[i], x1[i]) for i in range(x0.shape[0])])
    return out + base if base is not None else out


def multislerp(models, weights, base=None, eps=1e-8):
    """Barycentric interpolation on the sphere through the tangent space at the weighted mean."""
    xs = [np.asarray(m, np.float64) - (0 if base is None else base) for m in models]
    w = np.asarray(weights, np.float64) / sum(weights)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x.ravel() / (r + eps) for x, r in zip(xs, norms)]
    mu = sum(wi * u for wi, u in zip(w, units))
    mu = mu / np.linalg.norm(mu)
    tangent = sum(wi * (u - np.dot(u, mu) * mu) for wi, u in zip(w, units))
    length = np.linalg.norm(tangent) + eps
    point = math.cos(length) * mu + math.sin(length) / length * tangent
    out = (point * sum(wi * r for wi, r in zip(w, norms))).reshape(xs[0].shape)
    return out + base if base is not None else out


def karcher(models, max_iter=10, tol=1e-5):
    """Karcher mean of the unit directions (equal weights) times the mean norm."""
    xs = [np.asarray(m, np.float64).ravel() for m in models]
    n = len(xs)
    norms = [np.linalg.norm(x) for x in xs]
    live = [i for i in range(n) if norms[i] > tol]
    if not live:
        return np.zeros_like(np.asarray(models[0], np.float64))
    units = [xs[i] / norms[i] for i in live]
    share = 1.0 / len(live)
    mu = sum(share * u for u in units)
    mu = units[0].copy() if np.linalg.norm(mu) < tol else mu / np.linalg.norm(mu)
    for _ in range(max_iter):
        step = np.zeros_like(mu)
        for u in units:
            c = float(np.clip(np.dot(mu, u), -1, 1))
            angle = math.acos(c)
            if angle >= tol:
                step += share * angle / math.sin(angle) * (u - c * mu)
        length = np.linalg.norm(step)
        if length < tol:
            break
        mu = math.cos(length) * mu + math.sin(length) * step / length
        mu = mu / np.linalg.norm(mu) if np.linalg.norm(mu) > tol else mu
    return (sum(norms) / n * mu).reshape(np.shape(models[0]))


def model_stock(base, models, filter_wise=False):
    """Model Stock: t = N·cos / (1 + (N − 1)·cos), θ = t·mean(θi) + (1 − t)·θ0."""
    base = np.asarray(base, np.float64)
    models = [np.asarray(m, np.float64) for m in models]
    n = len(models)

    def ratio(offsets):
        pairs = []
        for a in range(n):
            for b in range(a + 1, n):
                den = max(np.linalg.norm(offsets[a]) * np.linalg.norm(offsets[b]), 1e-6)
                pairs.append(float(np.clip(np.dot(offsets[a], offsets[b]) / den, -1, 1)))
        c = sum(pairs) / len(pairs)
        den = 1 + (n - 1) * c
        return 0.0 if abs(den) < 1e-6 else n * c / den

    if not filter_wise:
        t = ratio([(m - base).ravel() for m in models])
        return t * sum(models) / n + (1 - t) * base
    rows = np.atleast_2d(base)
    out = np.zeros(rows.shape)
    for i in range(rows.shape[0]):
        t = ratio([np.atleast_2d(m)[i] - rows[i] for m in models])
        out[i] = t * sum(np.atleast_2d(m)[i] for m in models) / n + (1 - t) * rows[i]
    return out.reshape(base.shape)


def nearswap(base, other, t):
    """Per entry: w = clip(t / max(|θ0 − θ1|, 1e-6), 0, 1), θ = w·θ1 + (1 − w)·θ0."""
    a, b = np.asarray(base, np.float64).ravel(), np.asarray(other, np.float64).ravel()
    out = np.empty_like(a)
    for j in range(a.size):
        w = min(1.0, max(0.0, t / max(abs(a[j] - b[j]), 1e-6)))
        out[j] = w * b[j] + (1 - w) * a[j]
    return out.reshape(np.shape(base))


# ----------------------------------------------------------------------------- selection


def ram(tau, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    """RAM: entries one model touches keep its value, shared ones are averaged (RAM+: λi)."""
    tau = np.asarray(tau, np.float64)
    n = len(tau)
    flat = tau.reshape(n, -1)
    touched = [[abs(v) > epsilon for v in row] for row in flat]
    count = [sum(touched[i][j] for i in range(n)) for j in range(flat.shape[1])]
    lam = [1.0] * n
    if plus:
        for i in range(n):
            shared = sum(1 for j in range(flat.shape[1]) if touched[i][j] and count[j] > 1)
            unique = sum(1 for j in range(flat.shape[1]) if touched[i][j] and count[j] == 1)
            lam[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        for i in range(n):
            if touched[i][j]:
                out[j] += flat[i, j] * lam[i] if count[j] == 1 else flat[i, j] / count[j]
    return out.reshape(tau.shape[1:])


def arcee_fusion(base, other):
    """Keep θ1's change where |Δ|·KL(softmax θ1 ‖ softmax θ0) (per row) ≥ median + 1.5·IQR."""
    b = np.atleast_2d(np.asarray(base, np.float64))
    o = np.atleast_2d(np.asarray(other, np.float64))

    def softmax(row):
        e = np.exp(row - row.max())
        return e / e.sum()

    importance = np.zeros(b.shape)
    for i in range(b.shape[0]):
        p, q = softmax(o[i]) + 1e-8, softmax(b[i]) + 1e-8
        importance[i] = np.abs(o[i] - b[i]) * float(np.sum(p * np.log(p / q)))
    ordered = sorted(importance.ravel())
    last = len(ordered) - 1
    q1, med, q3 = ordered[int(0.25 * last)], ordered[int(0.5 * last)], ordered[int(0.75 * last)]
    keep = importance >= med + 1.5 * (q3 - q1)
    return np.where(keep, o, b).reshape(np.shape(base))
