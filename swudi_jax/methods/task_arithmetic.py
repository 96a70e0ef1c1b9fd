"""Task arithmetic: θ = θ0 + λ Σi τi.

Source: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023). λ = 0.3 is the
common default. The layer function returns Σi τi; λ is the merge scale, so
``merge(..., method="task_arithmetic_paper")`` gives θ0 + 0.3 Σi τi and ``scale=λ`` sets another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from swudi_jax.methods.spec import MethodSpec

DEFAULT_LAMBDA = 0.3


def task_arithmetic(tau: jax.Array) -> jax.Array:
    """The sum of task vectors Σi τi over axis 0 (apply λ as the merge scale).

    Args:
      tau: task vectors (N, ...) of any shape.
    Returns:
      Σi τi, shape (...), in ``tau``'s dtype.
    """
    return jnp.sum(tau, axis=0)


TASK_ARITHMETIC = MethodSpec(
    name="task_arithmetic_paper",
    fn=task_arithmetic,
    kind="elementwise",
    default_scale=DEFAULT_LAMBDA,
    combination=lambda options, n: np.ones(n),
    source="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
)


__all__ = [
    "DEFAULT_LAMBDA",
    "TASK_ARITHMETIC",
    "task_arithmetic",
]
