"""swudi_jax: closed-form spectral model merging (SWUDI, SWUDI-A) and its baselines, in JAX.

The one door to the library: layer-level estimators for numerical work, the filters and
rank rules they are built from, and the whole-model entry points.
"""

import sys as _sys

from swudi_jax.checkpoint import io
from swudi_jax.checkpoint.compile_cache import enable_compile_cache
from swudi_jax.checkpoint.config import MergeConfig, load_config
from swudi_jax.checkpoint.pipeline import merge_checkpoints
from swudi_jax.checkpoint.report_files import read_report, report_figure, write_report
from swudi_jax.maths import filters, solvers, spectral
from swudi_jax.maths.spectral import (
    filtered_solution,
    interference_operator,
    normal_equation,
    right_hand_side,
    spectrum,
    task_weights,
    wudi_loss,
)
from swudi_jax.methods import registry
from swudi_jax.methods.iwudi import iwudi
from swudi_jax.methods.optmerge import optmerge, optmerge_closed_form
from swudi_jax.methods.output_space import output_space_qp, residual_energy_score
from swudi_jax.methods.registry import MergeMethod, available_methods, get_method, register, resolve
from swudi_jax.methods.spec import MethodSpec, Resolved
from swudi_jax.methods.regmean import regmean
from swudi_jax.methods.swudi import (
    LLM_PRESET,
    VISION_PRESET,
    pinv_merge,
    spectral_merge,
    swudi,
    swudi_a,
    swudi_a_rank,
)
from swudi_jax.methods.ties import ties_model_thresholds
from swudi_jax.methods.wudi import wudi_gd
from swudi_jax.model import calibration, layout, sequential
from swudi_jax.model.calibration import Calibration, task_grams
from swudi_jax.model.merger import TreePlan, merge, merge_group, plan, plan_tree, task_vectors
from swudi_jax.model.report import MergeReport
from swudi_jax.model.score import score
from swudi_jax.model.sequential import layer_scores, layerwise_merge
from swudi_jax.scale import lora, sharding
from swudi_jax.scale.lora import Adapter, merge_lora
from swudi_jax.scale.sharding import make_row_mesh, merge_sharded

# Aliases for the module paths of releases before the package was laid out by stage:
# ``import swudi_jax.filters`` (now swudi_jax.maths.filters), swudi_jax.model.layout,
# swudi_jax.calibration, swudi_jax.sequential (now under swudi_jax.model), swudi_jax.methods.registry
# (swudi_jax.methods.registry), swudi_jax.sharding, swudi_jax.lora (swudi_jax.scale) and
# swudi_jax.checkpoint.io (swudi_jax.checkpoint.io) keep working.
for _module in (filters, solvers, spectral, layout, calibration, sequential, registry, sharding, lora, io):
    _sys.modules.setdefault(f"{__name__}.{_module.__name__.rsplit('.', 1)[-1]}", _module)
del _module

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "Calibration",
    "LLM_PRESET",
    "MergeConfig",
    "MergeMethod",
    "MergeReport",
    "MethodSpec",
    "Resolved",
    "TreePlan",
    "VISION_PRESET",
    "available_methods",
    "enable_compile_cache",
    "calibration",
    "filtered_solution",
    "filters",
    "get_method",
    "interference_operator",
    "iwudi",
    "io",
    "layout",
    "lora",
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
    "optmerge",
    "optmerge_closed_form",
    "output_space_qp",
    "pinv_merge",
    "plan",
    "plan_tree",
    "register",
    "regmean",
    "read_report",
    "registry",
    "report_figure",
    "residual_energy_score",
    "resolve",
    "score",
    "right_hand_side",
    "sequential",
    "sharding",
    "solvers",
    "spectral",
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
    "write_report",
]
