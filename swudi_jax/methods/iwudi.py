"""IWUDI: the full-rank soft spectral filter (the SWUDI authors' "SWUDI-soft").

Source: Wei et al., "Closed-Form Spectral Regularization for Multi-Task Model Merging"
(arXiv 2606.07289) and its reference code (MLLMerging, ``yongxianwei_merging.iwudi_merge``).
With C = Σ wi τiᵀτi = V diag(λ) Vᵀ (λ clamped at 1e-8), D = Σ wi τiτiᵀτi and anchor θ0,

    θ = θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λ) Vᵀ     (no truncation: every direction)

with one of three filters:

- "exponential" (gradient flow to time t):  h = 1 − e^{−λt}
- "tikhonov" (ridge, θ relative to the anchor):  h = λ / (λ + α)
- "landweber" (k gradient steps of θC − D with step η = ρ/λ_max):  h = 1 − clip(1 − ηλ, 0, 1)^k

h → 1 (t → ∞, α → 0, k → ∞) gives the pseudo-inverse D C⁺; h ≡ 0 the anchor. Landweber with
ρ ≤ 1 is exactly ``wudi_gd`` with ``optax.sgd(η/2)`` after k steps (the loss's gradient is
2(θC − D)); tests/test_golden_family.py checks both identities in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from swudi_jax.maths import filters, solvers
from swudi_jax.maths.spectral import INIT_MODES, filtered_merge
from swudi_jax.maths.validation import check_choice, check_number, check_task_vectors, static_or_traced
from swudi_jax.maths.placement import auto_axes_boundary
from swudi_jax.methods.results import finite_result
from swudi_jax.methods.spec import MethodSpec, SpectralFilter, expert_weighted

IWUDI_FILTERS = ("exponential", "tikhonov", "landweber")
SOURCE = ("Wei et al., Closed-Form Spectral Regularization for Multi-Task Model Merging (arXiv 2606.07289): "
          "IWUDI / SWUDI-soft, the full-rank soft filter")


def check_iwudi_options(opts: Mapping[str, Any]) -> None:
    """ValueError naming the option for any bad value of :func:`iwudi`'s options."""
    check_choice(opts["filter"], "filter", IWUDI_FILTERS)
    check_number(opts["time"], "time", low=0.0, traceable=True)
    check_number(opts["alpha"], "alpha", low=0.0, traceable=True)
    check_number(opts["steps"], "steps", low=0, integer=True)
    check_number(opts["eta_ratio"], "eta_ratio", low=0.0, high=2.0, low_open=True, traceable=True)
    check_choice(opts["init"], "init", INIT_MODES)
    check_choice(opts["solver"], "solver", solvers.SOLVERS)
    if opts["solver"] == "topk":
        raise ValueError("solver='topk' is not available for iwudi: its filter is non-zero on every direction "
                         "(use 'auto', 'full' or 'lowrank')")


def iwudi_filter(filter: str, *, time: float, alpha: float, steps: int, eta_ratio: float):
    """IWUDI's filter factory ``make_h(λ, (m, n))`` on ascending clamped λ (module docstring)."""
    if filter == "exponential":
        h = filters.exponential(time)
        return lambda lam, shape: h(lam)
    if filter == "tikhonov":
        h = filters.tikhonov(alpha)
        return lambda lam, shape: h(lam)
    if filter == "landweber":

        def make_h(lam, shape):
            eta = eta_ratio / jnp.maximum(jnp.max(lam), filters.EIG_FLOOR)
            return 1.0 - jnp.clip(1.0 - eta * lam, 0.0, 1.0) ** steps

        return make_h
    raise ValueError(f"filter must be one of {list(IWUDI_FILTERS)}, got {filter!r}")


@functools.partial(jax.jit, static_argnames=("filter", "steps", "init", "solver"))
def _iwudi(tau, filter, time, alpha, steps, eta_ratio, init, solver):
    make_h = iwudi_filter(filter, time=time, alpha=alpha, steps=steps, eta_ratio=eta_ratio)
    return filtered_merge(tau, make_h, init, solver)


@auto_axes_boundary
def iwudi(
    tau: ArrayLike,
    *,
    filter: str = "exponential",
    time: float = 300.0,
    alpha: float = 1e-2,
    steps: int = 150,
    eta_ratio: float = 0.9,
    init: str = "sum",
    solver: str = "auto",
) -> jax.Array:
    """IWUDI: θ = θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λ) Vᵀ over all n directions; the defaults
    are the reference's (``iwudi_merge``), and the registry reads them from this signature.

    Args:
      tau: task vectors (N, m, n), maths layout, float32 or float64.
      filter: "exponential" h = 1 − e^{−λt}; "tikhonov" h = λ/(λ+α); "landweber"
        h = 1 − clip(1 − ηλ, 0, 1)^k with η = eta_ratio/λ_max.
      time: t ≥ 0 (exponential). alpha: α ≥ 0 (tikhonov). steps: k ≥ 0 and eta_ratio
        ∈ (0, 2] (landweber; ≤ 1 for the plain gradient-descent reading).
      init: anchor θ0: "sum" (the reference's default), "mean" or "zero".
      solver: "auto", "full" or "lowrank" (every direction is filtered: no "topk").
      ``time``, ``alpha`` and ``eta_ratio`` may be traced (arguments of the caller's ``jax.jit``);
      ``steps`` (an integer power) and the choices must be static Python values.
    Returns:
      The merged task vector (m, n), in ``tau``'s dtype.
    """
    tau = check_task_vectors(tau)
    opts = {"filter": filter, "time": time, "alpha": alpha, "steps": steps, "eta_ratio": eta_ratio, "init": init, "solver": solver}
    check_iwudi_options(opts)
    from swudi_jax.methods.swudi import resolve_solver

    solver = resolve_solver(solver, tau.shape, None)
    merged = _iwudi(tau, filter, static_or_traced(time), static_or_traced(alpha), int(steps),
                    static_or_traced(eta_ratio), init, solver)
    return finite_result(merged, tau, "iwudi")


def _iwudi_spectral_filter(options: Mapping[str, Any]) -> SpectralFilter:
    make_h = iwudi_filter(options["filter"], time=float(options["time"]), alpha=float(options["alpha"]),
                          steps=int(options["steps"]), eta_ratio=float(options["eta_ratio"]))
    return SpectralFilter(make_h, options["init"], lambda n: None)  # non-zero on every direction


IWUDI = expert_weighted(MethodSpec("iwudi", iwudi, "linear", source=SOURCE,
                                   validate=check_iwudi_options, spectral_filter=_iwudi_spectral_filter))

__all__ = ["IWUDI", "IWUDI_FILTERS", "check_iwudi_options", "iwudi", "iwudi_filter"]
