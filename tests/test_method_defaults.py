"""Every default of every method, pinned: changing one must be a deliberate edit of this file."""

from __future__ import annotations

import pytest

import swudi_jax as sj
from swudi_jax.methods import registry

DEFAULTS = {
    "swudi": ({"time": 1300.0, "rank_ratio": 0.65, "init": "sum", "solver": "auto", "weight": 1.0}, 1.0),
    "swudi_a": ({"rank_rule": "participation_sqrt", "min_rank": 1, "max_rank_ratio": 1.0, "init": "sum",
                 "solver": "auto", "weight": 1.0}, 1.0),
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
    "passthrough": ({"scale": None}, 1.0),
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
