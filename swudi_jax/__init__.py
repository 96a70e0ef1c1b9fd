"""swudi_jax: closed-form spectral model merging (SWUDI, SWUDI-A) and its baselines, in JAX.

The one door to the library: layer-level estimators for numerical work, the filters and
rank rules they are built from, and the whole-model entry points.
"""

from swudi_jax import calibration, filters, layout, registry, sequential
from swudi_jax.calibration import Calibration, task_grams
from swudi_jax.checkpoint_merge import merge_checkpoints
from swudi_jax.config import MergeConfig, load_config
from swudi_jax.lora import merge_lora
from swudi_jax.methods.swudi import (
    LLM_PRESET,
    VISION_PRESET,
    pinv_merge,
    spectral_merge,
    swudi,
    swudi_a,
    swudi_a_rank,
)
from swudi_jax.methods.output_space import output_space_qp, residual_energy_score
from swudi_jax.methods.regmean import regmean
from swudi_jax.methods.ties import ties_model_thresholds
from swudi_jax.methods.wudi import wudi_gd
from swudi_jax.registry import MergeMethod, available_methods, get_method, register
from swudi_jax.spectral import (
    filtered_solution,
    interference_operator,
    normal_equation,
    right_hand_side,
    spectrum,
    task_weights,
    wudi_loss,
)
from swudi_jax.sequential import layer_scores, layerwise_merge
from swudi_jax.sharding import make_row_mesh, merge_sharded
from swudi_jax.tree import merge, merge_group, plan_tree, task_vectors

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "LLM_PRESET",
    "MergeConfig",
    "MergeMethod",
    "VISION_PRESET",
    "available_methods",
    "calibration",
    "filtered_solution",
    "filters",
    "get_method",
    "interference_operator",
    "layout",
    "load_config",
    "make_row_mesh",
    "layer_scores",
    "layerwise_merge",
    "merge",
    "merge_checkpoints",
    "merge_group",
    "merge_lora",
    "merge_sharded",
    "normal_equation",
    "output_space_qp",
    "pinv_merge",
    "plan_tree",
    "register",
    "regmean",
    "registry",
    "residual_energy_score",
    "right_hand_side",
    "sequential",
    "spectral_merge",
    "spectrum",
    "swudi",
    "swudi_a",
    "swudi_a_rank",
    "task_grams",
    "task_vectors",
    "task_weights",
    "ties_model_thresholds",
    "wudi_gd",
    "wudi_loss",
]
