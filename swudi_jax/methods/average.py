"""Weight averaging: θ = θ0 + (1/N) Σi τi = (1/N) Σi θi.

Source: Wortsman et al., "Model soups" (ICML 2022); task arithmetic with λ = 1/N
(Ilharco et al., ICLR 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.methods.spec import MethodSpec


def average(tau: jax.Array) -> jax.Array:
    """The mean task vector (1/N) Σi τi over axis 0.

    Args:
      tau: task vectors (N, ...) of any shape.
    Returns:
      The mean, shape (...), in ``tau``'s dtype.
    """
    return jnp.mean(tau, axis=0)


AVERAGE = MethodSpec(
    name="average",
    fn=average,
    kind="elementwise",
    combination=lambda options, n: np.full(n, 1.0 / n),
    source="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
)


__all__ = [
    "AVERAGE",
    "average",
]
