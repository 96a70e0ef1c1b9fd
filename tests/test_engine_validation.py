"""Bad input to the engine gets a ValueError that names the argument and the offending value,
raised before any compute (issue 2, "What bad input gets")."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_task_vectors

import swudi_jax as sj
from swudi_jax.maths import filters
from swudi_jax.maths.spectral import Spectrum

TAU = random_task_vectors(0, 2, 7, 13)
"""A shape no other test compiles for, so a call that did compute would have to trace."""

LAYER_FUNCTIONS = {
    "swudi": sj.swudi,
    "swudi_a": sj.swudi_a,
    "swudi_a_rank": sj.swudi_a_rank,
    "pinv_merge": sj.pinv_merge,
    "spectral_merge": lambda tau: sj.spectral_merge(tau, filters.exponential(1.0)),
    "wudi_gd": sj.wudi_gd,
}


@contextlib.contextmanager
def no_compute():
    """Fail if JAX traces anything (the first step of any computation) inside the block."""
    traced = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            traced.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not traced, f"JAX traced/compiled before the ValueError: {traced[:3]}"


def raises_before_compute(match: str):
    @contextlib.contextmanager
    def both():
        with no_compute(), pytest.raises(ValueError, match=match):
            yield

    return both()


# ------------------------------------------------------------------------------- tau itself


@pytest.mark.parametrize("fn", sorted(LAYER_FUNCTIONS))
@pytest.mark.parametrize("bad,match", [
    (TAU[0], r"tau must have shape \(N, m, n\).*got shape \(7, 13\)"),
    (TAU[None], r"tau must have shape \(N, m, n\).*got shape \(1, 2, 7, 13\)"),
    (TAU[:1], r"tau must stack at least 2 task vectors.*got shape \(1, 7, 13\)"),
    (TAU[:, :0], r"tau has an empty axis: shape \(2, 0, 13\)"),
    (TAU.astype(np.int32), r"tau must have a floating dtype, got int32"),
    (TAU > 0, r"tau must have a floating dtype, got bool"),
    (TAU.astype(np.complex64), r"tau must have a floating dtype, got complex64"),
    ([["a"]], r"tau must have a floating dtype"),
], ids=["rank-2", "rank-4", "one-task", "empty", "int32", "bool", "complex", "strings"])
def test_bad_task_vector_stack_is_rejected(fn, bad, match):
    with raises_before_compute(match):
        LAYER_FUNCTIONS[fn](bad)


@pytest.mark.parametrize("fn", sorted(LAYER_FUNCTIONS))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_task_vectors_are_rejected_with_their_position(fn, value):
    tau = TAU.copy()
    tau[1, 3, 5] = value
    with raises_before_compute(r"tau contains 1 non-finite value\(s\) \(NaN/Inf\); first at index \(1, 3, 5\)"):
        LAYER_FUNCTIONS[fn](tau)


def test_non_array_task_vectors_are_rejected():
    with raises_before_compute(r"tau must have a floating dtype, got object"):
        sj.swudi(object())


# ------------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs,match", [
    ({"time": -1.0}, r"time must be >= 0.0, got -1.0"),
    ({"time": float("nan")}, r"time must be a finite number, got nan"),
    ({"time": "1300"}, r"time must be a finite number, got '1300'"),
    ({"rank_ratio": 0.0}, r"rank_ratio must be > 0.0, got 0.0"),
    ({"rank_ratio": 1.5}, r"rank_ratio must be <= 1.0, got 1.5"),
    ({"rank_ratio": -0.2}, r"rank_ratio must be > 0.0, got -0.2"),
    ({"init": "avg"}, r"init must be one of \['mean', 'sum', 'zero'\], got 'avg'"),
])
def test_bad_swudi_options_are_rejected(kwargs, match):
    with raises_before_compute(match):
        sj.swudi(TAU, **kwargs)


@pytest.mark.parametrize("fn", [sj.swudi_a, sj.swudi_a_rank])
@pytest.mark.parametrize("kwargs,match", [
    ({"rank_rule": "bogus"}, r"unknown rank_rule 'bogus'; choose one of \[.*'participation_sqrt'"),
    ({"min_rank": 0}, r"min_rank must be >= 1, got 0"),
    ({"min_rank": 2.5}, r"min_rank must be an integer, got 2.5"),
    ({"max_rank_ratio": 0.0}, r"max_rank_ratio must be > 0.0, got 0.0"),
    ({"max_rank_ratio": 2.0}, r"max_rank_ratio must be <= 1.0, got 2.0"),
])
def test_bad_swudi_a_options_are_rejected(fn, kwargs, match):
    with raises_before_compute(match):
        fn(TAU, **kwargs)


def test_bad_swudi_a_init_is_rejected():
    with raises_before_compute(r"init must be one of .*got 'first'"):
        sj.swudi_a(TAU, init="first")


@pytest.mark.parametrize("filter_fn", ["exponential", None, 0.5], ids=["name", "none", "number"])
def test_spectral_merge_rejects_a_filter_that_is_not_callable(filter_fn):
    with raises_before_compute(r"filter_fn must be a callable h\(eigenvalues\), got "):
        sj.spectral_merge(TAU, filter_fn)


def test_spectral_merge_rejects_an_unknown_init():
    with raises_before_compute(r"init must be one of .*got 'ones'"):
        sj.spectral_merge(TAU, filters.identity(), init="ones")


@pytest.mark.parametrize("kwargs,match", [
    ({"optimizer": "adam"}, r"optimizer must be an optax.GradientTransformation, got 'adam'"),
    ({"optimizer": optax.adam}, r"optimizer must be an optax.GradientTransformation, got <function adam"),
    ({"optimizer": 1e-5}, r"optimizer must be an optax.GradientTransformation, got 1e-05"),
    ({"steps": -1}, r"steps must be >= 0, got -1"),
    ({"steps": 3.0}, r"steps must be an integer, got 3.0"),
    ({"init": "random"}, r"init must be one of .*got 'random'"),
    ({"gradient": "exact"}, r"gradient must be one of \['gram', 'reference'\], got 'exact'"),
    ({"trajectory_every": -2}, r"trajectory_every must be >= 0, got -2"),
])
def test_bad_wudi_gd_options_are_rejected(kwargs, match):
    with raises_before_compute(match):
        sj.wudi_gd(TAU, **kwargs)


# ------------------------------------------------------------------------ filter factories


@pytest.mark.parametrize("make,match", [
    (lambda: filters.exponential(-1.0), r"time must be a finite number >= 0, got -1.0"),
    (lambda: filters.exponential(float("inf")), r"time must be a finite number >= 0, got inf"),
    (lambda: filters.landweber(-0.1, 5), r"step must be a finite number >= 0, got -0.1"),
    (lambda: filters.landweber(0.1, -5), r"steps must be an int >= 0, got -5"),
    (lambda: filters.landweber(0.1, 2.5), r"steps must be an int >= 0, got 2.5"),
    (lambda: filters.tikhonov(-1.0), r"alpha must be a finite number >= 0, got -1.0"),
    (lambda: filters.power(-2.0), r"gamma must be a finite number >= 0, got -2.0"),
    (lambda: filters.top_k(-1), r"k must be an int >= 0, got -1"),
    (lambda: filters.top_k(2.0), r"k must be an int >= 0, got 2.0"),
    (lambda: filters.top_ratio(0.0), r"rank_ratio must lie in \(0, 1\], got 0.0"),
    (lambda: filters.top_ratio(1.01), r"rank_ratio must lie in \(0, 1\], got 1.01"),
    (lambda: filters.cumulative_variance(0.0), r"fraction must lie in \(0, 1\], got 0.0"),
    (lambda: filters.product(), r"product\(\) needs at least one filter"),
    (lambda: filters.get_rank_rule("median"), r"unknown rank_rule 'median'"),
])
def test_bad_filter_parameters_are_rejected_when_the_filter_is_built(make, match):
    with raises_before_compute(match):
        make()


# ------------------------------------------------ layer functions that take several arrays


def _layer():
    tau = jnp.asarray(random_task_vectors(1, 3, 4, 6))
    eq = sj.normal_equation(tau)
    return tau, eq, sj.spectrum(eq.c)


def test_mismatched_weights_are_rejected_by_the_operator_builders():
    tau, _, _ = _layer()
    for fn in (sj.interference_operator, sj.right_hand_side):
        with pytest.raises(ValueError, match=r"weights must have shape \(N,\) = \(3,\) for tau of shape "
                                             r"\(3, 4, 6\), got \(2,\)"):
            fn(tau, jnp.ones(2))


def test_mismatched_shapes_are_rejected_by_the_filtered_solution():
    tau, eq, spec = _layer()
    with pytest.raises(ValueError, match=r"theta0 \(3, 6\) and d \(4, 6\) must have one shape"):
        sj.filtered_solution(eq.theta0[:3], eq.d, spec, jnp.ones(6))
    with pytest.raises(ValueError, match=r"eigenvectors \(6, 6\).*h \(5,\)"):
        sj.filtered_solution(eq.theta0, eq.d, spec, jnp.ones(5))
    with pytest.raises(ValueError, match=r"eigenvectors \(5, 5\)"):
        sj.filtered_solution(eq.theta0, eq.d, Spectrum(jnp.ones(5), jnp.eye(5)), jnp.ones(5))


def test_mismatched_shapes_are_rejected_by_the_wudi_loss():
    tau, _, _ = _layer()
    with pytest.raises(ValueError, match=r"theta must have the shape \(m, n\) = \(4, 6\) of one task vector "
                                         r"in tau \(3, 4, 6\), got \(4, 5\)"):
        sj.wudi_loss(jnp.zeros((4, 5)), tau)


# -------------------------------------------------------------------- what is not an error


def test_zero_task_vectors_are_not_an_error():
    out = sj.swudi(np.zeros_like(TAU))
    np.testing.assert_array_equal(out, np.zeros_like(TAU[0]))


def test_integer_valued_options_of_numpy_type_are_accepted():
    out = sj.swudi_a(TAU, min_rank=np.int64(2), max_rank_ratio=np.float32(0.5))
    assert out.shape == TAU.shape[1:]
