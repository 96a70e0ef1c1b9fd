"""Hyperparameters as traced values: ``jax.jit(sj.swudi)(tau, time=300.0)`` runs, a sweep over
``time`` is one compilation (or one ``jax.vmap``), and an option that sets a shape, a loop or a
branch is refused naming it and saying it must be a static Python number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_task_vectors, rel_err

import swudi_jax as sj
from swudi_jax.methods import registry

TAU = random_task_vectors(0, 3, 16, 12)


def test_jit_of_swudi_with_time_as_a_keyword_equals_the_eager_call():
    assert rel_err(jax.jit(sj.swudi)(TAU, time=300.0), sj.swudi(TAU, time=300.0)) <= 1e-6


TRACEABLE = [
    (sj.swudi, "time", 300.0, {}),
    (sj.swudi, "tikhonov_alpha", 0.01, {}),
    (sj.swudi, "gamma", 2.0, {}),
    (sj.swudi, "time", 50.0, {"tikhonov_alpha": 0.01, "gamma": 0.5}),  # the family's path
    (sj.iwudi, "time", 100.0, {}),
    (sj.iwudi, "alpha", 0.1, {"filter": "tikhonov"}),
    (sj.iwudi, "eta_ratio", 0.5, {"filter": "landweber", "steps": 20}),
]


@pytest.mark.parametrize("fn, name, value, others", TRACEABLE)
def test_traced_option_equals_the_static_one_and_one_compilation_serves_every_value(fn, name, value, others):
    jitted = jax.jit(lambda tau, v: fn(tau, **{name: v}, **others))
    for v in (value, 2 * value):
        assert rel_err(jitted(TAU, v), fn(TAU, **{name: v}, **others)) <= 1e-6
    assert jitted._cache_size() == 1


def test_a_sweep_over_time_runs_under_vmap():
    times = jnp.array([10.0, 300.0, 1300.0])
    swept = jax.vmap(lambda t: sj.swudi(TAU, time=t))(times)
    for i, t in enumerate([10.0, 300.0, 1300.0]):
        assert rel_err(swept[i], sj.swudi(TAU, time=t)) <= 1e-6


STATIC = [
    (sj.swudi, "rank_ratio", 0.5, {}),
    (sj.swudi, "alignment", 0.5, {"alignment_reference": 1.0}),
    (sj.swudi, "consensus_power", 1.0, {}),
    (sj.swudi_a, "max_rank_ratio", 0.5, {}),
    (sj.swudi_a, "min_rank", 2, {}),
    (sj.swudi_a, "rank_scale", 0.5, {}),
    (sj.iwudi, "steps", 20, {"filter": "landweber"}),
    (sj.optmerge, "steps", 5, {}),
]


@pytest.mark.parametrize("fn, name, value, others", STATIC)
def test_an_option_that_sets_a_shape_loop_or_branch_is_refused_traced_naming_it(fn, name, value, others):
    with pytest.raises(ValueError, match=f"{name} must be a static Python number, got a traced value"):
        jax.jit(lambda tau, v: fn(tau, **{name: v}, **others))(TAU, value)
    jax.jit(lambda tau: fn(tau, **{name: value}, **others))(TAU)  # closed over: static, runs


def test_pinv_and_swudi_a_run_under_jit():
    assert rel_err(jax.jit(sj.pinv_merge)(TAU), sj.pinv_merge(TAU)) <= 1e-5
    assert rel_err(jax.jit(sj.swudi_a)(TAU), sj.swudi_a(TAU)) <= 1e-6


def test_a_traced_value_must_be_a_real_scalar():
    with pytest.raises(ValueError, match="time must be a real scalar"):
        jax.jit(lambda tau, t: sj.swudi(tau, time=t))(TAU, jnp.ones(2))


def test_whole_model_merge_refuses_traced_options_naming_them():
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=(8, 6)).astype(np.float32)}
    experts = [{"w": base["w"] + 0.1 * rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(2)]
    for method, name, value in [("swudi", "time", 300.0), ("ties", "density", 0.5), ("linear", "weight", 0.5)]:
        with pytest.raises(ValueError, match=rf"\['{name}'\] of method '{method}' are traced values"):
            jax.jit(lambda v: sj.merge(base, experts, method, **{name: v}))(value)


MERGEKIT_TRACEABLE = [("linear", "weight", 0.5), ("slerp", "t", 0.3), ("nearswap", "t", 0.3),
                      ("ties", "density", 0.5), ("breadcrumbs", "density", 0.5), ("dare_ties", "density", 0.5),
                      ("della", "density", 0.5), ("sce", "select_topk", 0.5)]


@pytest.mark.parametrize("method, name, value", MERGEKIT_TRACEABLE)
def test_mergekit_layer_functions_take_their_main_scalar_traced(method, name, value):
    spec = registry.get_method(method)
    options = dict(registry.resolve(spec, {name: value}).options)
    base = TAU[0] * 0.5
    stack = TAU if spec.operand == "task_vectors" else TAU[:2] + base  # slerp and nearswap take two models
    extra = {"base": base} if "base" in spec.inputs else {}
    if "key" in spec.inputs:
        extra["key"] = jax.random.key(0)
    want = spec.fn(stack, **options, **extra)
    got = jax.jit(lambda x, v: spec.fn(x, **{**options, name: v}, **extra))(stack, value)
    assert rel_err(got, want) <= 1e-6
