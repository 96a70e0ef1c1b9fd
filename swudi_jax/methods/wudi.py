"""WUDI, the iterative baseline: minimise the interference loss with an optax optimizer.

Source: Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors" (ICML 2025, arXiv 2503.08099). Per linear layer

    L(θ) = Σi wi ‖(θ − τi) τiᵀ‖²_F,   wi = 1/‖τi‖²_F,   ∇L = 2(θC − D),

minimised from θ0 = Σ τi by Adam (lr 1e-5, 300 full-batch steps) in the reference. With
``optax.sgd(η)`` the iterates are exactly the Landweber filter h = 1 − (1 − 2ηλ)^k of
:mod:`swudi_jax.maths.filters`, and as η → 0 with t = 2ηk they approach SWUDI's exponential
filter: this function is the numerical witness of that equivalence.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.maths.spectral import (
    INIT_MODES,
    anchor,
    gram_gradient,
    interference_operator,
    right_hand_side,
    task_weights,
    with_mean_fallback,
    wudi_loss,
)
from swudi_jax.maths.validation import check_choice, check_number, check_task_vectors
from swudi_jax.maths.placement import auto_axes_boundary
from swudi_jax.methods.results import finite_result
from swudi_jax.methods.spec import MethodSpec, expert_weighted

GRADIENTS = ("reference", "gram")
DEFAULT_LEARNING_RATE = 1e-5


def _gradient_fn(work, gradient):
    if gradient == "reference":
        return jax.grad(wudi_loss)
    w = task_weights(work)
    c, d = interference_operator(work, w), right_hand_side(work, w)
    return lambda theta, _: gram_gradient(theta, c, d)


@functools.partial(jax.jit, static_argnames=("optimizer", "steps", "init", "gradient", "trajectory_every"))
def _wudi_gd(tau, optimizer, steps, init, gradient, trajectory_every):
    work = tau.astype(compute_dtype(tau.dtype))
    grad_fn = _gradient_fn(work, gradient)

    def step(carry, _):
        theta, state = carry
        updates, state = optimizer.update(grad_fn(theta, work), state, theta)
        return (optax.apply_updates(theta, updates), state), None

    def run(carry, n):
        return lax.scan(step, carry, None, length=n)[0]

    theta0 = anchor(work, init)
    carry = (theta0, optimizer.init(theta0))
    finish = lambda theta: with_mean_fallback(work, theta).astype(tau.dtype)  # noqa: E731
    if not trajectory_every:
        return finish(run(carry, steps)[0])

    def chunk(carry, _):
        carry = run(carry, trajectory_every)
        return carry, carry[0]

    carry, snapshots = lax.scan(chunk, carry, None, length=steps // trajectory_every)
    carry = run(carry, steps % trajectory_every)
    trajectory = jnp.concatenate([theta0[None], snapshots], axis=0).astype(tau.dtype)
    return finish(carry[0]), trajectory


_DEFAULT_OPTIMIZER = optax.adam(DEFAULT_LEARNING_RATE)


def wudi_gd(
    tau: ArrayLike,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 300,
    init: str = "sum",
    gradient: str = "reference",
    trajectory_every: int = 0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Iterative WUDI with any optax optimizer, all steps in one jit-compiled ``lax.scan``.

    Args:
      tau: task vectors (N, m, n), maths layout.
      optimizer: an optax transformation (default ``optax.adam(1e-5)``, the reference).
      steps: number of full-batch steps.
      init: starting point θ0: "sum", "mean" or "zero".
      gradient: "reference" differentiates L(θ) = Σ wi‖(θ − τi)τiᵀ‖² with autodiff (the
        original, memory-hungry form); "gram" uses ∇L = 2(θC − D) with C, D formed once.
      trajectory_every: k > 0 also returns the iterates θ_0, θ_k, θ_2k, … as an array
        (steps // k + 1, m, n).
    Returns:
      The merged task vector (m, n), or ``(theta, trajectory)`` when ``trajectory_every > 0``.
    """
    tau = check_task_vectors(tau)
    optimizer = _DEFAULT_OPTIMIZER if optimizer is None else optimizer
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    check_number(steps, "steps", low=0, integer=True)
    check_choice(init, "init", INIT_MODES)
    check_choice(gradient, "gradient", GRADIENTS)
    check_number(trajectory_every, "trajectory_every", low=0, integer=True)
    out = _wudi_gd(tau, optimizer, int(steps), init, gradient, int(trajectory_every))
    return out if trajectory_every else finite_result(out, tau, "wudi")


@auto_axes_boundary
def wudi(
    tau: jax.Array,
    *,
    steps: int = 300,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    gradient: str = "gram",
    init: str = "sum",
) -> jax.Array:
    """WUDI with Adam(``learning_rate``): :func:`wudi_gd` with plain options (the registry's form).

    Its default gradient is the Gram form 2(θC − D): the same gradient as the reference's
    autodiff (tests/test_golden.py checks the Adam-300 result of both against the authors'
    code) without the per-task (m, m) residuals that make the autodiff form run out of
    memory on tall weights such as a 30522-row embedding.

    Args:
      tau: task vectors (N, m, n), maths layout.
      steps: full-batch Adam steps (300 in the reference).
      learning_rate: Adam's step size (1e-5 in the reference; betas 0.9/0.999, eps 1e-8).
      gradient: "gram" (2(θC − D), the default here) or "reference" (autodiff of the loss).
      init: starting point θ0: "sum", "mean" or "zero".
    Returns:
      The merged task vector (m, n).
    """
    optimizer = None if learning_rate == DEFAULT_LEARNING_RATE else optax.adam(learning_rate)
    return wudi_gd(tau, optimizer=optimizer, steps=steps, init=init, gradient=gradient)


def _validate(options: Mapping[str, Any]) -> None:
    check_number(options["steps"], "steps", low=0, integer=True)
    check_number(options["learning_rate"], "learning_rate", low=0.0, low_open=True)
    check_choice(options["gradient"], "gradient", GRADIENTS)
    check_choice(options["init"], "init", INIT_MODES)


WUDI = expert_weighted(MethodSpec(
    "wudi", wudi, "linear", validate=_validate,
    source="Cheng et al., Whoever Started the Interference Should End It, ICML 2025 (arXiv 2503.08099)"))


__all__ = [
    "DEFAULT_LEARNING_RATE",
    "GRADIENTS",
    "WUDI",
    "wudi",
    "wudi_gd",
]
