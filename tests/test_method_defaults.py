"""Every default of every method, pinned: changing one must be a deliberate edit of this file."""

from __future__ import annotations

import dataclasses
import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import swudi_jax as sj
from swudi_jax.checkpoint import io as ckio
from swudi_jax.checkpoint import pipeline
from swudi_jax.checkpoint.config import DEFAULT_SHARD_SIZE, MergeConfig, parse_config
from swudi_jax.maths import filters, solvers, spectral
from swudi_jax.methods.spec import LOCAL
from swudi_jax.methods import (
    dare,
    output_space,
    registry,
    regmean,
    task_arithmetic,
    ties,
)
from swudi_jax.model import layout, merger
from swudi_jax.scale import sharding

DEFAULTS = {
    "swudi": ({"time": 1300.0, "rank_ratio": 0.65, "init": "sum", "solver": "auto", "tikhonov_alpha": 0.0,
               "output_time": None, "consensus_power": 0.0, "consensus_floor": 0.0, "gamma": 1.0,
               "filter": "exponential", "alignment": 0.0, "alignment_reference": None, "weight": 1.0}, 1.0),
    "swudi_a": ({"rank_rule": "participation_sqrt", "min_rank": 1, "max_rank_ratio": 1.0, "init": "sum",
                 "solver": "auto", "rank_scale": 1.0, "filter": "none", "time": 1e6, "wiener_scale": 1.0,
                 "wiener_power": 2.0, "wiener_floor": "tail_mean", "weight": 1.0}, 1.0),
    "iwudi": ({"filter": "exponential", "time": 300.0, "alpha": 1e-2, "steps": 150, "eta_ratio": 0.9, "init": "sum",
               "solver": "auto", "weight": 1.0}, 1.0),
    "optmerge": ({"rank_ratio": None, "steps": 300, "learning_rate": 1e-5, "weight": 1.0}, 1.0),
    "pinv": ({"solver": "auto", "weight": 1.0}, 1.0),
    "wudi": ({"steps": 300, "learning_rate": 1e-5, "gradient": "gram", "init": "sum", "weight": 1.0}, 1.0),
    "task_arithmetic_paper": ({}, 0.3),
    "average": ({}, 1.0),
    "ties_paper": ({"density": 0.2, "trim": "model", "thresholds": None}, 1.0),
    "dare": ({"drop": 0.9, "rescale": True, "seed": 0, "then": "task_arithmetic"}, 0.3),
    "regmean": ({"alpha": 0.95, "ridge": 0.0}, 1.0),
    "output_space": ({"basis": None, "ridge": 1e-6, "fallback_weight": 0.3}, 1.0),
    # mergekit's methods, mergekit's defaults (weight: mergekit has none, 1 here; lam is `lambda`)
    "linear": ({"weight": 1.0, "normalize": True}, 1.0),
    "task_arithmetic": ({"weight": 1.0, "normalize": False, "lam": 1.0}, 1.0),
    "ties": ({"weight": 1.0, "density": 1.0, "normalize": True, "rescale": False, "lam": 1.0, "int8_mask": False}, 1.0),
    "dare_ties": ({"weight": 1.0, "density": 1.0, "normalize": False, "rescale": True, "lam": 1.0,
                   "int8_mask": False, "seed": 0}, 1.0),
    "dare_linear": ({"weight": 1.0, "density": 1.0, "normalize": False, "rescale": True, "lam": 1.0,
                     "int8_mask": False, "seed": 0}, 1.0),
    "breadcrumbs": ({"weight": 1.0, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False, "lam": 1.0,
                     "int8_mask": False}, 1.0),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False,
                          "lam": 1.0, "int8_mask": False}, 1.0),
    "della": ({"weight": 1.0, "density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": True, "lam": 1.0,
               "int8_mask": False, "seed": 0}, 1.0),
    "della_linear": ({"weight": 1.0, "density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": True,
                      "lam": 1.0, "int8_mask": False, "seed": 0}, 1.0),
    "sce": ({"select_topk": 1.0, "int8_mask": False}, 1.0),
    "ram": ({"epsilon": 1e-5}, 1.0),
    "ramplus_tl": ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, 1.0),
    "slerp": ({"t": None}, 1.0),
    "nuslerp": ({"weight": 1.0, "nuslerp_row_wise": False, "nuslerp_flatten": True}, 1.0),
    "multislerp": ({"weight": 1.0, "normalize_weights": True, "eps": 1e-8}, 1.0),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, 1.0),
    "model_stock": ({"filter_wise": False}, 1.0),
    "nearswap": ({"t": None}, 1.0),
    "arcee_fusion": ({"seed": 0}, 1.0),
    "passthrough": ({"scale": 1.0}, 1.0),  # mergekit's None (no scaling) is 1 here: a per-model option
}


