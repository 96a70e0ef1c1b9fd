"""The diagonal QP of output-space merging, its basis variant and the residual-energy score ρ.

Reference values are computed from the calibration inputs X themselves (never from the
Grams the code uses), in float64 with NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swudi_jax import output_space_qp, residual_energy_score
from swudi_jax.methods.output_space import qp_merge, row_systems
from swudi_jax.methods.registry import get_method, resolve_options


def problem(seed=0, n_tasks=3, m=5, n=7, tokens=(20, 16, 24)):
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(n_tasks, m, n))
    xs = [rng.normal(size=(n, tokens[k % len(tokens)])) + 0.3 * k for k in range(n_tasks)]
    grams = np.stack([x @ x.T for x in xs])
    return tau, xs, grams


def direct_rho(delta, tau, xs, weights=None):
    """1 − Σk ωk ‖(Δ − Δk) Xk‖² / Σk ωk ‖Δk Xk‖², straight from the activations."""
    weights = np.ones(len(xs)) if weights is None else weights
    loss = sum(w * np.sum(((delta - t) @ x) ** 2) for w, t, x in zip(weights, tau, xs))
    energy = sum(w * np.sum((t @ x) ** 2) for w, t, x in zip(weights, tau, xs))
    return 1.0 - loss / energy


def brute_force_diagonal_qp(tau, xs, weights):
    """Least squares over all m·K coefficients at once: Σk ωk ‖(Σj diag(aj) Δj − Δk) Xk‖²."""
    n_tasks, m, _ = tau.shape
    rows, rhs = [], []
    for k, (w, x) in enumerate(zip(weights, xs)):
        for i in range(m):
            block = np.zeros((x.shape[1], m * n_tasks))
            for j in range(n_tasks):
                block[:, i * n_tasks + j] = tau[j, i] @ x
            rows.append(np.sqrt(w) * block)
            rhs.append(np.sqrt(w) * (tau[k, i] @ x))
    coeffs, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(rhs), rcond=None)
    coeffs = coeffs.reshape(m, n_tasks)
    return np.einsum("ij,jin->in", coeffs, tau)


def test_per_row_closed_form_equals_brute_force_least_squares():
    tau, xs, grams = problem()
    weights = np.array([1.0, 0.5, 2.0])
    with jax.enable_x64(True):
        merged, rho = output_space_qp(tau, grams, weights=weights, ridge=0.0)
        expected = brute_force_diagonal_qp(tau, xs, weights)
        np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-12, atol=1e-12)
        assert float(rho) == pytest.approx(direct_rho(expected, tau, xs, weights), abs=1e-12)


def test_rho_lies_in_unit_interval_and_equals_one_minus_optimal_loss_over_energy():
    for seed in range(3):
        tau, xs, grams = problem(seed)
        with jax.enable_x64(True):
            merged, rho = output_space_qp(tau, grams, ridge=0.0)
            optimum = brute_force_diagonal_qp(tau, xs, np.ones(3))
            loss = sum(np.sum(((optimum - t) @ x) ** 2) for t, x in zip(tau, xs))
            energy = sum(np.sum((t @ x) ** 2) for t, x in zip(tau, xs))
            assert 0.0 <= float(rho) <= 1.0
            assert float(rho) == pytest.approx(1.0 - loss / energy, abs=1e-12)
            # ... which is also Σi b_iᵀ a_i / E at the exact solution.
            systems = row_systems(jnp.asarray(tau), jnp.asarray(grams), jnp.ones(3))
            coeffs = np.linalg.solve(np.asarray(systems.h), np.asarray(systems.b)[..., None])[..., 0]
            assert float(rho) == pytest.approx(float(np.sum(np.asarray(systems.b) * coeffs) / systems.energy), abs=1e-12)


def test_task_arithmetic_and_averaging_are_feasible_points_the_score_reproduces():
    tau, xs, grams = problem(1)
    with jax.enable_x64(True):
        _, rho_qp = output_space_qp(tau, grams, ridge=0.0)
        for delta in (0.3 * tau.sum(0), tau.mean(0), tau.sum(0)):
            score = float(residual_energy_score(delta, tau, grams))
            assert score == pytest.approx(direct_rho(delta, tau, xs), abs=1e-12)
            assert score <= float(rho_qp) + 1e-12


def test_identity_basis_equals_the_diagonal_qp():
    tau, _, grams = problem(2)
    merged, rho = output_space_qp(tau.astype(np.float32), grams.astype(np.float32))
    rotated, rho_rotated = output_space_qp(tau.astype(np.float32), grams.astype(np.float32), basis=np.eye(5))
    np.testing.assert_allclose(np.asarray(rotated), np.asarray(merged), rtol=1e-5, atol=1e-5)
    assert float(rho_rotated) == pytest.approx(float(rho), abs=1e-6)


def test_rotated_basis_rho_is_the_score_of_its_merge_and_bounded_by_regmean():
    from swudi_jax import regmean

    tau, xs, grams = problem(3)
    q, _ = np.linalg.qr(np.random.default_rng(9).normal(size=(5, 5)))
    with jax.enable_x64(True):
        unconstrained = float(residual_energy_score(regmean(tau, grams, alpha=1.0), tau, grams))
        for basis in ("energy", q):
            merged, rho = output_space_qp(tau, grams, basis=basis, ridge=0.0)
            assert float(rho) == pytest.approx(direct_rho(np.asarray(merged), tau, xs), abs=1e-12)
            assert 0.0 <= float(rho) <= unconstrained + 1e-12


def test_rows_the_data_never_reaches_take_the_task_arithmetic_weight():
    rng = np.random.default_rng(4)
    tau = rng.normal(size=(3, 4, 6))
    tau[:, 0, :3] = 0.0  # row 0 only reads features 3..5, which the data never activates
    x = np.concatenate([rng.normal(size=(3, 30)), np.zeros((3, 30))])
    grams = np.stack([x @ x.T] * 3)
    merged, _ = output_space_qp(tau.astype(np.float32), grams.astype(np.float32), fallback_weight=0.3)
    np.testing.assert_allclose(np.asarray(merged)[0], 0.3 * tau[:, 0].sum(0), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(merged)))


def test_general_targets_with_local_cross_moments_equal_the_local_qp():
    tau, _, grams = problem(5)
    tau, grams = jnp.asarray(tau, jnp.float32), jnp.asarray(grams, jnp.float32)
    w = jnp.ones(3)
    cross = jnp.einsum("knp,kip->kni", grams, tau)  # Ck = Gk Δkᵀ
    energy = jnp.einsum("kin,knp,kip->k", tau, grams, tau)
    local, rho_local, _ = qp_merge(tau, grams, w)
    general, rho_general, _ = qp_merge(tau, grams, w, cross=cross, target_energy=energy)
    np.testing.assert_allclose(np.asarray(general), np.asarray(local), rtol=1e-4, atol=1e-4)
    assert float(rho_general) == pytest.approx(float(rho_local), abs=1e-4)


def test_vmap_over_a_layer_stack_equals_a_loop():
    stacks = [problem(s) for s in range(3)]
    tau = np.stack([s[0] for s in stacks]).astype(np.float32)
    grams = np.stack([s[2] for s in stacks]).astype(np.float32)
    merged, rho = jax.vmap(lambda t, g: output_space_qp(t, g))(tau, grams)
    for layer in range(3):
        one, one_rho = output_space_qp(tau[layer], grams[layer])
        np.testing.assert_allclose(np.asarray(merged[layer]), np.asarray(one), rtol=1e-5, atol=1e-5)
        assert float(rho[layer]) == pytest.approx(float(one_rho), abs=1e-5)


def test_registered_as_a_data_method_with_its_options():
    method = get_method("output_space")
    assert method.kind == "data"
    assert resolve_options("output_space", {"basis": "energy"})["basis"] == "energy"
    with pytest.raises(ValueError, match="unknown option"):
        resolve_options("output_space", {"alpha": 0.5})
    tau, _, grams = problem(6)
    merged = method.fn(tau.astype(np.float32), grams.astype(np.float32), **method.defaults)
    assert merged.shape == (5, 7)


def test_singular_system_without_ridge_names_the_row_and_tasks():
    tau, _, grams = problem(7)
    tau[2] = tau[1]  # two identical experts: every H_i is singular
    with pytest.raises(ValueError, match=r"row \d+ .*tasks \[1, 2\].*ridge > 0"):
        output_space_qp(tau, grams, ridge=0.0, layer="blocks/0/mlp")
    merged, rho = output_space_qp(tau.astype(np.float32), grams.astype(np.float32))  # the default ridge copes
    assert np.all(np.isfinite(np.asarray(merged))) and 0.0 <= float(rho) <= 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, g: (t, g[:, :-1, :-1]), "grams must have shape"),
        (lambda t, g: (t, g[:2]), "grams must have shape"),
        (lambda t, g: (t, np.where(np.eye(7, dtype=bool), np.nan, g)), "grams contains"),
        (lambda t, g: (t[:1], g[:1]), "at least 2 task vectors"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(change, message):
    tau, _, grams = problem(8)
    tau, grams = change(tau, grams)
    with pytest.raises(ValueError, match=message):
        output_space_qp(tau, grams)


def test_bad_options_are_value_errors():
    tau, _, grams = problem(8)
    with pytest.raises(ValueError, match="orthonormal"):
        output_space_qp(tau, grams, basis=2.0 * np.eye(5))
    with pytest.raises(ValueError, match="basis"):
        output_space_qp(tau, grams, basis="optimal")
    with pytest.raises(ValueError, match="weights"):
        output_space_qp(tau, grams, weights=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="ridge"):
        output_space_qp(tau, grams, ridge=-1.0)
    with pytest.raises(ValueError, match="merged_tau"):
        residual_energy_score(np.zeros((5, 6)), tau, grams)
