"""swudi_jax: closed-form spectral model merging (SWUDI, SWUDI-A) and its baselines, in JAX.

The one door to the library: layer-level estimators for numerical work, the filters and
rank rules they are built from, and the whole-model entry points.
"""

from swudi_jax import filters
from swudi_jax.methods.swudi import (
    LLM_PRESET,
    VISION_PRESET,
    pinv_merge,
    spectral_merge,
    swudi,
    swudi_a,
    swudi_a_rank,
)
from swudi_jax.methods.wudi import wudi_gd
from swudi_jax.spectral import (
    filtered_solution,
    interference_operator,
    normal_equation,
    right_hand_side,
    spectrum,
    task_weights,
    wudi_loss,
)

__version__ = "0.1.0"

__all__ = [
    "LLM_PRESET",
    "VISION_PRESET",
    "filtered_solution",
    "filters",
    "interference_operator",
    "normal_equation",
    "pinv_merge",
    "right_hand_side",
    "spectral_merge",
    "spectrum",
    "swudi",
    "swudi_a",
    "swudi_a_rank",
    "task_weights",
    "wudi_gd",
    "wudi_loss",
]
