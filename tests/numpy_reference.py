"""A plain NumPy float64 transcription of MATH.md (sections 1–5), independent of swudi_jax.

Written straight from the formulas, with loops where the formula has a sum, so that the
tests compare the JAX engine against something that shares none of its code:

    wi = 1/max(‖τi‖², 1e-12),  C = Σ wi τiᵀτi,  D = Σ wi τiτiᵀτi,  θ0 = Σ τi (init "sum")
    C = V diag(λ) Vᵀ (ascending),  λs = max(λ, 1e-8)
    θ_h = θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λs) Vᵀ
"""

from __future__ import annotations

import math

import numpy as np

EIG_FLOOR = 1e-8
NORM_FLOOR = 1e-12


def weights(tau: np.ndarray) -> np.ndarray:
    return np.array([1.0 / max(float(np.sum(t * t)), NORM_FLOOR) for t in tau])


def interference_operator(tau: np.ndarray) -> np.ndarray:
    tau = np.asarray(tau, np.float64)
    return sum(w * t.T @ t for w, t in zip(weights(tau), tau))


def right_hand_side(tau: np.ndarray) -> np.ndarray:
    tau = np.asarray(tau, np.float64)
    return sum(w * t @ t.T @ t for w, t in zip(weights(tau), tau))


def anchor(tau: np.ndarray, init: str = "sum") -> np.ndarray:
    tau = np.asarray(tau, np.float64)
    return {"sum": tau.sum(0), "mean": tau.mean(0), "zero": np.zeros(tau.shape[1:])}[init]


def clamped_spectrum(tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λs ascending and clamped at 1e-8, V)."""
    lam, v = np.linalg.eigh(interference_operator(tau))
    return np.maximum(lam, EIG_FLOOR), v


def filtered_estimator(tau: np.ndarray, h: np.ndarray, init: str = "sum") -> np.ndarray:
    """θ_h for a given per-direction filter h (aligned with the ascending spectrum)."""
    tau = np.asarray(tau, np.float64)
    if max(float(np.sum(t * t)) for t in tau) < NORM_FLOOR:
        return tau.mean(0)
    lam, v = clamped_spectrum(tau)
    theta0, d = anchor(tau, init), right_hand_side(tau)
    return theta0 - theta0 @ v @ np.diag(h) @ v.T + d @ v @ np.diag(h / lam) @ v.T


# ----------------------------------------------------------------------------- filters


def exponential(lam, t):
    return 1.0 - np.exp(-np.asarray(lam) * t)


def landweber(lam, eta, k, halved=False):
    factor = eta if halved else 2.0 * eta
    return 1.0 - (1.0 - factor * np.asarray(lam)) ** k


def tikhonov(lam, alpha):
    lam = np.asarray(lam)
    return lam / (lam + alpha)


def top_k(lam, k):
    n = len(lam)
    return np.array([1.0 if j >= n - k else 0.0 for j in range(n)])


def rank_from_ratio(r, n):
    return min(n, max(1, math.ceil(r * n)))


# -------------------------------------------------------------------------- rank rules


def _descending(lam):
    return np.sort(np.asarray(lam, np.float64))[::-1]


def participation_sqrt(lam, shape=None):
    lam = _descending(lam)
    return math.ceil(np.sum(np.sqrt(lam)) ** 2 / np.sum(lam))


def entropy(lam, shape=None):
    p = _descending(lam) / np.sum(lam)
    return math.ceil(math.exp(-float(np.sum(p * np.log(p)))))


def participation(lam, shape=None):
    lam = _descending(lam)
    return math.ceil(np.sum(lam) ** 2 / np.sum(lam**2))


def stable_rank(lam, shape=None):
    lam = _descending(lam)
    return math.ceil(np.sum(lam**2) / lam[0] ** 2)


def cumulative_variance(lam, shape=None, fraction=0.9):
    lam = _descending(lam)
    total, running = np.sum(lam), 0.0
    for k, value in enumerate(lam, start=1):
        running += value
        if running / total >= fraction:
            return k
    return len(lam)


def lower_median(x):
    x = np.sort(np.asarray(x))
    return x[(len(x) - 1) // 2]


def gavish_donoho(lam, shape):
    m, n = shape
    beta = min(m, n) / max(m, n)
    if beta < 0.9999:
        mu = math.sqrt(max((1 - beta) ** 2 + beta, 1e-3))
    else:
        mu = math.sqrt(2 + math.sqrt(3))
    omega = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1))) / mu
    y = np.sqrt(_descending(lam))
    return max(1, int(np.sum(y > omega * lower_median(y))))


RANK_RULES = {
    "participation_sqrt": participation_sqrt,
    "entropy": entropy,
    "participation": participation,
    "stable_rank": stable_rank,
    "gavish_donoho": gavish_donoho,
    "cumulative_variance": cumulative_variance,
}


def clamp_rank(k, n, min_rank=1, max_rank_ratio=1.0):
    upper = min(n, max(min_rank, round(max_rank_ratio * n)))
    return min(max(k, min_rank), upper)


# ------------------------------------------------------------------------------ methods


def swudi(tau, time=1300.0, rank_ratio=0.65, init="sum"):
    lam, _ = clamped_spectrum(tau)
    h = exponential(lam, time) * top_k(lam, rank_from_ratio(rank_ratio, len(lam)))
    return filtered_estimator(tau, h, init)


def swudi_a_rank(tau, rank_rule="participation_sqrt", min_rank=1, max_rank_ratio=1.0):
    lam, _ = clamped_spectrum(tau)
    k = RANK_RULES[rank_rule](lam, np.shape(tau)[1:])
    return clamp_rank(k, len(lam), min_rank, max_rank_ratio)


def swudi_a(tau, rank_rule="participation_sqrt", min_rank=1, max_rank_ratio=1.0, init="sum"):
    lam, _ = clamped_spectrum(tau)
    k = swudi_a_rank(tau, rank_rule, min_rank, max_rank_ratio)
    return filtered_estimator(tau, top_k(lam, k), init)


def pinv(tau):
    lam, _ = clamped_spectrum(tau)
    return filtered_estimator(tau, np.ones_like(lam))


def wudi_loss(theta, tau):
    """L(θ) = Σi wi ‖(θ − τi) τiᵀ‖²_F."""
    tau = np.asarray(tau, np.float64)
    return sum(w * np.sum(((theta - t) @ t.T) ** 2) for w, t in zip(weights(tau), tau))


def gradient_descent(tau, eta, steps, init="sum"):
    """θ_{k+1} = θ_k − η · 2(θ_k C − D), the plain GD iterates θ_0 … θ_steps."""
    c, d = interference_operator(tau), right_hand_side(tau)
    theta = anchor(tau, init)
    iterates = [theta]
    for _ in range(steps):
        theta = theta - eta * 2.0 * (theta @ c - d)
        iterates.append(theta)
    return np.stack(iterates)