def test_every_builtin_method_has_its_defaults_pinned():
    assert {spec.name for spec in registry.BUILTIN_METHODS} == set(DEFAULTS)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_method_defaults_and_default_scale(name):
    options, scale = DEFAULTS[name]
    method = registry.get_method(name)
    assert method.resolve() == options
    assert type(method.resolve().get("min_rank", 0)) is int
    assert registry.default_scale(name) == scale


def test_dare_handing_over_to_ties_takes_scale_one():
    assert registry.default_scale("dare", {"then": "ties"}) == 1.0


def test_the_paper_presets():
    assert sj.VISION_PRESET == {"time": 1300.0, "rank_ratio": 0.65}
    assert sj.LLM_PRESET == {"time": 300.0, "rank_ratio": 0.85}


def test_wudi_gd_defaults_are_the_reference_adam_run():
    import inspect

    params = inspect.signature(sj.wudi_gd).parameters
    assert (params["steps"].default, params["init"].default, params["gradient"].default) == (300, "sum", "reference")
    from swudi_jax.methods.wudi import DEFAULT_LEARNING_RATE

    assert DEFAULT_LEARNING_RATE == 1e-5


# ------------------------------------------- the layer functions' own keyword defaults


def keyword_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_layer_function_defaults_to_its_method_options(name):
    # the spec's defaults and the Python function's keyword defaults are written separately
    options, _ = DEFAULTS[name]
    got = keyword_defaults(registry.get_method(name).fn)
    assert {k: got[k] for k in options} == options


def test_public_layer_functions_outside_the_registry():
    output_space_options = {"basis": None, "ridge": 1e-6, "fallback_weight": 0.3}
    assert keyword_defaults(sj.output_space_qp) == {"weights": None, **output_space_options, "layer": "layer"}
    assert {k: keyword_defaults(output_space.qp_merge)[k] for k in output_space_options} == output_space_options
    assert keyword_defaults(sj.regmean) == {"alpha": 0.95, "weights": None, "ridge": 0.0, "layer": "layer"}
    assert keyword_defaults(sj.swudi_a_rank) == {"rank_rule": "participation_sqrt", "min_rank": 1, "max_rank_ratio": 1.0,
                                                 "rank_scale": 1.0, "init": "sum"}
    assert keyword_defaults(sj.optmerge_closed_form) == {"rank_ratio": None}
    assert keyword_defaults(sj.spectral_merge) == {"init": "sum", "solver": "auto"}
    assert keyword_defaults(sj.ties_model_thresholds) == {"density": 0.2, "combine": LOCAL}  # one process
    assert keyword_defaults(dare.drop_and_rescale) == {"rescale": True}
    assert keyword_defaults(sj.layerwise_merge) == {"method": "output_space", "inputs": "merged", "targets": "local",
                                                    "weights": None, "scale": 1.0, "prefix": "params"}
    assert keyword_defaults(sj.merge_lora) == {"method": "swudi"}
    assert keyword_defaults(sj.merge_sharded) == {"mesh": None, "method": "swudi"}  # solver: the method's own option


def test_method_constants():
    assert (dare.DEFAULT_DROP, ties.DEFAULT_DENSITY, task_arithmetic.DEFAULT_LAMBDA) == (0.9, 0.2, 0.3)
    assert (regmean.DEFAULT_ALPHA, output_space.DEFAULT_FALLBACK_WEIGHT) == (0.95, 0.3)
    assert ties.kept_count(10, 0.2) == 2 and ties.kept_count(4, 0.2) == 1  # ⌊density·size⌋, at least one
    assert registry.DEFAULT_METHOD == "swudi"


# ------------------------------------------------------------ filters and rank rules


def test_filter_and_rank_rule_defaults():
    assert filters.EIG_FLOOR == 1e-8
    assert keyword_defaults(filters.landweber) == {"halved": False}
    assert keyword_defaults(filters.power) == {"base": None}
    assert keyword_defaults(filters.cumulative_variance) == {"fraction": 0.9}
    assert keyword_defaults(filters.adaptive_rank) == {"min_rank": 1, "max_rank_ratio": 1.0}
    assert sorted(filters.RANK_RULES) == ["cumulative_variance", "entropy", "gavish_donoho", "participation",
                                          "participation_sqrt", "stable_rank"]
    # the registered cumulative_variance is the 0.9 one: shares 0.7, 0.85, 0.95, 1 need K = 3 for 0.9
    # (K = 2 for any fraction in (0.7, 0.85], K = 4 above 0.95)
    lam = jnp.asarray([1.0, 2.0, 3.0, 14.0])
    assert int(filters.RANK_RULES["cumulative_variance"](lam, (4, 4))) == 3
    # the floor clamps eigenvalues: a zero eigenvalue is read as EIG_FLOOR
    assert float(spectral.spectrum(jnp.zeros((3, 3))).eigenvalues[0]) == pytest.approx(1e-8, rel=1e-6)


