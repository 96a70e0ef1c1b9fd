"""The low-rank and top-K eigensolver paths give the full path's θ to float rounding.

Equality is checked in float64 (``jax.enable_x64`` inside each test): there the full path's
eigenvalues of C's null space come out at ~1e-16 and clamp to exactly 1e-8, as the fast
paths assume, so rank rules see the same numbers. In float32 the full path's null-space
eigenvalues are rounding noise (~1e-7) that the low-rank path does not reproduce (it is the
exact-arithmetic result), so float32 is compared only where the null space does not matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_task_vectors, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import swudi_jax as sj
from swudi_jax.maths import solvers
from swudi_jax.methods.swudi import resolve_solver, swudi_a_top_count

ALL_RULES = ["participation_sqrt", "entropy", "participation", "stable_rank", "gavish_donoho",
             "cumulative_variance"]


def gapped_task_vectors(seed, dtype=np.float64):
    """4 tasks of rank 2 plus weak noise, n = 160: C has 8 large eigenvalues, then a gap."""
    return random_task_vectors(seed, 4, 64, 160, rank=2, noise=0.02, dtype=dtype)


# ------------------------------------------------------------------------------ low rank


@pytest.mark.parametrize("options", [{}, {"time": 300.0, "rank_ratio": 0.85}, {"rank_ratio": 0.1},
                                     {"init": "zero"}, {"init": "mean", "rank_ratio": 1.0}])
def test_lowrank_swudi_equals_full_path(options):
    with jax.enable_x64(True):
        tau = random_task_vectors(0, 3, 8, 40, dtype=np.float64)
        fast = sj.swudi(tau, solver="lowrank", **options)
        assert rel_err(fast, sj.swudi(tau, solver="full", **options)) <= 1e-11


@pytest.mark.parametrize("rule", ALL_RULES)
def test_lowrank_swudi_a_equals_full_path_for_every_rank_rule(rule):
    with jax.enable_x64(True):
        tau = random_task_vectors(1, 4, 6, 50, dtype=np.float64)
        fast = sj.swudi_a(tau, rank_rule=rule, solver="lowrank")
        assert rel_err(fast, sj.swudi_a(tau, rank_rule=rule, solver="full")) <= 1e-11


def test_lowrank_pinv_is_the_exact_pseudo_inverse_solution():
    with jax.enable_x64(True):
        tau = random_task_vectors(2, 3, 8, 40, dtype=np.float64)
        eq = sj.normal_equation(tau)
        exact = np.asarray(eq.d) @ np.linalg.pinv(np.asarray(eq.c), rcond=1e-10, hermitian=True)
        assert rel_err(sj.pinv_merge(tau, solver="lowrank"), exact) <= 1e-10
        # the full path divides its null space's rounding noise (~1e-16) by the 1e-8 floor
        assert rel_err(sj.pinv_merge(tau, solver="full"), exact) <= 1e-6


def test_range_eigh_returns_the_nonzero_eigenpairs_of_c():
    with jax.enable_x64(True):
        rows = np.random.default_rng(3).normal(size=(12, 30))
        lam, v = solvers.range_eigh(jnp.asarray(rows))
        c = rows.T @ rows
        np.testing.assert_allclose(np.asarray(v).T @ np.asarray(v), np.eye(12), rtol=0, atol=1e-12)
        np.testing.assert_allclose(c @ np.asarray(v), np.asarray(v) * np.asarray(lam), rtol=0, atol=1e-12 * lam[-1])
        np.testing.assert_allclose(lam, np.linalg.eigvalsh(c)[-12:], rtol=1e-12)


def test_range_eigh_returns_zero_vectors_for_null_directions_of_dependent_rows():
    with jax.enable_x64(True):
        rows = np.random.default_rng(4).normal(size=(5, 30))
        rows = np.concatenate([rows, rows[:2] + rows[2:4], np.zeros((1, 30))])  # rank 5 of 8 rows
        lam, v = solvers.range_eigh(jnp.asarray(rows))
        assert np.all(np.asarray(lam[:3]) == 1e-8)
        assert np.all(np.asarray(v[:, :3]) == 0.0)
        np.testing.assert_allclose(np.asarray(v[:, 3:]).T @ np.asarray(v[:, 3:]), np.eye(5), rtol=0, atol=1e-12)


@settings(max_examples=5, deadline=None)
@given(n_tasks=st.integers(2, 4), m=st.integers(1, 6), extra=st.integers(1, 20), seed=st.integers(0, 99),
       time=st.sampled_from([30.0, 300.0, 1300.0]), ratio=st.sampled_from([0.05, 0.3, 0.65, 1.0]))
def test_lowrank_equals_full_on_random_wide_layers(n_tasks, m, extra, seed, time, ratio):
    with jax.enable_x64(True):
        tau = random_task_vectors(seed, n_tasks, m, n_tasks * m + extra, dtype=np.float64)
        fast = sj.swudi(tau, time=time, rank_ratio=ratio, solver="lowrank")
        assert rel_err(fast, sj.swudi(tau, time=time, rank_ratio=ratio, solver="full")) <= 1e-10


def test_lowrank_is_refused_for_a_tall_stack():
    tau = random_task_vectors(0, 4, 16, 20)
    with pytest.raises(ValueError, match="lowrank"):
        sj.swudi(tau, solver="lowrank")


# ------------------------------------------------------------------------------- top K


def test_subspace_iteration_converges_to_the_top_eigenpairs_on_a_gapped_spectrum():
    with jax.enable_x64(True):
        c = sj.normal_equation(gapped_task_vectors(0)).c
        result = solvers.subspace_iteration(c, 8)
        assert bool(result.converged) and int(result.iterations) < 200
        lam, v = np.linalg.eigh(np.asarray(c))
        np.testing.assert_allclose(result.eigenvalues, lam[-8:], rtol=1e-12)
        overlap = np.abs(np.asarray(result.eigenvectors).T @ v[:, -8:])
        # 1 − |cos| is quadratic in the angle, which the 100-ulp residual check keeps ≲ 1e-13
        np.testing.assert_allclose(np.diag(overlap), 1.0, rtol=0, atol=1e-12)


def test_top_eigh_falls_back_to_the_full_eigh_when_the_residual_check_fails():
    c = sj.normal_equation(random_task_vectors(4, 4, 64, 160, rank=16, noise=0.3)).c
    assert not bool(solvers.subspace_iteration(c, 8, max_iters=1).converged)
    lam, v = solvers.top_eigh(c, 8, max_iters=1)
    full_lam, full_v = jnp.linalg.eigh(c)
    np.testing.assert_array_equal(lam, jnp.maximum(full_lam[-8:], 1e-8))
    np.testing.assert_array_equal(v, full_v[:, -8:])


# top K is iterative: it stops at a residual of 100 ulp·λmax, so 1e-11 rather than 1e-12 in float64
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-11), (np.float32, 1e-5)])
@pytest.mark.parametrize("options", [{"rank_ratio": 0.05}, {"rank_ratio": 0.05, "time": 300.0, "init": "zero"}])
def test_topk_swudi_equals_full_path(dtype, tol, options):
    with jax.enable_x64(dtype == np.float64):
        tau = gapped_task_vectors(5, dtype)
        fast = sj.swudi(tau, solver="topk", **options)
        assert fast.dtype == dtype
        assert rel_err(fast, sj.swudi(tau, solver="full", **options)) <= tol


@pytest.mark.parametrize("rule", list(solvers.TRACE_RANK_RULES))
def test_topk_swudi_a_equals_full_path_for_trace_rank_rules(rule):
    with jax.enable_x64(True):
        tau = gapped_task_vectors(6)
        options = {"rank_rule": rule, "max_rank_ratio": 0.1}
        fast = sj.swudi_a(tau, solver="topk", **options)
        assert rel_err(fast, sj.swudi_a(tau, solver="full", **options)) <= 1e-11  # iterative top K, as above


def test_topk_is_refused_where_the_full_spectrum_is_needed():
    tau = gapped_task_vectors(0, np.float32)
    with pytest.raises(ValueError, match="topk"):
        sj.swudi_a(tau, rank_rule="entropy", solver="topk")
    with pytest.raises(ValueError, match="topk"):
        sj.pinv_merge(tau, solver="topk")


def test_solver_paths_work_under_vmap_over_stacked_layers():
    with jax.enable_x64(True):
        layers = np.stack([gapped_task_vectors(s) for s in (7, 8)])
        batched = jax.vmap(lambda t: sj.swudi(t, rank_ratio=0.05, solver="topk"))(layers)
        for i in range(2):
            assert rel_err(batched[i], sj.swudi(layers[i], rank_ratio=0.05, solver="full")) <= 1e-11  # iterative


# ---------------------------------------------------------------------------- the choice


def test_auto_picks_lowrank_topk_or_full_by_shape_and_k():
    assert solvers.choose_solver((4, 100, 512)) == "lowrank"
    assert solvers.choose_solver((4, 128, 512)) == "full"  # N·m = n: not strictly smaller
    assert solvers.choose_solver((4, 1024, 4096), top=41) == "topk"
    assert solvers.choose_solver((4, 1024, 4096), top=500) == "full"
    assert solvers.choose_solver((4, 512, 512), top=5) == "full"  # n < 1024
    assert resolve_solver("auto", (4, 1024, 4096), None) == "full"


def test_auto_never_picks_topk_for_rank_rules_that_need_the_full_spectrum():
    shape = (2, 1100, 1024)
    for rule in ALL_RULES:
        top = swudi_a_top_count(rule, 1, 0.05, shape[-1])
        expected = "topk" if rule in solvers.TRACE_RANK_RULES else "full"
        assert resolve_solver("auto", shape, top) == expected


def test_unknown_solver_is_rejected_by_name():
    tau = random_task_vectors(0, 2, 4, 6)
    for call in (sj.swudi, sj.swudi_a, sj.pinv_merge):
        with pytest.raises(ValueError, match="solver"):
            call(tau, solver="lanczos")


def test_lowrank_in_float32_is_as_close_to_float64_as_the_full_path():
    tau = random_task_vectors(11, 4, 8, 256, rank=2)
    with jax.enable_x64(True):
        exact = sj.swudi(tau.astype(np.float64), solver="lowrank")
    fast, full = sj.swudi(tau, solver="lowrank"), sj.swudi(tau, solver="full")
    assert fast.dtype == np.float32
    assert rel_err(fast, exact) <= max(2.0 * rel_err(full, exact), 1e-5)


def test_lowrank_handles_a_stack_of_lower_rank_than_its_rows():
    with jax.enable_x64(True):
        tau = random_task_vectors(12, 4, 8, 64, rank=2, noise=0.0, dtype=np.float64)  # rank 8 of 32 rows
        fast = sj.swudi(tau, solver="lowrank")
        assert np.all(np.isfinite(np.asarray(fast)))
        assert rel_err(fast, sj.swudi(tau, solver="full")) <= 1e-11
