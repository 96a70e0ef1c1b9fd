"""The layer maths (MATH.md §1, §3): C, D, θ0, the clamped spectrum and the filtered
estimator, against the NumPy float64 transcription and against the algebra they must obey."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_task_vectors, tau64

import numpy_reference as ref
import swudi_jax as sj
from swudi_jax.maths import filters
from swudi_jax.maths.spectral import anchor, normal_equation, task_weights

SHAPES = [(4, 6, 10), (3, 12, 5), (3, 2, 9)]
"""m < n, m > n (the other association for D), and N·m < n (C rank-deficient)."""


@pytest.mark.parametrize("shape", SHAPES)
def test_interference_operator_rhs_and_anchor_match_their_formulas(shape):
    with jax.enable_x64(True):
        tau = tau64(1, shape)
        eq = normal_equation(tau)
        np.testing.assert_allclose(eq.c, ref.interference_operator(tau), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(eq.d, ref.right_hand_side(tau), rtol=1e-12, atol=1e-14)
        for init in ("sum", "mean", "zero"):
            np.testing.assert_allclose(anchor(jnp.asarray(tau), init), ref.anchor(tau, init), rtol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_interference_operator_has_trace_n_and_is_symmetric_psd(shape):
    with jax.enable_x64(True):
        tau = tau64(2, shape)
        c = np.asarray(normal_equation(tau).c)
        assert abs(np.trace(c) - shape[0]) <= 1e-12 * shape[0]
        np.testing.assert_array_equal(c, c.T)
        lam = np.linalg.eigvalsh(c)
        assert lam.min() >= -1e-12 and lam.max() <= shape[0] + 1e-12
        assert np.linalg.matrix_rank(c, tol=1e-10) == min(shape[2], shape[0] * shape[1])


def test_a_zero_task_vector_adds_nothing_to_the_interference_operator():
    tau = random_task_vectors(3, 3, 4, 6, dtype=np.float64)
    tau[2] = 0.0
    with jax.enable_x64(True):
        w = np.asarray(task_weights(jnp.asarray(tau)))
        assert w[2] == 1e12  # the 1e-12 norm floor, not a division by zero
        assert abs(np.trace(normal_equation(tau).c) - 2.0) <= 1e-12


def test_task_weights_are_inverse_squared_frobenius_norms():
    with jax.enable_x64(True):
        tau = tau64(4, (3, 4, 5))
        np.testing.assert_allclose(task_weights(jnp.asarray(tau)), ref.weights(tau), rtol=1e-14)


def test_rhs_and_anchor_rows_lie_in_the_range_of_c():
    with jax.enable_x64(True):
        tau = tau64(5, (3, 2, 9))  # rank C = 6 < 9: a 3-dimensional null space
        eq = normal_equation(tau)
        lam, v = np.linalg.eigh(np.asarray(eq.c))
        null = v[:, lam < 1e-10]
        assert null.shape[1] == 3
        for rows in (eq.d, eq.theta0):
            assert np.linalg.norm(np.asarray(rows) @ null) <= 1e-13 * np.linalg.norm(rows)


def test_spectrum_is_ascending_orthonormal_and_clamped_at_the_floor():
    with jax.enable_x64(True):
        tau = tau64(6, (3, 2, 9))
        c = normal_equation(tau).c
        lam, v = sj.spectrum(c)
        lam, v = np.asarray(lam), np.asarray(v)
        assert np.all(np.diff(lam) >= 0)
        np.testing.assert_array_equal(lam[:3], np.full(3, filters.EIG_FLOOR))  # null directions
        assert lam[3] > 1e-6
        np.testing.assert_allclose(v.T @ v, np.eye(9), rtol=0, atol=1e-13)
        # the clamp adds 1e-8·Σ v vᵀ over the 3 null directions: entries ≤ 1e-8 (Cauchy–Schwarz)
        np.testing.assert_allclose(v @ np.diag(lam) @ v.T, c, rtol=0, atol=2e-8)
        np.testing.assert_allclose(lam[3:], ref.clamped_spectrum(tau)[0][3:], rtol=1e-12)


def test_filtered_solution_with_no_filter_is_the_anchor_and_with_full_filter_solves_the_normal_equation():
    with jax.enable_x64(True):
        tau = tau64(7, (4, 6, 10))  # C full rank
        eq = normal_equation(tau)
        spec = sj.spectrum(eq.c)
        zeros, ones = jnp.zeros(10), jnp.ones(10)
        np.testing.assert_allclose(sj.filtered_solution(eq.theta0, eq.d, spec, zeros), eq.theta0, rtol=1e-15)
        theta_star = sj.filtered_solution(eq.theta0, eq.d, spec, ones)
        np.testing.assert_allclose(np.asarray(theta_star) @ np.asarray(eq.c), eq.d, rtol=1e-12, atol=1e-12)


def test_filtered_solution_matches_the_two_forms_of_the_estimator():
    # θ_h = θ0 + (θ* − θ0) V diag(h) Vᵀ  =  θ0 − θ0 V diag(h) Vᵀ + D V diag(h/λs) Vᵀ
    with jax.enable_x64(True):
        tau = tau64(8, (4, 6, 10))
        eq = normal_equation(tau)
        lam, v = (np.asarray(a) for a in sj.spectrum(eq.c))
        h = np.linspace(0.0, 1.0, 10)
        theta0, d = np.asarray(eq.theta0), np.asarray(eq.d)
        theta_star = d @ v @ np.diag(1 / lam) @ v.T
        first_form = theta0 + (theta_star - theta0) @ v @ np.diag(h) @ v.T
        got = sj.filtered_solution(eq.theta0, eq.d, sj.spectrum(eq.c), jnp.asarray(h))
        np.testing.assert_allclose(got, first_form, rtol=1e-12, atol=1e-13)


def test_merge_is_linear_in_a_common_scale_of_the_task_vectors():
    # C is scale-free (wi absorbs it), D and θ0 scale with τ: θ(sτ) = s·θ(τ)
    with jax.enable_x64(True):
        tau = tau64(9, (4, 6, 10))
        for merge in (sj.swudi, sj.swudi_a, sj.pinv_merge):
            np.testing.assert_allclose(merge(1e-3 * tau), 1e-3 * np.asarray(merge(tau)), rtol=1e-9, atol=1e-15)


def test_merge_does_not_depend_on_the_order_of_the_experts():
    with jax.enable_x64(True):
        tau = tau64(10, (4, 6, 10))
        perm = tau[[2, 0, 3, 1]]
        for merge in (sj.swudi, sj.swudi_a):
            np.testing.assert_allclose(merge(perm), merge(tau), rtol=1e-10, atol=1e-14)


def test_normal_equation_computes_low_precision_input_in_float32():
    tau = jnp.asarray(random_task_vectors(11, 3, 4, 6), jnp.bfloat16)
    eq = normal_equation(tau)
    assert eq.c.dtype == eq.d.dtype == eq.theta0.dtype == jnp.float32
    assert abs(float(jnp.trace(eq.c)) - 3.0) <= 1e-5


def test_normal_equation_vmaps_over_a_stack_of_layers():
    stack = np.stack([random_task_vectors(s, 3, 4, 6) for s in range(3)])
    batched = jax.jit(jax.vmap(normal_equation))(stack)
    for layer in range(3):
        single = normal_equation(stack[layer])
        for got, want in zip(batched, single):
            np.testing.assert_allclose(got[layer], want, rtol=1e-6, atol=1e-7)


def test_very_tall_layers_project_the_right_hand_side_task_by_task_and_others_form_it():
    from swudi_jax.maths.spectral import projects_per_task

    k = filters.rank_from_ratio(0.65, 384)
    assert projects_per_task((5, 30522, 384), k)  # MiniLM's word embeddings under SWUDI: 37 % fewer flops
    assert not projects_per_task((5, 1536, 384), k)  # 25 % fewer: the smaller products run slower
    assert not projects_per_task((5, 30522, 384), 384)  # every eigenvector kept
    assert not projects_per_task((5, 384, 1536), k) and not projects_per_task((5, 384, 384), k)
    small_k = filters.rank_from_ratio(0.1, 768)  # fewer flops, but the Grams would be as large as the stack
    assert not projects_per_task((8, 768, 768), small_k) and not projects_per_task((8, 1024, 768), small_k)


def test_the_per_task_projection_keeps_c_bit_for_bit_and_gives_the_same_merge():
    from swudi_jax.maths.spectral import (interference_and_grams, interference_and_rhs, project, projected_rhs,
                                          projects_per_task, spectrum)

    tau = jnp.asarray(random_task_vectors(5, 3, 600, 24))
    k = filters.rank_from_ratio(0.65, 24)
    assert projects_per_task(tau.shape, k)
    w = task_weights(tau)
    c, grams = jax.jit(interference_and_grams)(tau, w)
    c_apart, d = jax.jit(interference_and_rhs)(tau, w)
    np.testing.assert_array_equal(c, c_apart)  # the same spectrum, so the same rank rules
    want = np.einsum("kmn,kmp->knp", np.asarray(tau, np.float64), np.asarray(tau, np.float64))
    np.testing.assert_allclose(grams, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    v = spectrum(c).eigenvectors[:, -k:]
    d_v = projected_rhs(tau, w, grams, v)
    np.testing.assert_allclose(d_v, project(d, anchor(tau, "sum"), v)[0], rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(d_v).max()))
    with jax.enable_x64(True):  # the merge through this path against the float64 transcription
        tau64_ = tau64(6, (3, 600, 24))
        np.testing.assert_allclose(sj.swudi(tau64_), ref.swudi(tau64_), rtol=1e-9, atol=1e-11)