# --------------------------------------------------------------------- solver thresholds


def test_solver_thresholds():
    assert solvers.TOPK_MIN_DIM == 1024
    assert solvers.TRACE_RANK_RULES == ("participation", "stable_rank")
    # top K only from n = 1024 on and for K ≤ n/10; low rank where N·m < n
    assert solvers.choose_solver((4, 1024, 1024), top=102) == "topk"
    assert solvers.choose_solver((4, 1024, 1024), top=103) == "full"
    assert solvers.choose_solver((4, 1024, 1023), top=10) == "full"
    assert solvers.choose_solver((4, 255, 1024)) == "lowrank"
    assert solvers.default_oversampling(3) == 10 and solvers.default_oversampling(25) == 25  # p = max(10, K)
    assert solvers.default_tolerance(np.float64) == 100 * np.finfo(np.float64).eps  # 100 ulp · λmax
    assert solvers.default_tolerance(np.float32) == 100 * float(np.finfo(np.float32).eps)
    assert keyword_defaults(solvers.subspace_iteration) == {"oversampling": None, "max_iters": 200, "tol": None,
                                                            "seed": 0}


def test_spectral_norm_floor_and_anchor():
    assert spectral.NORM_FLOOR == 1e-12
    assert keyword_defaults(spectral.normal_equation) == {"init": "sum"}


# ------------------------------------------------ whole-model, sharding and config defaults


def test_whole_model_merge_defaults():
    assert merger.DEFAULT_MAX_GROUP_BYTES == 1 << 30
    merge = keyword_defaults(sj.merge)
    assert {k: merge[k] for k in ("method", "scale", "layout", "head_patterns", "others", "scan_axis", "multi_device",
                                  "max_group_bytes")} == {
        "method": "swudi", "scale": None, "layout": "flax", "head_patterns": ("lm_head*",), "others": "mean",
        "scan_axis": 0, "multi_device": "auto", "max_group_bytes": 1 << 30}
    assert keyword_defaults(pipeline.merge_checkpoints)["max_group_bytes"] == 1 << 30
    assert keyword_defaults(pipeline.plan_merge)["max_group_bytes"] == 1 << 30
    assert layout.DEFAULT_HEAD_PATTERNS == ("lm_head*",)
    assert layout.LeafRules() == layout.LeafRules(layout="flax", include=None, exclude=(), head_patterns=("lm_head*",),
                                                  input_axes=(), scan_patterns=None, scan_axis=0, others="mean")
    assert layout.DEFAULT_INPUT_AXES == {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1, "q_proj/kernel": 1,
                                         "k_proj/kernel": 1, "v_proj/kernel": 1, "out/kernel": 2, "o_proj/kernel": 2}


def test_sharding_defaults():
    assert sharding.DEFAULT_SHARD_BYTES == 256 * 2**20
    assert keyword_defaults(sharding.should_shard) == {"threshold_bytes": 256 * 2**20, "itemsize": 4}


def test_merge_config_defaults(tmp_path):
    want = {"scale": None, "include": None, "exclude": None, "head_patterns": None, "others": "mean",
            "input_axes": None, "scan_patterns": None, "scan_axis": 0, "multi_device": "auto", "layout": "auto",
            "dtype": None, "out_dtype": None, "format": "auto", "out_format": "auto",
            "out_shard_size": 5 * 10**9, "grams": None, "allow_download": False}
    assert DEFAULT_SHARD_SIZE == 5 * 10**9  # mergekit's "5B": 5·10⁹ bytes per output file
    fields = {f.name: f.default for f in dataclasses.fields(MergeConfig)}
    assert {k: fields[k] for k in want} == want
    # parse_config fills absent keys with its own defaults: they must be the same
    for name in ("base", "e1", "e2"):
        ckio.save(tmp_path / f"{name}.safetensors", {"w": np.ones((2, 2), np.float32)})
    config = parse_config({"base_model": "base.safetensors", "models": ["e1.safetensors", "e2.safetensors"],
                           "merge_method": "swudi"}, base_dir=tmp_path)
    assert {k: getattr(config, k) for k in want} == want
    assert config.leaf_rules().head_patterns == ("lm_head*",)
